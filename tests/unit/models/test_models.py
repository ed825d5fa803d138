"""Models build from the registry, run forward, and avoid BatchNorm (DP-compatible)."""

from __future__ import annotations

import pytest
import torch

from fedsim.models import build_model, model_names, model_options


@pytest.mark.parametrize("name,shape,dtype", [("mlp", (1, 8, 8), torch.float32), ("cnn", (1, 8, 8), torch.float32),
                                              ("cnn", (1, 28, 28), torch.float32), ("char_lstm", (80,), torch.long)])
def test_forward_shapes(name, shape, dtype):
    model = build_model(name, input_shape=shape, num_classes=10)
    x = torch.zeros(3, *shape, dtype=dtype)
    assert model(x).shape == (3, 10)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_registry_and_options():
    assert model_names() == ["char_lstm", "cnn", "mlp"]
    assert model_options("mlp") == {"hidden": [128]}
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet", input_shape=(1,), num_classes=2)
    with pytest.raises(ValueError, match="use 'mlp'"):
        build_model("cnn", input_shape=(30,), num_classes=2)


@pytest.mark.parametrize("name", ["mlp", "cnn", "char_lstm"])
def test_options_table_is_what_the_constructor_takes(name):
    """The torch-free option table (what validation accepts) names exactly the constructor's keyword
    options with its defaults: an option added to a model but not to the table would be rejected
    as unknown, one left in the table after removal would crash in round 1."""
    import inspect

    from fedsim.models import MODELS

    params = inspect.signature(MODELS[name]).parameters
    taken = {k: (list(p.default) if isinstance(p.default, tuple) else p.default)
             for k, p in params.items() if k not in ("input_shape", "num_classes")}
    assert taken == model_options(name)


def test_validating_a_scenario_does_not_import_torch():
    """Validation must stay torch-free (a second of start-up, and the workers' zygote starts only
    after it): a registry lookup that imports the model classes would fail this."""
    import subprocess
    import sys

    code = ("import sys; from fedsim.scenario import load_scenario; load_scenario('scenarios/quickstart.yaml'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=__import__("pathlib").Path(__file__).resolve().parents[3])
    assert out.stdout.strip() == "False"
