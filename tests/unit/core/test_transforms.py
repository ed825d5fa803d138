"""The optax-style server transforms (fedsim/core/transforms.py) and apply_updates, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.core.arrays import apply_updates
from fedsim.core.transforms import RoundInfo, Transform, adam, chain, identity, masked, scale, trace


def _recorder(tag: str, log: list, *, factor: float = 1.0, report=None, downlink=None) -> Transform:
    """A transform that multiplies by ``factor``, counts its calls in its state and logs what it saw."""
    def update(updates, state, params, info):
        log.append((tag, {k: v.copy() for k, v in updates.items()}, sorted(params), info))
        return {k: factor * v for k, v in updates.items()}, state + 1

    return Transform(lambda params: 0, update, report or (lambda s: {}), downlink or (lambda s: {}))


def _named(**arrays) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in arrays.items()}


def test_chain_runs_in_order_with_one_state_per_transform():
    """chain feeds each output to the next, in order, and keeps one state slot each (state mix-up)."""
    log: list = []
    opt = chain(_recorder("a", log, factor=2.0), _recorder("b", log, factor=3.0))
    x = _named(w=np.zeros(2))
    s = opt.init(x)
    assert s == [0, 0]
    out, s = opt.update(_named(w=[1.0, -1.0]), s, x, RoundInfo(1))
    assert [t for t, *_ in log] == ["a", "b"]
    assert log[1][1]["w"].tolist() == [2.0, -2.0]             # b sees a's output
    assert out["w"].tolist() == [6.0, -6.0] and s == [1, 1]
    _, s = opt.update(_named(w=[1.0, 1.0]), s, x, RoundInfo(2))
    assert s == [2, 2]


def test_chain_is_not_commutative_with_state():
    """trace then scale (FedAvgM) differs from scale then trace only by where the LR enters the buffer."""
    x, d = _named(w=np.zeros(1)), _named(w=[1.0])
    a, b = chain(trace(0.5), scale(2.0)), chain(scale(2.0), trace(0.5))
    sa, sb = a.init(x), b.init(x)
    for _ in range(2):
        oa, sa = a.update(d, sa, x, RoundInfo(1))
        ob, sb = b.update(d, sb, x, RoundInfo(1))
    assert oa["w"].tolist() == ob["w"].tolist() == [3.0]       # 2 * (1 + 0.5)
    assert sa[0]["w"].tolist() == [1.5] and sb[1]["w"].tolist() == [3.0]   # the buffers differ


def test_chain_merges_reports_and_downlinks_later_wins():
    """Merged read-outs: every transform contributes, a later key wins (a lost or stale lr_global)."""
    log: list = []
    first = _recorder("a", log, report=lambda s: {"lr_global": 1.0, "a_only": s},
                      downlink=lambda s: {"lr_scale": 0.5})
    second = _recorder("b", log, report=lambda s: {"lr_global": 2.0, "b_only": s})
    opt = chain(first, second)
    s = opt.init({})
    assert opt.report(s) == {"lr_global": 2.0, "a_only": 0, "b_only": 0}
    assert opt.downlink(s) == {"lr_scale": 0.5}
    assert chain(trace(0.9), scale(3.0)).report([None, None]) == {"lr_global": 3.0}


def test_masked_passes_other_arrays_through_bit_exactly_and_hides_them():
    """masked: non-masked arrays are passed through untouched (same bits) and the inner transform
    never sees them, in updates, params or RoundInfo.client_params (buffers leaking into h)."""
    log: list = []
    inner = _recorder("in", log, factor=3.0, report=lambda s: {"calls": s}, downlink=lambda s: {"lr_scale": 2.0})
    opt = masked(inner, ["w"])
    x = _named(w=np.zeros(2, np.float32), buf=np.zeros(3, np.float32), n=np.array([1], np.int64))
    weird = np.array([np.nan, -0.0, 5e-324])                  # NaN, negative zero, a subnormal
    d = _named(w=[1.0, 2.0], buf=weird, n=np.zeros(1))
    clients = [_named(w=[1.0, 2.0], buf=[9.0, 9.0, 9.0], n=[4]), _named(w=[0.0, 0.0], buf=[1.0, 1.0, 1.0], n=[4])]
    s = opt.init(x)
    out, s = opt.update(d, s, x, RoundInfo(7, clients, [1.0, 3.0]))
    assert list(out) == ["w", "buf", "n"]                      # model order kept
    assert out["w"].tolist() == [3.0, 6.0]
    assert out["buf"].tobytes() == weird.tobytes() and out["n"].tobytes() == d["n"].tobytes()
    (_, seen, seen_params, info), = log
    assert list(seen) == ["w"] and seen_params == ["w"]
    assert info.server_round == 7 and list(info.weights) == [1.0, 3.0]
    assert [list(c) for c in info.client_params] == [["w"], ["w"]]
    assert info.client_params[0]["w"].tolist() == [1.0, 2.0]
    assert s == 1 and opt.report(s) == {"calls": 1} and opt.downlink(s) == {"lr_scale": 2.0}


def test_masked_init_sees_only_the_masked_params():
    """masked.init builds the inner state from the masked arrays only (model-sized state for buffers)."""
    opt = masked(trace(0.9), ["w"])
    s = opt.init(_named(w=np.zeros((2, 2), np.float32), buf=np.zeros(5)))
    assert list(s) == ["w"] and s["w"].shape == (2, 2) and s["w"].dtype == np.float64


def test_masked_does_not_mutate_its_inputs():
    """Transforms never mutate the caller's updates/params (aliasing the aggregate)."""
    opt = masked(scale(2.0), ["w"])
    x, d = _named(w=np.ones(2)), _named(w=np.array([1.0, 2.0]), b=np.array([3.0]))
    d_before = {k: v.copy() for k, v in d.items()}
    opt.update(d, opt.init(x), x, RoundInfo(1))
    assert all(np.array_equal(d[k], d_before[k]) for k in d) and x["w"].tolist() == [1.0, 1.0]


def test_scale_and_identity_by_hand():
    """scale multiplies and reports its LR; identity returns the update unchanged (a lost server LR)."""
    x, d = _named(w=np.zeros(2)), _named(w=[1.0, -4.0])
    out, s = scale(0.25).update(d, scale(0.25).init(x), x, RoundInfo(1))
    assert out["w"].tolist() == [0.25, -1.0] and s is None and scale(0.25).report(s) == {"lr_global": 0.25}
    out, s = identity().update(d, identity().init(x), x, RoundInfo(1))
    assert out["w"] is d["w"] and out is not d and s is None and identity().report(s) == {}


def test_trace_by_hand():
    """trace: m <- mu m + delta, output m, state float64 (momentum off by one round)."""
    opt, x = trace(0.5), _named(w=np.zeros(1, np.float32))
    s = opt.init(x)
    assert s["w"].dtype == np.float64 and s["w"].tolist() == [0.0]
    out, s = opt.update(_named(w=[2.0]), s, x, RoundInfo(1))
    assert out["w"].tolist() == [2.0] and s["w"].tolist() == [2.0]
    out, s = opt.update(_named(w=[1.0]), s, x, RoundInfo(2))
    assert out["w"].tolist() == [2.0] and s["w"].tolist() == [2.0]          # 0.5 * 2 + 1
    out, s = opt.update(_named(w=[-3.0]), s, x, RoundInfo(3))
    assert out["w"].tolist() == [-2.0]


def test_adam_by_hand():
    """adam: no bias correction, step lr m / (sqrt v + tau) (bias correction, tau inside the root)."""
    opt, x = adam(lr=0.1, beta_1=0.5, beta_2=0.75, tau=0.5), _named(w=np.zeros(2))
    s = opt.init(x)
    out, s = opt.update(_named(w=[2.0, -4.0]), s, x, RoundInfo(1))
    m, v = np.array([1.0, -2.0]), np.array([1.0, 4.0])                     # 0.5 d, 0.25 d^2
    assert s["m"]["w"].tolist() == m.tolist() and s["v"]["w"].tolist() == v.tolist()
    np.testing.assert_allclose(out["w"], 0.1 * m / (np.sqrt(v) + 0.5), rtol=1e-15)
    out, s = opt.update(_named(w=[0.0, 4.0]), s, x, RoundInfo(2))
    m2, v2 = 0.5 * m + 0.5 * np.array([0.0, 4.0]), 0.75 * v + 0.25 * np.array([0.0, 16.0])
    np.testing.assert_allclose(out["w"], 0.1 * m2 / (np.sqrt(v2) + 0.5), rtol=1e-15)
    assert opt.report(s) == {"lr_global": 0.1}


def test_apply_updates_keeps_dtypes_and_copies():
    """apply_updates: float64 sum cast back per dtype; int arrays and arrays without a step are
    copies, never aliases (a later in-place change corrupting the previous model)."""
    x = _named(h=np.array([1.0, 2.0], np.float16), f=np.array([0.1], np.float32), d=np.array([0.1], np.float64),
               n=np.array([3], np.int64), frozen=np.array([7.0], np.float32))
    step = {"h": np.array([0.5, 0.5]), "f": np.array([0.2]), "d": np.array([0.2]), "n": np.array([100.0])}
    out = apply_updates(x, step)
    assert list(out) == list(x) and {k: out[k].dtype for k in out} == {k: x[k].dtype for k in x}
    assert out["h"].tolist() == [1.5, 2.5] and out["n"].tolist() == [3] and out["frozen"].tolist() == [7.0]
    assert out["f"][0] == np.float32(np.float64(np.float32(0.1)) + 0.2)            # added in float64
    assert out["d"][0] == 0.1 + 0.2
    for k in ("n", "frozen"):
        assert out[k] is not x[k] and not np.shares_memory(out[k], x[k])
    out["n"][0] = 99
    assert x["n"][0] == 3


@pytest.mark.parametrize("make", [lambda: scale(1.0), identity])
def test_fedavg_step_is_bit_identical_to_adding_delta(make):
    """x + 1.0 * delta via the transform is exactly x + delta in float64 (the FedAvg identity, H1)."""
    rng = np.random.default_rng(0)
    x = _named(w=rng.normal(size=50).astype(np.float32))
    d = _named(w=rng.normal(size=50))
    opt = make()
    upd, _ = opt.update(d, opt.init(x), x, RoundInfo(1))
    assert apply_updates(x, upd)["w"].tobytes() == (x["w"].astype(np.float64) + d["w"]).astype(np.float32).tobytes()


def test_masked_refuses_names_that_are_not_arrays():
    """A typo in the trainable names would silently turn every array into a buffer (plain FedAvg)."""
    import pytest

    from fedsim.core.transforms import masked, scale

    with pytest.raises(ValueError, match=r"\['typo'\] are not among the arrays"):
        masked(scale(2.0), ["typo"]).init({"w": np.zeros(2)})
