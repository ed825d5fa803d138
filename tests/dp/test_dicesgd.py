"""DiceSGD and DP-SGD: the pure step functions (fedsim.privacy.mechanisms) and the Opacus optimizers
(fedsim.privacy.optimizers) against the spec's properties DS1–DS7, DS9, DS11
(../shared/specs/dicesgd.md §2.1 and §4), the no-privacy limit, noise moments and per-sample
gradients.

Every reference below is written from the spec in this file (``_ref_*``), not taken from the code
under test. Per-sample gradients come from Opacus' hooks (checked separately against single-example
backward passes in ``test_per_sample_gradients_match_single_example_backward``).

Probability budget (fixed seeds, never re-rolled):

* Exactness tests (DS1–DS5, DS9, DS11, the SGD limit) run with σ = 0, or compare two runs drawing
  from identically seeded generators; they are deterministic and their tolerances are float64
  round-off budgets (1e-6 where the spec says so, far above the ~1e-13 observed).
* Noise-scale tests (DS7, dpsgd noise moments) estimate a std from d ≥ 1e5 i.i.d. Gaussians:
  the relative SE of a sample std is 1/√(2d) ≤ 0.23 %, so the 2 % band is ≥ 8.9 SE
  (two-sided P ≈ 5e-19 for a correct implementation), while a missing κ = √3 (−42 %), a noise
  divided twice by n, or a std 3 % off is caught with certainty. Means are checked at 6 SE
  (P ≈ 2e-9). The "noise is present" check of DS2 needs χ²_57 < 5.1 to fail (P < 1e-20 a step).
* DS6 (bias removal) is a deterministic optimisation on a fixed data set and fixed batches; the
  ratios measured for data/batch seeds 0–2 are DiceSGD / SGD 1.05–1.13 (threshold 2) and
  DiceSGD / clipped SGD 0.042–0.063 (threshold 0.1): ≥ 1.5× margin on either side. Excess
  losses are averaged over the last 1000 of 3000 iterates so that one noisy iterate cannot decide.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsim.privacy.mechanisms import (
    clip_error,
    clipped_sum,
    dicesgd_from_sums,
    dicesgd_grad,
    dpsgd_grad,
    noise_inflation,
    per_sample_norms,
)
from fedsim.privacy.optimizers import DiceSGDOptimizer, PrivateOptimizer

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# Helpers and spec references
# --------------------------------------------------------------------------------------------

def _mlp(seed: int = 0, dtype=F64, d_in: int = 5, hidden: int = 8) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, 1)).to(dtype)


def _gsm(model: nn.Module, mode: str = "hooks"):
    return prepare_module(model, mode, batch_first=True, loss_reduction="mean")


def _clone_gsm(gsm) -> nn.Module:
    """A new GradSampleModule over a copy of ``gsm``'s MLP (deepcopy would copy Opacus' hook markers)."""
    m = _mlp()
    m.load_state_dict(gsm._module.state_dict())
    return _gsm(m)


def _data(n: int = 200, d_in: int = 5, seed: int = 1, dtype=F64, offset: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=dtype)
    y = torch.sin(x @ torch.randn(d_in, 1, generator=g, dtype=dtype)) + offset     # offset: large residuals
    return x, y


def _poisson_batches(n_data: int, q: float, steps: int, seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = [torch.nonzero(torch.rand(n_data, generator=g) < q)[:, 0] for _ in range(steps)]
    assert all(len(b) > 0 for b in out)         # fixed seed: no empty batch (P ≈ 0.9^200 each anyway)
    return out


def _gen(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _ref_sums(per_sample: list[torch.Tensor], c1: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(S_c, S_g) per spec 2.1: flat clipping over all tensors jointly, factor min(1, C/(||g||+1e-6))."""
    norms = torch.sqrt(sum((g.reshape(len(g), -1) ** 2).sum(1) for g in per_sample))
    f = torch.clamp(c1 / (norms + 1e-6), max=1.0)
    s_c = [(f.reshape(-1, *[1] * (g.dim() - 1)) * g).sum(0) for g in per_sample]
    s_g = [g.sum(0) for g in per_sample]
    return s_c, s_g


def _ref_clip_e(e: list[torch.Tensor], c2: float) -> list[torch.Tensor]:
    norm = float(_flat(e).norm())
    factor = 1.0 if norm == 0.0 else min(1.0, c2 / norm)
    return [t * factor for t in e]


def _err_list(opt: DiceSGDOptimizer) -> list[torch.Tensor]:
    """The optimizer's e as a list in parameter order (zeros when it has none yet)."""
    st = opt.error_state()
    if not st:
        return [torch.zeros_like(p) for p in opt.params]
    return [st[str(i)] for i in range(len(opt.params))]


def _dice(model, *, c1, c2, sigma, n, lr=0.05, seed=7, kappa=None, base=None, names=None):
    if base is None:
        base = torch.optim.SGD(model.parameters(), lr=lr)
    return DiceSGDOptimizer(base, noise_multiplier=sigma, max_grad_norm=c1, error_clip=c2, kappa=kappa,
                            expected_batch_size=n, generator=_gen(seed), names=names)


def _mse(model, x, y):
    return nn.functional.mse_loss(model(x), y)


def _trajectory(opt, model, x, y, batches):
    """Run ``opt`` over ``batches``; record e_t (before), per-sample grads, p.grad and params per step."""
    rec = []
    for idx in batches:
        opt.zero_grad()
        _mse(model, x[idx], y[idx]).backward()
        ps = [p.grad_sample.detach().clone() for p in opt.params]
        e_before = [t.clone() for t in _err_list(opt)]
        opt.step()
        rec.append({"ps": ps, "e": e_before, "grad": [p.grad.detach().clone() for p in opt.params],
                    "e_after": [t.clone() for t in _err_list(opt)],
                    "params": [p.detach().clone() for p in opt.params], "size": len(idx)})
    return rec


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------

def test_pure_functions_match_spec_reference():
    """Catches per-layer (instead of flat) clipping, a wrong clip factor, or e updated with the noise."""
    g = torch.Generator().manual_seed(0)
    ps = {"a": 3 * torch.randn(12, 4, 3, generator=g, dtype=F64), "b": torch.randn(12, 2, generator=g, dtype=F64)}
    ref_norms = torch.sqrt((ps["a"].reshape(12, -1) ** 2).sum(1) + (ps["b"] ** 2).sum(1))
    torch.testing.assert_close(per_sample_norms(ps), ref_norms, rtol=1e-12, atol=0)
    s_c, s_g = _ref_sums([ps["a"], ps["b"]], 1.5)
    got = clipped_sum(ps, 1.5)
    torch.testing.assert_close(got["a"], s_c[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got["b"], s_c[1], rtol=1e-12, atol=1e-14)
    e = {"a": torch.randn(4, 3, generator=g, dtype=F64), "b": torch.randn(2, generator=g, dtype=F64)}
    ce = clip_error(e, 0.7)
    ref_ce = _ref_clip_e([e["a"], e["b"]], 0.7)
    torch.testing.assert_close(ce["a"], ref_ce[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(ce["b"], ref_ce[1], rtol=1e-12, atol=0)
    assert clip_error({"a": torch.zeros(3)}, 0.5)["a"].eq(0).all()          # factor 1 at e = 0, no NaN
    assert noise_inflation(1.0) == pytest.approx(math.sqrt(3)) and noise_inflation(0.0) == 1.0
    # the step with σ > 0: e' excludes the noise exactly
    n = 10
    grad, new_e = dicesgd_grad(ps, e, clip=1.5, error_clip=0.7, noise_multiplier=2.0, expected_batch_size=n,
                               generator=_gen(3))
    for i, k in enumerate(("a", "b")):
        v = s_c[i] / n + ref_ce[i]
        torch.testing.assert_close(new_e[k], e[k] + s_g[i] / n - v, rtol=1e-12, atol=1e-13)
        assert float((grad[k] - v).abs().max()) > 0.01          # the released gradient is noised


def test_dpsgd_noise_moments():
    """Catches DP-SGD noise of the wrong scale (σC/n), a biased noise mean, or noise on the clipped part."""
    d, n, sigma, c = 200_000, 10, 1.3, 0.7
    ps = {"w": torch.zeros(3, d, dtype=F64)}                 # zero gradients: the output is the noise
    out = dpsgd_grad(ps, clip=c, noise_multiplier=sigma, expected_batch_size=n, generator=_gen(11))["w"]
    std = sigma * c / n
    assert abs(float(out.mean())) <= 6 * std / math.sqrt(d)
    assert float(out.std()) == pytest.approx(std, rel=0.02)
    # with data: the mean is S_c/n (and σ = 0 gives it exactly)
    g = torch.Generator().manual_seed(5)
    ps = {"w": 5 * torch.randn(4, 50_000, generator=g, dtype=F64)}
    s_c = _ref_sums([ps["w"]], c)[0][0]
    exact = dpsgd_grad(ps, clip=c, noise_multiplier=0.0, expected_batch_size=n)["w"]
    torch.testing.assert_close(exact, s_c / n, rtol=1e-12, atol=1e-15)
    noisy = dpsgd_grad(ps, clip=c, noise_multiplier=sigma, expected_batch_size=n, generator=_gen(12))["w"]
    assert float((noisy - exact).std()) == pytest.approx(std, rel=0.02)     # 50k draws: 2 % = 6.3 SE


def test_optimizer_step_is_the_pure_step():
    """Catches the optimizer diverging from dicesgd_from_sums (noise draw order/scale, e carried, S_g sum)."""
    x, y = _data()
    n, c1, c2, sigma = 20, 0.05, 0.1, 0.8
    batches = _poisson_batches(len(x), n / len(x), 5)
    model = _gsm(_mlp())
    opt = _dice(model, c1=c1, c2=c2, sigma=sigma, n=n, seed=13)
    gen = _gen(13)                                # an identically seeded generator for the reference
    for r in _trajectory(opt, model, x, y, batches):
        s_c, s_g = _ref_sums(r["ps"], c1)
        grad, new_e = dicesgd_from_sums(dict(enumerate(s_c)), dict(enumerate(s_g)), dict(enumerate(r["e"])),
                                        clip=c1, error_clip=c2, noise_multiplier=sigma, expected_batch_size=n,
                                        generator=gen)
        torch.testing.assert_close(_flat(r["grad"]), _flat(grad.values()), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(_flat(r["e_after"]), _flat(new_e.values()), rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------
# DS1–DS5 at the optimizer level
# --------------------------------------------------------------------------------------------

def test_ds1_sgd_limit():
    """DS1: catches an unclipped term under-weighted by the micro-batch (defect D2) or any residual in e."""
    x, y = _data()
    n, lr = 20, 0.05
    batches = _poisson_batches(len(x), n / len(x), 50)
    model = _gsm(_mlp())
    ref = copy.deepcopy(_mlp())
    opt = _dice(model, c1=1e12, c2=1e12, sigma=0.0, n=n, lr=lr)
    sgd = torch.optim.SGD(ref.parameters(), lr=lr)
    for idx in batches:
        opt.zero_grad()
        _mse(model, x[idx], y[idx]).backward()
        sg = [p.grad_sample.sum(0) / n for p in opt.params]
        opt.step()
        e_norm = float(_flat(_err_list(opt)).norm())
        assert e_norm <= 1e-6 * float(_flat(sg).norm())
        sgd.zero_grad()
        (((ref(x[idx]) - y[idx]) ** 2).sum() / n).backward()     # gradient S_g / n
        sgd.step()
    for p, r in zip(model._module.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-12)
    assert float(_flat([p.detach() - q.detach() for p, q in zip(ref.parameters(), _mlp().parameters())]).norm()) > 0.1


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_ds2_telescoping_and_ds3_clip_bounds(sigma):
    """DS2/DS3: catches noise leaking into e, a lost clipped-away residual, or v/S_c outside their clips."""
    x, y = _data()
    n, c1, c2 = 20, 0.05, 0.05
    batches = _poisson_batches(len(x), n / len(x), 100)
    model = _gsm(_mlp())
    opt = _dice(model, c1=c1, c2=c2, sigma=sigma, n=n, lr=0.02)
    rec = _trajectory(opt, model, x, y, batches)
    sum_sg = [torch.zeros_like(p) for p in opt.params]
    sum_v = [torch.zeros_like(p) for p in opt.params]
    fb_norms = []
    for r in rec:
        s_c, s_g = _ref_sums(r["ps"], c1)
        fb = _ref_clip_e(r["e"], c2)
        v = [sc / n + f for sc, f in zip(s_c, fb)]
        for i in range(len(v)):
            sum_sg[i] += s_g[i] / n
            sum_v[i] += v[i]
        # per-step update rule e' = e + S_g/n - v (noise excluded)
        torch.testing.assert_close(_flat(r["e_after"]), _flat([e + sg / n - vv for e, sg, vv in
                                                               zip(r["e"], s_g, v)]), rtol=1e-9, atol=1e-12)
        # DS3: ||v - S_c/n|| <= C2 and ||S_c||/|L| <= C1, from the optimizer's own released gradient (σ = 0)
        if sigma == 0:
            released_fb = [g - sc / n for g, sc in zip(r["grad"], s_c)]
            fb_norms.append(float(_flat(released_fb).norm()))
            assert fb_norms[-1] <= c2 * (1 + 1e-6)
            released_sc = [n * (g - f) for g, f in zip(r["grad"], fb)]
            assert float(_flat(released_sc).norm()) / r["size"] <= c1 * (1 + 1e-6)
            torch.testing.assert_close(_flat(r["grad"]), _flat(v), rtol=1e-9, atol=1e-12)
        else:                         # the released gradient is v plus noise of std κσC1/n
            dev = _flat(r["grad"]) - _flat(v)
            assert float(dev.norm()) > 0.3 * noise_inflation(c2 / c1) * sigma * c1 / n * math.sqrt(len(dev))
    e_t = _flat(rec[-1]["e_after"])
    tele = _flat(sum_sg) - _flat(sum_v)
    assert float(e_t.norm()) > 10 * c2                     # clipping really removed a lot
    assert float((e_t - tele).norm()) <= 1e-5 * float(e_t.norm())
    if sigma == 0:
        assert max(fb_norms) >= 0.999 * c2                 # the C2 bound was active


def test_ds4_r0_is_dpsgd_gc():
    """DS4: catches DiceSGD with C2 = 0 deviating from Opacus' DP-SGD (noise inflation, draw order, scale)."""
    x, y = _data(dtype=torch.float32)
    n, c1, sigma = 20, 0.05, 1.0
    batches = _poisson_batches(len(x), n / len(x), 6)
    base = _mlp(dtype=torch.float32)
    models = [_gsm(copy.deepcopy(base)) for _ in range(3)]
    opts = [DPOptimizer(torch.optim.SGD(models[0].parameters(), lr=0.1), noise_multiplier=sigma, max_grad_norm=c1,
                        expected_batch_size=n, generator=_gen(9)),
            PrivateOptimizer(torch.optim.SGD(models[1].parameters(), lr=0.1), noise_multiplier=sigma,
                             max_grad_norm=c1, expected_batch_size=n, generator=_gen(9)),
            _dice(models[2], c1=c1, c2=0.0, sigma=sigma, n=n, lr=0.1, seed=9)]
    assert opts[2].kappa == 1.0
    for idx in batches:
        for m, o in zip(models, opts):
            o.zero_grad()
            _mse(m, x[idx], y[idx]).backward()
            o.step()
        ref = [p.detach() for p in models[0].parameters()]
        for m in models[1:]:
            for a, b in zip(ref, m.parameters()):
                assert torch.equal(a, b.detach())                      # bit-identical
    assert float(_flat(_err_list(opts[2])).norm()) > 0                 # e accumulated but was not fed back


def test_ds5_no_clipping_pure_decay():
    """DS5: catches per-layer error clipping, a wrong decay rule (e.g. defect D1), or S_c != S_g unclipped."""
    x, y = _data(offset=0.0)
    n, c1, c2 = 20, 100.0, 0.1
    batches = _poisson_batches(len(x), n / len(x), 9)
    model = _gsm(_mlp())
    opt = _dice(model, c1=c1, c2=c2, sigma=0.0, n=n, lr=0.01)
    g = torch.Generator().manual_seed(4)
    e0 = {str(i): torch.randn(p.shape, generator=g, dtype=F64) * (i + 1) for i, p in enumerate(opt.params)}
    scale = 5 * c2 / float(_flat(e0.values()).norm())
    opt.load_error_state({k: v * scale for k, v in e0.items()})
    rec = _trajectory(opt, model, x, y, batches)
    for t, r in enumerate(rec):
        _, s_g = _ref_sums(r["ps"], c1)
        assert float(per_sample_norms({str(i): p for i, p in enumerate(r["ps"])}).max()) < c1
        fb = _ref_clip_e(r["e"], c2)
        torch.testing.assert_close(_flat(r["grad"]) - _flat(fb), _flat(s_g) / n, rtol=1e-6, atol=1e-9)  # S_c = S_g
        before, after = float(_flat(r["e"]).norm()), float(_flat(r["e_after"]).norm())
        assert after == pytest.approx(max(0.0, before - c2), abs=1e-6)
        if after > 1e-3:                                     # a global shrink keeps the direction
            cos = float(_flat(r["e"]) @ _flat(r["e_after"])) / (before * after)
            assert cos == pytest.approx(1.0, abs=1e-9)
        if t + 1 >= 5:
            assert after <= 1e-6
    assert float(_flat(rec[0]["e"]).norm()) == pytest.approx(5 * c2, rel=1e-12)


def _ds6_run(method: str, c1: float, A, yv, masks, lr: float, avg_last: int) -> float:
    """Average excess loss over the last ``avg_last`` iterates of SGD / clipped SGD / DiceSGD (σ = 0)."""
    th_ls = torch.linalg.lstsq(A, yv[:, None]).solution[:, 0]
    l_star = float(((A @ th_ls - yv) ** 2).mean())
    th = torch.zeros(A.shape[1], dtype=F64)
    e, acc = None, 0.0
    n = round(0.1 * len(yv))                           # expected batch size (q = 0.1)
    for t, mask in enumerate(masks):
        idx = torch.nonzero(mask)[:, 0]
        ps = {"w": 2 * (A[idx] @ th - yv[idx])[:, None] * A[idx]}
        if method == "sgd":
            step = ps["w"].sum(0) / n
        elif method == "clip":
            step = dpsgd_grad(ps, clip=c1, noise_multiplier=0.0, expected_batch_size=n)["w"]
        else:
            grad, e = dicesgd_grad(ps, e, clip=c1, error_clip=3 * c1, noise_multiplier=0.0, expected_batch_size=n)
            step = grad["w"]
        th = th - lr * step
        if t >= len(masks) - avg_last:
            acc += float(((A @ th - yv) ** 2).mean()) - l_star
    return acc / avg_last


def test_ds6_bias_removal_toy_regression():
    """DS6: catches DiceSGD keeping DPSGD-GC's clipping bias (error feedback missing or switched off)."""
    # Least squares y = x·w* + 2 + skewed noise 2(Exp(1) − 1): every per-sample gradient (norm ~10) is
    # clipped at C1 ∈ {0.1, 0.5}; the skew makes the clipped fixed point (a median-type regression)
    # differ from the least-squares one. Same batches and lr (0.05) for all methods.
    g = torch.Generator().manual_seed(0)
    N, d, T = 500, 5, 3000
    X = torch.randn(N, d, generator=g, dtype=F64)
    w = torch.randn(d, generator=g, dtype=F64)
    yv = X @ w + 2.0 + 2.0 * (-torch.log(torch.rand(N, generator=g, dtype=F64)) - 1)
    A = torch.cat([X, torch.ones(N, 1, dtype=F64)], 1)
    masks = torch.rand(T, N, generator=torch.Generator().manual_seed(1)) < 0.1
    sgd = _ds6_run("sgd", 0.0, A, yv, masks, 0.05, 1000)
    for c1 in (0.1, 0.5):
        clip = _ds6_run("clip", c1, A, yv, masks, 0.05, 1000)
        dice = _ds6_run("dice", c1, A, yv, masks, 0.05, 1000)
        assert dice <= 2 * sgd, (c1, dice, sgd)
        assert dice <= 0.1 * clip, (c1, dice, clip)


@pytest.mark.parametrize("kappa,expected_kappa", [(None, math.sqrt(3)), (1.0, 1.0)])
def test_ds7_noise_scale(kappa, expected_kappa):
    """DS7: catches a missing/doubled κ = √(1+2r), noise divided twice by n, or noise entering e."""
    n, c1, sigma = 8, 0.5, 1.0
    model = _gsm(nn.Linear(1000, 100))                    # d = 100,100 parameters
    opt = _dice(model, c1=c1, c2=c1, sigma=sigma, n=n, seed=21, kappa=kappa)   # r = 1
    x = torch.randn(n, 1000, generator=_gen(1))
    (model(x).sum() * 0.0).backward()                     # zero loss: all per-sample gradients are 0
    opt.step()
    noise = _flat([p.grad for p in opt.params]).double()
    assert noise.numel() >= 100_000
    std = expected_kappa * sigma * c1 / n
    assert float(noise.std()) == pytest.approx(std, rel=0.02)
    assert abs(float(noise.mean())) <= 6 * std / math.sqrt(noise.numel())
    assert all(float(t.abs().max()) == 0.0 for t in _err_list(opt))       # e stays exactly 0


# --------------------------------------------------------------------------------------------
# DS9: micro-batching through BatchMemoryManager; privatize()
# --------------------------------------------------------------------------------------------

def _run_loader(make_opt, logical: list[list[int]], physical: int | None, x, y):
    """Train over fixed logical batches, optionally split by BatchMemoryManager; return (model, opt, flags)."""
    model = _gsm(_mlp())
    opt = make_opt(model)
    real = []
    opt.attach_step_hook(lambda o: real.append(1))
    loader = DataLoader(TensorDataset(x, y), batch_sampler=logical)
    flags = []

    def train(dl):
        for xb, yb in dl:
            opt.zero_grad()
            _mse(model, xb, yb).backward()
            opt.step()
            flags.append(not opt._is_last_step_skipped)

    if physical is None:
        train(loader)
    else:
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical, optimizer=opt) as dl:
            train(dl)
    assert sum(real) == sum(flags)
    return model, opt, flags


@pytest.mark.parametrize("kind,sigma", [("dice", 0.0), ("dice", 0.5), ("dpsgd", 0.0)])
def test_ds9_batch_memory_manager(kind, sigma):
    """DS9: catches S_g/S_c lost between physical batches, e updated on virtual steps, or steps over-counted."""
    x, y = _data(n=128)
    logical = [list(range(64)), list(range(64, 128))]
    if kind == "dice":
        def make(m):
            return _dice(m, c1=0.1, c2=0.3, sigma=sigma, n=64, lr=0.1)
    else:
        def make(m):
            return PrivateOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=sigma,
                                    max_grad_norm=0.1, expected_batch_size=64, generator=_gen(7))
    m1, o1, f1 = _run_loader(make, logical, None, x, y)
    m4, o4, f4 = _run_loader(make, logical, 16, x, y)
    assert f1 == [True, True]
    assert f4 == [False, False, False, True] * 2            # one real step per logical batch of 4×16
    for a, b in zip(m1.parameters(), m4.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    if kind == "dice":
        torch.testing.assert_close(_flat(_err_list(o1)), _flat(_err_list(o4)), rtol=1e-6, atol=1e-9)
        assert float(_flat(_err_list(o4)).norm()) > 0.3


@pytest.mark.parametrize("cls", ["private", "dice"])
def test_privatize_then_step_equals_step(cls):
    """Catches privatize() drawing different noise, double-noising on step(), or stepping on virtual steps."""
    x, y = _data(n=128)
    logical = [list(range(64)), list(range(64, 128))]

    def make(m):
        if cls == "dice":
            return _dice(m, c1=0.1, c2=0.3, sigma=1.0, n=64, lr=0.1)
        return PrivateOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=0.1,
                                expected_batch_size=64, generator=_gen(7))

    plain, _, _ = _run_loader(make, logical, 16, x, y)
    model = _gsm(_mlp())
    opt = make(model)
    dues = []
    with BatchMemoryManager(data_loader=DataLoader(TensorDataset(x, y), batch_sampler=logical),
                            max_physical_batch_size=16, optimizer=opt) as dl:
        for xb, yb in dl:
            opt.zero_grad()
            _mse(model, xb, yb).backward()
            dues.append(opt.privatize())
            if dues[-1]:
                g = [p.grad.clone() for p in opt.params]
            opt.step()
            if dues[-1]:                                   # step() applied exactly the privatized gradient
                assert all(torch.equal(a, b) for a, b in zip(g, [p.grad for p in opt.params]))
    assert dues == [False, False, False, True] * 2
    for a, b in zip(plain.parameters(), model.parameters()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# DS11: error state at the optimizer level; state_dict never holds e
# --------------------------------------------------------------------------------------------

def _steps(opt, model, x, y, batches):
    for idx in batches:
        opt.zero_grad()
        _mse(model, x[idx], y[idx]).backward()
        opt.step()


def test_ds11_error_state_round_trip_and_fresh_start():
    """DS11: catches e kept on the parameters across optimizers (defect D5) or a lossy error_state() move."""
    x, y = _data()
    batches = _poisson_batches(len(x), 0.1, 8)
    model = _gsm(_mlp())
    names = {p: n for n, p in model.named_parameters()}
    opt = _dice(model, c1=0.05, c2=0.1, sigma=0.0, n=20, names=names)
    fresh_state = opt.error_state()
    assert all(float(t.abs().max()) == 0 for t in fresh_state.values())   # empty or zeros
    _steps(opt, model, x, y, batches[:5])
    state = opt.error_state()
    assert set(state) == set(names.values()) and float(_flat(state.values()).norm()) > 0
    # a copy of the model + a new optimizer that loads e continues exactly like the original
    twin = _clone_gsm(model)
    twin_opt = _dice(twin, c1=0.05, c2=0.1, sigma=0.0, n=20, names={p: n for n, p in twin.named_parameters()})
    twin_opt.load_error_state(state)
    assert all(torch.equal(twin_opt.error_state()[k], v) for k, v in state.items())
    state["_module.0.weight"].add_(1.0)                    # error_state() hands out copies
    assert not torch.equal(opt.error_state()["_module.0.weight"], state["_module.0.weight"])
    _steps(opt, model, x, y, batches[5:])
    _steps(twin_opt, twin, x, y, batches[5:])
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    assert all(torch.equal(opt.error_state()[k], v) for k, v in twin_opt.error_state().items())
    # a new optimizer over the same (already trained) parameters starts from e = 0
    m2 = _clone_gsm(model)
    o_new = _dice(model, c1=0.05, c2=0.1, sigma=0.0, n=20)
    o_ref = _dice(m2, c1=0.05, c2=0.1, sigma=0.0, n=20)
    o_ref.load_error_state({str(i): torch.zeros_like(p) for i, p in enumerate(o_ref.params)})
    assert all(float(t.abs().max()) == 0 for t in o_new.error_state().values())
    _steps(o_new, model, x, y, batches[:1])
    _steps(o_ref, m2, x, y, batches[:1])
    for a, b in zip(model.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_ds11_load_error_state_rejects_mismatch():
    """DS11: catches silently accepting an error state for another parameter layout (must reset, not mix)."""
    model = _gsm(_mlp())
    opt = _dice(model, c1=1.0, c2=1.0, sigma=0.0, n=4)
    good = {str(i): torch.zeros_like(p) for i, p in enumerate(opt.params)}
    opt.load_error_state(good)
    with pytest.raises(ValueError):
        opt.load_error_state({**good, "extra": torch.zeros(1)})
    with pytest.raises(ValueError):
        opt.load_error_state({k: v for k, v in good.items() if k != "0"})
    with pytest.raises(ValueError):
        opt.load_error_state({("w" if k == "0" else k): v for k, v in good.items()})
    with pytest.raises(ValueError):
        opt.load_error_state({**good, "0": torch.zeros(good["0"].numel())})        # flattened
    with pytest.raises(ValueError):
        opt.load_error_state({**good, "1": torch.zeros(good["1"].shape[0] + 1)})


@pytest.mark.parametrize("base", ["sgd_momentum", "adam"])
def test_state_dict_never_contains_error_state(base):
    """Catches e stored in optimizer state (Opacus forwards .state to the base optimizer's state_dict)."""
    x, y = _data()
    model = _gsm(_mlp(dtype=torch.float32))
    x, y = x.float(), y.float()
    params = list(model.parameters())
    base_opt = (torch.optim.SGD(params, lr=0.05, momentum=0.9) if base == "sgd_momentum"
                else torch.optim.Adam(params, lr=1e-3))
    opt = _dice(model, c1=0.05, c2=0.1, sigma=0.5, n=20, base=base_opt)
    _steps(opt, model, x, y, _poisson_batches(len(x), 0.1, 5))
    err = [t for t in _err_list(opt)]
    assert float(_flat(err).norm()) > 0

    def tensors(obj):
        if torch.is_tensor(obj):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from tensors(v)

    for sd in (opt.state_dict(), model.state_dict()):
        for t in tensors(sd):
            for e in err:
                assert not (t.shape == e.shape and torch.allclose(t.float(), e.float(), rtol=1e-5, atol=0))
        buf = io.BytesIO()
        torch.save(sd, buf)
        blob = buf.getvalue()
        for e in err:                                       # no 64-byte window of e's fp32 bytes
            raw = e.detach().float().contiguous().numpy().tobytes()
            for i in range(0, max(1, len(raw) - 63), 16):
                assert raw[i:i + 64] not in blob


# --------------------------------------------------------------------------------------------
# No-privacy limit and per-sample gradients
# --------------------------------------------------------------------------------------------

def _no_privacy_run(clip: float):
    x, y = _data()
    batches = [torch.arange(i * 25, (i + 1) * 25) for i in range(8)]      # fixed batches: n = |L|
    model = _gsm(_mlp())
    ref = _mlp()
    opt = PrivateOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0,
                           max_grad_norm=clip, expected_batch_size=25)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
    dice_model = _gsm(_mlp())
    dice = _dice(dice_model, c1=clip, c2=clip, sigma=0.0, n=25, lr=0.1)
    for idx in batches:
        for m, o in ((model, opt), (ref, sgd), (dice_model, dice)):
            o.zero_grad()
            _mse(m, x[idx], y[idx]).backward()
            o.step()
        assert float(_flat(_err_list(dice)).abs().max()) <= 1e-14          # e ≡ 0 (up to fp summation order)
    for a, b, c in zip(model._module.parameters(), ref.parameters(), dice_model._module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)           # exact up to summation order
        torch.testing.assert_close(c, b, rtol=1e-12, atol=1e-14)
    assert float(_flat([p.detach() - q.detach() for p, q in zip(ref.parameters(), _mlp().parameters())]).norm()) > 0.1


def test_dpsgd_no_privacy_limit_is_sgd():
    """Catches DP-SGD/DiceSGD that are not plain SGD at clip → ∞, σ 0 (wrong scaling, stray clip, extra noise)."""
    _no_privacy_run(1e12)           # every clip factor is exactly 1 (all norms < 1e12); σ·C = 0 exactly


def test_dpsgd_no_privacy_limit_literal_infinite_clip():
    """Catches a no-privacy limit that only works for a finite stand-in for ∞ (clip = math.inf): Opacus
    computes the std as 0 * inf = NaN and torch raises (fedsim's PrivateOptimizer.add_noise)."""
    _no_privacy_run(math.inf)


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_per_sample_gradients_match_single_example_backward(mode):
    """Catches per-sample gradients scaled by the batch size (loss_reduction) or mixed between examples."""
    x, y = _data(n=16, dtype=torch.float32)
    base = _mlp(dtype=torch.float32)
    model = _gsm(copy.deepcopy(base), mode)
    _mse(model, x, y).backward()
    got = [p.grad_sample for p in model.parameters()]
    for i in range(len(x)):
        single = copy.deepcopy(base)
        _mse(single, x[i:i + 1], y[i:i + 1]).backward()
        for g, p in zip(got, single.parameters()):
            torch.testing.assert_close(g[i], p.grad, rtol=1e-5, atol=1e-5)
