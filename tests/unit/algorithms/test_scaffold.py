"""SCAFFOLD (option II) by hand on quadratics, through its fedsim plugins and the standard loop.

Client i has f_i(w) = 1/2 (w - b_i)^T A_i (w - b_i); K local steps of SGD at lr eta on the
corrected gradient A_i (y - b_i) - c_i + c; then c_i+ = c_i - c + (x - y) / (K eta), and the
server sets c <- c + (1/N) sum delta_c_i.
"""

from __future__ import annotations

import numpy as np
import torch

from fedsim.algorithms.scaffold import ScaffoldClient, ScaffoldServer, client_control, server_control
from fedsim.core import LocalRun, Payload, Server, scale
from fedsim.core.server import ClientUpdate
from fedsim.train import run_local

D, N, K, ETA = 4, 5, 6, 0.1


class Quadratic(torch.nn.Module):
    """The model's output is the loss itself (the loss function passes it through)."""

    def __init__(self, a: np.ndarray, b: np.ndarray):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(D, dtype=torch.float64))
        self.a, self.b = torch.from_numpy(a), torch.from_numpy(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.w - self.b
        return 0.5 * d @ self.a @ d


class Steps:
    """K batches of nothing (the quadratic ignores its input)."""

    def epochs(self):
        yield [(torch.zeros(1), torch.zeros(1))] * K


def _problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    mats = []
    for _ in range(N):
        q = rng.normal(size=(D, D))
        mats.append(q @ q.T / D + np.eye(D))
    return mats, [rng.normal(size=D) for _ in range(N)]


def _by_hand(a, b, x, c, c_i):
    y = x.copy()
    for _ in range(K):
        y = y - ETA * (a @ (y - b) - c_i + c)
    new_ci = c_i - c + (x - y) / (K * ETA)
    return y, new_ci


def _client_round(plugin: ScaffoldClient, a, b, x, c, state):
    model = Quadratic(a, b)
    with torch.no_grad():
        model.w.copy_(torch.from_numpy(x))
    run = LocalRun(model, Steps(), lambda params, lr: torch.optim.SGD(params, lr=lr), lambda out, y: out, ETA)
    rnd = plugin.begin(run, Payload(arrays={"c": {"w": c.astype(np.float32)}}), state)
    run_local(run, [rnd])
    result = rnd.finish(run, {})
    return model.w.detach().numpy(), result


def test_client_steps_and_control_variate_match_the_hand_computation():
    """Catches a correction with the wrong sign (g + c_i - c), a missing correction, or c_i+ built
    from the wrong K or lr."""
    mats, bs = _problem()
    rng = np.random.default_rng(1)
    x = rng.normal(size=D)
    c = rng.normal(size=D).astype(np.float32).astype(np.float64)
    c_i = rng.normal(size=D).astype(np.float32)
    y, result = _client_round(ScaffoldClient("scaffold"), mats[0], bs[0], x, c, {"c_i": {"w": c_i}})
    y_hand, ci_hand = _by_hand(mats[0], bs[0], x, c, c_i.astype(np.float64))
    np.testing.assert_allclose(y, y_hand, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(result.state["c_i"]["w"], ci_hand, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.arrays["delta_c"]["w"], ci_hand - c_i, rtol=1e-5, atol=1e-5)


def test_pure_rules_by_hand():
    """Catches a server step that averages delta_c over the replies instead of dividing by N."""
    c_i, c = {"w": np.array([1.0, -1.0])}, {"w": np.array([0.5, 0.5])}
    x, y = {"w": np.array([2.0, 2.0])}, {"w": np.array([1.0, 3.0])}
    assert client_control(c_i, c, x, y, steps=4, lr=0.25)["w"].tolist() == [1.5, -2.5]
    out = server_control(c, [{"w": np.array([2.0, 0.0])}, {"w": np.array([0.0, 4.0])}], num_clients=4)
    assert out["w"].tolist() == [1.0, 1.5]


def test_server_c_stays_the_mean_of_every_clients_c_i_under_partial_participation():
    """The invariant c = (1/N) sum_i c_i over all N clients, through the Server and both plugins,
    with 2 of 5 clients per round for 6 rounds (catches a c update from the wrong replies or scale)."""
    mats, bs = _problem(2)
    server = Server(scale(1.0), [ScaffoldServer("scaffold", ["w"])], client_lr=ETA, num_clients=N)
    client = ScaffoldClient("scaffold")
    params = {"w": np.zeros(D)}
    state = server.init(params)
    states: dict[int, dict] = {}
    rng = np.random.default_rng(3)
    for rnd in range(1, 7):
        plan = server.plan(state, rnd, params)
        c = plan.arrays["scaffold.c"]["w"].astype(np.float64)
        replies = []
        for cid in sorted(rng.choice(N, size=2, replace=False)):
            y, result = _client_round(client, mats[cid], bs[cid], params["w"], c, states.get(cid))
            states[cid] = result.state
            replies.append(ClientUpdate(int(cid), 1.0, {"w": y}, {"scaffold": result.arrays}))
        params, state, _ = server.aggregate(state, plan, params, replies)
        mean_ci = sum(s["c_i"]["w"].astype(np.float64) for s in states.values()) / N
        np.testing.assert_allclose(state["plugins"]["scaffold"]["w"], mean_ci, rtol=1e-5, atol=1e-6)
