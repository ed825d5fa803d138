"""FedHyper: hypergradient learning-rate schedulers for federated learning.

This module gathers the public API:

- the server schedulers G, GM, SL and CL's server part as transforms: :func:`fedhyper_server`,
  and the baselines :func:`decay_server`, :func:`fedexp_server`, :func:`fedexp_lr`
  (in :mod:`fedsim.algorithms.fedhyper_server`);
- the client rule CL: :class:`FedHyperClient` (any torch loop) and :class:`ClientLR` (a fedsim
  client plugin), :func:`auto_beta_lg` (in :mod:`fedsim.algorithms.fedhyper_client`);
- :class:`PreviousUpdate`, the server plugin that sends CL's ``Delta_{t-1}``;
- :func:`reference_preset`: the reference code's settings (the defaults of every function and
  class here are the canonical ones, the same as the scenario schema's).

Example:
    >>> import numpy as np
    >>> from fedsim.core import RoundInfo, apply_updates, mean_update
    >>> opt = fedhyper_server("gm+cl")
    >>> x = {"w": np.zeros(3, np.float32)}
    >>> state = opt.init(x)
    >>> d = mean_update(x, [{"w": np.ones(3, np.float32)}, {"w": np.full(3, 3, np.float32)}], [1, 1])
    >>> step, state = opt.update(d, state, x, RoundInfo(1))
    >>> apply_updates(x, step)["w"].tolist(), opt.report(state)["lr_global"]
    ([2.0, 2.0, 2.0], 1.0)

References:
    Z. Wang, J. Wang, A. Li. FedHyper: A Universal and Robust Learning Rate Scheduler for
    Federated Learning with Hypergradient Descent. arXiv:2310.03156 (ICLR 2024).
    FedExp: Jhunjhunwala, Wang, Joshi, arXiv:2301.09604 (ICLR 2023).
"""

from __future__ import annotations

from typing import Any, Collection

import numpy as np

from fedsim.algorithms.fedhyper_client import ClientLR, FedHyperClient, auto_beta_lg
from fedsim.algorithms.fedhyper_server import VARIANTS, decay_server, fedexp_lr, fedexp_server, fedhyper_server
from fedsim.core.arrays import Named, inner
from fedsim.core.server import Payload, PluginUpdate, RoundResult, ServerPlugin


class PreviousUpdate(ServerPlugin):
    """CL's server side: keeps the raw aggregate of the last round (trainable arrays, float64) and
    sends it to every client as the float32 group ``prev_update`` (absent before the first update).

    Clients cannot rebuild ``Delta_{t-1}`` from a cached model: under sampling they may have
    missed round ``t-1``. Rounds without replies keep the last update.
    """

    def __init__(self, name: str, trainable: Collection[str]):
        self.name, self.trainable = name, list(trainable)

    def downlink(self, state: Named | None, server_round: int) -> Payload:
        if state is None:
            return Payload()
        return Payload(arrays={"prev_update": {k: v.astype(np.float32) for k, v in state.items()}})

    def aggregate(self, state: Named | None, result: RoundResult) -> PluginUpdate:
        if result.delta is None:
            return PluginUpdate(state)
        return PluginUpdate({k: np.array(result.delta[k], np.float64, copy=True) for k in self.trainable})


def reference_preset() -> dict[str, Any]:
    """``preset: reference`` (spec section 2.6, right column): how the reference code's settings
    differ from the canonical defaults.

    Uniform weighting, SL's unclipped accumulator, and (for ``federation.local``) Adam at lr 0.01
    without decay; the variant is not set (the code's default is ``gm``, its "FULL" is ``gm+cl``).

    Example:
        >>> p = reference_preset()
        >>> p["weighting"], p["sl_state_clip"], p["local"]["optimizer"]
        ('uniform', False, 'adam')
    """
    return {"weighting": "uniform", "sl_state_clip": False,
            "local": {"optimizer": "adam", "lr": 0.01, "weight_decay": 0.0}}


__all__ = ["VARIANTS", "ClientLR", "FedHyperClient", "PreviousUpdate", "auto_beta_lg", "decay_server", "fedexp_lr", "fedexp_server", "fedhyper_server", "inner", "reference_preset"]
