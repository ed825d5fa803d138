"""Property tests of the FedHyper cores (specs/fedhyper.md section 4): bounds under huge
updates (H3), degree-2 homogeneity (H5), order invariance and uniform weighting (H7), CL
bounds and growth cap (H3, H8), and checkpoint round trips (H11)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.algorithms.aggregate import mean_update
from fedsim.algorithms.fedhyper import (
    VARIANTS, FedHyperClient, fedhyper_server, previous_update, state_from_arrays, state_to_arrays)

FAST = settings(max_examples=30, deadline=None)
SEEDS = st.integers(0, 2**32 - 1)
SCHEDULERS = {   # name -> (kwargs, read-out, bounds)
    "g": ({}, lambda o, s: o.global_lr(s), (0.2, 5.0)),
    "gm": ({}, lambda o, s: float(s["a"]), (-0.2, 4.0)),
    "sl": ({}, lambda o, s: float(s["lam"]), (0.1, 10.0)),
    "sl-ref": ({"sl_state_clip": False}, lambda o, s: o.local_lr_scale(s), (0.1, 10.0)),
}


def _sequence(rng: np.random.Generator, length: int, shapes=((3, 2), (4,))) -> list[list[np.ndarray]]:
    """Updates with random signs and norms from 1e-6 to 1e6."""
    out = []
    for _ in range(length):
        scale = 10.0 ** rng.uniform(-6, 6)
        out.append([rng.choice([-1.0, 1.0]) * scale * rng.normal(size=s) for s in shapes])
    return out


def _server(name: str, **kw):
    extra, _, _ = SCHEDULERS[name]
    return fedhyper_server(name.split("-")[0], **{**extra, **kw})


# ------------------------------------------------------------------ H3 bounds


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_h3_bounds_over_1000_synthetic_sequences(name):
    _, read, (lo, hi) = SCHEDULERS[name]
    rng = np.random.default_rng(2024)
    opt = _server(name)
    for _ in range(1000):
        x = [np.zeros((3, 2)), np.zeros(4)]
        s = opt.init(x)
        for delta in _sequence(rng, 5):
            x, s = opt.update(x, delta, s)
            value = read(opt, s)
            assert np.isfinite(value) and lo <= value <= hi
            assert lo <= opt.local_lr_scale(s) <= hi if name.startswith("sl") else opt.local_lr_scale(s) == 1.0


@FAST
@given(seed=SEEDS, name=st.sampled_from(list(SCHEDULERS)), length=st.integers(1, 30))
def test_h3_bounds_hold_for_any_sequence(seed, name, length):
    _, read, (lo, hi) = SCHEDULERS[name]
    opt, x = _server(name), [np.zeros((3, 2)), np.zeros(4)]
    s = opt.init(x)
    for delta in _sequence(np.random.default_rng(seed), length):
        x, s = opt.update(x, delta, s)
        assert lo <= read(opt, s) <= hi
    assert float(s["hypergrad_skipped"]) == 0.0


def _client_run(rng: np.random.Generator, steps: int, epoch_len: int, **kw) -> tuple[FedHyperClient, list[float]]:
    p = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    g = [torch.as_tensor(_sequence(rng, 1, shapes=((5,),))[0][0])]
    cl = FedHyperClient(0.01, g, [p], beta_l=1.0, beta_lg=0.01, **kw)
    bs = [cl.b]
    for k, (d,) in enumerate(_sequence(rng, steps, shapes=((5,),))):
        if k % epoch_len == 0:
            cl.start_epoch()
        with torch.no_grad():
            p += torch.as_tensor(d)
        cl.after_step()
        bs.append(cl.b)
    return cl, bs


def test_h3_client_bounds_over_1000_synthetic_sequences():
    rng = np.random.default_rng(7)
    for _ in range(1000):
        cl, bs = _client_run(rng, 5, 3)
        b = np.array(bs)
        assert np.all(np.isfinite(b)) and np.all((b >= 0.1) & (b <= 10.0))
        assert np.all(b[1:] / b[:-1] <= 1.1 + 1e-12)


@FAST
@given(seed=SEEDS, steps=st.integers(1, 40), epoch_len=st.integers(1, 8),
       cap=st.floats(1.0, 2.0), lo=st.floats(0.01, 1.0), hi=st.floats(1.0, 50.0))
def test_h8_client_b_bounded_and_growth_capped(seed, steps, epoch_len, cap, lo, hi):
    cl, bs = _client_run(np.random.default_rng(seed), steps, epoch_len, factor_cap=cap, bounds=(lo, hi))
    b = np.array(bs)
    assert b[0] == 1.0 and np.all((b[1:] >= lo) & (b[1:] <= hi))
    assert np.all(b[1:] / b[:-1] <= cap + 1e-12)
    firsts = [k + 1 for k in range(steps) if k % epoch_len == 0]      # first minibatch of each epoch
    assert all(b[k] == b[k - 1] for k in firsts)
    assert cl.steps == steps


# ------------------------------------------------------------------ H5 homogeneity


def _aligned(rng: np.random.Generator, rounds: int) -> list[list[np.ndarray]]:
    """Updates whose consecutive inner products have one sign and similar size (no cancellation)."""
    sign = rng.choice([-1.0, 1.0])
    d = [rng.normal(size=(3, 2)), rng.normal(size=4)]
    out = [d]
    for _ in range(rounds - 1):
        d = [sign * a + 0.1 * rng.normal(size=a.shape) for a in d]
        out.append(d)
    return out


@FAST
@given(seed=SEEDS, c=st.sampled_from([0.5, 2.0, 10.0]), name=st.sampled_from(list(SCHEDULERS)))
def test_h5_increments_scale_with_c_squared(seed, c, name):
    wide = {"alpha0": 0.0, "alpha_bounds": (-1e12, 1e12), "gm_bounds": (-1e12, 1e12), "sl_bounds": (-1e12, 1e12),
            "beta_g": 1e-3, "beta_sl": 1e-3}
    _, read, _ = SCHEDULERS[name]
    seq = _aligned(np.random.default_rng(seed), 4)
    incs = []
    for scale in (1.0, c):
        opt, x = _server(name, **wide), [np.zeros((3, 2)), np.zeros(4)]
        s, values = opt.init(x), []
        for d in seq:
            x, s = opt.update(x, [scale * a for a in d], s)
            values.append(read(opt, s))
        incs.append(np.diff(values))
    np.testing.assert_allclose(incs[1], c * c * incs[0], rtol=1e-9)
    assert np.all(incs[0] != 0)


@FAST
@given(seed=SEEDS, c=st.sampled_from([0.5, 2.0, 10.0]))
def test_h5_client_hypergradient_scales_with_c_squared(seed, c):
    rng = np.random.default_rng(seed)
    g, d0, d1, d2 = (rng.normal(size=4) * 0.1 for _ in range(4))
    hs = []
    for scale in (1.0, c):
        p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
        cl = FedHyperClient(1.0, [torch.as_tensor(scale * g)], [p], beta_l=0.01, beta_lg=0.01,
                            factor_cap=1e30, bounds=(0.0, 1e30))
        bs = []
        for d in (d0, d1, d2):                 # d0 is the epoch's first minibatch: no update
            with torch.no_grad():
                p += torch.as_tensor(scale * d)
            cl.after_step()
            bs.append(cl.b)
        hs.append(np.array([bs[1] / bs[0] - 1.0, bs[2] / bs[1] - 1.0]))   # b <- b (1 + h)
    exact = [0.02 * float(d1 @ g), 0.01 * float(d2 @ d1) + 0.01 * float(d2 @ g)]
    np.testing.assert_allclose(hs[0], exact, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(hs[1], c * c * hs[0], rtol=1e-9, atol=1e-14)


# ------------------------------------------------------------------ H7 order invariance


@FAST
@given(seed=SEEDS, n=st.integers(2, 6), variant=st.sampled_from(["g", "gm", "sl"]), uniform=st.booleans())
def test_h7_reply_order_does_not_matter(seed, n, variant, uniform):
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    x0 = [rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=4).astype(np.float32)]
    runs = []
    for order in (np.arange(n), perm):
        opt, x = fedhyper_server(variant, beta_g=5.0, beta_sl=5.0), [a.copy() for a in x0]
        s = opt.init(x)
        r = np.random.default_rng(seed + 1)
        for _ in range(3):
            replies = [[a + 0.3 * r.normal(size=a.shape).astype(np.float32) for a in x] for _ in range(n)]
            weights = [1] * n if uniform else list(r.integers(1, 100, size=n))
            delta = mean_update(x, [replies[i] for i in order], [weights[i] for i in order])
            if uniform:
                manual = [np.mean([rep[i].astype(np.float64) - x[i] for rep in replies], axis=0) for i in range(2)]
                for a, b in zip(delta, manual):
                    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
            x, s = opt.update(x, delta, s)
        runs.append((x, opt.global_lr(s), opt.local_lr_scale(s)))
    (xa, ga, la), (xb, gb, lb) = runs
    assert ga == pytest.approx(gb, rel=1e-6) and la == pytest.approx(lb, rel=1e-6)
    for a, b in zip(xa, xb):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(a).max())


# ------------------------------------------------------------------ H11 checkpoint round trip


@FAST
@given(seed=SEEDS, variant=st.sampled_from(VARIANTS), split=st.integers(0, 5), ref=st.booleans())
def test_h11_checkpoint_round_trip_continues_exactly(seed, variant, split, ref):
    seq = _sequence(np.random.default_rng(seed), 6)
    seq = [[a * 1e-6 for a in d] for d in seq]           # keep the trajectory finite
    opt = fedhyper_server(variant, sl_state_clip=not ref)
    x = [np.zeros((3, 2), np.float32), np.zeros(4, np.float32)]
    xa, sa = x, opt.init(x)
    for d in seq:
        xa, sa = opt.update(xa, d, sa)
    xb, sb = x, opt.init(x)
    for k, d in enumerate(seq):
        if k == split:
            sb = state_from_arrays({k2: v.copy() for k2, v in state_to_arrays(sb).items()})
        xb, sb = opt.update(xb, d, sb)
    assert all(np.array_equal(a, b) for a, b in zip(xa, xb))
    ta, tb = state_to_arrays(sa), state_to_arrays(sb)
    assert ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)
    assert all(v.dtype == np.float64 and v.ndim >= 1 for v in ta.values())
    assert all(np.array_equal(p, d) for p, d in zip(previous_update(sa), seq[-1]))
