"""Every command the README shows runs as written, in README order, from a folder laid out like
a fresh clone (its runs/ starts empty). Slow: it trains the quickstart several times.

Catches a README that drifted from the code: a renamed flag or scenario key, a path that does not
exist, a step that depends on a run no earlier step made (the old tour step 6 resumed
``runs/fm``, which nothing had created)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]

#: Commands not run as written, each with the reason (and what is run instead, if anything).
NOT_AS_WRITTEN = {
    "make demo": ("installs and trains the quickstart: this suite runs under that install, and the "
                  "quickstart itself is the tour's first command", None),
    "make test": ("runs this test suite", None),
    ".venv/bin/fedsim sweep benchmarks/papers/dicesgd_digits.yaml --budget-min 30":
        ("a 30-minute budget is longer than the test tier; its grid and cells are checked with --dry-run",
         ".venv/bin/fedsim sweep benchmarks/papers/dicesgd_digits.yaml --dry-run"),
}


def readme_commands(text: str) -> list[str]:
    """The commands of the README's ```bash blocks, in order: continuation lines joined, comments
    dropped (the shell would drop them too)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith("#"):
                out.append(command)
    return out


def test_the_readme_lists_its_commands():
    """The extraction itself: the tour's commands are found (an empty list would pass vacuously)."""
    commands = readme_commands((ROOT / "README.md").read_text())
    assert ".venv/bin/fedsim run scenarios/quickstart.yaml" in commands
    assert sum(c.startswith(".venv/bin/fedsim run") for c in commands) >= 6
    assert set(NOT_AS_WRITTEN) <= set(commands), "a README command listed here no longer exists"


def test_every_readme_command_runs_as_written(tmp_path):
    for name in ("scenarios", "benchmarks", ".venv", "constraints.txt", "pyproject.toml"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{ROOT / '.venv/bin'}:{os.environ['PATH']}"}
    ran, skipped = [], []
    for command in readme_commands((ROOT / "README.md").read_text()):
        reason, instead = NOT_AS_WRITTEN.get(command, (None, command))
        if instead is None:
            skipped.append(f"{command}: {reason}")
            continue
        proc = subprocess.run(["bash", "-c", instead], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"README command failed: {instead}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, f"{instead}\n{proc.stderr[-3000:]}"
        ran.append(instead)
    print(f"\nran {len(ran)} README commands; not as written: {len(skipped)}")
    for line in skipped:
        print("  skipped:", line)
    assert (tmp_path / "runs/qs/summary.json").is_file() and (tmp_path / "runs/comparison.png").is_file()
