"""SCAFFOLD: stochastic controlled averaging (option II control variates).

Every client ``i`` keeps a control variate ``c_i`` across the rounds it takes part in; the
server keeps ``c``. In a round the server sends ``x`` and ``c``; the client runs ``K`` local SGD
steps on the corrected gradient ``g(y) - c_i + c``, then (option II)

    c_i+ = c_i - c + (x - y) / (K * lr),

and sends ``y`` and ``delta_c_i = c_i+ - c_i``. The server steps ``x`` from the mean update like
FedAvg (server learning rate ``server_lr``) and sets

    c <- c + (1/N) * sum_{i in S} delta_c_i,

so ``c`` stays the mean of all N clients' ``c_i`` (every ``c_i`` starts at 0).

The pure rules are :func:`client_control` and :func:`server_control`; :class:`ScaffoldServer`
and :class:`ScaffoldClient` plug them into fedsim's contracts (state ``c`` on the server,
``c_i`` in the client's state, ``c`` down, ``delta_c`` up). Local training should be plain SGD
(the option II rule assumes it); with momentum the correction is still applied to every step.

Example:
    >>> import numpy as np
    >>> c_i, c = {"w": np.zeros(2)}, {"w": np.array([0.5, 0.0])}
    >>> x, y = {"w": np.ones(2)}, {"w": np.array([0.0, 0.5])}
    >>> client_control(c_i, c, x, y, steps=2, lr=0.5)["w"].tolist()      # (x - y) / 1 - c
    [0.5, 0.5]
    >>> server_control(c, [{"w": np.array([1.0, 1.0])}], num_clients=4)["w"].tolist()
    [0.75, 0.25]

References:
    S. P. Karimireddy et al., SCAFFOLD: Stochastic Controlled Averaging for Federated Learning,
    arXiv:1910.06378 (ICML 2020), Algorithm 1, option II.
"""

from __future__ import annotations

from typing import Any, Collection, Mapping, Sequence

import numpy as np
import torch

from fedsim.core.arrays import Named
from fedsim.core.client import ClientPlugin, ClientResult, ClientRound, LocalRun
from fedsim.core.server import ArraySpec, Payload, PluginUpdate, RoundResult, ServerPlugin


def client_control(c_i: Mapping[str, np.ndarray], c: Mapping[str, np.ndarray], x: Mapping[str, np.ndarray],
                   y: Mapping[str, np.ndarray], *, steps: int, lr: float) -> Named:
    """Option II: ``c_i+ = c_i - c + (x - y) / (steps * lr)``, in float64."""
    if steps < 1 or not lr > 0:
        raise ValueError(f"the control variate needs steps >= 1 and lr > 0 (got {steps}, {lr})")
    k = float(steps) * float(lr)
    return {n: (np.asarray(c_i[n], np.float64) - np.asarray(c[n], np.float64)
                + (np.asarray(x[n], np.float64) - np.asarray(y[n], np.float64)) / k) for n in c_i}


def server_control(c: Mapping[str, np.ndarray], deltas: Sequence[Mapping[str, np.ndarray]], *,
                   num_clients: int) -> Named:
    """``c + (1/N) * sum_i delta_c_i`` (float64, in the order given)."""
    out = {n: np.array(v, np.float64, copy=True) for n, v in c.items()}
    for d in deltas:
        for n in out:
            out[n] += np.asarray(d[n], np.float64) / num_clients
    return out


class ScaffoldServer(ServerPlugin):
    """The server control variate ``c`` over the trainable arrays: sent down as ``c`` (float32),
    updated from every accepted reply's ``delta_c``."""

    def __init__(self, name: str, trainable: Collection[str]):
        self.name, self.trainable = name, list(trainable)

    def init(self, params: Named) -> Named:
        return {k: np.zeros(params[k].shape, np.float64) for k in self.trainable}

    def downlink(self, state: Named, server_round: int) -> Payload:
        return Payload(arrays={"c": {k: v.astype(np.float32) for k, v in state.items()}})

    def uplink(self, state: Named, server_round: int, phase: str, model_specs: dict[str, ArraySpec]):
        return model_specs, {"delta_c": {k: ArraySpec(v.shape, np.dtype(np.float32)) for k, v in state.items()}}

    def aggregate(self, state: Named, result: RoundResult) -> PluginUpdate:
        if result.num_clients < 1:
            raise ValueError("SCAFFOLD needs the population size: build the Server with num_clients=N")
        deltas = [r.groups[self.name]["delta_c"] for r in result.replies]
        return PluginUpdate(server_control(state, deltas, num_clients=result.num_clients))


class _ScaffoldRound(ClientRound):
    def __init__(self, c: dict[str, torch.Tensor], c_i: Named, x: Named):
        self.c, self.c_i, self.x = c, c_i, x
        self.correction: dict[str, torch.Tensor] = {}

    def prepare(self, run: LocalRun) -> None:
        self.correction = {k: (self.c[k] - torch.from_numpy(self.c_i[k])).to(run.device) for k in self.c}

    def before_step(self, run: LocalRun) -> None:
        for name, g in run.grads().items():
            g.add_(self.correction[name])

    def finish(self, run: LocalRun, model: Named) -> ClientResult:
        y = {k: p.detach().cpu().numpy() for k, p in run.trainable().items()}
        c = {k: v.numpy() for k, v in self.c.items()}
        new = {k: v.astype(np.float32) for k, v in
               client_control(self.c_i, c, self.x, y, steps=max(run.steps, 1), lr=run.base_lr).items()}
        delta = {k: new[k] - self.c_i[k] for k in new}
        return ClientResult(arrays={"delta_c": delta}, state={"c_i": new})


class ScaffoldClient(ClientPlugin):
    """The client control variate ``c_i`` (kept in the client's state, float32; zeros at first)."""

    stateful = True

    def __init__(self, name: str):
        self.name = name

    def begin(self, run: LocalRun, downlink: Payload, state: Any) -> ClientRound:
        params = run.trainable()
        c = {k: torch.from_numpy(np.array(downlink.arrays["c"][k], np.float32)) for k in params}
        c_i = (state or {}).get("c_i") or {k: np.zeros(tuple(p.shape), np.float32) for k, p in params.items()}
        x = {k: p.detach().cpu().numpy().copy() for k, p in params.items()}
        return _ScaffoldRound(c, {k: np.asarray(v, np.float32) for k, v in c_i.items()}, x)
