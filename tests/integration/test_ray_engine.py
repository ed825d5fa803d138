"""engine: ray — Flower's simulation runtime; skipped unless the `fedsim[ray]` extra is installed."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedsim.engine import run_scenario
from fedsim.engine.flower import FlowerRunError
from fedsim.scenario import parse_scenario

pytestmark = [pytest.mark.integration, pytest.mark.slow]
HAVE_RAY = importlib.util.find_spec("ray") is not None


@pytest.mark.skipif(HAVE_RAY, reason="checks the message shown when the extra is missing")
def test_clear_error_without_the_extra(tmp_path, tiny_yaml):
    with pytest.raises(FlowerRunError, match=r"pip install -c constraints.txt -e '\.\[ray\]'"):
        run_scenario(parse_scenario(tiny_yaml + "engine: {kind: ray}\n"), tmp_path, progress="none")


@pytest.mark.skipif(not HAVE_RAY, reason="needs the fedsim[ray] extra (pip install -e '.[ray]')")
def test_ray_matches_inprocess(tmp_path, tiny_yaml):
    text = tiny_yaml.replace("rounds: 3", "rounds: 2")
    run_scenario(parse_scenario(text + "engine: {kind: inprocess}\n"), tmp_path / "a", progress="none")
    run_scenario(parse_scenario(text + "engine: {kind: ray}\n"), tmp_path / "b", progress="none")
    a, b = load_file(str(tmp_path / "a/model.safetensors")), load_file(str(tmp_path / "b/model.safetensors"))
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-6
