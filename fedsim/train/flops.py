"""Measured forward cost of a model (spec 2.4, FLOPs): multiply-accumulates per sample, counted layer
by layer from one forward pass with hooks, with or without a pruning mask.

Convention (what is counted, per sample, for a batch of one):

- ``Conv1d/2d/3d``: nnz(W) x output positions (H_out x W_out for 2-D); groups, stride, padding and
  dilation are all in the output geometry and in W's shape. Transposed convs: nnz(W) x input positions.
- ``Linear``: nnz(W) x tokens, tokens = the input's elements / in_features (1 for a (1, F) input,
  T for (1, T, F)).
- ``LSTM`` (and ``GRU``/``RNN``): sum over layers (and directions, and ``weight_hr`` projections) of
  nnz(weight_ih) + nnz(weight_hh) per time step, x sequence length (read along ``batch_first``).
- ``Embedding``/``EmbeddingBag``: 0 (a lookup).
- Not counted: biases, normalisation layers, activations (``PReLU`` too), pooling, element-wise ops,
  and the gate non-linearities of recurrent cells. A module with its own parameters of any other
  kind raises ``NotImplementedError`` rather than being silently counted as free.

nnz(W) counts the entries of W whose mask is non-zero (all entries of W when W has no mask;
W's values are not inspected). Masks are keyed by canonical parameter name, as in
``model.named_parameters()`` (e.g. ``"net.1.weight"``, ``"lstm.weight_hh_l0"``).
FLOPs = 2 x MACs, and a training sample costs 3 forward passes, so :func:`step_flops` is 6 x MACs.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> forward_macs(net, (4,))
    {'0': 12, '2': 6}
    >>> step_flops(forward_macs(net, (4,)))
    108
    >>> keep = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 1]], dtype=torch.bool)
    >>> r = flops_report(net, (4,), mask={"0.weight": keep})
    >>> r.dense, r.theoretical, r.structured
    (18, 13, 14)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.utils.rnn import PackedSequence

Masks = Mapping[str, "np.ndarray | torch.Tensor"]

# Modules with parameters whose work is, by convention, not counted.
_FREE = (nn.Embedding, nn.EmbeddingBag, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.PReLU)
if hasattr(nn, "RMSNorm"):
    _FREE = (*_FREE, nn.RMSNorm)

# One counted use of a weight: (module name, parameter name, parameter, multiplier).
_Use = tuple[str, str, torch.Tensor, int]


def _dummy(model: nn.Module, input_shape: tuple[int, ...], input_dtype: torch.dtype | None) -> torch.Tensor:
    tensors = [*model.parameters(), *model.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    if input_dtype is None:
        first = next((m for m in model.modules() if next(m.parameters(recurse=False), None) is not None), None)
        if isinstance(first, (nn.Embedding, nn.EmbeddingBag)):
            input_dtype = torch.long
        else:
            floats = [t.dtype for t in tensors if t.is_floating_point()]
            input_dtype = floats[0] if floats else torch.get_default_dtype()
    return torch.zeros((1, *input_shape), dtype=input_dtype, device=device)


def _trace(model: nn.Module, input_shape: tuple[int, ...], input_dtype: torch.dtype | None) -> list[_Use]:
    """Run one no-grad eval-mode forward on a zero batch of 1 and record every counted weight use."""
    pname = {id(p): n for n, p in model.named_parameters()}
    uses: list[_Use] = []

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, output) -> None:
            x = args[0] if args else None
            if isinstance(module, _FREE):
                uses.append((name, "", module.weight, 0))   # recorded so the layer shows up with 0
            elif isinstance(module, _ConvTransposeNd):
                uses.append((name, pname[id(module.weight)], module.weight, x.numel() // module.in_channels))
            elif isinstance(module, _ConvNd):
                uses.append((name, pname[id(module.weight)], module.weight, output.numel() // module.out_channels))
            elif isinstance(module, nn.Linear):
                uses.append((name, pname[id(module.weight)], module.weight, x.numel() // module.in_features))
            elif isinstance(module, nn.RNNBase):
                if isinstance(x, PackedSequence):
                    steps = x.data.shape[0]
                elif x.dim() == 2:          # unbatched (T, F)
                    steps = x.shape[0]
                else:
                    steps = x.shape[1] if module.batch_first else x.shape[0]
                for wname in module._flat_weights_names:
                    if wname.startswith("weight_"):
                        w = getattr(module, wname)
                        uses.append((name, pname[id(w)], w, steps))
            else:
                raise NotImplementedError(f"no FLOPs rule for module '{name}' ({type(module).__name__}) "
                                          "with its own parameters")
        return hook

    modes = {m: m.training for m in model.modules()}
    handles = []
    try:
        for name, m in model.named_modules():
            if next(m.parameters(recurse=False), None) is not None:
                handles.append(m.register_forward_hook(hook_for(name)))
        model.eval()
        with torch.no_grad():
            model(_dummy(model, tuple(input_shape), input_dtype))
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return uses


def _check_masks(model: nn.Module, masks: Masks | None) -> dict[str, torch.Tensor]:
    if not masks:
        return {}
    params = dict(model.named_parameters())
    out = {}
    for name, m in masks.items():
        if name not in params:
            raise KeyError(f"mask for unknown parameter '{name}'")
        t = torch.as_tensor(np.asarray(m) if not isinstance(m, torch.Tensor) else m)
        if tuple(t.shape) != tuple(params[name].shape):
            raise ValueError(f"mask '{name}' has shape {tuple(t.shape)}, parameter has {tuple(params[name].shape)}")
        out[name] = t
    return out


def _count(uses: list[_Use], masks: dict[str, torch.Tensor]) -> dict[str, int]:
    macs: dict[str, int] = {}
    for module_name, pn, w, mult in uses:
        nnz = int(torch.count_nonzero(masks[pn]).item()) if pn in masks else w.numel()
        macs[module_name] = macs.get(module_name, 0) + nnz * mult
    return macs


def forward_macs(model: nn.Module, input_shape: tuple[int, ...], masks: Masks | None = None, *,
                 input_dtype: torch.dtype | None = None) -> dict[str, int]:
    """Forward multiply-accumulates per sample of each counted layer, keyed by module name.

    ``input_shape`` excludes the batch dimension. The dummy input is zeros, ``torch.long`` when the
    model's first parametrised layer is an embedding, else the model's float dtype (or ``input_dtype``).
    The model is run once in eval mode under ``torch.no_grad()``; its modes are restored and its
    hooks removed afterwards. A module called several times is counted once per call.
    """
    return _count(_trace(model, input_shape, input_dtype), _check_masks(model, masks))


def step_flops(macs: Mapping[str, int] | int) -> int:
    """FLOPs of one training sample: forward + backward = 3 forwards, 2 FLOPs per MAC, so 6 x MACs."""
    total = macs if isinstance(macs, int) else sum(macs.values())
    return 6 * int(total)


def structured_part(masks: Masks) -> dict[str, torch.Tensor]:
    """The structured-only part of a mask: an entry counts as removed only when its whole output
    slice (``W[i]``: a unit's fan-in or a conv filter) or its whole input slice (``W[:, j]``: a
    removed input unit's fan-out or input channel) is masked, since only those can be sliced away
    from a dense computation. Tensors of fewer than 2 dims are returned as they are.

    Example:
        >>> m = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
        >>> structured_part({"w": m})["w"].int().tolist()   # only the dead row is structured
        [[1, 1, 1], [0, 0, 0], [1, 1, 1]]
    """
    out = {}
    for name, m in masks.items():
        keep = torch.as_tensor(np.asarray(m) if not isinstance(m, torch.Tensor) else m) != 0
        if keep.dim() < 2:
            out[name] = keep
            continue
        rows = keep.flatten(1).any(1)                       # output slice still used
        cols = keep.transpose(0, 1).flatten(1).any(1)       # input slice still used
        shape = [1] * keep.dim()
        out[name] = rows.view(-1, *shape[1:]) & cols.view(1, -1, *shape[2:])
        out[name] = out[name].expand_as(keep).clone()
    return out


@dataclass(frozen=True)
class FlopsReport:
    """Per-sample forward MACs of one model: dense, with every masked entry as zero (theoretical),
    and with only removed units/channels as zero (structured), plus the ratios to dense and the
    per-layer counts ``{module: (dense, theoretical, structured)}``."""

    dense: int
    theoretical: int
    structured: int
    theoretical_ratio: float
    structured_ratio: float
    layers: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    @property
    def step_flops(self) -> dict[str, int]:
        """FLOPs of one training sample for each count (6 x MACs)."""
        return {"dense": step_flops(self.dense), "theoretical": step_flops(self.theoretical),
                "structured": step_flops(self.structured)}


def flops_report(model: nn.Module, input_shape: tuple[int, ...], *, mask: Masks | None = None,
                 structured_mask: Masks | None = None, input_dtype: torch.dtype | None = None) -> FlopsReport:
    """Dense, theoretical (nnz of ``mask``) and structured (nnz of ``structured_mask``) forward MACs
    per sample, from one forward pass. Without ``structured_mask`` the structured count uses
    :func:`structured_part` of ``mask`` (whole rows/columns masked); without either it is dense.

    Ratios are 1.0 for a model with no counted work.
    """
    uses = _trace(model, input_shape, input_dtype)
    full = _check_masks(model, mask)
    struct = _check_masks(model, structured_mask if structured_mask is not None else
                          (structured_part(full) if full else None))
    d, t, s = _count(uses, {}), _count(uses, full), _count(uses, struct)
    dense, theo, stru = sum(d.values()), sum(t.values()), sum(s.values())
    return FlopsReport(dense=dense, theoretical=theo, structured=stru,
                       theoretical_ratio=theo / dense if dense else 1.0,
                       structured_ratio=stru / dense if dense else 1.0,
                       layers={k: (d[k], t[k], s[k]) for k in d})
