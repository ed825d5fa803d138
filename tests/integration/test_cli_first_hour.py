"""A new user's first hour with the CLI: every mistake ends in one clear message (exit 2, no
traceback) that says what is wrong and what to type instead; nothing of the user's is overwritten."""

from __future__ import annotations

import json

import pytest

from fedsim.cli import main

@pytest.fixture
def text(tiny_yaml) -> str:
    """The shared tiny scenario, 2 rounds, in-process (6 clients, 3 per round)."""
    return tiny_yaml.replace("rounds: 3", "rounds: 2") + "engine: {kind: inprocess}\n"


@pytest.fixture
def scenario(tmp_path, text):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_out_is_a_file(tmp_path, scenario, capsys):
    """Catches ``FileExistsError`` when ``--out`` names an existing file, and a file that is then
    overwritten or removed."""
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert main(["run", str(scenario), "--out", str(target), "--quiet"]) == 2
    assert "is a file, not a directory" in _err(capsys)
    assert main(["run", str(scenario), "--out", str(target / "run"), "--quiet"]) == 2
    assert "is a file, so the run directory cannot be created under it" in _err(capsys)
    assert target.read_text() == "mine"


def test_out_is_someone_elses_folder(tmp_path, scenario, capsys):
    """A non-empty folder that holds no run is refused unless ``--overwrite``, and even then the
    user's files stay. Catches fedsim writing its files among the user's without a word."""
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("mine")
    assert main(["run", str(scenario), "--out", str(folder), "--quiet"]) == 2
    err = _err(capsys)
    assert "is not empty and holds no fedsim run" in err and "'chapter1.tex'" in err and "--overwrite" in err
    assert sorted(p.name for p in folder.iterdir()) == ["chapter1.tex"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["run", str(scenario), "--out", str(empty), "--quiet"]) == 0
    assert main(["run", str(scenario), "--out", str(folder), "--quiet", "--overwrite"]) == 0
    assert (folder / "chapter1.tex").read_text() == "mine" and (folder / "summary.json").is_file()


def test_an_interrupted_run_says_how_to_resume(tmp_path, scenario, capsys, monkeypatch):
    """Ctrl-C after a checkpoint prints the exact resume command (on one line, with the --set
    overrides), and a second plain ``run`` on that folder points to ``--resume`` again; the printed
    command then finishes the run. Catches a bare "interrupted" and a hint without the overrides."""
    from fedsim.flower import runner

    out = tmp_path / "run"
    original = runner.ServerLoop._maybe_checkpoint

    def stop_after_round_1(self, rnd, arrays, wall_s):
        original(self, rnd, arrays, wall_s)
        if rnd == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(runner.ServerLoop, "_maybe_checkpoint", stop_after_round_1)
    args = ["run", str(scenario), "--out", str(out), "--quiet", "--set", "output.checkpoint_every=1"]
    assert main(args) == 130
    err = _err(capsys)
    command = f"fedsim run {scenario} --set output.checkpoint_every=1 --out {out} --resume"
    assert "interrupted" in err and command in err.splitlines()[-1]
    monkeypatch.setattr(runner.ServerLoop, "_maybe_checkpoint", original)
    assert main(args) == 2
    err = _err(capsys)
    assert "holds an interrupted run" in err and command in err
    assert main(command.split()[1:] + ["--quiet"]) == 0
    assert json.loads((out / "summary.json").read_text())["rounds_completed"] == 2


def test_interrupted_without_checkpoints_says_how_to_get_them(tmp_path, scenario, capsys, monkeypatch):
    """Catches a resume hint for a run that cannot be resumed."""
    from fedsim.flower import runner

    def interrupt(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.ServerLoop, "_round", interrupt)
    assert main(["run", str(scenario), "--out", str(tmp_path / "r"), "--quiet"]) == 130
    err = _err(capsys)
    assert "no checkpoint to resume from" in err and "output.checkpoint_every" in err and "--resume" not in err


@pytest.mark.parametrize("overrides,message", [
    (["model.name=char_lstm", "model.options={}"], "model.name: 'char_lstm' cannot be built for data set 'digits'"),
    (["model.name=cnn", "data.dataset=breast_cancer", "model.options={}"],
     "model.name: 'cnn' cannot be built for data set 'breast_cancer'"),
    (["model.name=char_lstm", "data.dataset=breast_cancer", "model.options={}"],
     "model.name: 'char_lstm' cannot take the inputs of data set 'breast_cancer'"),
    (["model.options.hidden=[0]"], "model.options.hidden: every size must be an integer >= 1 (got [0])"),
    (["data.partition.min_size=1000"], "data.partition: the data has only 1437 samples for 6 clients x min_size 1000"),
    (["strategy={name: fedavg, robust: krum, robust_byzantine: 1}"],
     "strategy.robust_byzantine: Krum with f=1 attackers needs more than 2f + 2 = 4 clients per round"),
])
def test_validate_checks_what_needs_the_data(tmp_path, scenario, capsys, overrides, message):
    """``validate`` builds the partition and the model on the data's shapes, so what ``run`` would
    crash on in round 1 is a path-ed problem with exit 2. Catches validate saying "ok" for a model
    that does not fit the data (a traceback in ``run``) and a 0-wide layer that trains to chance."""
    args = ["validate", str(scenario)] + [w for o in overrides for w in ("--set", o)]
    assert main(args) == 2
    assert message in _err(capsys)
    run = ["run", str(scenario), "--out", str(tmp_path / "r"), "--quiet"] + [w for o in overrides for w in ("--set", o)]
    assert main(run) == 2
    assert message in _err(capsys)


@pytest.mark.parametrize("hidden", [2_000_000_000, 80_000_000])
def test_a_model_too_big_to_allocate_is_a_scenario_problem(scenario, hidden):
    """A layer of 2e9 units (559 GiB) exceeds any machine's memory and is refused from its shapes
    alone; one of 8e7 (20 GiB) under a 6 GiB address-space limit fails torch's allocation (or,
    on a small machine, the same size check). Both are ``model.options`` problems with exit 2.
    Catches the allocator's RuntimeError traceback and a size check that allocates to measure."""
    import resource
    import subprocess
    import sys

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    proc = subprocess.run([sys.executable, "-m", "fedsim.cli", "validate", str(scenario), "--set",
                           f"model.options.hidden=[{hidden}]"], capture_output=True, text=True, timeout=120,
                          preexec_fn=limit)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.options: the 'mlp' model " in proc.stderr and "Traceback" not in proc.stderr


def test_validate_ok(scenario, capsys):
    assert main(["validate", str(scenario)]) == 0
    assert f"{scenario}: ok (tiny)" in _err(capsys)


@pytest.fixture
def two_runs(tmp_path, text):
    """Two runs of one scenario that differ in the Dirichlet alpha only."""
    from fedsim.engine import run_scenario
    from fedsim.scenario import parse_scenario

    runs = tmp_path / "runs"
    for alpha in (0.5, 0.1):
        run_scenario(parse_scenario(text.replace("alpha: 0.5", f"alpha: {alpha}")), runs / f"a{alpha}",
                     progress="none")
    return [runs / "a0.5", runs / "a0.1"]


def test_report_tells_runs_of_one_scenario_apart(two_runs, capsys, monkeypatch, tmp_path):
    """The table gains the config keys in which the runs differ, and the plot goes beside the runs
    (not into the current folder) and says where. Catches indistinguishable rows and a
    comparison.png dropped wherever the command was typed."""
    monkeypatch.chdir(tmp_path)
    assert main(["report", *map(str, two_runs)]) == 0
    out = capsys.readouterr()
    assert "data.partition.alpha" in out.out and "0.1" in out.out and "0.5" in out.out
    plot = two_runs[0].parent / "comparison.png"
    assert f"comparison plot: {plot}" in out.err and plot.is_file()
    assert not (tmp_path / "comparison.png").exists()
    from fedsim.results import compare_runs
    assert [r["config"] for r in compare_runs(two_runs)] == [{"data.partition.alpha": 0.5},
                                                            {"data.partition.alpha": 0.1}]


def test_report_on_a_corrupt_run_or_an_unwritable_plot(two_runs, capsys):
    """A corrupt metrics.jsonl line and a plot path that cannot be written end in one message
    naming the file (exit 2), never a traceback after the table."""
    assert main(["report", *map(str, two_runs), "--plot", str(two_runs[0] / "summary.json" / "x.png")]) == 2
    assert "cannot write the plot to" in _err(capsys)
    lines = (two_runs[1] / "metrics.jsonl").read_text().splitlines()
    (two_runs[1] / "metrics.jsonl").write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    assert main(["report", *map(str, two_runs)]) == 2
    assert f"{two_runs[1] / 'metrics.jsonl'}:2: corrupt metrics line" in _err(capsys)


def test_lr_plot_only_with_a_schedule_and_on_two_panels(tmp_path, text):
    """``plots/lr.png`` is drawn for a run with an LR schedule (server and client LR on panels of
    their own) and not for a constant-LR run. Catches the flat-looking client LR on the server
    LR's axis and an lr.png for runs whose LRs never change."""
    from PIL import Image

    from fedsim.engine import run_scenario
    from fedsim.scenario import parse_scenario

    plain = tmp_path / "plain"
    run_scenario(parse_scenario(text), plain, progress="none")
    assert not (plain / "plots/lr.png").exists()
    hyper = tmp_path / "hyper"
    run_scenario(parse_scenario(text + "lr_schedule: {kind: fedhyper, variant: g+cl}\n"), hyper, progress="none")
    width, height = Image.open(hyper / "plots/lr.png").size
    assert width > 1.8 * height, "two panels side by side"


@pytest.mark.parametrize("overrides,note", [
    (["data.root=/srv/data"], "note: data.root: 'digits' is bundled with its package, so data.root (/srv/data) is not used"),
    (["data.partition={kind: shards, num_clients: 6, classes_per_client: 10}"],
     "note: data.partition: shards with classes_per_client 10 >= the 10 classes gives every client every class"),
])
def test_settings_without_the_expected_effect_are_said(scenario, capsys, overrides, note):
    """``validate`` (and ``run``, as a warning) says when a setting does nothing or not what it
    seems: a data.root for a bundled set, shards that give every client every class. Catches the
    silent IID split and the silently ignored root."""
    assert main(["validate", str(scenario)] + [w for o in overrides for w in ("--set", o)]) == 0
    assert note in _err(capsys)


def test_commands_in_messages_are_never_wrapped(scenario, capsys, monkeypatch):
    """Output that is not a terminal (CI logs, pipes) is not hard-wrapped at 80 columns, so a command
    a message suggests can be copied whole. Catches ``sudo apt-get install ...`` split across lines."""
    import fedsim.federation
    from fedsim.data import DataUnavailableError

    command = "sudo apt-get install -y dataset-fashion-mnist   # or put the four idx files into data.root"
    message = "fashion_mnist: the idx files are not in /usr/share/datasets/fashion-mnist nor in data.root; " + command

    def unavailable(*args, **kwargs):
        raise DataUnavailableError(message)

    monkeypatch.setattr(fedsim.federation, "load_dataset", unavailable)
    monkeypatch.setattr(fedsim.federation, "_CACHE", type(fedsim.federation._CACHE)())   # no federation built earlier
    assert main(["validate", str(scenario)]) == 0
    assert command in _err(capsys)
    assert main(["run", str(scenario), "--out", str(scenario.parent / "r"), "--quiet"]) == 2
    assert command in _err(capsys)
