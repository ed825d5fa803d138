"""Small models for federated simulation: MLP, CNN (8x8 and 28x28 inputs) and a character LSTM.

All use GroupNorm rather than BatchNorm, so that the same models work under DP-SGD
(per-sample gradients) and carry no running statistics across clients.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedsim.models.options import OPTIONS
from fedsim.models.units import Slice, UnitLayer, neurons


class ModelOptionError(ValueError):
    """A ``model.options`` value no model can be built with; ``option`` names it."""

    def __init__(self, option: str, message: str):
        self.option = option
        super().__init__(message)


def _sizes(option: str, values: tuple[int, ...] | int, *, allow_empty: bool = True) -> None:
    """Every layer size in ``values`` must be an int >= 1 (a 0-wide layer trains to chance)."""
    seq = values if isinstance(values, tuple) else (values,)
    bad = [v for v in seq if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad or (not seq and not allow_empty):
        raise ModelOptionError(option, f"every size must be an integer >= 1 (got {list(seq) if isinstance(values, tuple) else values})")


class MLP(nn.Module):
    """A multi-layer perceptron over flattened inputs.

    Example:
        >>> MLP((1, 8, 8), 10, hidden=(32,))(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int,
                 hidden: tuple[int, ...] = OPTIONS["mlp"]["hidden"]):
        super().__init__()
        _sizes("hidden", tuple(hidden))
        sizes = [math.prod(input_shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def unit_map(self) -> tuple[UnitLayer, ...]:
        """Every hidden neuron (never the output layer); fan-out: the next Linear's input columns.

        Example:
            >>> [(u.name, u.units) for u in MLP((4,), 3, hidden=(8, 5)).unit_map()]
            [('net.1', 8), ('net.3', 5)]
        """
        linears = [(i, m) for i, m in enumerate(self.net) if isinstance(m, nn.Linear)]
        return tuple(neurons(f"net.{i}", m.out_features, [Slice(f"net.{j}.weight", 1)], bias=m.bias is not None)
                     for (i, m), (j, _) in zip(linears[:-1], linears[1:]))


def _groups(channels: int) -> int:
    return math.gcd(channels, 8) or 1


class CNN(nn.Module):
    """Two conv blocks (conv 3x3, GroupNorm, ReLU, max-pool 2) and a two-layer head.

    Works for any square input of side >= 4 (8x8 digits, 28x28 Fashion-MNIST).

    Example:
        >>> CNN((1, 28, 28), 10)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int,
                 channels: tuple[int, ...] = OPTIONS["cnn"]["channels"], hidden: int = OPTIONS["cnn"]["hidden"]):
        super().__init__()
        _sizes("channels", tuple(channels), allow_empty=False)
        _sizes("hidden", hidden)
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

    def unit_map(self) -> tuple[UnitLayer, ...]:
        """Every conv output channel (fan-in: its filter, bias and GroupNorm entries; fan-out: the
        next conv's input channel, or after the last block the head's input columns of the channel's
        ``h*w`` block, flattened as C, H, W) and every hidden neuron of the head (never the output).

        Example:
            >>> [(u.name, u.units, u.fan_out[0].block) for u in CNN((1, 8, 8), 10).unit_map()]
            [('features.0', 16, 1), ('features.4', 32, 4), ('head.1', 64, 1)]
        """
        mods = list(self.features)
        convs = [(i, m) for i, m in enumerate(mods) if isinstance(m, nn.Conv2d)]
        linears = [(i, m) for i, m in enumerate(self.head) if isinstance(m, nn.Linear)]
        first, last = linears[0], convs[-1][1]
        layers = []
        for k, (i, conv) in enumerate(convs):
            if k + 1 < len(convs):
                fan_out = [Slice(f"features.{convs[k + 1][0]}.weight", 1)]
            else:
                fan_out = [Slice(f"head.{first[0]}.weight", 1, block=first[1].in_features // last.out_channels)]
            norm = f"features.{i + 1}" if i + 1 < len(mods) and isinstance(mods[i + 1], nn.GroupNorm) else None
            layers.append(neurons(f"features.{i}", conv.out_channels, fan_out, bias=conv.bias is not None, norm=norm))
        layers += [neurons(f"head.{i}", m.out_features, [Slice(f"head.{j}.weight", 1)], bias=m.bias is not None)
                   for (i, m), (j, _) in zip(linears[:-1], linears[1:])]
        return tuple(layers)


class CharLSTM(nn.Module):
    """Next-character model (LEAF Shakespeare): embedding, stacked LSTM, linear head on the last step.

    Example:
        >>> CharLSTM((80,), 82, embed=8, hidden=16, layers=1)(torch.zeros(2, 80, dtype=torch.long)).shape
        torch.Size([2, 82])
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, embed: int = OPTIONS["char_lstm"]["embed"],
                 hidden: int = OPTIONS["char_lstm"]["hidden"], layers: int = OPTIONS["char_lstm"]["layers"]):
        super().__init__()
        for option, value in (("embed", embed), ("hidden", hidden), ("layers", layers)):
            _sizes(option, value)
        if len(input_shape) != 1:
            raise ValueError(f"char_lstm needs token sequences (seq_len,); got input shape {input_shape}")
        self.embed = nn.Embedding(num_classes, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(x))
        return self.head(out[:, -1, :])

    def unit_map(self) -> tuple[UnitLayer, ...]:
        """The hidden units of every LSTM layer ``k``: fan-in, the unit's 4 gate rows (i, f, g, o) of
        ``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}`` and ``bias_hh_l{k}``; fan-out, its
        ``weight_hh_l{k}`` column and the next layer's ``weight_ih`` column (the head's input column
        after the last layer). The embedding and the head are not unit layers.

        Example:
            >>> [(u.name, u.units) for u in CharLSTM((80,), 82, hidden=16, layers=2).unit_map()]
            [('lstm.l0', 16), ('lstm.l1', 16)]
        """
        h, n = self.lstm.hidden_size, self.lstm.num_layers
        layers = []
        for k in range(n):
            gates = [Slice(f"lstm.{w}_l{k}", 0, repeats=4, stride=h) for w in ("weight_ih", "weight_hh")]
            if self.lstm.bias:
                gates += [Slice(f"lstm.{b}_l{k}", 0, repeats=4, stride=h) for b in ("bias_ih", "bias_hh")]
            nxt = Slice(f"lstm.weight_ih_l{k + 1}", 1) if k + 1 < n else Slice("head.weight", 1)
            layers.append(UnitLayer(f"lstm.l{k}", h, tuple(gates), (Slice(f"lstm.weight_hh_l{k}", 1), nxt)))
        return tuple(layers)
