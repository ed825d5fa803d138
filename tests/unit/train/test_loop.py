"""The standard local loop (fedsim.train.loop) and its batch source: hook order and counts,
skipped (virtual) steps, learning-rate factors, a plugin's own procedure, and per-sample
gradients against single-example backward passes."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fedsim.core.client import ClientRound, LocalRun
from fedsim.train import ShuffledBatches, per_sample_grads, run_local, train_local

X = np.random.default_rng(0).normal(size=(10, 3)).astype("float32")
Y = (X[:, 0] > 0).astype("int64")


def _run(epochs=2, steps=None, batch_size=4, opt=None) -> LocalRun:
    model = torch.nn.Linear(3, 2)
    batches = ShuffledBatches(X, Y, batch_size=batch_size, epochs=epochs, steps=steps,
                              generator=torch.Generator().manual_seed(1))
    return LocalRun(model, batches, opt or (lambda params, lr: torch.optim.SGD(params, lr=lr)), F.cross_entropy,
                    base_lr=0.1)


class Recorder(ClientRound):
    def __init__(self):
        self.log: list[str] = []

    def prepare(self, run):
        self.log.append("prepare")

    def on_epoch(self, run):
        self.log.append("epoch")

    def loss_term(self, run):
        self.log.append("loss")
        return None

    def before_step(self, run):
        assert all(p.grad is not None for p in run.trainable().values())   # after backward
        self.log.append("before")

    def after_step(self, run, skipped):
        self.log.append("after-skip" if skipped else "after")


def test_hooks_run_in_loop_order_once_per_batch_and_epoch():
    """Catches a hook that is never called, called out of order, or on_epoch called per batch."""
    rec = Recorder()
    out = train_local(_run(), [rec])
    per_epoch = ["epoch"] + ["loss", "before", "after"] * 3           # 10 examples, batches of 4: 3 batches
    assert rec.log == ["prepare"] + per_epoch * 2
    assert out["steps"] == 6


def test_steps_mode_draws_whole_passes_and_stops_exactly():
    src = ShuffledBatches(X, Y, batch_size=4, steps=5, generator=torch.Generator().manual_seed(0))
    sizes = [[len(y) for _, y in epoch] for epoch in src.epochs()]
    assert sizes == [[4, 4, 2], [4, 4]]
    seen = [y for epoch in ShuffledBatches(X, Y, batch_size=10, epochs=1, generator=torch.Generator().manual_seed(0))
            .epochs() for _, y in epoch]
    assert sorted(seen[0].tolist()) == sorted(Y.tolist())                # a pass is a permutation


class Skipper(torch.optim.SGD):
    """Like Opacus' DPOptimizer under BatchMemoryManager: every other step is virtual."""

    def step(self, closure=None):
        self._is_last_step_skipped = not getattr(self, "_is_last_step_skipped", True)
        if not self._is_last_step_skipped:
            super().step(closure)


def test_virtual_steps_are_not_counted_and_hooks_are_told():
    rec = Recorder()
    run = _run(opt=lambda params, lr: Skipper(params, lr=lr))
    train_local(run, [rec])
    assert run.steps == 3 and rec.log.count("before") == 6
    assert rec.log.count("after-skip") == 3 and rec.log.count("after") == 3


class Halver(ClientRound):
    """Halves the learning rate after every real step."""

    def __init__(self):
        self.seen: list[float] = []

    def before_step(self, run):
        self.seen.append(run.optimizer.param_groups[0]["lr"])

    def after_step(self, run, skipped):
        run.lr_factors["halver"] = run.lr_factors.get("halver", 1.0) * 0.5


def test_lr_factors_reach_the_optimizer_for_the_next_step():
    """Catches a loop that ignores run.lr_factors (every step would use the base LR)."""
    h = Halver()
    run = _run()
    train_local(run, [h])
    assert h.seen == [0.1 * 0.5 ** k for k in range(6)] and run.lr == 0.1 * 0.5 ** 6


class Own(ClientRound):
    def procedure(self, run, rounds):
        return {"train_loss": 0.0, "steps": 0, "compute_s": 0.0, "mine": 1.0}


def test_a_plugin_procedure_replaces_the_standard_loop():
    run = _run()
    before = [p.detach().clone() for p in run.model.parameters()]
    assert run_local(run, [Recorder(), Own()])["mine"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, run.model.parameters()))


def test_per_sample_grads_equal_single_example_backward():
    """The functional core (vmap(grad)) against a loop of one-example backward passes."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x, y = torch.from_numpy(X), torch.from_numpy(Y)
    grads = per_sample_grads(model, F.cross_entropy, x, y)
    for i in range(len(y)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-5, atol=1e-6)
