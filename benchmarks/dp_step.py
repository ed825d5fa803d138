"""DP step cost: the time of one DP-SGD (and DiceSGD) step over one plain SGD step, per built-in
model and per-sample-gradient mode, on one torch thread. Prints figures; it is not a test.

    python benchmarks/dp_step.py                 # the quickstart CNN (digits 8x8) and the MLP
    python benchmarks/dp_step.py --models cnn28,mlp28 --batch 64      # Fashion-MNIST-sized (28x28) models
    python benchmarks/dp_step.py --batch 64 --steps 60 --json

A step is zero_grad + forward + backward + optimizer.step(), including per-sample gradients,
flat clipping, noise and averaging; the batch is fixed (no loader). Modes: ``hooks`` (Opacus,
fedsim's ``auto`` for most models), ``ghost`` (Opacus' ghost clipping, ``auto`` for models dominated
by large ``nn.Linear`` layers), ``functorch`` (Opacus' functorch mode) and ``torch.func`` (fedsim's own
``per_sample_grads`` + ``dpsgd_grad``, the functional path). Timing: warm-up, then blocks with
every variant interleaved; the median block per variant is reported.
"""

from __future__ import annotations

import argparse
import warnings
import json
import statistics
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message="Full backward hook is firing")


SHAPES = {"cnn": (1, 8, 8), "mlp": (64,), "cnn28": (1, 28, 28), "mlp28": (1, 28, 28)}   # *28: Fashion-MNIST


def _model(name: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    from fedsim.models import build_model
    shape = SHAPES[name]
    return build_model(name.removesuffix("28"), input_shape=shape, num_classes=10), shape


def _plain(name, x, y):
    model, _ = _model(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def _opacus(name, x, y, mode, mechanism):
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.grad_sample.utils import prepare_module

    from fedsim.privacy.optimizers import DiceSGDOptimizer, GhostPrivateOptimizer, PrivateOptimizer, ghost_loss
    model, _ = _model(name)
    kwargs = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=len(y),
                  generator=torch.Generator().manual_seed(0))
    base = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = F.cross_entropy
    if mode == "ghost":          # as fedsim's record-level client builds it
        gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean", max_grad_norm=1.0)
        opt = GhostPrivateOptimizer(base, **kwargs)
        loss_fn = ghost_loss(gsm, opt, F.cross_entropy)
    else:
        gsm = prepare_module(model, mode, batch_first=True, loss_reduction="mean")
        opt = DiceSGDOptimizer(base, error_clip=1.0, **kwargs) if mechanism == "dicesgd" else \
            PrivateOptimizer(base, **kwargs)

    def step():
        opt.zero_grad()
        loss_fn(gsm(x), y).backward()
        opt.step()
    return step


def _functional(name, x, y):
    from fedsim.privacy.mechanisms import dpsgd_grad
    from fedsim.train import per_sample_grads
    model, _ = _model(name)
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def apply(grads):
        for k, p in params.items():
            p.sub_(0.05 * grads[k])

    def step():
        per = per_sample_grads(model, F.cross_entropy, x, y)
        apply(dpsgd_grad(per, clip=1.0, noise_multiplier=1.0, expected_batch_size=len(y), generator=g))
    return step


def measure(name: str, batch: int, steps: int, blocks: int) -> list[dict]:
    _, shape = _model(name)
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    variants = {"plain": _plain(name, x, y), "dpsgd hooks": _opacus(name, x, y, "hooks", "dpsgd"),
                "dicesgd hooks": _opacus(name, x, y, "hooks", "dicesgd"), "dpsgd torch.func": _functional(name, x, y),
                "dpsgd ghost": _opacus(name, x, y, "ghost", "dpsgd")}
    if not name.startswith("cnn"):     # Opacus' functorch mode fails on GroupNorm with empty batches (fedsim refuses it for cnn)
        variants["dpsgd functorch"] = _opacus(name, x, y, "functorch", "dpsgd")
    for fn in variants.values():
        for _ in range(10):
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(blocks):
        for k, fn in variants.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            times[k].append((time.perf_counter() - t0) / steps)
    plain = statistics.median(times["plain"])
    return [{"model": name, "variant": k, "ms_per_step": 1000 * statistics.median(v),
             "over_plain": statistics.median(v) / plain} for k, v in times.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="cnn,mlp", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--batch", type=int, default=16, help="the quickstart's batch size")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--blocks", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = [r for m in args.models.split(",") for r in measure(m, args.batch, args.steps, args.blocks)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'model':6} {'variant':18} {'ms/step':>8} {'x plain':>8}")
    for r in rows:
        print(f"{r['model']:6} {r['variant']:18} {r['ms_per_step']:8.3f} {r['over_plain']:8.2f}")


if __name__ == "__main__":
    main()
