"""House rule 1: outside fedsim/flower/, fedsim imports no flwr (checked with flwr blocked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BLOCK_AND_IMPORT = """
import importlib, pkgutil, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "flwr" or name.startswith("flwr."):
            raise ImportError("flwr is blocked in this test")
sys.meta_path.insert(0, Block())
import fedsim
names = [m.name for m in pkgutil.walk_packages(fedsim.__path__, "fedsim.")
         if not m.name.startswith("fedsim.flower")]
for name in names:
    importlib.import_module(name)
assert "flwr" not in sys.modules
print(len(names))
"""


def test_core_modules_import_without_flwr():
    proc = subprocess.run([sys.executable, "-c", BLOCK_AND_IMPORT], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) >= 15


def test_no_flwr_import_statements_outside_flower():
    offenders = [str(p) for p in (ROOT / "fedsim").rglob("*.py") if "flower" not in p.parts
                 and any(line.lstrip().startswith(("import flwr", "from flwr")) for line in p.read_text().splitlines())]
    assert offenders == []
