"""Aggregation and server optimizers against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.algorithms.aggregate import apply_step, fedadam, fedavg, fedavgm, mean_update, server_optimizer


def f32(*v):
    return np.array(v, dtype=np.float32)


def test_weighted_mean_by_hand():
    x = [f32(0.0, 0.0), np.array([5], dtype=np.int64)]
    clients = [[f32(1.0, 2.0), np.array([9])], [f32(4.0, -1.0), np.array([7])]]
    delta = mean_update(x, clients, [1, 3])   # p = 1/4, 3/4
    np.testing.assert_allclose(delta[0], [0.25 * 1 + 0.75 * 4, 0.25 * 2 + 0.75 * -1])
    assert not delta[1].any()                   # integer buffers are carried, not averaged
    new, _ = fedavg().update(x, delta, {})
    np.testing.assert_allclose(new[0], [3.25, -0.25])
    assert new[0].dtype == np.float32 and new[1].tolist() == [5]


def test_fedavg_server_lr_one_is_the_plain_average():
    rng = np.random.default_rng(0)
    x = [rng.normal(size=(3, 4)).astype(np.float32)]
    clients = [[rng.normal(size=(3, 4)).astype(np.float32)] for _ in range(5)]
    new, _ = fedavg(1.0).update(x, mean_update(x, clients, [1] * 5), {})
    np.testing.assert_allclose(new[0], np.mean([c[0] for c in clients], axis=0), atol=1e-6)


def test_fedavgm_by_hand():
    opt, x = fedavgm(server_lr=0.5, server_momentum=0.9), [f32(1.0)]
    state = opt.init(x)
    x, state = opt.update(x, [np.array([2.0])], state)      # m = 2, x = 1 + 1
    x, state = opt.update(x, [np.array([1.0])], state)      # m = 2.8, x = 2 + 1.4
    np.testing.assert_allclose(x[0], [3.4])
    np.testing.assert_allclose(state["m"][0], [2.8])


def test_fedadam_by_hand():
    opt, x = fedadam(server_lr=0.1, beta_1=0.5, beta_2=0.5, tau=0.0), [f32(0.0)]
    x, state = opt.update(x, [np.array([2.0])], opt.init(x))  # m = 1, v = 2 -> step 0.1/sqrt 2
    np.testing.assert_allclose(x[0], [0.1 / np.sqrt(2)], rtol=1e-6)


def test_order_of_arguments_given_sorted_is_deterministic():
    rng = np.random.default_rng(1)
    x = [rng.normal(size=100).astype(np.float32)]
    clients = [[rng.normal(size=100).astype(np.float32)] for _ in range(7)]
    w = rng.integers(1, 50, size=7)
    a = mean_update(x, clients, w)
    b = mean_update(x, list(clients), list(w))
    assert np.array_equal(a[0], b[0])


def test_errors_and_names():
    with pytest.raises(ValueError, match="positive weight"):
        mean_update([f32(0.0)], [], [])
    with pytest.raises(ValueError, match="unknown strategy"):
        server_optimizer("fedsgd")
    assert server_optimizer("fedprox").name == "fedavg"
    assert apply_step([f32(1.0)], [np.array([0.5])])[0].dtype == np.float32
