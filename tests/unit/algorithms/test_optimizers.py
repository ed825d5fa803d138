"""Aggregation (named arrays) and the classic server optimizers against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.algorithms.optimizers import fedadam, fedavg, fedavgm
from fedsim.core.arrays import apply_updates, mean_update
from fedsim.core.transforms import RoundInfo


def f32(*v):
    return np.array(v, dtype=np.float32)


def step(opt, x, delta, state):
    """One server round: ``x + opt.update(delta)``."""
    upd, state = opt.update(delta, state, x, RoundInfo(1))
    return apply_updates(x, upd), state


def test_weighted_mean_by_hand():
    """Weights normalise to p_m; int buffers get a zero update and stay int (averaged counters)."""
    x = {"w": f32(0.0, 0.0), "n": np.array([5], dtype=np.int64)}
    clients = [{"w": f32(1.0, 2.0), "n": np.array([9])}, {"w": f32(4.0, -1.0), "n": np.array([7])}]
    delta = mean_update(x, clients, [1, 3])   # p = 1/4, 3/4
    np.testing.assert_allclose(delta["w"], [0.25 * 1 + 0.75 * 4, 0.25 * 2 + 0.75 * -1])
    assert not delta["n"].any()                   # integer buffers are carried, not averaged
    opt = fedavg()
    new, _ = step(opt, x, delta, opt.init(x))
    np.testing.assert_allclose(new["w"], [3.25, -0.25])
    assert new["w"].dtype == np.float32 and new["n"].tolist() == [5] and new["n"].dtype == np.int64


def test_mean_update_gives_arrays_no_client_sent_a_zero_update():
    """Arrays absent from the replies (frozen factors) get a zero update, not a KeyError."""
    x = {"w": f32(1.0), "frozen": f32(2.0)}
    delta = mean_update(x, [{"w": f32(3.0)}], [1])
    assert list(delta) == ["w", "frozen"] and delta["w"].tolist() == [2.0] and delta["frozen"].tolist() == [0.0]


def test_fedavg_server_lr_one_is_the_plain_average():
    """FedAvg at server LR 1 is the plain mean of the client models (a stray scale)."""
    rng = np.random.default_rng(0)
    x = {"w": rng.normal(size=(3, 4)).astype(np.float32)}
    clients = [{"w": rng.normal(size=(3, 4)).astype(np.float32)} for _ in range(5)]
    opt = fedavg(1.0)
    new, _ = step(opt, x, mean_update(x, clients, [1] * 5), opt.init(x))
    np.testing.assert_allclose(new["w"], np.mean([c["w"] for c in clients], axis=0), atol=1e-6)


def test_fedavgm_by_hand():
    """FedAvgM: m <- mu m + delta, x += lr m (momentum applied before the LR, or not kept)."""
    opt, x = fedavgm(server_lr=0.5, server_momentum=0.9), {"w": f32(1.0)}
    state = opt.init(x)
    x, state = step(opt, x, {"w": np.array([2.0])}, state)      # m = 2, x = 1 + 1
    x, state = step(opt, x, {"w": np.array([1.0])}, state)      # m = 2.8, x = 2 + 1.4
    np.testing.assert_allclose(x["w"], [3.4])
    np.testing.assert_allclose(state[0]["w"], [2.8])            # chain(trace, scale): trace's m
    assert opt.report(state) == {"lr_global": 0.5}


def test_fedadam_by_hand():
    """FedAdam without bias correction: m = 1, v = 2 -> step lr / sqrt(2) (bias correction or tau slip)."""
    opt, x = fedadam(server_lr=0.1, beta_1=0.5, beta_2=0.5, tau=0.0), {"w": f32(0.0)}
    x, state = step(opt, x, {"w": np.array([2.0])}, opt.init(x))
    np.testing.assert_allclose(x["w"], [0.1 / np.sqrt(2)], rtol=1e-6)
    np.testing.assert_allclose(state["m"]["w"], [1.0])
    np.testing.assert_allclose(state["v"]["w"], [2.0])


def test_errors_and_dtypes():
    """No replies are refused; apply keeps dtypes."""
    with pytest.raises(ValueError, match="positive weight"):
        mean_update({"w": f32(0.0)}, [], [])
    assert apply_updates({"w": f32(1.0)}, {"w": np.array([0.5])})["w"].dtype == np.float32
