"""Property tests of the FedHyper cores (specs/fedhyper.md section 4): bounds under huge
updates (H3), degree-2 homogeneity (H5), order invariance and uniform weighting (H7), CL
bounds and growth cap (H3, H8), and checkpoint round trips (H11)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsim.algorithms.fedhyper import VARIANTS, FedHyperClient, PreviousUpdate, fedhyper_server
from fedsim.core.arrays import apply_updates, mean_update
from fedsim.core.server import TRAIN, RoundResult
from fedsim.core.state import flatten, unflatten
from fedsim.core.transforms import RoundInfo

FAST = settings(max_examples=30, deadline=None)
SEEDS = st.integers(0, 2**32 - 1)
SHAPES = {"w": (3, 2), "b": (4,)}


def _lr_global(opt, s) -> float:
    return opt.report(s)["lr_global"]


def _lr_scale(opt, s) -> float:
    return opt.downlink(s).get("lr_scale", 1.0)


SCHEDULERS = {   # name -> (kwargs, read-out, bounds)
    "g": ({}, _lr_global, (0.2, 5.0)),
    "gm": ({}, lambda o, s: float(s["a"]), (-0.2, 4.0)),
    "sl": ({}, lambda o, s: float(s["lam"]), (0.1, 10.0)),
    "sl-ref": ({"sl_state_clip": False}, _lr_scale, (0.1, 10.0)),
}


def _zeros(dtype=np.float64) -> dict[str, np.ndarray]:
    return {k: np.zeros(s, dtype) for k, s in SHAPES.items()}


def _step(opt, x, delta, s):
    """One server step on the transform: ``x + update(delta)``."""
    upd, s = opt.update(delta, s, x, RoundInfo(1))
    return apply_updates(x, upd), s


def _sequence(rng: np.random.Generator, length: int, shapes=SHAPES) -> list[dict[str, np.ndarray]]:
    """Updates with random signs and norms from 1e-6 to 1e6."""
    out = []
    for _ in range(length):
        scale = 10.0 ** rng.uniform(-6, 6)
        out.append({k: rng.choice([-1.0, 1.0]) * scale * rng.normal(size=s) for k, s in shapes.items()})
    return out


def _server(name: str, **kw):
    extra, _, _ = SCHEDULERS[name]
    return fedhyper_server(name.split("-")[0], **{**extra, **kw})


# ------------------------------------------------------------------ H3 bounds


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_h3_bounds_over_1000_synthetic_sequences(name):
    """H3: alpha, a, lambda stay finite and in bounds under huge random updates (clip order, overflow)."""
    _, read, (lo, hi) = SCHEDULERS[name]
    rng = np.random.default_rng(2024)
    opt = _server(name)
    for _ in range(1000):
        x = _zeros()
        s = opt.init(x)
        for delta in _sequence(rng, 5):
            x, s = _step(opt, x, delta, s)
            value = read(opt, s)
            assert np.isfinite(value) and lo <= value <= hi
            assert lo <= _lr_scale(opt, s) <= hi if name.startswith("sl") else _lr_scale(opt, s) == 1.0


@FAST
@given(seed=SEEDS, name=st.sampled_from(list(SCHEDULERS)), length=st.integers(1, 30))
def test_h3_bounds_hold_for_any_sequence(seed, name, length):
    """H3 for any sequence length; finite inputs never trigger the non-finite skip (a spurious skip)."""
    _, read, (lo, hi) = SCHEDULERS[name]
    opt, x = _server(name), _zeros()
    s = opt.init(x)
    for delta in _sequence(np.random.default_rng(seed), length):
        x, s = _step(opt, x, delta, s)
        assert lo <= read(opt, s) <= hi
    assert s["hypergrad_skipped"] == 0


def _client_run(rng: np.random.Generator, steps: int, epoch_len: int, **kw) -> tuple[FedHyperClient, list[float]]:
    p = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    g = [torch.as_tensor(_sequence(rng, 1, shapes={"p": (5,)})[0]["p"])]
    cl = FedHyperClient(0.01, g, [p], beta_l=1.0, beta_lg=0.01, **kw)
    bs = [cl.b]
    for k, d in enumerate(u["p"] for u in _sequence(rng, steps, shapes={"p": (5,)})):
        if k % epoch_len == 0:
            cl.start_epoch()
        with torch.no_grad():
            p += torch.as_tensor(d)
        cl.after_step()
        bs.append(cl.b)
    return cl, bs


def test_h3_client_bounds_over_1000_synthetic_sequences():
    """H3 for CL's b: finite, in [b_min, b_max], growth <= rho per step under huge steps."""
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
    """H8 for any bounds/cap/epoch length: bounds, cap, first minibatch of each epoch inert, steps counted."""
    cl, bs = _client_run(np.random.default_rng(seed), steps, epoch_len, factor_cap=cap, bounds=(lo, hi))
    b = np.array(bs)
    assert b[0] == 1.0 and np.all((b[1:] >= lo) & (b[1:] <= hi))
    assert np.all(b[1:] / b[:-1] <= cap + 1e-12)
    firsts = [k + 1 for k in range(steps) if k % epoch_len == 0]      # first minibatch of each epoch
    assert all(b[k] == b[k - 1] for k in firsts)
    assert cl.steps == steps


# ------------------------------------------------------------------ H5 homogeneity


def _aligned(rng: np.random.Generator, rounds: int) -> list[dict[str, np.ndarray]]:
    """Updates whose consecutive inner products have one sign and similar size (no cancellation)."""
    sign = rng.choice([-1.0, 1.0])
    d = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    out = [d]
    for _ in range(rounds - 1):
        d = {k: sign * a + 0.1 * rng.normal(size=a.shape) for k, a in d.items()}
        out.append(d)
    return out


@FAST
@given(seed=SEEDS, c=st.sampled_from([0.5, 2.0, 10.0]), name=st.sampled_from(list(SCHEDULERS)))
def test_h5_increments_scale_with_c_squared(seed, c, name):
    """H5: server increments are degree-2 homogeneous in the updates (a normalised or scaled hypergradient)."""
    wide = {"alpha0": 0.0, "alpha_bounds": (-1e12, 1e12), "gm_bounds": (-1e12, 1e12), "sl_bounds": (-1e12, 1e12),
            "beta_g": 1e-3, "beta_sl": 1e-3}
    _, read, _ = SCHEDULERS[name]
    seq = _aligned(np.random.default_rng(seed), 4)
    incs = []
    for scale in (1.0, c):
        opt, x = _server(name, **wide), _zeros()
        s, values = opt.init(x), []
        for d in seq:
            x, s = _step(opt, x, {k: scale * a for k, a in d.items()}, s)
            values.append(read(opt, s))
        incs.append(np.diff(values))
    np.testing.assert_allclose(incs[1], c * c * incs[0], rtol=1e-9)
    assert np.all(incs[0] != 0)


@FAST
@given(seed=SEEDS, c=st.sampled_from([0.5, 2.0, 10.0]))
def test_h5_client_hypergradient_scales_with_c_squared(seed, c):
    """H5 for CL: h is beta_l <d, d_prev> + beta_lg <d, Delta> exactly and degree-2 homogeneous."""
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
    """H7: permuting replies changes alpha/lambda and x by <= 1e-6 rel.; uniform weighting is 1/|S_t|."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    x0 = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    runs = []
    for order in (np.arange(n), perm):
        opt, x = fedhyper_server(variant, beta_g=5.0, beta_sl=5.0), {k: a.copy() for k, a in x0.items()}
        s = opt.init(x)
        r = np.random.default_rng(seed + 1)
        for _ in range(3):
            replies = [{k: a + 0.3 * r.normal(size=a.shape).astype(np.float32) for k, a in x.items()}
                       for _ in range(n)]
            weights = [1] * n if uniform else list(r.integers(1, 100, size=n))
            delta = mean_update(x, [replies[i] for i in order], [weights[i] for i in order])
            if uniform:
                manual = {k: np.mean([rep[k].astype(np.float64) - x[k] for rep in replies], axis=0) for k in x}
                assert list(delta) == list(manual)
                for k in manual:
                    np.testing.assert_allclose(delta[k], manual[k], rtol=1e-12, atol=1e-12)
            x, s = _step(opt, x, delta, s)
        runs.append((x, _lr_global(opt, s), _lr_scale(opt, s)))
    (xa, ga, la), (xb, gb, lb) = runs
    assert ga == pytest.approx(gb, rel=1e-6) and la == pytest.approx(lb, rel=1e-6)
    assert list(xa) == list(xb)
    for k in xa:
        np.testing.assert_allclose(xa[k], xb[k], rtol=1e-6, atol=1e-6 * np.abs(xa[k]).max())


# ------------------------------------------------------------------ H11 checkpoint round trip


def _full_round(opt, plugin, x, s, p, d):
    """One server round on the transform and CL's plugin (the parts ``Server.aggregate`` calls)."""
    x_new, s = _step(opt, x, d, s)
    return x_new, s, plugin.aggregate(p, RoundResult(1, TRAIN, x, x_new, d, [], 0)).state


@FAST
@given(seed=SEEDS, variant=st.sampled_from(VARIANTS), split=st.integers(0, 5), ref=st.booleans())
def test_h11_checkpoint_round_trip_continues_exactly(seed, variant, split, ref):
    """H11: flatten/unflatten (safetensors-ready arrays + JSON) at any round continues bit-identically."""
    seq = _sequence(np.random.default_rng(seed), 6)
    seq = [{k: a * 1e-6 for k, a in d.items()} for d in seq]           # keep the trajectory finite
    opt, plugin = fedhyper_server(variant, sl_state_clip=not ref), PreviousUpdate("cl", list(SHAPES))
    x = _zeros(np.float32)
    xa, sa, pa = x, opt.init(x), plugin.init(x)
    for d in seq:
        xa, sa, pa = _full_round(opt, plugin, xa, sa, pa, d)
    xb, sb, pb = x, opt.init(x), plugin.init(x)
    for k, d in enumerate(seq):
        if k == split:
            arrays, skeleton = flatten({"optimizer": sb, "plugin": pb})
            back = unflatten({k2: v.copy() for k2, v in arrays.items()}, skeleton)
            sb, pb = back["optimizer"], back["plugin"]
        xb, sb, pb = _full_round(opt, plugin, xb, sb, pb, d)
    assert list(xa) == list(xb) and all(np.array_equal(xa[k], xb[k]) for k in xa)
    (ta, ka), (tb, kb) = flatten({"optimizer": sa, "plugin": pa}), flatten({"optimizer": sb, "plugin": pb})
    assert ka == kb and list(ta) == list(tb) and all(np.array_equal(ta[k], tb[k]) for k in ta)
    assert all(v.dtype == np.float64 for v in ta.values())            # model-sized state is float64
    assert list(pa) == list(seq[-1]) and all(np.array_equal(pa[k], seq[-1][k]) for k in pa)   # raw Delta
    if isinstance(sa, dict) and "delta_prev" in sa:                  # G, SL: raw Delta too
        assert all(np.array_equal(sa["delta_prev"][k], seq[-1][k]) for k in seq[-1])
