"""fedsim's two flwr-free contracts and their building blocks.

- :mod:`fedsim.core.server`: :class:`Server`, :class:`ServerPlugin` and the round protocol
  (:class:`RoundPlan`, :class:`ArraySpec`, :class:`ClientUpdate`).
- :mod:`fedsim.core.client`: :class:`LocalRun`, :class:`ClientPlugin`, :class:`ClientRound`.
- :mod:`fedsim.core.transforms`: server optimizers as optax-style transforms.
- :mod:`fedsim.core.arrays`: named-array arithmetic (float64, canonical order).
- :mod:`fedsim.core.state`: state trees <-> named arrays + JSON (checkpoints without pickle).

``docs/architecture.md`` shows how an algorithm plugs in (SCAFFOLD as the worked example).
"""

from fedsim.core.arrays import Named, apply_updates, inner, mean_update
from fedsim.core.client import ClientPlugin, ClientResult, ClientRound, LocalRun, check_private
from fedsim.core.server import (TRAIN, ArraySpec, ClientUpdate, Payload, PluginUpdate, RoundPlan, RoundResult, Server,
                                ServerPlugin)
from fedsim.core.transforms import RoundInfo, Transform, adam, chain, identity, masked, scale, trace

__all__ = ["TRAIN", "ArraySpec", "ClientPlugin", "ClientResult", "ClientRound", "ClientUpdate", "LocalRun", "Named",
           "Payload", "PluginUpdate", "RoundInfo", "RoundPlan", "RoundResult", "Server", "ServerPlugin", "Transform",
           "adam", "apply_updates", "chain", "check_private", "identity", "inner", "masked", "mean_update", "scale",
           "trace"]
