"""The classic server optimizers as transforms: FedAvg, FedAvgM, FedAdam (and FedProx's server side).

Each is a :class:`~fedsim.core.transforms.Transform` of the round's raw aggregate update
(FedProx's server side is :func:`fedavg`).

Example:
    >>> import numpy as np
    >>> from fedsim.core import RoundInfo, apply_updates, mean_update
    >>> x = {"w": np.zeros(2, np.float32)}
    >>> d = mean_update(x, [{"w": np.array([1., 3.], np.float32)}, {"w": np.array([3., 1.], np.float32)}], [1, 1])
    >>> opt = fedavgm(server_momentum=0.5)
    >>> step, _ = opt.update(d, opt.init(x), x, RoundInfo(1))
    >>> apply_updates(x, step)["w"].tolist()
    [2.0, 2.0]

References:
    FedAvg: McMahan et al., arXiv:1602.05629. FedAvgM: Hsu et al., arXiv:1909.06335.
    FedAdam: Reddi et al., arXiv:2003.00295. FedProx: Li et al., arXiv:1812.06127.
"""

from __future__ import annotations

from fedsim.core.transforms import Transform, adam, chain, scale, trace


def fedavg(server_lr: float = 1.0) -> Transform:
    """FedAvg: ``x <- x + server_lr * delta``."""
    return scale(server_lr)


def fedavgm(server_lr: float = 1.0, server_momentum: float = 0.9) -> Transform:
    """FedAvgM: ``m <- mu m + delta``; ``x <- x + server_lr * m``."""
    return chain(trace(server_momentum), scale(server_lr))


def fedadam(server_lr: float = 0.01, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3) -> Transform:
    """FedAdam: Adam moments of the pseudo-gradient, no bias correction (Reddi et al.)."""
    return adam(server_lr, beta_1, beta_2, tau)
