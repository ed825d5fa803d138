"""House rule 1 and the one-way layout: the flwr-free packages import no flwr, and there are no
import cycles — none among modules, none between fedsim's subpackages even through imports
inside functions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FLWR_FREE = ("algorithms", "train", "privacy", "data", "models", "scenario", "results", "core", "runtime")

BLOCK_AND_IMPORT = """
import importlib, pkgutil, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "flwr" or name.startswith("flwr."):
            raise ImportError("flwr is blocked in this test")
sys.meta_path.insert(0, Block())
import fedsim
names = [m.name for m in pkgutil.walk_packages(fedsim.__path__, "fedsim.")
         if m.name.split(".")[1] in %r]
for name in names:
    importlib.import_module(name)
assert "flwr" not in sys.modules
print(len(names))
""" % (FLWR_FREE,)


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted((ROOT / "fedsim").rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(tree: ast.AST, module: str, is_pkg: bool, top_level_only: bool) -> set[str]:
    """Absolute names a module imports (``from a import b`` gives ``a`` and ``a.b``)."""
    nodes = []
    if top_level_only:
        for n in tree.body:
            if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.dump(n.test):
                continue
            nodes += n.body + n.orelse if isinstance(n, ast.If) else n.body if isinstance(n, ast.Try) else [n]
    else:
        nodes = list(ast.walk(tree))
    pkg = module if is_pkg else module.rpartition(".")[0]
    out: set[str] = set()
    for n in nodes:
        if isinstance(n, ast.Import):
            out.update(a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                up = pkg.split(".")[: len(pkg.split(".")) - (n.level - 1)]
                base = ".".join(up + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in n.names)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in list(graph):
        if v not in index:
            visit(v)
    return comps


def test_flwr_free_packages_import_without_flwr():
    proc = subprocess.run([sys.executable, "-c", BLOCK_AND_IMPORT], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) >= 30


def test_no_flwr_import_statements_in_flwr_free_packages():
    offenders = []
    for name, path in _modules().items():
        if name.count(".") and name.split(".")[1] in FLWR_FREE:
            tree = ast.parse(path.read_text(encoding="utf-8"))
            if any(i == "flwr" or i.startswith("flwr.") for i in _imports(tree, name, path.name == "__init__.py", False)):
                offenders.append(name)
    assert offenders == []


def test_only_fedsim_flower_imports_flwr():
    """The engines reach Flower's app API through ``fedsim.flower.compat``, so an upgrade audits one
    package. Catches a new ``from flwr...`` anywhere else (imports inside functions included)."""
    offenders = []
    for name, path in _modules().items():
        if name.startswith("fedsim.") and not name.startswith("fedsim.flower"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            if any(i == "flwr" or i.startswith("flwr.") for i in _imports(tree, name, path.name == "__init__.py", False)):
                offenders.append(name)
    assert offenders == []


def test_no_module_import_cycles():
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[name] = {t for t in _imports(tree, name, path.name == "__init__.py", True) if t in mods and t != name}
    # a package importing its own submodules (fedsim.core -> fedsim.core.server -> fedsim.core) is the
    # usual __init__ re-export, not a cycle between modules
    cycles = [c for c in _cycles(graph) if not all(x.startswith(min(c, key=len)) for x in c)]
    assert cycles == []


def test_no_subpackage_import_cycles_even_lazy():
    top = lambda m: ".".join(m.split(".")[:2])       # fedsim.<subpackage or module>
    graph: dict[str, set[str]] = {}
    for name, path in _modules().items():
        if name == "fedsim":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        targets = {top(t) for t in _imports(tree, name, path.name == "__init__.py", False) if t.startswith("fedsim.")}
        graph.setdefault(top(name), set()).update(t for t in targets if t != top(name))
    assert _cycles(graph) == []
    assert "fedsim.engine" not in graph["fedsim.flower"]       # engines run the Flower apps, never the reverse
    assert graph.get("fedsim.runtime", set()) == set()          # the runtime helpers are a leaf
