"""Privacy as fedsim plugins: record-level DP-SGD / DiceSGD on every client, client-level DP on the
server, and the server's mirror of every client's privacy ledger (``privacy.json``).

Record level (``unit: example``), on the client (:class:`RecordLevelClient`):

- the model is wrapped for per-sample gradients (Opacus ``GradSampleModule``, ``hooks`` or
  ``functorch`` mode), or for ghost clipping (per-sample gradient norms only; DP-SGD);
- batches are Poisson-sampled from the client's data, at rate ``q = 1 / ceil(|D_k| / B)``, with a
  generator derived from (seed, round, client);
- the optimizer is :class:`~fedsim.privacy.optimizers.PrivateOptimizer` (DP-SGD) or
  :class:`~fedsim.privacy.optimizers.DiceSGDOptimizer`. It privatizes before the other plugins'
  ``before_step``, so their edits are post-processing.

The noise multiplier σ_k is explicit, or calibrated when the client first trains. The
calibration takes the target ε over the most rounds the client could take part in:
``steps = τ R``, with τ its local steps per round. This never overshoots, whatever the
participation. The client's ledger of (σ, q, steps) events lives in its state and never
rolls back (``keep_on_resume``): after a crash, the steps of the interrupted round are counted
again when the round is re-run (conservative: the lost replies may have been seen). DiceSGD's
error state does roll back, with the model, so a resumed run trains as the straight run. A client whose next round would take it past the target does
not train and says so: its reply is an error naming the ε it would reach.

Client level (``unit: client``, :class:`ClientLevelServer`): every client update is clipped to
norm C and Gaussian noise of std σC is added to the SUM. The sum is divided by the planned cohort
size m, a fixed public number. The accounting is one ledger for the population, with
``q = m / N`` and one step per round.

Example:
    >>> client = RecordLevelClient("privacy", mechanism="dpsgd", clip=1.0, noise_multiplier=1.0, target_epsilon=None,
    ...                            delta=1e-5, accountant="rdp", batch_size=16, epochs=1, steps=None, rounds=5)
    >>> client.sample_rate(100), client.local_steps(100)
    (0.14285714285714285, 7)
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedsim.core.arrays import Named
from fedsim.core.client import ClientPlugin, ClientResult, ClientRound, LocalRun
from fedsim.core.server import TRAIN, ClientUpdate, Payload, PluginUpdate, RoundResult, ServerPlugin
from fedsim.privacy.accounting import Ledger, calibrate
from fedsim.privacy.mechanisms import client_level_mean, noise_inflation
from fedsim.seeding import numpy_rng


# Opacus' hooks fire on the first module, whose input needs no gradient: torch warns on every batch.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")


GHOST_MIN_WEIGHTS = 50_000


def auto_grad_sample_mode(model: torch.nn.Module, mechanism: str) -> tuple[str, str]:
    """``grad_sample_mode: auto``: ``(mode, why)``.

    Ghost clipping for DP-SGD when large ``nn.Linear`` layers (each >= 50k trainable weights) hold
    most of the trainable weights: materialised per-sample gradients of such a layer (batch x
    weights floats) made hooks 20-60x slower than plain SGD, ghost 2-4x (shared/notes/dp-tooling.md
    section 2). Else ``hooks`` (also always for DiceSGD, whose error feedback needs the per-sample
    gradients' sum before and after clipping, and for LoRA-style small trainable layers).
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    large = {name: m.weight.numel() for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and m.weight.requires_grad and m.weight.numel() >= GHOST_MIN_WEIGHTS}
    share = sum(large.values()) / max(trainable, 1)
    if mechanism == "dpsgd" and large and share >= 0.5:
        layers = ", ".join(f"{name} ({n} weights)" for name, n in sorted(large.items()))
        return "ghost", f"large nn.Linear {layers}: {share:.0%} of the {trainable} trainable weights"
    if mechanism != "dpsgd":
        return "hooks", f"{mechanism} needs per-sample gradients"
    return "hooks", f"no nn.Linear of >= {GHOST_MIN_WEIGHTS} weights holds most of the {trainable} trainable weights"


class PrivacyBudgetExhausted(RuntimeError):
    """A client whose next round would exceed its target ε (it does not train)."""


class _PoissonBatches:
    """Poisson-sampled batches (Opacus ``DPDataLoader``), optionally split into physical batches by
    ``BatchMemoryManager``; ``epochs`` passes, or exactly ``steps`` logical batches."""

    def __init__(self, run: LocalRun, loader: Any, optimizer: Any, epochs: int | None, steps: int | None,
                 physical: int | None, outer: Any = None):
        self.run, self.loader, self.optimizer = run, loader, optimizer
        self.epochs_, self.steps, self.physical, self.outer = epochs, steps, physical, outer

    def epochs(self):
        if self.run.phase != TRAIN and self.outer is not None:
            for _ in self.outer.epochs():        # a stage's own schedule (AutoFLIP's exploration) sets the epochs
                yield self._pass(None)
            return
        done, epoch = 0, 0
        while (self.steps is not None and done < self.steps) or (self.steps is None and epoch < (self.epochs_ or 1)):
            epoch += 1
            budget = None if self.steps is None else self.steps - done
            done += len(self.loader) if budget is None else min(budget, len(self.loader))
            yield self._pass(budget)

    def _pass(self, budget: int | None):
        from opacus.utils.batch_memory_manager import BatchMemoryManager

        device = self.run.device
        if self.physical is None:
            for k, (xb, yb) in enumerate(self.loader):
                if budget is not None and k >= budget:
                    return
                yield xb.to(device), yb.to(device)
            return
        start = self.run.steps
        with BatchMemoryManager(data_loader=self.loader, max_physical_batch_size=self.physical,
                                optimizer=self.optimizer) as loader:
            for xb, yb in loader:
                if budget is not None and self.run.steps - start >= budget:
                    return
                yield xb.to(device), yb.to(device)


def _dp_loss(loss_fn):
    """The loss, with an empty Poisson batch giving a zero loss (its step still adds noise)."""
    def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return loss_fn(output, target) if len(target) else output.sum() * 0.0
    return loss


class _RecordLevelRound(ClientRound):
    def __init__(self, plugin: "RecordLevelClient", sigma: float, q: float, ledger: Ledger, error: Any):
        self.plugin, self.sigma, self.q, self.ledger, self.error = plugin, sigma, q, ledger, error
        self.gsm: Any = None
        self.optimizer: Any = None

    def prepare(self, run: LocalRun) -> None:
        from opacus.data_loader import DPDataLoader
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.grad_sample.utils import prepare_module

        from fedsim.privacy.optimizers import DiceSGDOptimizer, GhostPrivateOptimizer, PrivateOptimizer, ghost_loss

        p = self.plugin
        x, y = run.data
        base = DataLoader(TensorDataset(torch.from_numpy(np.asarray(x)), torch.from_numpy(np.asarray(y))),
                          batch_size=p.batch_size)
        loader = DPDataLoader.from_data_loader(base, generator=run.generator("poisson"))
        kwargs = dict(noise_multiplier=self.sigma, max_grad_norm=p.clip,
                      expected_batch_size=max(1, int(len(base.dataset) * loader.sample_rate)),
                      generator=run.generator("dp-noise"))
        if p.grad_sample_mode == "ghost":
            self.gsm = GradSampleModuleFastGradientClipping(run.model, batch_first=True, loss_reduction="mean",
                                                            max_grad_norm=p.clip, use_ghost_clipping=True)
        else:
            self.gsm = prepare_module(run.model, p.grad_sample_mode, batch_first=True, loss_reduction="mean")
        run.wrapped = self.gsm
        names = {param: name for name, param in run.trainable().items()}
        if p.grad_sample_mode == "ghost":
            self.optimizer = GhostPrivateOptimizer(run.optimizer, **kwargs)
            run.loss_fn = ghost_loss(self.gsm, self.optimizer, run.loss_fn)
        elif p.mechanism == "dicesgd":
            self.optimizer = DiceSGDOptimizer(run.optimizer, error_clip=p.error_clip_ratio * p.clip, kappa=p.kappa,
                                              names=names, **kwargs)
            if self.error is not None:
                self.optimizer.load_error_state({k: torch.from_numpy(np.asarray(v)) for k, v in self.error.items()})
        else:
            self.optimizer = PrivateOptimizer(run.optimizer, **kwargs)
        if p.lr_divide_by_c1:
            run.lr_factors[p.name] = 1.0 / p.clip
        if p.grad_sample_mode != "ghost":
            run.loss_fn = _dp_loss(run.loss_fn)
        run.optimizer = self.optimizer
        run.batches = _PoissonBatches(run, loader, self.optimizer, p.epochs, p.steps, p.physical_batch_size,
                                      outer=run.batches)

    def before_step(self, run: LocalRun) -> None:
        self.optimizer.privatize()

    def finish(self, run: LocalRun, model: Named) -> ClientResult:
        self.ledger.add(self.sigma, self.q, run.steps)
        p = self.plugin
        eps = self.ledger.epsilon(p.delta, p.accountant)
        state: dict[str, Any] = {"ledger": self.ledger.to_list(), "sigma": self.sigma}
        if p.mechanism == "dicesgd" and p.persist_error:
            state.update(error={k: v.cpu().numpy() for k, v in self.optimizer.error_state().items()},
                         error_basis=run.basis_id)
        metrics = {"epsilon": eps, "dp_noise_multiplier": self.sigma, "dp_sample_rate": self.q,
                   "dp_steps": run.steps, "dp_steps_total": self.ledger.steps}
        if p.mechanism == "dicesgd":
            metrics.update(dp_kappa=p.kappa)
        return ClientResult(metrics=metrics, state=state)

    def private(self) -> Mapping[str, Any]:
        if self.optimizer is not None and self.plugin.mechanism == "dicesgd":
            return {"error_buffer": self.optimizer.error_state()}
        return {}

    def close(self, run: LocalRun) -> None:
        if self.gsm is not None:
            self.gsm._close()                 # the model is shared by the next client of this process
            run.wrapped = None


class RecordLevelClient(ClientPlugin):
    """Record-level DP-SGD or DiceSGD on a client, with its cumulative ledger in the client state.

    Args:
        name: the plugin name (shared with :class:`LedgerMirror`).
        mechanism: ``dpsgd`` or ``dicesgd``.
        clip: C1, the per-sample clip.
        noise_multiplier: σ (explicit), or None to calibrate it to ``target_epsilon``.
        target_epsilon, delta: the budget; with both σ and a target, the target is a cap.
        accountant: ``prv`` or ``rdp``, for calibration, the budget and the reported ε.
        batch_size, epochs, steps, rounds: the local schedule (``steps`` or ``epochs`` per round)
            and the run length (calibration assumes the client could take part in every round).
        error_clip_ratio, kappa, persist_error: DiceSGD's settings (``kappa``, the noise inflation,
            defaults to ``sqrt(1 + 2 r)``).
        lr_divide_by_c1: train at lr / C1 (either mechanism); None: DiceSGD yes (its reference
            scripts), DP-SGD no.
        grad_sample_mode: Opacus' per-sample gradient mode, ``hooks``, ``functorch`` or ``ghost``
            (DP-SGD only; see :func:`auto_grad_sample_mode`).
        stage_epochs: the most epochs a client trains in stages before round 1 (AutoFLIP's
            exploration, whose own schedule then sets the epochs); calibration counts them.
        physical_batch_size: split Poisson batches into physical batches of this size.
    """

    stateful = True
    keep_on_resume = frozenset({"ledger"})      # spent is spent; the error feedback rolls back with the model
    private = frozenset({"error"})

    def __init__(self, name: str, *, mechanism: str, clip: float, noise_multiplier: float | None,
                 target_epsilon: float | None, delta: float, accountant: str, batch_size: int, epochs: int | None,
                 steps: int | None, rounds: int, error_clip_ratio: float = 1.0, kappa: float | None = None,
                 persist_error: bool = False, lr_divide_by_c1: bool | None = None, grad_sample_mode: str = "hooks",
                 physical_batch_size: int | None = None, stage_epochs: int = 0):
        self.name, self.mechanism, self.clip = name, mechanism, float(clip)
        self.noise_multiplier, self.target_epsilon, self.delta = noise_multiplier, target_epsilon, float(delta)
        self.accountant, self.batch_size, self.epochs, self.steps = accountant, int(batch_size), epochs, steps
        self.rounds, self.error_clip_ratio, self.persist_error = int(rounds), float(error_clip_ratio), persist_error
        self.kappa = kappa if kappa is not None else \
            (noise_inflation(self.error_clip_ratio) if mechanism == "dicesgd" else 1.0)
        self.lr_divide_by_c1 = (mechanism == "dicesgd") if lr_divide_by_c1 is None else bool(lr_divide_by_c1)
        self.grad_sample_mode = grad_sample_mode
        self.physical_batch_size, self.stage_epochs = physical_batch_size, int(stage_epochs)

    def takes_part(self, phase: str) -> bool:
        return True                       # every phase that trains on private data is accounted

    def sample_rate(self, n: int) -> float:
        """Opacus' Poisson rate ``1 / len(loader) = 1 / ceil(n / B)``."""
        return 1.0 / math.ceil(n / self.batch_size)

    def local_steps(self, n: int) -> int:
        """Logical steps per round: ``steps``, or ``epochs * ceil(n / B)``."""
        return int(self.steps) if self.steps is not None else int(self.epochs or 1) * math.ceil(n / self.batch_size)

    def stage_steps(self, n: int) -> int:
        """The most logical steps a client takes in stages before round 1 (AutoFLIP's exploration)."""
        return self.stage_epochs * math.ceil(n / self.batch_size)

    def noise_for(self, n: int) -> float:
        """σ for a client with ``n`` examples (explicit, or calibrated over ``τ R`` steps plus the
        stages' most steps)."""
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        return calibrate(self.target_epsilon, self.delta, self.sample_rate(n),
                         self.local_steps(n) * self.rounds + self.stage_steps(n), self.accountant)

    def begin(self, run: LocalRun, downlink: Payload, state: Any) -> ClientRound:
        n = run.num_examples
        state = state or {}
        ledger = Ledger.from_list(state.get("ledger", []))
        sigma = float(state["sigma"]) if "sigma" in state else self.noise_for(n)
        q = self.sample_rate(n)
        if self.target_epsilon is not None and self.noise_multiplier is not None:   # a calibrated σ cannot overshoot
            next_steps = self.local_steps(n) if run.phase == TRAIN else self.stage_steps(n)
            after = ledger.after(sigma, q, next_steps).epsilon(self.delta, self.accountant)
            if after > self.target_epsilon:
                raise PrivacyBudgetExhausted(
                    f"client {run.client_id} does not train: its next round would take it to ε = {after:.3f} > "
                    f"{self.target_epsilon} (δ = {self.delta}, {ledger.steps} steps spent)")
        error = None
        if self.mechanism == "dicesgd" and self.persist_error and state.get("error_basis") == run.basis_id:
            error = state.get("error")          # a changed basis (re-factorisation, new mask) resets e
        return _RecordLevelRound(self, sigma, q, ledger, error)


MEANING = {
    "dpsgd": "record-level (epsilon, delta) of the Poisson-subsampled Gaussian mechanism with per-sample clip C1, "
             "composed over every step the client took",
    "dicesgd": "eps_dpsgd_equiv: the DP-SGD epsilon at sigma_base, NOT a DiceSGD guarantee. It does not cover the "
               "error-feedback channel (specs/dicesgd.md 2.2): the fed-back error carries unnoised clipped-away "
               "residuals, and the audit in tests/dp/test_audit.py measures an empirical epsilon above it once the "
               "error state carries an example's residual",
    "gaussian": "client-level (epsilon, delta): a client's whole contribution is the unit, Poisson-style client "
                "sampling at q = m/N, one Gaussian step per round",
}


class LedgerMirror(ServerPlugin):
    """The server's copy of every client's ledger, from the replies (σ, q, steps); writes
    ``privacy.json`` (with the per-sample gradient mode used and why) and reports ``epsilon_max`` / ``epsilon_mean`` over the clients that trained.

    A client's σ and q are fixed for the run, so its ledger is determined by its total steps: a
    round whose reply was lost or rejected is recovered from the next reply's ``dp_steps_total``.
    The mirror never rolls back (a reply claiming fewer steps than before changes nothing).
    """

    def __init__(self, name: str, *, unit: str, mechanism: str, delta: float, target_epsilon: float | None,
                 accountant: str, calibration: Mapping[str, Any], grad_sample_mode: Mapping[str, str] | None = None):
        self.name, self.unit, self.mechanism, self.delta = name, unit, mechanism, float(delta)
        self.target_epsilon, self.accountant, self.calibration = target_epsilon, accountant, dict(calibration)
        self.grad_sample_mode = dict(grad_sample_mode) if grad_sample_mode else None

    def init(self, params: Named) -> dict:
        return {"clients": {}}

    def takes_part(self, phase: str) -> bool:
        return True

    def aggregate(self, state: dict, result: RoundResult) -> PluginUpdate:
        clients = dict(state["clients"])
        for r in [*result.replies, *result.refused]:      # a refused reply was released to the server too
            m = r.metrics
            if not {"dp_noise_multiplier", "dp_sample_rate", "dp_steps_total"} <= set(m):
                continue
            entry = clients.get(str(r.cid), {"events": [], "epsilon": 0.0})
            ledger = Ledger.from_list(entry["events"])
            new = int(m["dp_steps_total"]) - ledger.steps
            if new <= 0:
                continue
            ledger.add(float(m["dp_noise_multiplier"]), float(m["dp_sample_rate"]), new)
            clients[str(r.cid)] = {"events": ledger.to_list(), "epsilon": ledger.epsilon(self.delta, self.accountant)}
        return PluginUpdate({"clients": clients})

    def skipped(self, state: dict, result: RoundResult) -> dict:
        """A round left unaggregated still released its replies to the server: account them."""
        return self.aggregate(state, result).state

    def metrics(self, state: dict) -> dict[str, float]:
        eps = [c["epsilon"] for c in state["clients"].values()]
        return {"epsilon_max": max(eps), "epsilon_mean": float(np.mean(eps))} if eps else {}

    def files(self, state: dict) -> dict[str, Any]:
        return {"privacy.json": {"unit": self.unit, "mechanism": self.mechanism, "accountant": self.accountant,
                                 "epsilon_meaning": MEANING[self.mechanism],
                                 "delta": self.delta, "target_epsilon": self.target_epsilon,
                                 "calibration": self.calibration,
                                 **({"grad_sample_mode": self.grad_sample_mode} if self.grad_sample_mode else {}),
                                 "clients": dict(sorted(state["clients"].items(), key=lambda kv: int(kv[0])))}}


class ClientLevelServer(ServerPlugin):
    """Client-level DP-FedAvg: clip every client update to C, add N(0, (σC)^2) to the sum, divide by
    the planned cohort size m (public); one ledger for the population (q = m/N, a step per round).

    Args:
        name: the plugin name.
        clip: C, the update clip.
        noise_multiplier: σ.
        cohort: m, the planned clients per round (the fixed denominator).
        num_clients: N.
        seed: the run seed (the noise is a pure function of seed and round).
        delta, target_epsilon, accountant, calibration: for the report (``privacy.json``).
    """

    def __init__(self, name: str, *, clip: float, noise_multiplier: float, cohort: int, num_clients: int, seed: int,
                 delta: float, target_epsilon: float | None, accountant: str, calibration: Mapping[str, Any]):
        self.name, self.clip, self.sigma, self.cohort = name, float(clip), float(noise_multiplier), int(cohort)
        self.num_clients, self.seed, self.delta, self.accountant = int(num_clients), int(seed), float(delta), accountant
        self.target_epsilon, self.calibration = target_epsilon, dict(calibration)

    def init(self, params: Named) -> dict:
        return {"events": [], "epsilon": 0.0}

    def combine(self, state: Any, server_round: int, params: Named, replies: Sequence[ClientUpdate],
                weights: Sequence[float]) -> Named:
        floats = [k for k, v in params.items() if np.issubdtype(v.dtype, np.floating)]
        updates = [{k: np.asarray(r.model[k], np.float64) - params[k].astype(np.float64) for k in floats}
                   for r in replies]
        delta = client_level_mean(updates, clip=self.clip, noise_multiplier=self.sigma, denominator=self.cohort,
                                  rng=numpy_rng(self.seed, "client-dp", server_round))
        return {k: delta.get(k, np.zeros(v.shape, np.float64)) for k, v in params.items()}

    def aggregate(self, state: dict, result: RoundResult) -> PluginUpdate:
        ledger = Ledger.from_list(state["events"])
        ledger.add(self.sigma, self.cohort / self.num_clients, 1)
        return PluginUpdate({"events": ledger.to_list(), "epsilon": ledger.epsilon(self.delta, self.accountant)})

    def metrics(self, state: dict) -> dict[str, float]:
        return {"epsilon_max": state["epsilon"], "epsilon_mean": state["epsilon"]} if state["events"] else {}

    def files(self, state: dict) -> dict[str, Any]:
        return {"privacy.json": {"unit": "client", "mechanism": "gaussian", "accountant": self.accountant,
                                 "epsilon_meaning": MEANING["gaussian"],
                                 "delta": self.delta, "target_epsilon": self.target_epsilon,
                                 "calibration": self.calibration,
                                 "clients": {"all": {"events": state["events"], "epsilon": state["epsilon"]}}}}
