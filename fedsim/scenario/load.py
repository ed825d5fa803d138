"""Read, override and validate a scenario; every problem is reported at once, with its YAML path.

The YAML itself is read by :mod:`fedsim.scenario.yaml_read` (bounded, duplicate keys reported);
numbers must be finite and fit in 64 bits.

Example:
    >>> scn = parse_scenario(
    ...     "name: t\\ndata: {dataset: digits, partition: {kind: iid, num_clients: 4}}\\n"
    ...     "model: {name: mlp}\\nfederation: {rounds: 1}\\n")
    >>> scn.federation.local.epochs
    1
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from fedsim.scenario.errors import ScenarioError, clip, path_text, short
from fedsim.scenario.yaml_read import FIX_HINT, MAX_BYTES, MAX_DEPTH, HugeInt, Refused, decode_text, load_yaml, read_yaml
from fedsim.scenario.schema import UNION_TAGS, Scenario, check_schedule_strategy, either_or_message

RESERVED_SECTIONS = ("lora",)
INT_LIMIT = 2 ** 63        # integers must fit in 64 bits


# ------------------------------------------------------------------------- reading
def load_scenario(path: str | Path, overrides: Iterable[str] = ()) -> Scenario:
    """Load a YAML scenario file, apply ``--set key.path=value`` overrides, and validate it."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            data = file.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ScenarioError(str(path), [f"cannot read the file: {exc.strerror or exc}"]) from None
    return parse_scenario(decode_text(data, str(path)), source=str(path), overrides=overrides)


def parse_scenario(text: str, source: str = "<scenario>", overrides: Iterable[str] = ()) -> Scenario:
    """Validate scenario YAML text (plus overrides); raise ScenarioError listing every problem."""
    raw, problems = read_yaml(text, source)
    if raw is None:
        raise ScenarioError(source, [f"the file holds no YAML (it is empty or only comments); {FIX_HINT}"])
    if not isinstance(raw, dict):
        raise ScenarioError(source, [f"the file must be a mapping of sections (name:, data:, model:, ...), "
                                     f"not a {'list' if isinstance(raw, list) else type(raw).__name__}"])
    more, overridden = apply_overrides(raw, overrides)
    return validate_dict(raw, source, problems + more, overridden)


# ----------------------------------------------------------------------- overrides
def apply_overrides(raw: dict, overrides: Iterable[str]) -> tuple[list[str], set[str]]:
    """Apply ``key.path=value`` strings to ``raw`` in place; values are parsed as YAML scalars/lists.

    A malformed string (no ``=``, an empty key part, a key through a value) is a ``--set`` problem."""
    problems: list[str] = []
    overridden: set[str] = set()
    for item in overrides:
        item = str(item)
        key, sep, value = item.partition("=")
        parts = [p.strip() for p in key.split(".")]
        problem = _override_key_problem(sep, key, parts)
        parsed = None
        if problem is None:
            parsed, problem = _override_value(value)
        node = raw
        for part in parts[:-1] if problem is None else ():
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                problem = f"'{clip(part, 60)}' is not a section (it holds {short(node[part])})"
                break
            node = node[part]
        if problem is not None:
            problems.append(f"--set {clip(item, 100)}: {problem}")
        else:
            node[parts[-1]] = parsed
            overridden.add(".".join(parts))
    return problems, overridden


def _override_key_problem(sep: str, key: str, parts: list[str]) -> str | None:
    if not sep or not key.strip():
        return "expected key.path=value"
    if not all(parts):
        return "a key part is empty; join the keys with single dots (e.g. --set federation.local.lr=0.1)"
    if len(parts) > MAX_DEPTH:
        return f"the key has more than {MAX_DEPTH} parts; no scenario nests that deep"
    return None


def _override_value(value: str) -> tuple[Any, str | None]:
    """The value of a ``--set`` as YAML (a plain string when it is not YAML), or a problem."""
    if not value.strip():
        return None, None
    if len(value) > MAX_BYTES:
        return None, f"the value is longer than {MAX_BYTES:,} characters"
    try:
        parsed, duplicates = load_yaml(value)
    except Refused as exc:
        return None, f"the value is refused: {exc.problem}"
    except yaml.YAMLError:
        return value, None         # not YAML (or an unsupported tag): taken as a plain string
    if duplicates:
        return None, "the value repeats a key: " + "; ".join(d.split(": ", 1)[-1] for d in duplicates)
    return parsed, None


# ---------------------------------------------------------------------- validation
def validate_dict(raw: dict, source: str = "<scenario>", problems: list[str] | None = None,
                  overridden: set[str] = frozenset()) -> Scenario:
    """Validate a raw mapping; schema errors and cross-section checks are collected together."""
    problems = list(problems or [])
    scn, found = _schema_problems(raw)
    problems += [f"{path}: {msg}{' (from --set)' if path in overridden else ''}" for path, msg in found]
    problems += _guarded(lambda: cross_check(raw), "the cross-section checks")
    if problems:
        raise ScenarioError(source, sorted(dict.fromkeys(problems), key=_path_order))
    return scn  # type: ignore[return-value]


def _schema_problems(raw: dict) -> tuple[Scenario | None, list[tuple[str, str]]]:
    """The schema's ``(path, message)`` problems and the number checks': an integer beyond 64 bits is
    reported instead of what the schema says at its path (maybe nothing), NaN/infinity only where
    the schema says nothing (``options``)."""
    too_big, not_finite = _number_problems(raw)
    scn, found = None, []
    try:
        scn = Scenario.model_validate(raw)
    except ValidationError as exc:
        try:
            found = _merge_members([_format_error(err, raw) for err in exc.errors()])
        except Exception as bug:   # noqa: BLE001 - see _guarded
            found = [("(top level)", _bug("formatting the schema errors", bug))]
    except Exception as bug:   # noqa: BLE001 - anything but a ValidationError is a fedsim bug, not the user's
        found = [("(top level)", _bug("the schema check", bug))]
    big = {path for path, _ in too_big}
    found = [pm for pm in found if pm[0] not in big]
    seen = {path for path, _ in found}
    return scn, found + too_big + [pm for pm in not_finite if pm[0] not in seen]


def _guarded(check: Callable[[], list[str]], what: str) -> list[str]:
    """Run a check; an exception in it (a fedsim bug, never the user's) becomes one problem."""
    try:
        return check()
    except Exception as exc:   # noqa: BLE001 - the CLI promises exit 2 and no traceback for any input
        return [_bug(what, exc)]


def _bug(what: str, exc: BaseException) -> str:
    return (f"internal error in {what} ({type(exc).__name__}: {clip(str(exc), 120)}); this is a fedsim bug, "
            "please report it with the scenario")


def _number_problems(raw: Any) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(path, message)`` for integers beyond 64 bits (keys too) and for NaN/infinity, anywhere."""
    too_big: list[tuple[str, str]] = []
    not_finite: list[tuple[str, str]] = []
    stack: list[tuple[Any, tuple]] = [(raw, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            for k, v in value.items():
                if _too_big(k):
                    too_big.append((path_text(path), f"the key {short(k)} is too large an integer"))
                stack.append((v, path + (k,)))
        elif isinstance(value, (list, tuple)):
            stack += [(v, path + (i,)) for i, v in enumerate(value)]
        elif _too_big(value):
            too_big.append((path_text(path), f"{short(value)} is too large; integers in a scenario must fit "
                                              "in 64 bits (between -2**63 and 2**63 - 1)"))
        elif isinstance(value, float) and not math.isfinite(value):
            not_finite.append((path_text(path), f"Input should be a finite number (got {value!r})"))
    return too_big, not_finite


def _too_big(value: Any) -> bool:
    return isinstance(value, HugeInt) or (type(value) is int and not -INT_LIMIT <= value < INT_LIMIT)


def _path_order(problem: str) -> tuple[int, int, str]:
    line = re.match(r"line (\d+)", problem)     # YAML problems by line, then --set, then by path
    return (0, int(line.group(1)), problem) if line else (1 if problem.startswith("--set") else 2, 0, problem)


def _format_error(err: dict, raw: dict) -> tuple[str, str, bool]:
    """``(path, message, whether it is about one member of a union)`` for one pydantic error."""
    loc, member = _yaml_loc(tuple(err["loc"]), raw)
    return path_text(loc), _message(err, loc, raw), member


_MEMBER = re.compile(r"(str|int|float|bool|none|constrained-\w+|(literal|list|dict|tuple|union|function-\w+)\[.*\])$")


def _yaml_loc(loc: tuple, raw: Any) -> tuple[tuple, bool]:
    """The YAML path of a pydantic error location, and whether the location named a union member:
    drops the union tags (``data.partition.dirichlet.alpha``) and member labels (``engine.devices.list[str]``)."""
    out: list = []
    node, member, skip_next = raw, False, False
    for part in loc:
        if skip_next:
            skip_next = False
            continue
        if isinstance(part, str) and _MEMBER.match(part) and not (isinstance(node, dict) and part in node):
            member = True
            continue
        out.append(part)
        node = node.get(part) if isinstance(node, dict) else \
            node[part] if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node) else None
        if tuple(out) in UNION_TAGS:
            skip_next = True
    return tuple(out), member


def _merge_members(found: list[tuple[str, str, bool]]) -> list[tuple[str, str]]:
    """One problem per path for the errors of a union's members (``a or b (got x)``)."""
    merged: dict[tuple[str, bool], list[str]] = {}
    for path, msg, member in found:
        merged.setdefault((path, member), []).append(msg)
    out = []
    for (path, member), msgs in merged.items():
        got = re.search(r" \(got .*\)$", msgs[0]) if member and len(msgs) > 1 else None
        if got and all(m.endswith(got.group()) for m in msgs):
            msgs = [m[:-len(got.group())] for m in msgs[:-1]] + msgs[-1:]
        out += [(path, " or ".join(msgs))] if member else [(path, m) for m in msgs]
    return out


def _message(err: dict, loc: tuple, raw: dict) -> str:
    kind, ctx = err["type"], err.get("ctx", {})
    if loc and loc[0] in RESERVED_SECTIONS and len(loc) == 1:
        return f"section '{loc[0]}' is reserved for a later fedsim version; remove it"
    if kind == "extra_forbidden":
        return _unknown_key(loc, raw)
    if kind == "missing":
        return "required key is missing"
    if kind == "union_tag_invalid":
        return (f"unknown {ctx.get('discriminator', 'kind').strip(chr(39))} {clip(repr(ctx.get('tag')), 80)}; "
                f"expected one of {ctx.get('expected_tags')}")
    if kind == "union_tag_not_found":
        return f"missing {ctx.get('discriminator', 'kind').strip(chr(39))}; expected one of the known kinds"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()))
        shown = str(bound) if isinstance(bound, int) else f"{bound:g}"      # 4294967295, not 4.29497e+09
        return f"must be {op} {shown} (got {short(err.get('input'))})"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return f"{clip(msg, 300)} (got {short(err.get('input'))})" if kind != "value_error" and "input" in err else msg


def _unknown_key(loc: tuple, raw: dict) -> str:
    known = _known_keys(loc[:-1], raw)
    hint = difflib.get_close_matches(clip(str(loc[-1]), 100), known, n=1)
    text = f"unknown key {short(loc[-1])}"
    if hint:
        return f"{text}; did you mean '{hint[0]}'?"
    return f"{text}; known keys: {', '.join(known)}" if known else text


def _known_keys(loc: tuple, raw: dict) -> list[str]:
    """Field names of the section at ``loc`` (resolving discriminated unions from the raw input)."""
    model: Any = Scenario
    node: Any = raw
    for part in loc:
        node = node.get(part) if isinstance(node, dict) else None
        ann = model.model_fields[part].annotation if part in getattr(model, "model_fields", {}) else None
        model = _resolve(ann, node)
        if model is None:
            return []
    return list(model.model_fields)


def _resolve(ann: Any, node: Any) -> type[BaseModel] | None:
    """The pydantic model class an annotation denotes for this raw node (picks a union member by tag)."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    members = [m for m in _flatten(ann) if isinstance(m, type) and issubclass(m, BaseModel)]
    for member in members:
        for tag_field in ("kind", "name"):
            field = member.model_fields.get(tag_field)
            if field is not None and isinstance(node, dict) and node.get(tag_field) in get_args(field.annotation):
                return member
    return members[0] if len(members) == 1 else None


def _flatten(ann: Any) -> list:
    args = get_args(ann)
    if not args:
        return [ann]
    if get_origin(ann) is not None and str(get_origin(ann)).endswith("Annotated"):
        return _flatten(args[0])
    return [m for a in args for m in _flatten(a)]


def cross_check(raw: dict) -> list[str]:
    """Checks that span sections or need the data/model registries.

    They read the raw mapping defensively, so they report their findings even when other
    parts of the file are invalid (one run of ``fedsim validate`` lists everything).
    """
    from fedsim.data import dataset_names, dataset_options
    from fedsim.models import model_names, model_options

    data, model, fed = (_section(raw, k) for k in ("data", "model", "federation"))
    problems = _check_registry("data.dataset", data.get("dataset"), dataset_names(), dataset_options,
                               "data.options", _section(data, "options"))
    problems += _check_registry("model.name", model.get("name"), model_names(), model_options,
                                "model.options", _section(model, "options"))
    for path, node, a, b in (("federation", fed, "clients_per_round", "fraction"),
                             ("federation.local", _section(fed, "local"), "epochs", "steps")):
        if node.get(a) is not None and node.get(b) is not None:
            problems.append(f"{path}: {either_or_message(a, b)}")
    schedule, strategy = raw.get("lr_schedule"), _section(raw, "strategy")
    kind, server_lr = _section(raw, "lr_schedule").get("kind", "fedhyper"), strategy.get("server_lr", 1.0)
    if isinstance(schedule, dict) and isinstance(strategy.get("name", "fedavg"), str) and isinstance(kind, str) \
            and not isinstance(server_lr, (dict, list)):
        problem = check_schedule_strategy(kind, strategy.get("name", "fedavg"), server_lr)
        problems += [problem] if problem else []
    problems += _privacy_problems(raw.get("privacy"), model.get("name"), strategy.get("name", "fedavg"))
    pruning, privacy = raw.get("pruning"), raw.get("privacy")
    if isinstance(pruning, dict) and isinstance(privacy, dict):
        if privacy.get("unit", "example") == "client":
            problems.append("pruning: AutoFLIP's explorers send unnoised deviations, which client-level DP does not "
                            "cover; use privacy.unit: example (exploration then runs under DP-SGD)")
        if privacy.get("grad_sample_mode") == "ghost":
            problems.append("privacy.grad_sample_mode: ghost clipping has no per-sample gradients to mask before "
                            "clipping, which pruning needs; use auto or hooks")
    if strategy.get("name") == "scaffold" and _section(fed, "local").get("optimizer", "sgd") != "sgd":
        problems.append("federation.local.optimizer: strategy 'scaffold' needs local SGD (its control variates "
                        "are built from SGD steps); set federation.local.optimizer: sgd")
    n, k = _section(data, "partition").get("num_clients"), fed.get("clients_per_round")
    if isinstance(n, int) and isinstance(k, int) and not isinstance(k, bool) and 0 < n < k:
        problems.append(f"federation.clients_per_round: {k} is more than data.partition.num_clients ({n})")
    return problems


def _privacy_problems(privacy: Any, model: Any, strategy: Any) -> list[str]:
    """What does not combine with ``privacy`` in this version (each with the reason)."""
    if not isinstance(privacy, dict):
        return []
    out = []
    if model == "char_lstm" and privacy.get("unit", "example") == "example":
        out.append("model.name: char_lstm cannot train under record-level privacy in this version (Opacus needs "
                   "its DPLSTM layer for per-sample gradients of an LSTM); use mlp or cnn, or privacy.unit: client")
    if strategy == "fedprox" and privacy.get("unit", "example") == "example":
        out.append("strategy.name: fedprox's proximal term has no per-sample gradient, so record-level DP would drop "
                   "it; use fedavg or scaffold with privacy")
    if privacy.get("grad_sample_mode") == "functorch" and model == "cnn":
        out.append("privacy.grad_sample_mode: functorch fails on the cnn's GroupNorm for empty Poisson batches; "
                   "use auto or hooks")
    return out


def _section(node: Any, key: str) -> dict:
    value = node.get(key) if isinstance(node, dict) else None
    return value if isinstance(value, dict) else {}


def _check_registry(path: str, name: Any, known: list[str], options_of: Any, opt_path: str, given: dict) -> list[str]:
    if not isinstance(name, str):
        return []
    if name not in known:
        return [_choice(path, name, known)]
    return _check_options(opt_path, given, options_of(name), name)


def _choice(path: str, value: str, known: list[str]) -> str:
    hint = difflib.get_close_matches(value, known, n=1)
    extra = f"; did you mean '{hint[0]}'?" if hint else ""
    return f"{path}: unknown '{value}'{extra} (known: {', '.join(known)})"


def _check_options(path: str, given: dict, accepted: dict, owner: str) -> list[str]:
    out = []
    for key, value in given.items():
        where = f"{path}.{path_text((key,))}"
        if key not in accepted:
            hint = difflib.get_close_matches(clip(str(key), 100), list(accepted), n=1)
            extra = f"; did you mean '{hint[0]}'?" if hint else ""
            out.append(f"{where}: not an option of '{owner}'{extra} (accepted: {', '.join(accepted) or 'none'})")
        elif accepted[key] is not None and value is not None and not _same_kind(accepted[key], value):
            default = accepted[key]
            items = f" of {type(default[0]).__name__}" if isinstance(default, (list, tuple)) and default else ""
            out.append(f"{where}: expected {type(default).__name__}{items}, got {short(value)}")
    return out


def _same_kind(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and (isinstance(default, float) or isinstance(value, int))
    if isinstance(default, (list, tuple)):     # with items of the kind of the default's items
        return isinstance(value, (list, tuple)) and (not default or all(_same_kind(default[0], v) for v in value))
    return isinstance(value, type(default))


def resolved(scn: Scenario) -> dict:
    """The fully resolved scenario as plain JSON-ready data (defaults filled in)."""
    return scn.model_dump(mode="json")


def result_config(scn: Scenario, *, any_rounds: bool = False) -> dict:
    """Everything in the resolved scenario that changes results: all but ``output``, ``engine``
    (every engine must give the same model; the parity tests hold them to it) and the data's
    location (``data.root``, ``data.cache_dir``: loaders verify content by checksum).

    ``any_rounds``: also leave out ``federation.rounds`` — what a resumed run must match, since
    running longer does not change the rounds already run.
    """
    body = {k: v for k, v in resolved(scn).items() if k not in ("output", "engine")}
    body["data"] = {k: v for k, v in body["data"].items() if k not in ("root", "cache_dir")}   # where, not what
    if any_rounds:
        body["federation"] = {k: v for k, v in body["federation"].items() if k != "rounds"}
    return body


def config_sha256(scn: Scenario, *, any_rounds: bool = False) -> str:
    """Fingerprint of :func:`result_config` (``any_rounds`` as there)."""
    return hashlib.sha256(json.dumps(result_config(scn, any_rounds=any_rounds), sort_keys=True).encode()).hexdigest()


def config_diff(old: Any, new: Any, path: str = "") -> list[str]:
    """The dotted paths where two resolved configs differ, as ``path: old -> new`` lines.

    Example:
        >>> config_diff({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3, "d": 4}})
        ['a.c: 2 -> 3', 'a.d: (absent) -> 4']
    """
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in list(old) + [k for k in new if k not in old]:
            sub = f"{path}.{key}" if path else str(key)
            if key not in new:
                out.append(f"{sub}: {old[key]!r} -> (absent)")
            elif key not in old:
                out.append(f"{sub}: (absent) -> {new[key]!r}")
            else:
                out += config_diff(old[key], new[key], sub)
        return out
    return [] if old == new else [f"{path or '(top level)'}: {old!r} -> {new!r}"]


def to_yaml(scn: Scenario) -> str:
    """The resolved scenario as YAML (what ``config.yaml`` in a run directory holds)."""
    return yaml.safe_dump(resolved(scn), sort_keys=False)


