"""Structured units of a model (neurons, channels, LSTM hidden units) as plain, torch-free data.

A model that supports structured pruning declares ``unit_map() -> tuple[UnitLayer, ...]``. Each
:class:`UnitLayer` has ``units`` units; unit ``u`` owns its *fan-in* entries (the weight rows or
filters that compute it, its bias and norm-affine entries: what it is scored on) and its *fan-out*
entries (the next layer's input columns or channels that read it). Removing a unit zeroes both.
Every entry set is a :class:`Slice` of one named parameter along one axis: unit ``u`` covers the
indices ``r * stride + u * block + [0, block)`` for ``r in range(repeats)``. ``block`` is a
channel's spatial block after a flatten; ``repeats=4, stride=hidden`` are an LSTM's gate rows.

Example:
    >>> Slice("lstm.weight_ih_l0", axis=0, repeats=4, stride=3).indices(1).tolist()  # rows i, f, g, o
    [1, 4, 7, 10]
    >>> Slice("head.1.weight", axis=1, block=4).indices(2).tolist()      # channel 2 of a 2x2 map
    [8, 9, 10, 11]
    >>> layer = neurons("net.1", 3, fan_out=[Slice("net.3.weight", axis=1)])
    >>> check_unit_map((layer,), {"net.1.weight": (3, 5), "net.1.bias": (3,), "net.3.weight": (2, 3)})
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class Slice:
    """The entries of parameter ``param`` that belong to one unit, along ``axis``.

    Unit ``u`` covers ``[r * stride + u * block, r * stride + (u + 1) * block)`` for every
    ``r in range(repeats)`` (all other axes in full).
    """

    param: str
    axis: int
    block: int = 1
    repeats: int = 1
    stride: int = 0

    def __post_init__(self) -> None:
        if self.axis < 0 or self.block < 1 or self.repeats < 1 or self.stride < 0:
            raise ValueError(f"bad slice {self}: needs axis >= 0, block >= 1, repeats >= 1, stride >= 0")
        if self.repeats > 1 and self.stride < 1:
            raise ValueError(f"bad slice {self}: repeats > 1 needs a stride")

    def indices(self, unit: int) -> np.ndarray:
        """The indices along ``axis`` that unit ``unit`` covers, ascending within each repeat (int64)."""
        base = np.arange(self.block, dtype=np.int64) + unit * self.block
        return (np.arange(self.repeats, dtype=np.int64)[:, None] * self.stride + base[None, :]).reshape(-1)

    def unit_indices(self, units: int) -> np.ndarray:
        """``[units, repeats * block]``: row ``u`` is :meth:`indices` ``(u)``."""
        return np.stack([self.indices(u) for u in range(units)]) if units else np.zeros((0, 0), np.int64)

    def where(self, unit_ids: Iterable[int], ndim: int) -> tuple:
        """A numpy index selecting the entries of ``unit_ids`` in an array of ``ndim`` axes."""
        ids = [self.indices(u) for u in unit_ids]
        flat = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        return (slice(None),) * self.axis + (flat,) + (slice(None),) * (ndim - self.axis - 1)


@dataclass(frozen=True)
class UnitLayer:
    """One prunable layer: ``units`` units, each owning its ``fan_in`` and ``fan_out`` slices."""

    name: str
    units: int
    fan_in: tuple[Slice, ...]
    fan_out: tuple[Slice, ...] = ()

    def __post_init__(self) -> None:
        if self.units < 1 or not self.fan_in:
            raise ValueError(f"unit layer {self.name!r} needs units >= 1 and at least one fan-in slice")

    @property
    def slices(self) -> tuple[Slice, ...]:
        """Fan-in then fan-out slices."""
        return self.fan_in + self.fan_out


def neurons(layer: str, units: int, fan_out: Sequence[Slice] = (), *, bias: bool = True,
            norm: str | None = None) -> UnitLayer:
    """The output units of a linear or conv layer named ``layer``: rows (filters) of
    ``{layer}.weight``, entries of ``{layer}.bias`` and of a following norm's ``{norm}.weight`` and
    ``{norm}.bias``; ``fan_out`` is given by the caller (the next layer's input slices)."""
    fan_in = [Slice(f"{layer}.weight", 0)]
    if bias:
        fan_in.append(Slice(f"{layer}.bias", 0))
    if norm is not None:
        fan_in += [Slice(f"{norm}.weight", 0), Slice(f"{norm}.bias", 0)]
    return UnitLayer(layer, int(units), tuple(fan_in), tuple(fan_out))


def check_unit_map(unit_map: Sequence[UnitLayer], shapes: Mapping[str, Sequence[int]]) -> None:
    """Raise ``ValueError`` unless every slice names a parameter in ``shapes`` and indexes inside it,
    and no two units of a layer share an index of the same slice."""
    names = set()
    for layer in unit_map:
        if layer.name in names:
            raise ValueError(f"unit layer {layer.name!r} is declared twice")
        names.add(layer.name)
        for s in layer.slices:
            if s.param not in shapes:
                raise ValueError(f"unit layer {layer.name!r}: no parameter named {s.param!r}")
            shape = tuple(shapes[s.param])
            if s.axis >= len(shape):
                raise ValueError(f"unit layer {layer.name!r}: axis {s.axis} outside {s.param} {shape}")
            span = layer.units * s.block
            if s.repeats > 1 and s.stride < span:
                raise ValueError(f"unit layer {layer.name!r}: {s.param} repeats overlap (stride {s.stride} < {span})")
            top = (s.repeats - 1) * s.stride + span
            if top > shape[s.axis]:
                raise ValueError(f"unit layer {layer.name!r}: {layer.units} units need {top} entries along axis "
                                 f"{s.axis} of {s.param} {shape}")


__all__ = ["Slice", "UnitLayer", "check_unit_map", "neurons"]
