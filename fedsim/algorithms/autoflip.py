"""AutoFLIP: federated loss-exploration hybrid pruning, the pure core (``shared/specs/autoflip.md``).

1. *Exploration* (once, before round 1): every explorer ``k`` trains a private copy of the
   initial model (optional warm-up epochs first; the base ``θ_base`` is the warmed model), then
   up to ``explore_epochs`` more epochs with early stopping on the epoch-mean loss, and reports
   ``D_k = (θ_k − θ_base)²`` per parameter (:func:`explore`, :class:`EarlyStopping`).
2. *Guidance*: the server averages ``D̄ = Σ_k w_k D_k`` in client-id order in float64
   (:func:`merge_deviations`) and normalises each tensor on its own (:func:`normalize`, MinMax by
   default; a constant tensor gets ``G ≡ 1``). Entries that moved little score low.
3. *Mask* (deterministic, :func:`hybrid_mask`): a structured step removes the ``⌊T_s U⌋``
   lowest-scoring units of every unit layer (score: mean ``G`` over the unit's fan-in; removal
   zeroes fan-in and fan-out, :func:`structured_mask`), then an unstructured step zeroes the
   ``⌊T_p N_rem⌋`` lowest-``G`` remaining entries of the maskable tensors, ties by flat index in
   canonical order (:func:`unstructured_mask`; ``quantile_gt`` is the reference code's ``G > τ``).
4. *Training*: the masked model trains; :func:`mask_grads_`, :func:`mask_params_`,
   :func:`mask_grad_samples_` and :func:`mask_optimizer_state_` keep pruned entries, their
   gradients, per-sample gradients and optimiser state exactly 0 in any loop.

Every server-side step is exact under scaling ``D × 2^k`` (no additive epsilons), so ``G`` and
the mask are bit-identical for any power-of-two scale of the deviations.

Example:
    >>> D = {3: {"w": np.array([[0., 2.], [4., 8.]], np.float32), "b": np.zeros(2, np.float32)}}
    >>> G = normalize(merge_deviations(D))
    >>> G["w"].tolist(), G["b"].tolist()                  # per tensor; constant -> all ones
    ([[0.0, 0.25], [0.5, 1.0]], [1.0, 1.0])
    >>> r = hybrid_mask(G, {"w": (2, 2), "b": (2,)}, sparsity=0.5)
    >>> r.mask["w"].tolist(), r.mask["b"].tolist(), (r.pruned, r.total_maskable)
    ([[False, False], [True, True]], [True, True], (2, 4))
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from fedsim.models.units import UnitLayer, check_unit_map

Masks = dict[str, np.ndarray]


# --------------------------------------------------------------------------------------------
# exploration (client side, torch)

class EarlyStopping:
    """Stop after ``patience`` consecutive epochs without a strict improvement on the best value.

    ``update`` returns True when training must stop now. The first finite value is an improvement;
    a NaN never is. ``patience=0`` stops at the first epoch that does not improve.

    Example:
        >>> es = EarlyStopping(2)
        >>> [es.update(v) for v in [3.0, 2.0, 2.0, 1.5, 1.6, 1.5]]
        [False, False, False, False, False, True]
    """

    def __init__(self, patience: int):
        if patience < 0:
            raise ValueError(f"patience must be >= 0 (got {patience})")
        self.patience = int(patience)
        self.best = math.inf
        self.bad_epochs = 0
        self.best_epoch = -1
        self.epochs = 0

    def update(self, value: float) -> bool:
        value = float(value)
        self.epochs += 1
        if value < self.best:
            self.best, self.bad_epochs, self.best_epoch = value, 0, self.epochs - 1
            return False
        self.bad_epochs += 1
        return self.bad_epochs >= self.patience


@dataclass
class Exploration:
    """What one explorer reports (plus diagnostics).

    ``deviations``: ``(θ_k − θ_base)²`` per trainable parameter (float32, canonical names);
    ``epochs_run``: exploration epochs after warm-up; ``examples_seen``: over warm-up and
    exploration; ``losses``: the epoch-mean losses of the exploration epochs; ``params``: ``θ_k``
    (float32) when asked for (``start_from: explored``).
    """

    deviations: dict[str, np.ndarray]
    epochs_run: int
    warmup_epochs: int
    examples_seen: int
    losses: list[float] = field(default_factory=list)
    params: dict[str, np.ndarray] | None = None

    @property
    def final_loss(self) -> float:
        """The epoch-mean loss of the last exploration epoch (the one ``θ_k`` stopped at)."""
        return self.losses[-1] if self.losses else math.nan


def _numpy(t: torch.Tensor | np.ndarray) -> np.ndarray:
    return t if isinstance(t, np.ndarray) else t.detach().to("cpu").numpy()


class ExplorationSchedule:
    """An explorer's epochs as a batch source for any training loop (fedsim's standard loop, with
    DP-SGD's hooks if the run is private): ``warmup_epochs`` epochs, then up to ``explore_epochs``
    epochs until :class:`EarlyStopping` on the epoch-mean loss says stop.

    ``epoch()`` returns the batches of one epoch per call. Feed every batch's mean loss to
    :meth:`record`. ``on_base()`` is called once, when the warm-up is over (snapshot θ_base there).
    The schedule decides lazily: the next epoch starts only after the previous one was consumed.

    Example:
        >>> s = ExplorationSchedule(lambda: [0], explore_epochs=5, patience=1)
        >>> for i, epoch in enumerate(s.epochs()):
        ...     s.record([3.0, 2.0, 2.5, 1.0, 1.0][i], 1)
        >>> s.losses, s.epochs_run
        ([3.0, 2.0, 2.5], 3)
    """

    def __init__(self, epoch: Callable[[], Iterable[Any]], *, explore_epochs: int, patience: int,
                 warmup_epochs: int = 0, on_base: Callable[[], None] | None = None):
        if explore_epochs < 1 or warmup_epochs < 0:
            raise ValueError(f"exploration needs explore_epochs >= 1 and warmup_epochs >= 0 "
                             f"(got {explore_epochs}, {warmup_epochs})")
        self.epoch, self.explore_epochs, self.warmup_epochs = epoch, int(explore_epochs), int(warmup_epochs)
        self.stopper, self.on_base = EarlyStopping(patience), on_base
        self.losses: list[float] = []
        self.examples_seen = 0
        self._total, self._count = 0.0, 0

    def record(self, loss: float, n: int) -> None:
        """One batch's mean loss over its ``n`` examples (empty batches: ``n = 0``, ignored)."""
        if n:
            self._total += float(loss) * n
            self._count += int(n)

    def _epoch_mean(self) -> float:
        mean = self._total / self._count if self._count else math.inf
        self.examples_seen += self._count
        self._total, self._count = 0.0, 0
        return mean

    @property
    def epochs_run(self) -> int:
        """Exploration epochs after the warm-up, so far."""
        return len(self.losses)

    def epochs(self):
        for _ in range(self.warmup_epochs):
            yield self.epoch()
            self._epoch_mean()
        if self.on_base is not None:
            self.on_base()
        for _ in range(self.explore_epochs):
            yield self.epoch()
            self.losses.append(self._epoch_mean())
            if self.stopper.update(self.losses[-1]):
                return


def squared_deviations(params: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """``(θ − θ_base)²`` per tensor (torch tensors or numpy arrays), computed in float64, returned as float32."""
    return {n: np.square(_numpy(p).astype(np.float64) - _numpy(base[n]).astype(np.float64)).astype(np.float32)
            for n, p in params.items()}


def explore(model: torch.nn.Module, epochs: Callable[[], Iterable[tuple[Any, Any]]],
            make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
            loss_fn: Callable[[torch.Tensor, Any], torch.Tensor], *, explore_epochs: int, patience: int,
            warmup_epochs: int = 0, device: torch.device | str | None = None,
            return_params: bool = False) -> Exploration:
    """Run one explorer on a private deep copy of ``model`` (``model`` is never touched).

    ``epochs()`` yields the ``(x, y)`` batches of one epoch per call; ``make_optimizer`` gets the
    copy's trainable parameters (one optimiser for warm-up and exploration). The epoch-mean loss
    is the example-weighted mean of the batch losses (``loss_fn`` returns a batch mean); empty
    batches are skipped. The base is a ``clone()`` snapshot, so the optimiser cannot alias it.
    (fedsim's clients run the same :class:`ExplorationSchedule` inside their standard loop, so a
    private run explores under DP-SGD.)
    """
    work = copy.deepcopy(model)
    if device is not None:
        work.to(device)
    work.train()
    named = {n: p for n, p in work.named_parameters() if p.requires_grad}
    if not named:
        raise ValueError("the model has no trainable parameters to explore")
    dev = next(iter(named.values())).device
    optimizer = make_optimizer(list(named.values()))
    base: dict[str, torch.Tensor] = {}

    def snapshot() -> None:
        with torch.no_grad():
            base.update({n: p.detach().clone() for n, p in named.items()})

    schedule = ExplorationSchedule(epochs, explore_epochs=explore_epochs, patience=patience,
                                   warmup_epochs=warmup_epochs, on_base=snapshot)
    for batches in schedule.epochs():
        for x, y in batches:
            n = int(len(y))
            if n == 0:
                continue
            x = x.to(dev) if isinstance(x, torch.Tensor) else x
            y = y.to(dev) if isinstance(y, torch.Tensor) else y
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(work(x), y)
            loss.backward()
            optimizer.step()
            schedule.record(float(loss.detach()), n)
    params = {n: _numpy(p).astype(np.float32, copy=True) for n, p in named.items()} if return_params else None
    return Exploration(squared_deviations(named, base), schedule.epochs_run, int(warmup_epochs),
                       schedule.examples_seen, schedule.losses, params)


# --------------------------------------------------------------------------------------------
# guidance (server side, numpy)

def merge_deviations(deviations: Mapping[int, Mapping[str, np.ndarray]],
                     weights: Mapping[int, float] | None = None) -> dict[str, np.ndarray]:
    """``D̄ = Σ_k w_k D_k`` in float64, summed in sorted client-id order (bit-identical for any
    order the explorers arrive in). ``weights`` (e.g. ``n_k``) are normalised to sum 1; default
    uniform ``1/|E|``. Names are taken from the lowest client id, in its order."""
    if not deviations:
        raise ValueError("no explorer deviations to merge")
    ids = sorted(deviations)
    if weights is None:
        w = {k: 1.0 / len(ids) for k in ids}
    else:
        missing = [k for k in ids if k not in weights]
        if missing:
            raise ValueError(f"no weight for explorers {missing}")
        total = math.fsum(float(weights[k]) for k in ids)
        if not total > 0 or any(float(weights[k]) < 0 for k in ids):
            raise ValueError(f"explorer weights must be >= 0 with a positive sum (got {dict(weights)})")
        w = {k: float(weights[k]) / total for k in ids}
    names = list(deviations[ids[0]])
    out: dict[str, np.ndarray] = {}
    for name in names:
        acc = None
        for k in ids:
            if name not in deviations[k]:
                raise ValueError(f"explorer {k} sent no deviation for {name!r}")
            term = np.asarray(deviations[k][name], np.float64) * w[k]
            if acc is None:
                acc = term
            elif term.shape != acc.shape:
                raise ValueError(f"explorer {k}: {name!r} has shape {term.shape}, expected {acc.shape}")
            else:
                acc = acc + term
        out[name] = acc
    return out


def normalize(dbar: Mapping[str, np.ndarray], method: str = "minmax") -> dict[str, np.ndarray]:
    """Normalise each tensor on its own (float64).

    ``minmax``: ``(x − min)/(max − min)``, all ones when ``max == min``. ``robust``:
    ``(x − median)/IQR`` (IQR from linear-interpolated quartiles), dividing by 1 when the IQR is 0.
    No epsilon is added anywhere, so scaling the input by a power of two leaves the output
    bit-identical (an exact scale survives each subtraction and the division); the robust IQR == 0
    branch is the one exception (it divides by 1, so its output scales).
    """
    if method not in ("minmax", "robust"):
        raise ValueError(f"unknown normalization {method!r} (minmax or robust)")
    out: dict[str, np.ndarray] = {}
    for name, v in dbar.items():
        x = np.asarray(v, np.float64)
        if x.size == 0:
            out[name] = x.copy()
            continue
        if not np.all(np.isfinite(x)):
            raise ValueError(f"deviation {name!r} is not finite")
        if method == "minmax":
            lo, hi = x.min(), x.max()
            out[name] = np.ones_like(x) if hi == lo else (x - lo) / (hi - lo)
        else:
            q1, med, q3 = np.quantile(x, [0.25, 0.5, 0.75])
            iqr = q3 - q1
            out[name] = (x - med) / (iqr if iqr != 0 else 1.0)
    return out


# --------------------------------------------------------------------------------------------
# mask construction (server side, numpy)

def _shape(v: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in (v.shape if hasattr(v, "shape") else v))


def _count(fraction: float, n: int) -> int:
    """``⌊fraction · n⌋`` with ``fraction`` read as the decimal it prints as (0.29 · 100 = 29)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"a sparsity must lie in [0, 1] (got {fraction})")
    return math.floor(Fraction(repr(float(fraction))) * n)


def maskable_names(params: Mapping[str, Any], maskable: str = "weights", exclude: Sequence[str] = ()) -> list[str]:
    """The maskable set ``P_M`` in the given (canonical) order: ``weights`` = every tensor with
    ``ndim >= 2``; ``all`` = every tensor; minus ``exclude``. Values may be arrays or shapes."""
    if maskable not in ("weights", "all"):
        raise ValueError(f"unknown maskable {maskable!r} (weights or all)")
    unknown = [n for n in exclude if n not in params]
    if unknown:
        raise ValueError(f"exclude names unknown parameters {unknown}")
    skip = set(exclude)
    return [n for n, v in params.items() if n not in skip and (maskable == "all" or len(_shape(v)) >= 2)]


def _guidance(G: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in G:
        raise ValueError(f"no guidance for {name!r}")
    g = np.asarray(G[name], np.float64)
    if g.shape != shape:
        raise ValueError(f"guidance {name!r} has shape {g.shape}, the parameter {shape}")
    return g


def structured_mask(G: Mapping[str, np.ndarray], shapes: Mapping[str, Sequence[int]], unit_map: Sequence[UnitLayer],
                    structured_sparsity: float) -> tuple[Masks, dict[str, list[int]]]:
    """The structured step alone: masks for every name in ``shapes`` and the removed units per layer.

    In each layer the score of unit ``u`` is the mean of ``G`` over its fan-in entries; the
    ``⌊T_s U⌋`` lowest (stable: ties by unit index, at least one unit kept) are removed, i.e. set
    to 0 on all their fan-in and fan-out entries. Scores read ``G`` only, so layers do not interact.
    """
    shp = {n: _shape(s) for n, s in shapes.items()}
    check_unit_map(unit_map, shp)
    masks = {n: np.ones(s, bool) for n, s in shp.items()}
    removed: dict[str, list[int]] = {}
    for layer in unit_map:
        k = min(_count(structured_sparsity, layer.units), layer.units - 1)
        sums, count = np.zeros(layer.units, np.float64), 0
        for s in layer.fan_in:
            g = np.moveaxis(_guidance(G, s.param, shp[s.param]), s.axis, 0)
            taken = g[s.unit_indices(layer.units)]                     # [U, repeats*block, rest...]
            sums += taken.reshape(layer.units, -1).sum(axis=1)
            count += taken[0].size
        scores = sums / count
        gone = sorted(int(u) for u in np.argsort(scores, kind="stable")[:k])
        removed[layer.name] = gone
        if gone:
            for s in layer.slices:
                masks[s.param][s.where(gone, len(shp[s.param]))] = False
    return masks, removed


def unstructured_mask(G: Mapping[str, np.ndarray], base_mask: Mapping[str, np.ndarray], maskable: Sequence[str],
                      sparsity: float, selection: str = "exact_rank") -> Masks:
    """The unstructured step on top of ``base_mask`` (returns new masks for every name in it).

    ``exact_rank``: the maskable entries still True, concatenated in the order of ``maskable``,
    stable-sorted by ``G`` ascending (ties by flat index); the first ``⌊T_p N_rem⌋`` go to 0.
    ``quantile_gt``: ``τ`` = the linear-interpolated ``T_p`` quantile of all maskable ``G``;
    keep ``G > τ`` (and ``base_mask``).
    """
    if selection not in ("exact_rank", "quantile_gt"):
        raise ValueError(f"unknown selection {selection!r} (exact_rank or quantile_gt)")
    out = {n: np.array(m, bool, copy=True) for n, m in base_mask.items()}
    names = list(maskable)
    if not names:
        return out
    missing = [n for n in names if n not in out]
    if missing:
        raise ValueError(f"maskable names missing from the base mask: {missing}")
    gs = [_guidance(G, n, out[n].shape).reshape(-1) for n in names]
    g = np.concatenate(gs)
    if not np.all(np.isfinite(g)):
        raise ValueError("the guidance of the maskable tensors is not finite")
    keep = np.concatenate([out[n].reshape(-1) for n in names])
    if selection == "exact_rank":
        candidates = np.flatnonzero(keep)
        k = _count(sparsity, candidates.size)
        order = np.argsort(g[candidates], kind="stable")
        keep[candidates[order[:k]]] = False
    else:
        _count(sparsity, 0)                                       # range check
        tau = np.quantile(g, float(sparsity), method="linear")
        keep &= g > tau
    start = 0
    for n in names:
        size = out[n].size
        out[n] = keep[start:start + size].reshape(out[n].shape).copy()
        start += size
    return out


@dataclass
class MaskResult:
    """A hybrid mask. ``mask``/``structured``: bool arrays for every name given (``structured`` is
    the structured step alone); ``removed_units``: per unit layer; ``counts``: zeros per tensor
    (every tensor, so structured zeros outside ``P_M`` show); ``pruned``: zeros inside ``P_M``
    (the sum of ``counts`` over ``maskable``); ``total_maskable``: ``|P_M|``."""

    mask: Masks
    structured: Masks
    removed_units: dict[str, list[int]]
    counts: dict[str, int]
    pruned: int
    total_maskable: int
    maskable: list[str] = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        """Pruned fraction of ``P_M``."""
        return self.pruned / self.total_maskable if self.total_maskable else 0.0


def _result(mask: Masks, structured: Masks, removed: dict[str, list[int]], maskable: list[str]) -> MaskResult:
    counts = {n: int(m.size - np.count_nonzero(m)) for n, m in mask.items()}
    return MaskResult(mask, structured, removed, counts, sum(counts[n] for n in maskable),
                      sum(mask[n].size for n in maskable), maskable)


def hybrid_mask(G: Mapping[str, np.ndarray], shapes: Mapping[str, Sequence[int]], *, sparsity: float,
                structured_sparsity: float = 0.0, unit_map: Sequence[UnitLayer] | None = None,
                maskable: str = "weights", exclude: Sequence[str] = (), selection: str = "exact_rank") -> MaskResult:
    """The structured step (``T_s``, needs ``unit_map``), then the unstructured step (``T_p``) on
    the maskable entries the structured step left."""
    shp = {n: _shape(s) for n, s in shapes.items()}
    names = maskable_names(shp, maskable, exclude)
    if structured_sparsity > 0:
        if unit_map is None:
            raise ValueError("structured_sparsity > 0 needs the model's unit map: pass unit_map=model.unit_map() "
                             "or set structured_sparsity: 0 for a model that declares no unit_map")
        structured, removed = structured_mask(G, shp, unit_map, structured_sparsity)
    else:
        _count(structured_sparsity, 0)
        structured = {n: np.ones(s, bool) for n, s in shp.items()}
        removed = {layer.name: [] for layer in unit_map or ()}
    mask = unstructured_mask(G, structured, names, sparsity, selection)
    return _result(mask, structured, removed, names)


def random_mask(shapes: Mapping[str, Sequence[int]], *, sparsity: float, rng: np.random.Generator,
                maskable: str = "weights", exclude: Sequence[str] = ()) -> Masks:
    """The random-pruning baseline: exactly ``⌊T_p |P_M|⌋`` entries of ``P_M``, uniformly without
    replacement; every other tensor dense."""
    shp = {n: _shape(s) for n, s in shapes.items()}
    names = maskable_names(shp, maskable, exclude)
    masks = {n: np.ones(s, bool) for n, s in shp.items()}
    sizes = [math.prod(shp[n]) for n in names]
    total = sum(sizes)
    keep = np.ones(total, bool)
    keep[rng.choice(total, size=_count(sparsity, total), replace=False)] = False
    start = 0
    for n, size in zip(names, sizes):
        masks[n] = keep[start:start + size].reshape(shp[n]).copy()
        start += size
    return masks


def mask_digest(mask: Mapping[str, np.ndarray]) -> str:
    """SHA-256 (hex) over, per tensor in the given order: its name, its shape and its bytes as bool."""
    h = hashlib.sha256()
    for name, m in mask.items():
        a = np.ascontiguousarray(np.asarray(m, bool))
        h.update(name.encode() + b"\0" + repr(a.shape).encode() + b"\0")
        h.update(a.tobytes())
    return h.hexdigest()


def mask_counts(mask: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Zeros per tensor."""
    return {n: int(np.size(m) - np.count_nonzero(m)) for n, m in mask.items()}


def apply_mask(arrays: Mapping[str, np.ndarray], mask: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``θ ⊙ M`` for numpy arrays (a new dict, same dtypes; masked entries are +0; names not in
    ``mask`` are passed through unchanged)."""
    out = {}
    for n, a in arrays.items():
        a = np.asarray(a)
        out[n] = np.where(np.asarray(mask[n], bool), a, np.zeros((), a.dtype)) if n in mask else a
    return out


# --------------------------------------------------------------------------------------------
# masking in a training loop (client side, torch)

def torch_masks(mask: Mapping[str, Any], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """The masks as bool tensors on ``device`` (convert once per round and reuse)."""
    out = {}
    for n, m in mask.items():
        t = m if isinstance(m, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(np.asarray(m, bool)))
        out[n] = t.to(device=device, dtype=torch.bool) if device is not None else t.to(dtype=torch.bool)
    return out


def _mask_for(mask: Mapping[str, Any], name: str, like: torch.Tensor, batched: bool = False) -> torch.Tensor:
    m = mask[name]
    if not isinstance(m, torch.Tensor) or m.device != like.device or m.dtype != torch.bool:
        m = torch_masks({name: m}, like.device)[name]
    shape = tuple(like.shape[1:]) if batched else tuple(like.shape)
    if tuple(m.shape) != shape:
        raise ValueError(f"mask {name!r} has shape {tuple(m.shape)}, the tensor {tuple(like.shape)}")
    return m


def _zero_(t: torch.Tensor, keep: torch.Tensor) -> None:
    t.masked_fill_(keep.logical_not(), 0)


@torch.no_grad()
def mask_params_(named_params: Mapping[str, torch.Tensor], mask: Mapping[str, Any]) -> None:
    """``θ ← θ ⊙ M`` in place for every named tensor that has a mask."""
    for n, p in named_params.items():
        if n in mask:
            _zero_(p.data if isinstance(p, torch.nn.Parameter) else p, _mask_for(mask, n, p))


@torch.no_grad()
def mask_grads_(named_grads: Mapping[str, torch.Tensor | None], mask: Mapping[str, Any]) -> None:
    """``∇ ← ∇ ⊙ M`` in place (``None`` gradients are skipped)."""
    for n, g in named_grads.items():
        if g is not None and n in mask:
            _zero_(g, _mask_for(mask, n, g))


@torch.no_grad()
def mask_grad_samples_(named_params: Mapping[str, torch.Tensor], mask: Mapping[str, Any]) -> None:
    """Zero Opacus' per-sample gradients ``p.grad_sample`` (``[batch, *shape]``, or a list of such)
    at masked entries; call it before clipping, so that pruned entries use no clip budget."""
    for n, p in named_params.items():
        gs = getattr(p, "grad_sample", None)
        if gs is None or n not in mask:
            continue
        for t in (gs if isinstance(gs, (list, tuple)) else [gs]):
            _zero_(t, _mask_for(mask, n, t, batched=True))


@torch.no_grad()
def mask_optimizer_state_(optimizer: torch.optim.Optimizer, named_params: Mapping[str, torch.Tensor],
                          mask: Mapping[str, Any]) -> None:
    """Zero every parameter-shaped optimiser state tensor (SGD momentum, Adam moments, ...) at
    masked entries; scalars such as Adam's ``step`` are left alone."""
    for n, p in named_params.items():
        if n not in mask:
            continue
        for v in optimizer.state.get(p, {}).values():
            if isinstance(v, torch.Tensor) and v.shape == p.shape and v.is_floating_point():
                _zero_(v, _mask_for(mask, n, v))


__all__ = ["EarlyStopping", "Exploration", "MaskResult", "apply_mask", "explore", "hybrid_mask", "mask_counts",
           "mask_digest", "mask_grad_samples_", "mask_grads_", "mask_optimizer_state_", "mask_params_",
           "maskable_names", "merge_deviations", "normalize", "random_mask", "structured_mask", "torch_masks",
           "unstructured_mask"]
