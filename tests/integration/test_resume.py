"""Resume through the ``fedsim`` command: a corrupt latest checkpoint falls back to the previous
intact one (named in the output), a changed setup is refused with the differing fields listed,
``--force`` overrides, and checkpoints hold any server state (not pickle)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedsim.cli import main
from fedsim.results import read_metrics

TEXT_EXTRA = "engine: {kind: inprocess}\noutput: {checkpoint_every: 1}\n" \
             "lr_schedule: {kind: fedhyper, variant: gm+cl}\n"


@pytest.fixture
def scenario(tmp_path, tiny_yaml) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(tiny_yaml.replace("rounds: 3", "rounds: 4") + TEXT_EXTRA)
    return path


def _run(scenario: Path, out: Path, *extra: str) -> int:
    return main(["run", str(scenario), "--out", str(out), "--quiet", *extra])


def _model(run: Path) -> dict:
    return load_file(str(run / "model.safetensors"))


def test_truncated_latest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, scenario, capfd):
    """Catches a raw SafetensorError traceback, or a resume that silently restarts from round 0."""
    assert _run(scenario, tmp_path / "full") == 0
    assert _run(scenario, tmp_path / "cut") == 0
    latest = tmp_path / "cut" / "checkpoints" / "round-00004.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])            # a crash while a disk filled up
    capfd.readouterr()
    assert main(["run", str(scenario), "--out", str(tmp_path / "cut"), "--resume", "--quiet"]) == 0
    err = capfd.readouterr().err          # said even with --quiet
    assert "round-00004.safetensors is unreadable" in err and "resuming from the previous checkpoint" in err
    a, b = _model(tmp_path / "full"), _model(tmp_path / "cut")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert [r["round"] for r in read_metrics(tmp_path / "cut")] == [1, 2, 3, 4]


def test_no_intact_checkpoint_lists_every_file(tmp_path, scenario, capfd):
    assert _run(scenario, tmp_path / "r") == 0
    for ckpt in (tmp_path / "r" / "checkpoints").glob("round-*.safetensors"):
        ckpt.write_bytes(b"not a checkpoint")
    capfd.readouterr()
    assert _run(scenario, tmp_path / "r", "--resume") == 2
    err = capfd.readouterr().err
    assert "has no intact checkpoint" in err and all(f"round-0000{k}.safetensors" in err for k in range(1, 5))


def test_changed_setup_is_refused_with_the_fields_listed_and_force_overrides(tmp_path, scenario, capfd):
    """Catches a resume that checks only a hash (no fields named) or ignores the fedsim version."""
    assert _run(scenario, tmp_path / "r", "--set", "federation.rounds=2") == 0
    capfd.readouterr()
    code = _run(scenario, tmp_path / "r", "--resume", "--set", "federation.local.lr=0.2",
                "--set", "lr_schedule.beta_g=0.5")
    err = capfd.readouterr().err
    assert code == 2
    assert "differs" in err and "federation.local.lr: 0.1 -> 0.2" in err and "lr_schedule.beta_g: 1.0 -> 0.5" in err
    assert "--force" in err
    assert _run(scenario, tmp_path / "r", "--resume", "--force", "--set", "federation.local.lr=0.2") == 0
    assert [r["round"] for r in read_metrics(tmp_path / "r")] == [1, 2, 3, 4]


def test_another_fedsim_version_is_refused(tmp_path, scenario, capfd, monkeypatch):
    import fedsim

    assert _run(scenario, tmp_path / "r", "--set", "federation.rounds=2") == 0
    monkeypatch.setattr(fedsim, "__version__", "9.9.9")
    capfd.readouterr()
    assert _run(scenario, tmp_path / "r", "--resume") == 2
    assert "fedsim_version: '0.2.0' -> '9.9.9'" in capfd.readouterr().err


def test_force_without_resume_is_a_usage_error(tmp_path, scenario):
    assert _run(scenario, tmp_path / "r", "--force") == 2


def test_checkpoint_holds_the_server_state_tree_and_a_private_client_snapshot(tmp_path, scenario):
    """The GM scheduler's state (a float, a named float64 momentum) and CL's previous update are
    in the checkpoint as arrays plus a JSON skeleton; the client-state snapshot is 0700."""
    import json

    from safetensors import safe_open

    assert _run(scenario, tmp_path / "r", "--set", "federation.rounds=2") == 0
    path = tmp_path / "r" / "checkpoints" / "round-00002.safetensors"
    with safe_open(str(path), framework="np") as f:
        names, meta = list(f.keys()), f.metadata()
    skeleton = json.loads(meta["state"])
    assert "a" in skeleton["d"]["server"]["d"]["optimizer"]["d"]
    assert any(n.startswith("state/server/optimizer/m/") for n in names)
    assert any(n.startswith("state/server/plugins/fedhyper_cl/") for n in names)
    snap = tmp_path / "r" / "checkpoints" / "round-00002.client_state"
    assert snap.is_dir() and snap.stat().st_mode & 0o777 == 0o700
    assert path.stat().st_mode & 0o777 == 0o644 and (tmp_path / "r" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_keep_checkpoints_prunes_old_ones_with_their_snapshots(tmp_path, scenario):
    assert _run(scenario, tmp_path / "r", "--set", "output.keep_checkpoints=2") == 0
    names = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert names == ["round-00003.client_state", "round-00003.safetensors", "round-00004.client_state",
                     "round-00004.safetensors"]


def test_remote_resume_without_output_dir_is_refused_before_submitting(tmp_path, tiny_yaml):
    """A remote run without output.dir keeps nothing to resume from: --resume says so at once
    (instead of a Flower run that fails on the SuperLink), and a relative output.dir, which would
    resolve in the SuperLink's working directory, is a scenario error."""
    from fedsim.engine import run_scenario
    from fedsim.errors import ResumeError
    from fedsim.scenario import ScenarioError, parse_scenario

    base = tiny_yaml + "engine: {kind: flower, superlink: '127.0.0.1:9'}\n"
    with pytest.raises(ResumeError, match="keeps in output.dir"):
        run_scenario(parse_scenario(base), tmp_path / "a", progress="none", resume=True)
    with pytest.raises(ScenarioError, match="output.dir: .* absolute path"):
        run_scenario(parse_scenario(base + "output: {dir: runs/x}\n"), tmp_path / "b", progress="none")


CRASH_IN_WRITE = r"""
import os, signal, sys, tempfile
from pathlib import Path
import fedsim.results.checkpoint as ckpt
real = ckpt.atomic_write_bytes
def dying(path, data, *args, **kwargs):
    path = Path(path)
    if path.name == "round-00003.safetensors":       # SIGKILL half-way through writing it
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.write(fd, data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, data, *args, **kwargs)
ckpt.atomic_write_bytes = dying
from fedsim.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_crash_while_a_checkpoint_is_written_leaves_the_previous_one_to_resume_from(tmp_path, scenario):
    """SIGKILL in the middle of writing round 3's checkpoint (its client-state snapshot already
    written, half the file in a temporary file): --resume continues from round 2 and ends with
    the straight run's model. Catches a checkpoint written in place (a torn round-3 file would be
    taken as the latest) and a resume that trusts the orphaned round-3 snapshot."""
    import subprocess
    import sys

    assert _run(scenario, tmp_path / "full") == 0
    cut = tmp_path / "cut"
    proc = subprocess.run([sys.executable, "-c", CRASH_IN_WRITE, "run", str(scenario), "--out", str(cut), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    left = sorted(p.name for p in (cut / "checkpoints").iterdir())
    assert [n for n in left if n.endswith(".safetensors")] == ["round-00001.safetensors", "round-00002.safetensors"]
    assert any(n.endswith(".tmp") for n in left), left        # the torn write is still there, as after a real crash
    assert _run(scenario, cut, "--resume") == 0
    a, b = _model(tmp_path / "full"), _model(cut)
    diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    print(f"\nleft by the crash: {left}; resumed from round 2; max |straight - resumed| = {diff}")
    assert diff == 0.0
    assert [r["round"] for r in read_metrics(cut)] == [1, 2, 3, 4]
