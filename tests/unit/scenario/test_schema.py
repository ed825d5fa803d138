"""Scenario validation: one message listing every problem with its YAML path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedsim.scenario import ScenarioError, config_sha256, load_scenario, parse_scenario, to_yaml

ROOT = Path(__file__).resolve().parents[3]


def problems(text: str, overrides=()) -> list[str]:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(text, overrides=overrides)
    return info.value.problems


def test_valid_tiny_resolves_defaults(tiny_yaml):
    scn = parse_scenario(tiny_yaml)
    assert scn.strategy.name == "fedavg" and scn.engine.kind == "workers"
    assert scn.federation.local.steps == 3 and scn.federation.local.epochs is None
    assert parse_scenario(to_yaml(scn)) == scn
    assert config_sha256(scn) == config_sha256(parse_scenario(tiny_yaml))


def test_every_problem_listed_with_paths(tiny_yaml):
    bad = (tiny_yaml.replace("alpha: 0.5", "alpha: -1").replace("rounds: 3", "rouns: 3")
           .replace("lr: 0.1", "lr: 0"))
    found = problems(bad)
    assert any(p.startswith("data.partition.alpha: must be > 0") for p in found), found
    assert any(p.startswith("federation.rouns: unknown key 'rouns'; did you mean 'rounds'") for p in found), found
    assert any(p.startswith("federation.rounds: required") for p in found), found
    assert any(p.startswith("federation.local.lr: must be > 0") for p in found), found


def test_cross_section_checks(tiny_yaml):
    found = problems(tiny_yaml.replace("clients_per_round: 3", "clients_per_round: 9")
                     .replace("dataset: digits", "dataset: digts").replace("name: mlp", "name: cnn, bogus: 1"))
    assert any("federation.clients_per_round: 9 is more than data.partition.num_clients (6)" in p for p in found)
    assert any(p.startswith("data.dataset: unknown 'digts'; did you mean 'digits'") for p in found), found
    assert any(p.startswith("model.bogus: unknown key") for p in found), found


def test_options_checked_against_registries(tiny_yaml):
    found = problems(tiny_yaml.replace("options: {hidden: [16]}", "options: {hiden: [16]}"))
    assert found == ["model.options.hiden: not an option of 'mlp'; did you mean 'hidden'? (accepted: hidden)"]


def test_union_paths_and_unknown_kind(tiny_yaml):
    found = problems(tiny_yaml.replace("kind: dirichlet", "kind: dirichelt"))
    assert len(found) == 1 and found[0].startswith("data.partition: unknown kind 'dirichelt'")
    found = problems(tiny_yaml + "strategy: {name: fedadam, beta_1: 2}\n")
    assert found == ["strategy.beta_1: must be < 1 (got 2)"]


def test_yaml_syntax_and_python_tags_rejected():
    assert problems("name: [unclosed\n")[0].startswith("line 2")
    found = problems("name: !!python/object/apply:os.system ['echo pwned']\n")
    assert "unsupported YAML tag" in found[0]


def test_reserved_sections_and_engines(tiny_yaml):
    found = problems(tiny_yaml + "lora: {rank: 8}\nengine: {kind: spark}\n")
    assert any(p.startswith("lora: section 'lora' is reserved") for p in found), found
    assert any(p.startswith("engine.kind: Input should be 'inprocess', 'workers', 'flower' or 'ray'") for p in found)


def test_overrides(tiny_yaml):
    scn = parse_scenario(tiny_yaml, overrides=["federation.rounds=7", "data.partition.alpha=2"])
    assert scn.federation.rounds == 7 and scn.data.partition.alpha == 2.0
    found = problems(tiny_yaml, overrides=["federation.rounds=-1", "nonsense"])
    assert "--set nonsense: expected key.path=value" in found
    assert any(p.startswith("federation.rounds: must be > 0") and p.endswith("(from --set)") for p in found)


def test_either_or_keys(tiny_yaml):
    found = problems(tiny_yaml.replace("steps: 3", "steps: 3, epochs: 1").replace("clients_per_round: 3",
                                                                                  "clients_per_round: 3\n  fraction: 0.5"))
    assert "federation.local: give either epochs or steps, not both" in found
    assert "federation: give either clients_per_round or fraction, not both" in found


def test_missing_file_is_a_problem(tmp_path):
    with pytest.raises(ScenarioError) as info:
        load_scenario(tmp_path / "nope.yaml")
    assert "cannot read the file" in info.value.problems[0]


@pytest.mark.parametrize("path", sorted((ROOT / "scenarios").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_scenario_validates(path):
    load_scenario(path)


def test_cli_validate_exits_2_without_traceback(tmp_path, tiny_yaml):
    bad = tmp_path / "bad.yaml"
    bad.write_text(tiny_yaml.replace("alpha: 0.5", "alpha: 0").replace("rounds: 3", "rounds: -2"))
    proc = subprocess.run([sys.executable, "-m", "fedsim.cli", "validate", str(bad)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "data.partition.alpha: must be > 0" in proc.stderr
    assert "federation.rounds: must be > 0" in proc.stderr


def test_infinite_values_and_device_lists(tiny_yaml):
    found = problems(tiny_yaml + "lr_schedule: {cl_bounds: [0.1, .inf], alpha0: .inf}\nengine: {devices: [cuda:0, gpu]}\n")
    assert any(p.startswith("lr_schedule.cl_bounds.1: Input should be a finite number") for p in found), found
    assert any(p.startswith("lr_schedule.alpha0: Input should be a finite number") for p in found), found
    assert "engine.devices: use auto, cpu, or a list like [cuda:0, cuda:1] (not ['gpu'])" in found
    assert parse_scenario(tiny_yaml + "engine: {devices: cuda:1}\n").engine.devices == ["cuda:1"]


def test_schedule_owns_the_server_learning_rate(tiny_yaml):
    found = problems(tiny_yaml + "strategy: {name: fedavg, server_lr: 0.5}\nlr_schedule: {kind: fedhyper}\n")
    assert found[0].startswith("strategy.server_lr: 0.5 would be ignored")
    found = problems(tiny_yaml + "strategy: {name: fedadam}\nlr_schedule: {kind: decay}\n")
    assert found[0].startswith("lr_schedule.kind: 'decay' replaces the server optimizer")
    assert parse_scenario(tiny_yaml + "lr_schedule: {kind: fedhyper, preset: reference}\n").lr_schedule.weighting \
        == "uniform"


def test_data_dependent_problems_exit_2_without_traceback(tmp_path, tiny_yaml):
    from fedsim.cli import main
    path = tmp_path / "s.yaml"
    path.write_text(tiny_yaml.replace("num_clients: 6", "num_clients: 5000").replace("clients_per_round: 3",
                                                                                     "clients_per_round: 3"))
    assert main(["run", str(path), "--out", str(tmp_path / "r"), "--quiet"]) == 2
