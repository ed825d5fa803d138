"""AutoFLIP on fedsim's contracts: the exploration stage, the shared mask, masked training and sparse
communication (specs/autoflip.md 2.1-2.5). The algorithm itself is :mod:`fedsim.algorithms.autoflip`.

Server (:class:`PruningServer`):

- ``kind: autoflip`` claims round 0, a stage before round 1: the explorers (sampled once from the
  run seed) get the dense initial model, train a private copy and send back only their squared
  deviations. The server merges them, normalises per tensor, builds the hybrid mask, sets
  ``θ¹ = θ⁰ ⊙ M`` and bumps the basis id (DiceSGD-style client state tied to the basis resets).
  ``start_from: explored`` (the reference code's behaviour, compat): the explorers also send their
  explored models and ``θ¹ = (Σ w_k θ_k) ⊙ M`` with the deviations' weights ``w_k``.
  Exploration is part of the server state, so a resumed run never explores again.
- ``kind: random`` (the baseline) builds a seeded uniform random mask at the same exact sparsity
  when the run starts; no exploration.
- ``mask_update: every_k_rounds`` (AutoFLIP only): every k-th training round is a refresh round.
  Its clients train dense from the masked model (pruned entries start at 0) and send their whole
  model back; the server takes ``D̄ = Σ p_k Δ_k²`` of their updates (``p_k ∝ n_k``), normalises and
  rebuilds the mask by the same rules, masks the new global model with it and bumps ``mask_id``
  and the basis id (DiceSGD's error state resets). Each refresh is listed in ``pruning.json``.
- Then every training round: masked entries stay exactly 0 in the aggregate, the step and the
  optimizer state (``ServerPlugin.mask``); the model travels down and up as the kept entries of
  the masked tensors only (``ArraySpec(kept=...)``; no indices: the mask is shared state); a client
  gets the mask's bitmap (``ceil(|P_M| / 8)`` bytes, plus a bit per entry of the biases and norms
  the structured step may zero) only the first time it takes part after a mask change.

Client (:class:`PruningClient`): in round 0 an explorer trains in the standard loop on an
:class:`~fedsim.algorithms.autoflip.ExplorationSchedule` (so under DP it explores with DP-SGD and
its steps are in its privacy ledger); in training rounds the per-sample gradients are masked
before clipping (under DP), the gradients before every step (after DP's noise), the parameters
and optimizer state after it, and the upload is the kept entries only. The client caches the
bitmap in its state.

Cost accounting: ``pruning.json`` (the mask: per-tensor counts, removed units, digest; the
explorers' epochs; per-sample forward MACs dense / theoretical / structured) and ``summary.json``
keys ``sparsity``, ``flops_ratio`` (theoretical: pruned over dense for the same training samples),
``flops_ratio_structured`` (only removed units count as savings: what dense kernels realise), both
also ``_with_exploration`` (the explorers' dense training added), ``bytes_up_ratio`` and
``bytes_down_ratio``: the serialized bytes of the training rounds' messages over the same
messages' bytes with every model array dense (``bytes_*_dense`` in ``metrics.jsonl``: the
measured bytes plus the array bytes the sparse encoding left out); exploration's messages are
added in the ``_with_exploration`` variants.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from fedsim.algorithms import autoflip
from fedsim.core.arrays import Named
from fedsim.core.client import ClientPlugin, ClientResult, ClientRound, LocalRun
from fedsim.core.server import TRAIN, ArraySpec, Payload, PluginUpdate, RoundResult, ServerPlugin

#: The phase of the exploration stage (round 0).
EXPLORE = "explore"
#: Training FLOPs per forward MAC and sample: 2 FLOPs per MAC, forward + backward = 3 x forward (spec 2.4).
TRAIN_FLOPS_PER_MAC = 6


# ------------------------------------------------------------------------------- the bitmap
def pack_mask(mask: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    """The mask of ``names`` (canonical order) as a bitmap: ``ceil(total / 8)`` uint8."""
    return np.packbits(np.concatenate([np.asarray(mask[k], bool).ravel() for k in names]))


def unpack_mask(bits: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_mask` for ``shapes`` (canonical order)."""
    total = sum(math.prod(s) for s in shapes.values())
    flat = np.unpackbits(np.asarray(bits, np.uint8), count=total).astype(bool)
    out, at = {}, 0
    for k, s in shapes.items():
        n = math.prod(s)
        out[k] = flat[at:at + n].reshape(s)
        at += n
    return out


# ------------------------------------------------------------------------------- server
class PruningServer(ServerPlugin):
    """The mask as server state: AutoFLIP's exploration stage and mask, or the random baseline.

    Args:
        name: the plugin name (shared with :class:`PruningClient`).
        kind: ``autoflip`` or ``random``.
        shapes: every model array's shape, canonical order; ``dtypes`` likewise.
        trainable: the names explorers report deviations for.
        mask_names: the arrays the mask may zero (their bitmap goes down in this order): the maskable
            set ``P_M`` plus, under a structured step, the other tensors a unit owns (biases, norms).
        maskable: ``P_M``, the arrays ``sparsity`` is measured over.
        build_mask: ``G -> MaskResult`` (AutoFLIP) with the scenario's sparsities, unit map, selection.
        random_mask: ``() -> mask`` (the baseline).
        explorers: the exploration stage's clients (sampled by the builder from the run seed).
        normalization, weighting: how deviations are merged (``minmax``/``robust``, ``uniform``/``num_examples``).
        macs: ``(mask, structured) -> {"dense", "theoretical", "structured"}`` per-sample forward MACs.
        refresh_every: rebuild the mask every this many training rounds (0: a static mask).
        start_from: ``initial`` (θ¹ = θ⁰ ⊙ M) or ``explored`` (θ¹ = the explorers' weighted mean ⊙ M).
    """

    def __init__(self, name: str, *, kind: str, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, np.dtype],
                 trainable: Sequence[str], mask_names: Sequence[str], maskable: Sequence[str],
                 build_mask: Callable[[Named], Any] | None,
                 random_mask: Callable[[], Named] | None, explorers: Sequence[int], normalization: str,
                 weighting: str, macs: Callable[[Named, Named], dict[str, int]], refresh_every: int = 0,
                 start_from: str = "initial"):
        if refresh_every and kind != "autoflip":
            raise ValueError("a mask refresh rebuilds AutoFLIP's mask from the clients' updates; "
                             "the random baseline's mask is static")
        self.name, self.kind = name, kind
        self.shapes, self.dtypes = dict(shapes), dict(dtypes)
        self.trainable, self.mask_names, self.maskable = list(trainable), list(mask_names), list(maskable)
        if set(self.maskable) - set(self.mask_names):
            raise ValueError(f"maskable arrays {sorted(set(self.maskable) - set(self.mask_names))} are not in mask_names")
        self.build_mask, self.random_mask, self.explorers = build_mask, random_mask, sorted(explorers)
        self.normalization, self.weighting, self.macs = normalization, weighting, macs
        self.refresh_every = int(refresh_every)
        if start_from not in ("initial", "explored") or (start_from == "explored" and kind != "autoflip"):
            raise ValueError(f"start_from: {start_from!r} (initial, or explored for kind autoflip)")
        self.start_from = start_from

    # -- state
    def init(self, params: Named) -> dict:
        state = {"mask_id": 0, "explored": self.kind != "autoflip", "mask": {}, "report": {}, "seen": {},
                 "exploration": {}, "refreshes": [],
                 "counters": {"train_samples": 0, "explore_samples": 0,
                              "flops": {"dense": 0, "theoretical": 0, "structured": 0}}}
        if self.kind == "random":
            mask = self.random_mask()           # unstructured: no whole unit is removed, dense kernels save nothing
            state.update(self._with_mask(mask, {k: np.ones_like(m, bool) for k, m in mask.items()}, {}, 1))
        return state

    def _with_mask(self, mask: Named, structured: Named, removed: Mapping[str, Any], mask_id: int) -> dict:
        stray = [k for k, m in mask.items() if k not in self.mask_names and not np.all(m)]
        if stray:
            raise ValueError(f"the mask zeroes {stray}, which its bitmap does not carry (mask_names)")
        kept = {k: np.asarray(mask[k], bool) for k in self.mask_names}
        pruned = {k: int(m.size - np.count_nonzero(m)) for k, m in kept.items()}
        total = sum(kept[k].size for k in self.maskable)
        report = {"sparsity": sum(pruned[k] for k in self.maskable) / max(total, 1), "pruned": pruned,
                  "maskable": total,
                  "removed_units": {k: [int(u) for u in v] for k, v in removed.items()},
                  "digest": autoflip.mask_digest(kept), "macs": self.macs(kept, structured)}
        return {"mask": kept, "mask_id": mask_id, "report": report}

    def _rebuilt(self, deviations: Mapping[int, Named], weights: Mapping[int, float] | None, mask_id: int) -> dict:
        """The mask from clients' squared deviations: merged, normalised per tensor, the hybrid rule."""
        built = self.build_mask(autoflip.normalize(autoflip.merge_deviations(deviations, weights), self.normalization))
        return self._with_mask(built.mask, built.structured, built.removed_units, mask_id)

    def _refreshes(self, state: dict, server_round: int) -> bool:
        return bool(self.refresh_every and state["mask"] and server_round >= 1
                    and server_round % self.refresh_every == 0)

    def phase(self, state: dict, server_round: int) -> str | None:
        return EXPLORE if server_round == 0 and not state["explored"] else None

    def sample(self, state: dict, server_round: int) -> list[int]:
        return list(self.explorers)

    # -- messages
    def downlink(self, state: dict, server_round: int) -> Payload:
        if not state["mask_id"]:
            return Payload(scalars={"send_explored": 1} if self.start_from == "explored" else {})
        return Payload(scalars={"mask_id": state["mask_id"], "refresh": int(self._refreshes(state, server_round))})

    def downlink_client(self, state: dict, server_round: int, cid: int) -> Payload:
        if not state["mask_id"] or state["seen"].get(str(cid)) == state["mask_id"]:
            return Payload()
        return Payload(arrays={"bitmap": {"bits": pack_mask(state["mask"], self.mask_names)}})

    def _sparse(self, state: dict, specs: dict[str, ArraySpec]) -> dict[str, ArraySpec]:
        out = dict(specs)
        for k, m in state["mask"].items():
            out[k] = ArraySpec(self.shapes[k], np.dtype(self.dtypes[k]), kept=m)
        return out

    def downlink_model(self, state: dict, phase: str, model_specs: dict[str, ArraySpec]) -> dict[str, ArraySpec]:
        return self._sparse(state, model_specs) if phase == TRAIN and state["mask"] else model_specs

    def uplink(self, state: dict, server_round: int, phase: str, model_specs: dict[str, ArraySpec]):
        if phase == EXPLORE:
            explored = {k: ArraySpec(s, np.dtype(self.dtypes[k])) for k, s in self.shapes.items()} \
                if self.start_from == "explored" else {}            # a claimed phase expects no model by default
            return explored, {"deviation": {k: ArraySpec(self.shapes[k], np.dtype(np.float32)) for k in self.trainable}}
        dense = not state["mask"] or self._refreshes(state, server_round)   # a refresh round's clients train dense
        return (model_specs if dense else self._sparse(state, model_specs)), {}

    def mask(self, state: dict) -> Named | None:
        return state["mask"] or None

    # -- rounds
    def aggregate(self, state: dict, result: RoundResult) -> PluginUpdate:
        new = dict(state)
        counters = dict(state["counters"])
        if result.phase == EXPLORE:
            return self._explored(new, counters, result)
        samples = int(sum(r.metrics.get("pruning_samples", 0) for r in result.replies))
        refresh = self._refreshes(state, result.server_round)
        macs = state["report"].get("macs") or {}
        counters["train_samples"] += samples
        counters["flops"] = {k: v + TRAIN_FLOPS_PER_MAC * samples * macs.get("dense" if refresh else k, 0)
                             for k, v in counters["flops"].items()}
        new["seen"] = {**state["seen"], **{str(r.cid): state["mask_id"] for r in result.replies}}
        new["counters"] = counters
        if refresh:
            return self._refreshed(new, result)
        params = result.params
        if state["mask"] and any(np.any(params[k][~m]) for k, m in state["mask"].items()):
            params = autoflip.apply_mask(params, state["mask"])       # the random baseline's θ⁰ ⊙ M (round 1)
            return PluginUpdate(new, params=params)
        return PluginUpdate(new)

    def _explored(self, new: dict, counters: dict, result: RoundResult) -> PluginUpdate:
        if not result.replies:
            raise RuntimeError("no explorer replied in the exploration stage; nothing to build a mask from")
        deviations = {r.cid: r.groups[self.name]["deviation"] for r in result.replies}
        weights = {r.cid: float(r.weight) for r in result.replies} if self.weighting == "num_examples" else None
        new.update(self._rebuilt(deviations, weights, 1))
        explored = {str(r.cid): {"epochs": int(r.metrics.get("explore_epochs", 0)),
                                 "warmup_epochs": int(r.metrics.get("explore_warmup_epochs", 0)),
                                 "examples": int(r.metrics.get("explore_examples", 0))} for r in result.replies}
        counters["explore_samples"] = sum((e["epochs"] + e["warmup_epochs"]) * e["examples"] for e in explored.values())
        new.update(explored=True, exploration=explored, counters=counters)
        start = result.params_before
        if self.start_from == "explored":
            mean = autoflip.merge_deviations({r.cid: r.model for r in result.replies}, weights)  # a weighted mean
            start = {k: mean[k].astype(v.dtype) if k in mean else v for k, v in start.items()}
        params = autoflip.apply_mask(start, new["mask"])
        return PluginUpdate(new, params=params, basis_changed=True)

    def _refreshed(self, new: dict, result: RoundResult) -> PluginUpdate:
        """A refresh round: the mask rebuilt from ``Σ p_k Δ_k²`` of the replies' dense updates."""
        before = result.params_before
        deviations = {r.cid: autoflip.squared_deviations({k: r.model[k] for k in self.trainable},
                                                         {k: before[k] for k in self.trainable})
                      for r in result.replies}
        weights = {r.cid: float(r.weight) for r in result.replies}
        old = new["mask"]
        new.update(self._rebuilt(deviations, weights, new["mask_id"] + 1))
        flipped = sum(int(np.count_nonzero(old[k] != m)) for k, m in new["mask"].items())
        new["refreshes"] = [*new["refreshes"], {"round": result.server_round, "mask_id": new["mask_id"],
                                                "entries_changed": flipped, "digest": new["report"]["digest"]}]
        return PluginUpdate(new, params=autoflip.apply_mask(result.params, new["mask"]), basis_changed=True)

    # -- read-outs
    def metrics(self, state: dict) -> dict[str, float]:
        return {"sparsity": state["report"]["sparsity"], "mask_id": state["mask_id"]} if state["mask"] else {}

    def files(self, state: dict) -> dict[str, Any]:
        doc = {"kind": self.kind, "mask_id": state["mask_id"], "explored": state["explored"], **state["report"],
               "exploration": {"explorers": self.explorers, "clients": state["exploration"]},
               "refresh_every": self.refresh_every, "refreshes": state["refreshes"], "counters": state["counters"]}
        return {"pruning.json": doc}

    def summary(self, state: dict, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not state["mask"]:
            return {}
        flops, c = state["counters"]["flops"], state["counters"]
        dense = flops["dense"]
        explore = TRAIN_FLOPS_PER_MAC * state["report"]["macs"]["dense"] * c["explore_samples"]
        out: dict[str, Any] = {"sparsity": state["report"]["sparsity"]}
        for key, which in (("flops_ratio", "theoretical"), ("flops_ratio_structured", "structured")):
            pruned = flops[which]
            out[key] = pruned / dense if dense else None
            out[f"{key}_with_exploration"] = (pruned + explore) / dense if dense else None
        train = [r for r in rows if r.get("round", 0) >= 1]
        explore_rows = [r for r in rows if r.get("round") == 0]
        for way in ("up", "down"):
            sent = sum(r.get(f"bytes_{way}") or 0 for r in train)
            dense_bytes = sum(r.get(f"bytes_{way}_dense", r.get(f"bytes_{way}")) or 0 for r in train)
            extra = sum(r.get(f"bytes_{way}") or 0 for r in explore_rows)
            out[f"bytes_{way}_ratio"] = sent / dense_bytes if dense_bytes else None
            out[f"bytes_{way}_ratio_with_exploration"] = (sent + extra) / dense_bytes if dense_bytes else None
        return out


# ------------------------------------------------------------------------------- client
class _ExploreRound(ClientRound):
    """An explorer's round in the standard loop (so a private run explores under DP-SGD, and its
    steps reach the privacy ledger): an :class:`~fedsim.algorithms.autoflip.ExplorationSchedule`
    as the batch source, the explorer's optimizer and learning rate, θ_base snapshotted when the
    warm-up ends, ``D_k = (θ_k − θ_base)²`` up."""

    def __init__(self, plugin: "PruningClient", run: LocalRun, send_explored: bool = False):
        from fedsim.train import ShuffledBatches, make_optimizer

        p = self.plugin = plugin
        self.send_explored = send_explored              # start_from: explored: θ_k goes up too
        x, y = run.data
        generator = run.generator("explore")            # its own stream: training's stay FedAvg's (A4)
        self.base: dict[str, torch.Tensor] = {}

        def epoch():
            return next(iter(ShuffledBatches(x, y, batch_size=p.explore_batch_size, epochs=1, generator=generator,
                                             device=run.device).epochs()))

        def snapshot():
            with torch.no_grad():
                self.base = {k: v.detach().clone() for k, v in run.trainable().items()}

        self.schedule = autoflip.ExplorationSchedule(epoch, explore_epochs=p.explore_epochs, patience=p.patience,
                                                     warmup_epochs=p.warmup_epochs, on_base=snapshot)
        # Set before any plugin's prepare, so a DP plugin wraps this schedule, optimizer and loss.
        run.batches = self.schedule
        run.make_optimizer = lambda params, lr: make_optimizer(params, p.explore_optimizer, lr, 0.0, 0.0)
        run.lr_factors[p.name] = p.explore_lr / run.base_lr
        loss_fn = run.loss_fn

        def recorded(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            loss = loss_fn(output, target)
            self.schedule.record(float(loss.detach()), len(target))
            return loss
        run.loss_fn = recorded

    def finish(self, run: LocalRun, model: Named) -> ClientResult:
        deviations = autoflip.squared_deviations(run.trainable(), self.base)
        return ClientResult(arrays={"deviation": deviations},
                            metrics={"explore_epochs": self.schedule.epochs_run,
                                     "explore_warmup_epochs": self.plugin.warmup_epochs,
                                     "explore_examples": run.num_examples},
                            model=model if self.send_explored else {})


class _MaskedRound(ClientRound):
    """A training round on the mask; ``dense``: a refresh round (start masked, train and send dense)."""

    def __init__(self, mask: Named, state: dict, dense: bool = False):
        self.mask, self.state, self.dense = mask, state, dense
        self.masks: dict[str, torch.Tensor] = {}
        self.samples = 0

    def prepare(self, run: LocalRun) -> None:
        self.masks = autoflip.torch_masks(self.mask, run.device)
        autoflip.mask_params_(run.trainable(), self.masks)
        loss_fn = run.loss_fn

        def counted(output: torch.Tensor, target: torch.Tensor):
            self.samples += len(target)
            return loss_fn(output, target)
        run.loss_fn = counted

    def after_backward(self, run: LocalRun) -> None:
        if not self.dense:
            autoflip.mask_grad_samples_(run.trainable(), self.masks)   # DP: before clipping (no-op otherwise)

    def before_step(self, run: LocalRun) -> None:
        if not self.dense:
            autoflip.mask_grads_(run.grads(), self.masks)     # after every other hook (DP: after the noise)

    def after_step(self, run: LocalRun, skipped: bool) -> None:
        if not skipped and not self.dense:
            params = run.trainable()
            autoflip.mask_params_(params, self.masks)
            autoflip.mask_optimizer_state_(run.optimizer, params, self.masks)

    def finish(self, run: LocalRun, model: Named) -> ClientResult:
        upload = model if self.dense else \
            {k: (np.ascontiguousarray(v[self.mask[k]]) if k in self.mask else v) for k, v in model.items()}
        return ClientResult(metrics={"pruning_samples": self.samples}, state=self.state, model=upload)


class PruningClient(ClientPlugin):
    """The client side: exploration in round 0, masked training after it; caches the mask's bitmap.

    Args:
        name: the plugin name (shared with :class:`PruningServer`).
        mask_shapes: the shapes of the arrays that may carry a mask (canonical order, as the server's).
        explore_epochs, patience, warmup_epochs, explore_optimizer, explore_lr, explore_batch_size:
            the explorer's schedule (spec 2.1).
    """

    stateful = True

    def __init__(self, name: str, *, mask_shapes: Mapping[str, tuple[int, ...]], explore_epochs: int, patience: int,
                 warmup_epochs: int, explore_optimizer: str, explore_lr: float, explore_batch_size: int):
        self.name, self.mask_shapes = name, dict(mask_shapes)
        self.explore_epochs, self.patience, self.warmup_epochs = explore_epochs, patience, warmup_epochs
        self.explore_optimizer, self.explore_lr, self.explore_batch_size = explore_optimizer, explore_lr, explore_batch_size

    def takes_part(self, phase: str) -> bool:
        return phase in (TRAIN, EXPLORE)

    def _cached(self, downlink: Payload, state: Any) -> tuple[Named | None, dict]:
        """The current mask (from this round's bitmap, else the cached one) and the state to keep."""
        mask_id = downlink.scalars.get("mask_id")
        if mask_id is None:
            return None, state or {}
        bits = downlink.arrays.get("bitmap", {}).get("bits")
        if bits is None:
            if not state or state.get("mask_id") != mask_id:
                raise RuntimeError(f"the server's mask {mask_id} came without its bitmap and this client has "
                                   f"{'no mask' if not state else 'mask ' + str(state.get('mask_id'))} cached")
            bits = state["bits"]
        full = unpack_mask(bits, self.mask_shapes)
        return full, {"mask_id": int(mask_id), "bits": np.asarray(bits, np.uint8)}

    def decode_model(self, model: Named, downlink: Payload, state: Any) -> Named:
        mask, _ = self._cached(downlink, state)
        if mask is None:
            return model
        out = dict(model)
        for k, m in mask.items():
            if k in out and out[k].shape != m.shape:                  # came down as the kept entries
                dense = np.zeros(m.shape, out[k].dtype)
                dense[m] = out[k]
                out[k] = dense
        return out

    def begin(self, run: LocalRun, downlink: Payload, state: Any) -> ClientRound:
        if run.phase == EXPLORE:
            return _ExploreRound(self, run, send_explored=bool(downlink.scalars.get("send_explored", 0)))
        mask, keep = self._cached(downlink, state)
        if mask is None:
            raise RuntimeError("a pruning training round came without a mask id")
        return _MaskedRound(mask, keep, dense=bool(downlink.scalars.get("refresh", 0)))
