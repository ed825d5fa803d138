"""The sweep grid file: parse, validate (every problem at once, with its path), expand into cells.

A cell is one run: the base scenario + the grid's ``overrides`` + its method's overrides + one
value per axis (written to the key the axis maps to for that method) + ``seed=<s>`` + the command
line's ``--set``. Its id is built from its content (method, axis values, seed), never from its
position, so adding values to an axis later keeps the ids (and the finished runs) of the others.

Example:
    >>> g = parse_grid("scenario: s.yaml\\naxes: {federation.local.lr: [0.01, 0.1]}\\nseeds: [0, 1]\\n",
    ...                base_dir=".", check_files=False)
    >>> [c.id for c in g.cells()]
    ['federation.local.lr=0.01__seed=0', 'federation.local.lr=0.1__seed=0', 'federation.local.lr=0.01__seed=1', 'federation.local.lr=0.1__seed=1']
    >>> g.cells()[1].overrides
    ('federation.local.lr=0.1', 'seed=0')
"""

from __future__ import annotations

import difflib
import fnmatch
import itertools
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedsim.scenario.errors import ScenarioError
from fedsim.scenario.yaml_read import MAX_BYTES, decode_text, read_yaml
from fedsim.scenario.schema import SEED_MAX

__all__ = ["Axis", "Cell", "Grid", "GridError", "Method", "load_grid", "parse_grid", "select_cells",
           "subset_indices", "value_text"]

TOP_KEYS = ("name", "scenario", "out", "seeds", "target", "combine", "axes", "methods", "baseline", "overrides",
            "metrics")
AXIS_KEYS = ("key", "keys", "values", "label")
METHOD_KEYS = ("label", "overrides")
NAME_RE = re.compile(r"^[A-Za-z0-9_.+\-]+$")
MAX_ID = 200        # file names are limited to 255 bytes
DEFAULT_KEY = "default"


class GridError(ValueError):
    """A sweep that cannot run; ``problems`` lists every ``path: message``."""

    def __init__(self, source: str, problems: list[str], what: str = "in the sweep grid"):
        self.source, self.problems = source, problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) {what}\n{lines}")


@dataclass(frozen=True)
class Axis:
    """One axis: the values it takes and the scenario key it sets (per method, else ``default``)."""

    name: str
    values: tuple[Any, ...]
    keys: dict[str, str]
    label: str

    def key_for(self, method: str | None) -> str:
        return self.keys.get(method or "", self.keys.get(DEFAULT_KEY, ""))


@dataclass(frozen=True)
class Method:
    """A named list of overrides (``strategy.name=fedavg``, ...) applied to every cell of the method."""

    name: str
    label: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Cell:
    """One run of the sweep. ``overrides`` is every ``--set`` in application order; ``own`` only the
    cell-specific ones (method, axes, seed), for display."""

    id: str
    method: str | None
    point: tuple[tuple[str, Any], ...]
    seed: int
    overrides: tuple[str, ...]
    own: tuple[str, ...]

    @property
    def values(self) -> dict[str, Any]:
        return dict(self.point)


@dataclass(frozen=True)
class Grid:
    """A validated grid file (see the package docstring for the format)."""

    source: Path
    name: str
    scenario: Path
    out: Path
    axes: tuple[Axis, ...]
    combine: str = "product"
    methods: tuple[Method, ...] = ()
    baseline: str | None = None
    seeds: tuple[int, ...] = (0,)
    target: float | None = None
    overrides: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    extra: tuple[str, ...] = field(default=())   # the command line's --set, applied last

    @property
    def method_names(self) -> list[str]:
        return [m.name for m in self.methods]

    def label(self, method: str | None) -> str:
        return next((m.label for m in self.methods if m.name == method), method or "")

    def points(self, subset: int | None = None) -> list[tuple[tuple[str, Any], ...]]:
        """The axis-value combinations, in grid order (``subset``: K evenly spread values per axis)."""
        if self.combine == "zip":
            idx = subset_indices(len(self.axes[0].values), subset) if subset else range(len(self.axes[0].values))
            return [tuple((a.name, a.values[i]) for a in self.axes) for i in idx]
        picks = [[a.values[i] for i in (subset_indices(len(a.values), subset) if subset else range(len(a.values)))]
                 for a in self.axes]
        return [tuple(zip((a.name for a in self.axes), combo)) for combo in itertools.product(*picks)]

    def cells(self, subset: int | None = None, methods: Sequence[str] | None = None) -> list[Cell]:
        """Every cell: seeds outermost, then the axis points, then the methods (so that all methods of one
        point finish together and a budget-stopped sweep still has whole comparisons)."""
        chosen = [m for m in self.methods if methods is None or m.name in methods]
        if methods is not None:
            chosen.sort(key=lambda m: list(methods).index(m.name))
        return [self._cell(m, point, seed) for seed in self.seeds for point in self.points(subset)
                for m in (chosen if self.methods else [None])]

    def _cell(self, method: Method | None, point: tuple[tuple[str, Any], ...], seed: int) -> Cell:
        own = list(method.overrides) if method else []
        axes = {a.name: a for a in self.axes}
        own += [f"{axes[name].key_for(method.name if method else None)}={override_text(v)}" for name, v in point]
        own.append(f"seed={seed}")
        parts = ([method.name] if method else []) + [f"{n}={_slug(value_text(v))}" for n, v in point] + [f"seed={seed}"]
        return Cell(id="__".join(parts), method=method.name if method else None, point=point, seed=seed,
                    overrides=tuple(self.overrides) + tuple(own) + tuple(self.extra), own=tuple(own))


# ------------------------------------------------------------------ values
def value_text(value: Any) -> str:
    """A value as tables and ids show it: floats with ``%g`` (unless that loses digits), lists as JSON.

    Example:
        >>> value_text(1.0), value_text(0.001), value_text(0.1234567), value_text([16, 32]), value_text(True)
        ('1', '0.001', '0.1234567', '[16,32]', 'true')
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        short = f"{value:g}"
        return short if math.isfinite(value) and float(short) == value else repr(value)
    if isinstance(value, (int, str)):
        return str(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def override_text(value: Any) -> str:
    """The ``--set`` text whose YAML value is ``value`` again (``1e-05`` -> ``1.0e-05``, which YAML 1.1
    reads as a float; strings that look like numbers are quoted)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip()
    return text.removesuffix("...").strip()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+\-]", "_", text)


def subset_indices(n: int, k: int) -> list[int]:
    """``k`` of ``n`` evenly spread indices, corners first: 1 -> centre, 2 -> both ends,
    3 -> ends + centre, ``k >= n`` -> all.

    Example:
        >>> subset_indices(5, 1), subset_indices(5, 2), subset_indices(5, 3), subset_indices(5, 9)
        ([2], [0, 4], [0, 2, 4], [0, 1, 2, 3, 4])
    """
    if k < 1:
        raise ValueError(f"--subset must be >= 1 (got {k})")
    if k >= n:
        return list(range(n))
    if k == 1:
        return [(n - 1) // 2]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


# ------------------------------------------------------------------ parsing
def load_grid(path: str | Path, extra: Iterable[str] = ()) -> Grid:
    """Read and validate a grid file; ``extra``: the command line's ``--set`` overrides (applied last).

    Raises:
        GridError: listing every problem with its path.
    """
    path = Path(path)
    try:
        with path.open("rb") as file:
            data = file.read(MAX_BYTES + 1)
        text = decode_text(data, str(path))
    except OSError as exc:
        raise GridError(str(path), [f"cannot read the grid file: {exc.strerror or exc}"]) from None
    except ScenarioError as exc:             # binary, not UTF-8, empty or too large
        raise GridError(str(path), exc.problems) from None
    return parse_grid(text, base_dir=path.parent, source=str(path), extra=extra)


def parse_grid(text: str, *, base_dir: str | Path, source: str = "<grid>", extra: Iterable[str] = (),
               check_files: bool = True) -> Grid:
    """Validate grid YAML text. ``scenario`` is resolved against ``base_dir`` (the grid file's folder)."""
    try:
        raw, duplicates = read_yaml(text, source)     # bounded like a scenario; duplicate keys are problems
    except ScenarioError as exc:
        raise GridError(source, exc.problems) from None
    if duplicates:
        raise GridError(source, duplicates)
    if not isinstance(raw, dict):
        raise GridError(source, ["the grid file must be a mapping (scenario:, axes:, seeds:, ...)"])
    p = _Parser(source, Path(base_dir), check_files)
    grid = p.grid(raw, list(extra))
    if p.problems:
        raise GridError(source, p.problems)
    return grid


class _Parser:
    def __init__(self, source: str, base_dir: Path, check_files: bool):
        self.source, self.base_dir, self.check_files = source, base_dir, check_files
        self.problems: list[str] = []

    def bad(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def unknown(self, path: str, given: Iterable[Any], known: Sequence[str]) -> None:
        for key in given:
            if key not in known:
                hint = difflib.get_close_matches(str(key), known, n=1)
                extra = f"; did you mean '{hint[0]}'?" if hint else f"; known keys: {', '.join(known)}"
                self.bad(f"{path}{key}", f"unknown key{extra}")

    def grid(self, raw: dict, extra: list[str]) -> Grid:
        self.unknown("", raw, TOP_KEYS)
        scenario = self.scenario(raw.get("scenario"))
        methods = self.methods(raw.get("methods"))
        names = [m.name for m in methods]
        axes = self.axes(raw.get("axes"), names)
        combine = raw.get("combine", "product")
        if combine not in ("product", "zip"):
            self.bad("combine", f"must be product or zip (got {combine!r})")
        elif combine == "zip" and len({len(a.values) for a in axes}) > 1:
            lengths = ", ".join(f"{a.name}: {len(a.values)}" for a in axes)
            self.bad("axes", f"combine: zip needs axes of equal length ({lengths})")
        baseline = raw.get("baseline")
        if baseline is not None and baseline not in names:
            self.bad("baseline", f"{baseline!r} is not a method of the grid ({', '.join(names) or 'no methods:'})")
        overrides = self.override_list("overrides", raw.get("overrides", []))
        for i, item in enumerate(extra):
            self.check_override(f"--set {item}", item)
        name = raw.get("name", _slug(Path(self.source).stem).strip("_") or "sweep")
        if not isinstance(name, str) or not NAME_RE.match(name):
            self.bad("name", f"letters, digits and - _ . + only (got {name!r})")
        out = raw.get("out", f"runs/sweeps/{name}")
        if not isinstance(out, str) or not out.strip():
            self.bad("out", f"a folder path (got {out!r})")
            out = "."
        target = raw.get("target")
        if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))
                                   or not 0 < target <= 1):
            self.bad("target", f"an accuracy in (0, 1] (got {target!r})")
            target = None
        metrics = raw.get("metrics", [])
        if not isinstance(metrics, list) or not all(isinstance(m, str) and m for m in metrics):
            self.bad("metrics", f"a list of per-round metric names, e.g. [lr_global] (got {metrics!r})")
            metrics = []
        grid = Grid(source=Path(self.source), name=name if isinstance(name, str) else "sweep", scenario=scenario,
                    out=Path(out), axes=tuple(axes), combine=combine if combine in ("product", "zip") else "product",
                    methods=tuple(methods), baseline=baseline if baseline in names else None,
                    seeds=self.seeds(raw.get("seeds"), scenario), target=None if target is None else float(target),
                    overrides=tuple(overrides), metrics=tuple(metrics), extra=tuple(extra))
        if axes and not self.problems:
            self.check_ids(grid)
        return grid

    def scenario(self, value: Any) -> Path:
        if not isinstance(value, str) or not value.strip():
            self.bad("scenario", "required: the base scenario file, relative to the grid file's folder"
                     if value is None else f"a file path (got {value!r})")
            return Path()
        path = Path(value) if Path(value).is_absolute() else self.base_dir / value
        if self.check_files and not path.is_file():
            self.bad("scenario", f"no file {value} (looked for {path.resolve()}; the path is relative to the "
                     "grid file's folder)")
        return path

    def methods(self, raw: Any) -> list[Method]:
        if raw is None:
            return []
        if not isinstance(raw, dict) or not raw:
            self.bad("methods", "a mapping of method name -> {label, overrides: [key=value, ...]}")
            return []
        out = []
        for name, body in raw.items():
            path = f"methods.{name}"
            if not isinstance(name, str) or not NAME_RE.match(name):
                self.bad(path, "a method name is letters, digits and - _ . + only")
                continue
            if body is None:
                body = {}
            if isinstance(body, list):                 # shorthand: name: [key=value, ...]
                body = {"overrides": body}
            if not isinstance(body, dict):
                self.bad(path, f"a mapping with label and overrides (got {body!r})")
                continue
            self.unknown(f"{path}.", body, METHOD_KEYS)
            label = body.get("label", name)
            if not isinstance(label, str):
                self.bad(f"{path}.label", f"a string (got {label!r})")
                label = name
            out.append(Method(name, label, tuple(self.override_list(f"{path}.overrides", body.get("overrides", [])))))
        return out

    def axes(self, raw: Any, methods: list[str]) -> list[Axis]:
        if not isinstance(raw, dict) or not raw:
            self.bad("axes", "required: a mapping of axis name -> list of values, or -> {key, values, label}")
            return []
        out = []
        for name, body in raw.items():
            path = f"axes.{name}"
            if not isinstance(name, str) or not NAME_RE.match(name):
                self.bad(path, "an axis name is letters, digits and - _ . + only")
                continue
            if isinstance(body, list):                 # shorthand: key.path: [values]
                body = {"key": name, "values": body}
            if not isinstance(body, dict):
                self.bad(path, f"a list of values, or a mapping with key (or keys) and values (got {body!r})")
                continue
            self.unknown(f"{path}.", body, AXIS_KEYS)
            keys = self.axis_keys(path, body, methods)
            values = body.get("values")
            if not isinstance(values, list) or not values:
                self.bad(f"{path}.values", f"a non-empty list (got {values!r})")
                values = []
            texts = [value_text(v) for v in values]
            for text in sorted({t for t in texts if texts.count(t) > 1}):
                self.bad(f"{path}.values", f"{text} appears more than once")
            for i, v in enumerate(values):
                if v is None or isinstance(v, dict):
                    self.bad(f"{path}.values[{i}]", f"a number, string, boolean or list (got {v!r})")
            label = body.get("label", name)
            out.append(Axis(name, tuple(values), keys, label if isinstance(label, str) else name))
        return out

    def axis_keys(self, path: str, body: dict, methods: list[str]) -> dict[str, str]:
        if ("key" in body) == ("keys" in body):
            self.bad(path, "give either key (one scenario key) or keys (per method, with an optional default)")
            return {}
        if "key" in body:
            keys = {DEFAULT_KEY: body["key"]}
        elif not isinstance(body["keys"], dict) or not body["keys"]:
            self.bad(f"{path}.keys", f"a mapping of method name (or default) -> scenario key (got {body['keys']!r})")
            return {}
        else:
            keys = dict(body["keys"])
        for who, key in keys.items():
            where = f"{path}.key" if "key" in body else f"{path}.keys.{who}"
            if who != DEFAULT_KEY and who not in methods:
                hint = difflib.get_close_matches(str(who), methods, n=1)
                self.bad(where, f"'{who}' is not a method of the grid" + (f"; did you mean '{hint[0]}'?" if hint
                                                                          else f" (methods: {', '.join(methods)})"))
            if not isinstance(key, str) or not re.match(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$", key):
                self.bad(where, f"a dotted scenario key such as federation.local.lr (got {key!r})")
            elif key == "seed":
                self.bad(where, "seeds are set with the grid's seeds: list, not with an axis")
        if DEFAULT_KEY not in keys:
            for m in methods:
                if m not in keys:
                    self.bad(f"{path}.keys", f"no key for method '{m}'; add it or a '{DEFAULT_KEY}'")
            if not methods:
                self.bad(f"{path}.keys", f"the grid has no methods: use key: (or keys: {{{DEFAULT_KEY}: ...}})")
        return keys

    def override_list(self, path: str, raw: Any) -> list[str]:
        if not isinstance(raw, list):
            self.bad(path, f"a list of key.path=value strings (got {raw!r})")
            return []
        for i, item in enumerate(raw):
            self.check_override(f"{path}[{i}]", item)
        return [str(x) for x in raw]

    def check_override(self, path: str, item: Any) -> None:
        key, sep, _ = str(item).partition("=") if isinstance(item, str) else ("", "", "")
        if not sep or not key.strip():
            self.bad(path, f"expected key.path=value (got {item!r})")
        elif key.strip() == "seed":
            self.bad(path, "seeds are set with the grid's seeds: list (each cell gets seed=<s>)")

    def seeds(self, raw: Any, scenario: Path) -> tuple[int, ...]:
        if raw is None:
            return (_base_seed(scenario),)
        if not isinstance(raw, list) or not raw:
            self.bad("seeds", f"a non-empty list of integers >= 0 (got {raw!r})")
            return (0,)
        for i, s in enumerate(raw):
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= SEED_MAX:
                self.bad(f"seeds[{i}]", f"an integer from 0 to {SEED_MAX} (got {s!r})")
        dup = sorted({s for s in raw if raw.count(s) > 1}, key=str)
        if dup:
            self.bad("seeds", f"listed more than once: {', '.join(map(str, dup))}")
        return tuple(s for s in raw if isinstance(s, int) and not isinstance(s, bool))

    def check_ids(self, grid: Grid) -> None:
        cells = grid.cells()
        seen: dict[str, Cell] = {}
        for c in cells:
            if c.id in seen:
                self.bad("axes", f"cells {seen[c.id].point} and {c.point} get the same id {c.id}; make the values "
                         "distinct as text")
            seen[c.id] = c
        long = [c.id for c in cells if len(c.id) > MAX_ID]
        if long:
            self.bad("axes", f"cell ids longer than {MAX_ID} characters ({long[0]}); use shorter axis names "
                     "(axes: {short: {key: long.scenario.key, values: [...]}})")


def _base_seed(scenario: Path) -> int:
    """The base scenario file's own ``seed`` (the default of ``seeds``), else 0 (the schema default)."""
    try:
        with scenario.open("rb") as file:
            raw, _ = read_yaml(decode_text(file.read(MAX_BYTES + 1), str(scenario)), str(scenario))
    except (OSError, ScenarioError):
        return 0            # the scenario's own problems are reported when the cells are validated
    seed = raw.get("seed") if isinstance(raw, dict) else None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0 else 0


# ------------------------------------------------------------------ selection
def select_cells(grid: Grid, *, methods: Sequence[str] | None = None, subset: int | None = None,
                 only: Sequence[str] = ()) -> list[Cell]:
    """The cells of one invocation: ``methods`` (the baseline is added first when missing: gains need it),
    ``subset`` (K evenly spread values per axis, corners first), ``only`` (glob patterns over cell ids).

    Raises:
        GridError: unknown methods, a subset < 1, or a pattern that matches no cell.
    """
    problems = []
    if methods is not None:
        methods = list(dict.fromkeys(methods))
        unknown = [m for m in methods if m not in grid.method_names]
        if unknown:
            problems.append(f"--methods: unknown {', '.join(unknown)} (the grid has: "
                            f"{', '.join(grid.method_names) or 'no methods'})")
        if grid.baseline and grid.baseline not in methods:
            methods.insert(0, grid.baseline)
    if subset is not None and subset < 1:
        problems.append(f"--subset: must be >= 1 (got {subset})")
    if problems:
        raise GridError(str(grid.source), problems, "in the command line")
    cells = grid.cells(subset, methods)
    if only:
        unmatched = [p for p in only if not any(fnmatch.fnmatchcase(c.id, p) for c in cells)]
        if unmatched:
            sample = ", ".join(c.id for c in cells[:3])
            raise GridError(str(grid.source), [f"--only {p}: matches no cell (ids look like {sample})"
                                               for p in unmatched], "in the command line")
        cells = [c for c in cells if any(fnmatch.fnmatchcase(c.id, p) for p in only)]
    return cells
