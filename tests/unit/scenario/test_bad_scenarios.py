"""Bad scenario input of every kind ends in one ScenarioError (exit 2, no traceback).

The corpus in ``bad/`` holds one small file per way to get a scenario wrong; its first line says
what it breaks and which text the error must contain (``# breaks: ... | expect: ...``). Inputs that
are awkward to keep in git (binary, latin-1, empty, huge) are written by the tests into tmp_path.
"""

from __future__ import annotations

import math
import re
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsim.cli import main
from fedsim.scenario import Scenario, ScenarioError, load_scenario, parse_scenario
from fedsim.scenario.errors import MAX_LISTED
from fedsim.scenario.yaml_read import MAX_BYTES, MAX_NODES

BAD = Path(__file__).parent / "bad"
HEADER = re.compile(r"# breaks: (?P<what>.+?) \| expect: (?P<expect>.+)$")
VALID = """\
name: t
seed: 0
data: {dataset: digits, partition: {kind: dirichlet, num_clients: 4, alpha: 0.5}}
model: {name: mlp, options: {hidden: [8]}}
federation: {rounds: 1, clients_per_round: 2, local: {epochs: 1, batch_size: 16, lr: 0.1}}
"""
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _corpus() -> list[tuple[Path, str]]:
    out = []
    for path in sorted(BAD.glob("*.yaml")):
        first = path.read_text(encoding="utf-8").split("\n", 1)[0]
        match = HEADER.match(first)
        assert match, f"{path.name}: the first line must be '# breaks: WHAT | expect: TEXT'"
        out.append((path, match["expect"]))
    return out


CORPUS = _corpus()


def _generated() -> dict[str, tuple[bytes, str]]:
    """Bad files written at test time: name -> (bytes, expected text)."""
    big_list = ("x: [" + ",".join(["1"] * 300_000) + "]\n").encode()
    return {
        "empty": (b"", "the file is empty"),
        "binary": (bytes(range(256)) * 4, "not a text file: byte 0x00 at offset 0 is a NUL byte"),
        "png": (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "not a text file: byte 0x89 at offset 0 is not UTF-8"),
        "latin1": (VALID.replace("name: t", "name: caf\xe9").encode("latin-1"),
                   "not a text file: byte 0xe9 at offset 9 is not UTF-8 (line 1); a scenario is a UTF-8 YAML file"),
        "nul": (VALID.encode() + b"seed: 1\0\n", "is a NUL byte (line 6)"),
        "utf16": (VALID.encode("utf-16"), "UTF-16 byte-order mark"),
        "control_char": (VALID.replace("name: t", "name: t\x07").encode(), "character U+0007 is not allowed in YAML"),
        "blank": (b"\n\n   \n", "holds no YAML"),
        "over_1mb": (b"# " + b"x" * (MAX_BYTES + 10) + b"\n", "the file is larger than 1,000,000 bytes"),
        "many_values": (big_list, f"holds more than {MAX_NODES:,} values"),
    }


GENERATED = sorted(_generated())


def _problems(text: str, overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, overrides=overrides)
    return info.value.problems


def _validate_cli(path: Path, capfd: pytest.CaptureFixture[str]) -> str:
    code = main(["validate", str(path)])
    out, err = capfd.readouterr()
    assert code == 2, err
    assert "Traceback" not in out + err
    return err


# --------------------------------------------------------------------------------------- corpus
@pytest.mark.parametrize("path, expect", CORPUS, ids=[p.stem for p, _ in CORPUS])
def test_corpus_file_exits_2_with_its_message(path, expect, capfd):
    """Catches any bad input that escapes as a traceback or exit code other than 2 (UnicodeDecodeError,
    RecursionError, OverflowError, a TypeError in a cross check), or whose message loses the path,
    line or reason a user needs (e.g. duplicate keys silently resolved, last one wins)."""
    err = _validate_cli(path, capfd)
    assert expect in err, err
    assert "problem(s) in the scenario" in err


@pytest.mark.parametrize("name", GENERATED)
def test_generated_bad_file_exits_2_with_its_message(name, tmp_path, capfd):
    """Catches load_scenario reading files with path.read_text (UnicodeDecodeError on binary or
    latin-1 files), treating an empty or NUL-filled file as YAML, and parsing multi-megabyte or
    100k-value documents instead of refusing them (unbounded time and memory)."""
    data, expect = _generated()[name]
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(data)
    started = time.perf_counter()
    err = _validate_cli(path, capfd)
    assert expect in err, err
    assert time.perf_counter() - started < 60


def test_corpus_covers_every_section():
    """Catches a corpus that drifts from the schema: every section (and data.partition,
    federation.local) must have at least one bad file whose expected message names it."""
    expects = [expect for _, expect in CORPUS]
    sections = [s for s in Scenario.model_fields] + ["data.partition", "federation.local"]
    missing = [s for s in sections if not any(e.startswith(f"{s}:") or e.startswith(f"{s}.") or
                                               f"{s}: " in e or f"'{s}'" in e for e in expects)]
    assert not missing, f"no bad file for: {missing}"


@pytest.mark.parametrize("stem", ["num_rounds_bigint", "alias_bomb", "dup_federation", "tag_python_os_system",
                                  "partition_alpha_negative"])
def test_run_refuses_before_training(stem, tmp_path, capfd):
    """Catches `fedsim run` starting a federation (or creating its run directory) before the
    scenario is fully validated, or validating less than `fedsim validate` does."""
    path, expect = next((p, e) for p, e in CORPUS if p.stem == stem)
    out_dir = tmp_path / "r"
    started = time.perf_counter()
    code = main(["run", str(path), "--out", str(out_dir), "--quiet"])
    out, err = capfd.readouterr()
    assert code == 2 and expect in err and "Traceback" not in out + err, err
    assert not out_dir.exists()
    assert time.perf_counter() - started < 120


def test_run_refuses_a_binary_file(tmp_path, capfd):
    """Catches `fedsim run` decoding the file itself (a UnicodeDecodeError traceback) instead of
    going through load_scenario's checks."""
    path = tmp_path / "s.yaml"
    path.write_bytes(b"\xff\xd8\xff\xe0JFIF")
    assert main(["run", str(path), "--out", str(tmp_path / "r")]) == 2
    out, err = capfd.readouterr()
    assert "not a text file" in err and "Traceback" not in out + err


# ----------------------------------------------------------------------------- specific guards
def test_alias_bomb_refused_in_bounded_time_and_memory():
    """Catches a loader that expands aliases (billion laughs) while constructing or validating:
    a 10**9-value document must be refused in well under a second of work and a few MB."""
    bomb = VALID + "engine: {devices: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]}\noutput:\n  dir:\n"
    bomb += "".join(f"    - &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10))
    tracemalloc.start()
    started = time.perf_counter()
    try:
        found = _problems(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(found) == 1 and "alias bomb" in found[0] and found[0].startswith("line "), found
    assert time.perf_counter() - started < 10
    assert peak < 20 * 2 ** 20


def test_recursive_alias_and_deep_nesting_are_problems_not_recursion_errors():
    """Catches RecursionError tracebacks from self-referencing anchors (`&a [*a]`) and from
    thousands of nested brackets (PyYAML's composer recurses per level)."""
    assert "recursive alias" in _problems("a: &a [*a]\n")[0]
    assert "recursive alias" in _problems("a: &a {<<: *a}\n")[0]
    found = _problems("a: " + "[" * 5000 + "]" * 5000 + "\n")
    assert found[0].startswith("line 1, column ") and "nests deeper than 32 levels" in found[0]
    deep_via_aliases = "a: &a " + "[" * 20 + "1" + "]" * 20 + "\nb: " + "[" * 20 + "*a" + "]" * 20 + "\n"
    assert "nest deeper than 32 levels" in _problems(deep_via_aliases)[0]


def test_huge_text_refused_before_parsing():
    """Catches parse_scenario feeding megabytes of text to the pure-Python YAML parser."""
    started = time.perf_counter()
    found = _problems("x: " + "y" * (MAX_BYTES + 1))
    assert "more than 1,000,000" in found[0] and time.perf_counter() - started < 1


def test_duplicate_keys_listed_with_the_other_problems():
    """Catches duplicate keys silently resolved (last wins) or reported alone, hiding the rest:
    both duplicates and the schema problem of the same file are listed, in line order first."""
    text = VALID.replace("alpha: 0.5", "alpha: -1") + "seed: 3\nname: u\n"
    found = _problems(text)
    assert found[:2] == ["line 6: duplicate key 'seed' at the top level (first at line 2); keep only one of them",
                         "line 7: duplicate key 'name' at the top level (first at line 1); keep only one of them"]
    assert any(p.startswith("data.partition.alpha: must be > 0") for p in found), found


def test_merge_keys_are_not_duplicates():
    """Catches a duplicate-key check that flags YAML merge keys (`<<: *base` then an explicit key
    overriding a merged one), a legitimate pattern that safe_load accepts."""
    text = VALID.replace("federation: {rounds: 1,", "federation: {<<: {rounds: 5, eval_every: 2}, rounds: 1,")
    scn = parse_scenario(text)
    assert scn.federation.rounds == 1 and scn.federation.eval_every == 2


def test_python_tags_never_run(tmp_path):
    """Catches a loader that is not safe_load-equivalent (yaml.Loader/unsafe_load): the tag must be
    refused and its command never executed."""
    marker = tmp_path / "pwned"
    found = _problems(VALID.replace("name: t", f"name: !!python/object/apply:os.system ['touch {marker}']"))
    assert "unsupported YAML tag" in found[0] and not marker.exists()
    assert "unsupported YAML tag" in _problems(VALID.replace("name: t", "name: !!python/object:os.system {}"))[0]


@pytest.mark.parametrize("value, expect", [
    ("10000000000000000000000", "federation.rounds: 10000000000000000000000 is too large; integers"),
    ("9" * 5000, "federation.rounds: <an integer of 5000 digits> is too large"),
    ("1e400", "federation.rounds: Input should be a valid integer"),
    ("1.0e+400", "federation.rounds: Input should be a finite number (got inf)"),
    (".nan", "federation.rounds: Input should be a finite number (got nan)"),
    ("-9223372036854775809", "federation.rounds: -9223372036854775809 is too large"),
])
def test_huge_numbers_have_paths(value, expect):
    """Catches integers beyond 64 bits accepted by the schema (rounds: 10**22 used to validate),
    ValueError from Python's 4300-digit int() limit escaping the loader, and NaN/inf slipping
    through, each without the YAML path."""
    found = _problems(VALID.replace("rounds: 1", f"rounds: {value}"))
    assert any(p.startswith(expect) for p in found), found


def test_int64_boundary_is_accepted():
    """Catches an integer bound that is off by one or stricter than 64 bits (``seed`` has its own
    32-bit bound, scikit-learn's, and takes its largest value)."""
    big = parse_scenario(VALID.replace("rounds: 1,", f"rounds: {2 ** 63 - 1},"))
    assert big.federation.rounds == 2 ** 63 - 1
    assert parse_scenario(VALID.replace("seed: 0", f"seed: {2 ** 32 - 1}")).seed == 2 ** 32 - 1


def test_message_stays_on_one_screen():
    """Catches a message that lists thousands of lines or echoes a megabyte key: at most
    MAX_LISTED problems are written out (all are kept in .problems), each clipped."""
    text = VALID + "".join(f"k{i}: 1\n" for i in range(500)) + "x" * 900 + "y: 1\n"
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, overrides=["z" * 50_000 + "=1"])
    lines = str(info.value).splitlines()
    assert len(info.value.problems) > 500 and len(lines) == MAX_LISTED + 2
    assert lines[-1].startswith("  ... and ") and max(map(len, lines)) <= 520


@pytest.mark.parametrize("item, expect", [
    ("", "expected key.path=value"),
    ("=", "expected key.path=value"),
    ("=1", "expected key.path=value"),
    ("noequals", "expected key.path=value"),
    ("a..b=1", "a key part is empty"),
    (".seed=1", "a key part is empty"),
    ("seed.=1", "a key part is empty"),
    ("seed.x=1", "'seed' is not a section"),
    ("federation.local.lr.x.y=1", "'lr' is not a section"),
    ("model.options.hidden.0=3", "'hidden' is not a section"),
    (".".join(["a"] * 40) + "=1", "more than 32 parts"),
    ("seed={a: 1, a: 2}", "repeats a key"),
    ("seed=" + "[" * 100 + "]" * 100, "nests deeper than 32 levels"),
    ("seed=" + "9" * 5000, "seed: <an integer of 5000 digits> is too large"),
    ("seed=1e400", "seed: Input should be a valid integer"),
    ("federation.rounds=.inf", "federation.rounds: Input should be a finite number"),
    ("nämé=1", "unknown key 'nämé'"),
    ("x=", "x: unknown key 'x'"),
    ("k" * 100_000 + "=1", "unknown key 'kkkk"),
])
def test_bad_overrides_are_problems(item, expect):
    """Catches `--set` strings that raise (IndexError, ValueError from int(), RecursionError) or
    that are silently applied somewhere odd (an empty key, a path through a scalar)."""
    found = _problems(VALID, (item,))
    assert any(expect in p for p in found), found
    assert all(len(p) < 600 for p in found)


def test_good_overrides_still_apply():
    """Catches an override hardening that rejects valid `--set` strings (spaces around the key
    parts, YAML lists, strings that are not YAML)."""
    scn = parse_scenario(VALID, overrides=[" federation . rounds =3", "model.options.hidden=[4, 4]",
                                           "output.dir=@runs/x"])
    assert scn.federation.rounds == 3 and scn.model.options["hidden"] == [4, 4] and scn.output.dir == "@runs/x"


def test_cross_checks_survive_odd_keys_and_values():
    """Catches cross-section checks that assume string keys and scalar values (an integer key in
    model.options was a TypeError in difflib; a list as lr_schedule.kind produced nonsense)."""
    found = _problems(VALID.replace("hidden: [8]", "hidden: [8], 3: 4"))
    assert "model.options.3: not an option of 'mlp' (accepted: hidden)" in found
    found = _problems(VALID + "lr_schedule: {kind: [1]}\nstrategy: {name: fedavg, server_lr: [1]}\n")
    assert not any("would be ignored" in p for p in found), found


# ----------------------------------------------------------------------------------------- fuzz
def _outcome(text: str, overrides: tuple[str, ...] = ()) -> Scenario | ScenarioError:
    """parse_scenario's result: a Scenario or a ScenarioError; anything else fails the test."""
    try:
        return parse_scenario(text, overrides=overrides)
    except ScenarioError as exc:
        assert exc.problems and all(isinstance(p, str) for p in exc.problems)
        assert not any("fedsim bug" in p for p in exc.problems), exc.problems
        assert len(str(exc)) < 60_000
        return exc


RAW_TOKENS = ["1e400", "1.0e+400", ".nan", "-.inf", ".inf", "9" * 5000, "0x" + "f" * 40, "0x_", "2020-13-45",
              "!!int abc", "!!bool x", "!!timestamp x", "!!python/object/apply:os.system [ls]", "!foo x", "*nope",
              "&a [*a]", "{a: 1, a: 2}", "[", "}", "~", "''", "\"\\x\"", "1:2:3", "0b", "-0", "!!binary 'x'",
              "[" * 40 + "]" * 40, "{<<: 5}", "!!set {a}", "!!omap [a]"]
YAML_PIECES = ["a", "b: ", "seed: ", "rounds: ", "\n", "  ", "- ", "[", "]", "{", "}", ", ", ": ", "&x ", "*x", "&y ",
               "*y", "!!int ", "!!float ", "!!timestamp ", "!!str ", "<<: ", "? ", "'", '"', "#", "---\n", "0x",
               "1", "9", ".", "e+", "_", ":", "2020-", "\t", "\x00", "\x85", "\ufeff", "%YAML 1.1\n", "|\n", ">\n"]
YAMLISH = st.one_of(
    st.text(alphabet=st.sampled_from(list("ab01.9 :-[]{},&*!#|>'\"\n\t%@`~?<=_\\e+x"))
            | st.characters(codec="utf-8"), max_size=120),
    st.lists(st.sampled_from(YAML_PIECES + RAW_TOKENS), max_size=30).map("".join),
)
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=2 ** 62, max_value=2 ** 80),
    st.sampled_from([10 ** 22, -(2 ** 63) - 1, 2 ** 63, 0, -1]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.lists(st.integers() | st.text(max_size=5), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.sampled_from(RAW_TOKENS).map(lambda t: ("RAW", t)),
)


def _paths(node: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, prefix + (i,))
    return out


BASE_RAW = yaml.safe_load(VALID)
BASE_PATHS = _paths(BASE_RAW)


def _mutated(path: tuple, value: object, extra_key: str | None) -> str:
    """VALID with the value at ``path`` replaced (or a new key under it); raw tokens go in as text."""
    raw = yaml.safe_load(VALID)
    node = raw
    for part in path[:-1]:
        node = node[part]
    target = path[-1]
    if extra_key is not None and isinstance(node[target], dict):
        node, target = node[target], extra_key
    node[target] = "__RAW__" if isinstance(value, tuple) else value
    text = yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
    return text.replace("__RAW__", value[1]) if isinstance(value, tuple) else text


@FUZZ
@given(YAMLISH)
def test_fuzz_random_yamlish_text(text):
    """Catches any YAML-level crash escaping read_yaml (ReaderError formatting, ValueError from a
    scalar constructor, RecursionError, an unhandled node shape) on random YAML-looking text."""
    _outcome(text)


@FUZZ
@given(st.sampled_from(BASE_PATHS), VALUES, st.none() | st.sampled_from(["zz", "kind", "name", "1", "<<"]))
def test_fuzz_mutated_valid_scenario(path, value, extra_key):
    """Catches validation crashing (instead of reporting) on a wrong value at any path of a valid
    scenario: huge ints, NaN/inf, lists/dicts where scalars belong, broken YAML tokens."""
    _outcome(_mutated(path, value, extra_key))


@FUZZ
@given(st.sampled_from(BASE_PATHS), VALUES, st.none() | st.sampled_from(["zz", "kind", "name", "1", "<<"]))
def test_fuzz_mutations_that_validate_are_sane(path, value, extra_key):
    """Catches a mutation that is accepted with a non-finite float or an integer beyond 64 bits
    somewhere in the resolved scenario (what later crashes a run with OverflowError)."""
    result = _outcome(_mutated(path, value, extra_key))
    if isinstance(result, Scenario):
        for field_path in _paths(result.model_dump()):
            leaf = result.model_dump()
            for part in field_path:
                leaf = leaf[part]
            if isinstance(leaf, float):
                assert math.isfinite(leaf), field_path
            if isinstance(leaf, int):
                assert -(2 ** 63) <= leaf < 2 ** 63, field_path


KEYS = st.one_of(st.sampled_from([".".join(map(str, p)) for p in BASE_PATHS]), st.text(max_size=30),
                 st.sampled_from(["", ".", "..", "a..b", "seed.x", "name.", "federation.local.lr.z", "é" * 3]))
SET_VALUES = st.one_of(st.text(max_size=30), st.sampled_from(RAW_TOKENS), VALUES.map(str))


@FUZZ
@given(st.lists(st.one_of(st.text(max_size=40), st.builds(lambda k, sep, v: f"{k}{sep}{v}", KEYS,
                                                           st.sampled_from(["=", "==", "", " = "]), SET_VALUES)),
                max_size=4))
def test_fuzz_set_overrides(items):
    """Catches apply_overrides raising on any `--set` string (no '=', empty or dotted-empty keys,
    keys through scalars, unicode, unparsable or hostile YAML values)."""
    _outcome(VALID, tuple(items))
