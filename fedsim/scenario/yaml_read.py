"""fedsim's YAML reader: ``yaml.SafeLoader`` (plain YAML, no python tags) within bounds, so that no
input ends in a traceback: at most ``MAX_BYTES`` of UTF-8 text, ``MAX_DEPTH`` levels of nesting and
``MAX_NODES`` values once aliases are expanded (an "alias bomb" is refused before it is built);
duplicate keys are reported (``line 7: duplicate key 'rounds' in federation (first at line 4)``)
and integers too long to convert are kept as :class:`HugeInt` for the caller to report by path."""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from fedsim.scenario.errors import ScenarioError, clip, path_text, short

MAX_BYTES = 1_000_000      # a scenario file (or one --set value); real ones are a few kB
MAX_DEPTH = 32             # levels of nesting (sections, options, lists), aliases expanded
MAX_NODES = 20_000         # values in the document, aliases expanded (shipped scenarios: < 100)
MAX_INT_CHARS = 40         # longer integer scalars are never converted (int() is slow and capped there)
_MERGE = "tag:yaml.org,2002:merge"
FIX_HINT = "a scenario is a small YAML mapping with name:, data:, model: and federation:"


def decode_text(data: bytes, source: str) -> str:
    """The file's text, or a ScenarioError saying why it is not a UTF-8 text file of sane size."""
    if not data:
        raise ScenarioError(source, [f"the file is empty; {FIX_HINT}"])
    if len(data) > MAX_BYTES:
        raise ScenarioError(source, [f"the file is larger than {MAX_BYTES:,} bytes; {FIX_HINT}"])
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise ScenarioError(source, ["not a text file in UTF-8: it starts with a UTF-16 byte-order mark; "
                                     "save it as UTF-8"])
    try:
        text, bad = data.decode("utf-8"), data.find(b"\0")
    except UnicodeDecodeError as exc:
        nul = data.find(b"\0", 0, exc.start)
        text, bad = "", exc.start if nul < 0 else nul
    if bad < 0:
        return text
    what = "is a NUL byte" if data[bad] == 0 else "is not UTF-8"
    line = data.count(b"\n", 0, bad) + 1
    raise ScenarioError(source, [f"not a text file: byte 0x{data[bad]:02x} at offset {bad} {what} (line {line}); "
                                 "a scenario is a UTF-8 YAML file (save it as UTF-8 text)"])


def read_yaml(text: str, source: str) -> tuple[Any, list[str]]:
    """``yaml.safe_load`` semantics within bounds: (data, duplicate-key problems) or a ScenarioError."""
    if len(text) > MAX_BYTES:
        raise ScenarioError(source, [f"the scenario is {len(text):,} characters long, more than {MAX_BYTES:,}; "
                                     f"{FIX_HINT}"])
    try:
        return load_yaml(text)
    except yaml.YAMLError as exc:
        raise ScenarioError(source, [_yaml_problem(exc, text)]) from None


class Refused(yaml.MarkedYAMLError):
    """A document fedsim will not build (too deep, too many values, a recursive alias)."""


class HugeInt:
    """An integer scalar too long to convert; the scenario loader reports it with its path."""

    __slots__ = ("digits",)

    def __init__(self, text: str):
        self.digits = len(text.replace("_", "").lstrip("+-"))

    def __repr__(self) -> str:
        return f"<an integer of {self.digits} digits>"


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no python tags) bounded in depth, integer length and scalar errors."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = self._nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        self._nodes += 1
        try:
            if self._depth > MAX_DEPTH or self._nodes > MAX_NODES:
                what = f"nests deeper than {MAX_DEPTH} levels" if self._depth > MAX_DEPTH else \
                    f"holds more than {MAX_NODES:,} values"
                raise Refused(problem=f"the YAML {what}; {FIX_HINT}", problem_mark=self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, ArithmeticError, LookupError, AttributeError, TypeError) as exc:   # bad scalar
            tag = str(node.tag).rsplit(":", 1)[-1]
            value = short(node.value) if isinstance(node, ScalarNode) else f"this {node.id}"
            raise yaml.constructor.ConstructorError(
                None, None, f"{value} is not a valid {tag} ({clip(str(exc) or type(exc).__name__, 80)})",
                node.start_mark) from None

    def construct_yaml_int(self, node: Any) -> Any:
        text = self.construct_scalar(node)
        return HugeInt(text) if len(text) > MAX_INT_CHARS else super().construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def load_yaml(text: str) -> tuple[Any, list[str]]:
    """One YAML document as Python data (None when there is none), plus its duplicate-key problems."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, []
        duplicates = _check_nodes(node)
        return loader.construct_document(node), duplicates
    finally:
        loader.dispose()


def _check_nodes(root: Any) -> list[str]:
    """Duplicate keys of every mapping; raise ``Refused`` for a recursive alias or a document whose
    aliases expand beyond ``MAX_NODES`` values or ``MAX_DEPTH`` levels. Linear in the composed
    graph (each node is measured once; an alias reuses the measure), so a bomb is refused fast."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    active: set[int] = set()
    duplicates: list[str] = []
    stack: list[tuple[Any, tuple, bool]] = [(root, (), False)]
    while stack:
        node, path, done = stack.pop()
        key = id(node)
        if done:
            active.discard(key)
            kids = [child for child, _ in _children(node, path)]
            size[key] = 1 + sum(size[id(c)] for c in kids)
            depth[key] = 1 + max((depth[id(c)] for c in kids), default=0)
            if size[key] > MAX_NODES or depth[key] > MAX_DEPTH:
                what = f"expand to more than {MAX_NODES:,} values (an alias bomb?)" if size[key] > MAX_NODES else \
                    f"nest deeper than {MAX_DEPTH} levels"
                raise Refused(problem=f"the aliases (*name) {what}; write the values out or use fewer aliases",
                               problem_mark=node.start_mark)
        elif key in size:
            continue                     # measured already: this is an alias to it
        elif key in active:
            raise Refused(problem="an alias (*name) refers to a collection that contains it (a recursive alias); "
                                   "a scenario is a tree: write the value out", problem_mark=node.start_mark)
        else:
            active.add(key)
            stack.append((node, path, True))
            if isinstance(node, MappingNode):
                duplicates += _duplicates(node, path)
            stack += [(child, sub, False) for child, sub in _children(node, path)]
    return duplicates


def _children(node: Any, path: tuple) -> list[tuple[Any, tuple]]:
    if isinstance(node, SequenceNode):
        return [(child, path + (i,)) for i, child in enumerate(node.value)]
    if isinstance(node, MappingNode):
        out = []
        for k, v in node.value:
            name = k.value if isinstance(k, ScalarNode) else "?"
            out += [(k, path), (v, path + (name,))]
        return out
    return []


def _duplicates(node: MappingNode, path: tuple) -> list[str]:
    """``line L: duplicate key 'k' in section (first at line F)`` for each repeated scalar key."""
    first: dict[tuple[str, str], int] = {}
    out = []
    where = f"in {path_text(path)}" if path else "at the top level"
    for k, _ in node.value:
        if not isinstance(k, ScalarNode) or k.tag == _MERGE:
            continue
        line = k.start_mark.line + 1
        if (k.tag, k.value) in first:
            out.append(f"line {line}: duplicate key {short(k.value)} {where} (first at line "
                       f"{first[(k.tag, k.value)]}); keep only one of them")
        else:
            first[(k.tag, k.value)] = line
    return out


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """One line for a YAML error: where (line, column), what, and what fedsim reads."""
    if isinstance(exc, yaml.reader.ReaderError):
        before = text[:exc.position]
        where = f"line {before.count(chr(10)) + 1}, column {exc.position - before.rfind(chr(10))}: "
        char = exc.character if isinstance(exc.character, str) else chr(exc.character)
        return (f"{where}character U+{ord(char):04X} is not allowed in YAML (a control character); "
                "a scenario is plain UTF-8 text")
    where = _mark(getattr(exc, "problem_mark", None))
    problem = str(getattr(exc, "problem", None) or exc)
    if isinstance(exc, Refused):
        return f"{where}{problem}"
    if isinstance(exc, yaml.constructor.ConstructorError):
        if "could not determine a constructor" in problem:
            return f"{where}unsupported YAML tag ({clip(problem, 160)}); fedsim reads plain YAML only"
        if "unhashable" in problem:
            return f"{where}a list or mapping cannot be a key; keys are plain names such as rounds"
        return f"{where}{clip(problem, 200)}"
    return f"{where}YAML syntax error: {clip(problem, 200)}"


def _mark(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
