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
