"""Read, override and validate a scenario; every problem is reported at once, with its YAML path.

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
from pathlib import Path
from typing import Any, Iterable, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from fedsim.scenario.schema import UNION_TAGS, Scenario, check_schedule_strategy, either_or_message

RESERVED_SECTIONS = ("lora",)


class ScenarioError(ValueError):
    """A scenario that cannot run; ``problems`` lists every ``path: message``."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the scenario\n{lines}")


def load_scenario(path: str | Path, overrides: Iterable[str] = ()) -> Scenario:
    """Load a YAML scenario file, apply ``--set key.path=value`` overrides, and validate it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(str(path), [f"cannot read the file: {exc.strerror or exc}"]) from None
    return parse_scenario(text, source=str(path), overrides=overrides)


def parse_scenario(text: str, source: str = "<scenario>", overrides: Iterable[str] = ()) -> Scenario:
    """Validate scenario YAML text (plus overrides); raise ScenarioError listing every problem."""
    raw = _safe_yaml(text, source)
    if not isinstance(raw, dict):
        raise ScenarioError(source, ["the file must be a mapping of sections (name:, data:, model:, ...)"])
    problems, overridden = apply_overrides(raw, overrides)
    return validate_dict(raw, source, problems, overridden)


def _safe_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError as exc:
        where = _mark(exc.problem_mark)
        raise ScenarioError(source, [f"{where}unsupported YAML tag ({exc.problem}); fedsim reads plain YAML only"]) from None
    except yaml.YAMLError as exc:
        where = _mark(getattr(exc, "problem_mark", None))
        reason = getattr(exc, "problem", None) or str(exc)
        raise ScenarioError(source, [f"{where}YAML syntax error: {reason}"]) from None


def _mark(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""


def apply_overrides(raw: dict, overrides: Iterable[str]) -> tuple[list[str], set[str]]:
    """Apply ``key.path=value`` strings to ``raw`` in place; values are parsed as YAML scalars/lists."""
    problems: list[str] = []
    overridden: set[str] = set()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item}: expected key.path=value")
            continue
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            parsed = value
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {} if node.get(part) is None else node[part]
            if not isinstance(node[part], dict):
                problems.append(f"--set {item}: '{part}' is not a section")
                break
            node = node[part]
        else:
            node[parts[-1]] = parsed
            overridden.add(".".join(parts))
    return problems, overridden


def validate_dict(raw: dict, source: str = "<scenario>", problems: list[str] | None = None,
                  overridden: set[str] = frozenset()) -> Scenario:
    """Validate a raw mapping; schema errors and cross-section checks are collected together."""
    problems = list(problems or [])
    scn = None
    try:
        scn = Scenario.model_validate(raw)
    except ValidationError as exc:
        problems += [_format_error(err, raw, overridden) for err in exc.errors()]
    problems += cross_check(raw)
    if problems:
        raise ScenarioError(source, sorted(dict.fromkeys(problems), key=_path_order))
    return scn  # type: ignore[return-value]


def _path_order(problem: str) -> tuple[int, str]:
    return (0 if problem.startswith("--set") else 1, problem)


def _format_error(err: dict, raw: dict, overridden: set[str]) -> str:
    loc = _yaml_loc(tuple(err["loc"]))
    path = ".".join(str(p) for p in loc) or "(top level)"
    msg = _message(err, loc, raw)
    suffix = " (from --set)" if path in overridden else ""
    return f"{path}: {msg}{suffix}"


def _yaml_loc(loc: tuple) -> tuple:
    """Drop the union tags pydantic inserts into error locations (``data.partition.dirichlet.alpha``)."""
    out: list = []
    skip_next = False
    for part in loc:
        if skip_next:
            skip_next = False
            continue
        out.append(part)
        if tuple(out) in UNION_TAGS:
            skip_next = True
    return tuple(out)


def _message(err: dict, loc: tuple, raw: dict) -> str:
    kind, ctx = err["type"], err.get("ctx", {})
    if loc and loc[0] in RESERVED_SECTIONS and len(loc) == 1:
        return f"section '{loc[0]}' is reserved for a later fedsim version; remove it"
    if kind == "extra_forbidden":
        return _unknown_key(loc, raw)
    if kind == "missing":
        return "required key is missing"
    if kind == "union_tag_invalid":
        return f"unknown {ctx.get('discriminator', 'kind').strip(chr(39))} {ctx.get('tag')!r}; expected one of {ctx.get('expected_tags')}"
    if kind == "union_tag_not_found":
        return f"missing {ctx.get('discriminator', 'kind').strip(chr(39))}; expected one of the known kinds"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()))
        return f"must be {op} {bound:g} (got {err.get('input')!r})"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return f"{msg} (got {err.get('input')!r})" if kind not in ("value_error",) and "input" in err else msg


def _unknown_key(loc: tuple, raw: dict) -> str:
    known = _known_keys(loc[:-1], raw)
    hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
    text = f"unknown key '{loc[-1]}'"
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
    if isinstance(schedule, dict) and isinstance(strategy.get("name", "fedavg"), str):
        problem = check_schedule_strategy(schedule.get("kind", "fedhyper"), strategy.get("name", "fedavg"),
                                          strategy.get("server_lr", 1.0))
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
        if key not in accepted:
            hint = difflib.get_close_matches(key, list(accepted), n=1)
            extra = f"; did you mean '{hint[0]}'?" if hint else ""
            out.append(f"{path}.{key}: not an option of '{owner}'{extra} (accepted: {', '.join(accepted) or 'none'})")
        elif accepted[key] is not None and value is not None and not _same_kind(accepted[key], value):
            out.append(f"{path}.{key}: expected {type(accepted[key]).__name__}, got {value!r}")
    return out


def _same_kind(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and (isinstance(default, float) or isinstance(value, int))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
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
