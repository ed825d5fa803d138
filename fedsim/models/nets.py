"""Small models for federated simulation: MLP, CNN (8x8 and 28x28 inputs) and a character LSTM.

All use GroupNorm rather than BatchNorm, so that the same models work under DP-SGD
(per-sample gradients) and carry no running statistics across clients.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Module):
    """A multi-layer perceptron over flattened inputs.

    Example:
        >>> MLP((1, 8, 8), 10, hidden=(32,))(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (128,)):
        super().__init__()
        sizes = [math.prod(input_shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _groups(channels: int) -> int:
    return math.gcd(channels, 8) or 1


class CNN(nn.Module):
    """Two conv blocks (conv 3x3, GroupNorm, ReLU, max-pool 2) and a two-layer head.

    Works for any square input of side >= 4 (8x8 digits, 28x28 Fashion-MNIST).

    Example:
        >>> CNN((1, 28, 28), 10)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: tuple[int, ...] = (16, 32),
                 hidden: int = 64):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"cnn needs image inputs (C, H, W); got input shape {input_shape} — use 'mlp'")
        in_ch, h, w = input_shape
        blocks: list[nn.Module] = []
        for ch in channels:
            blocks += [nn.Conv2d(in_ch, ch, 3, padding=1), nn.GroupNorm(_groups(ch), ch), nn.ReLU(), nn.MaxPool2d(2)]
            in_ch, h, w = ch, h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"input {input_shape} is too small for {len(channels)} pooling blocks")
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(in_ch * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class CharLSTM(nn.Module):
    """Next-character model (LEAF Shakespeare): embedding, stacked LSTM, linear head on the last step.

    Example:
        >>> CharLSTM((80,), 82, embed=8, hidden=16, layers=1)(torch.zeros(2, 80, dtype=torch.long)).shape
        torch.Size([2, 82])
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, embed: int = 8, hidden: int = 256,
                 layers: int = 2):
        super().__init__()
        if len(input_shape) != 1:
            raise ValueError(f"char_lstm needs token sequences (seq_len,); got input shape {input_shape}")
        self.embed = nn.Embedding(num_classes, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(x))
        return self.head(out[:, -1, :])
