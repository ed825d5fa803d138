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
