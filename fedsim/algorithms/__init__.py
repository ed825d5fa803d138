"""fedsim's algorithms: pure cores (no Flower, no YAML) importable into any federated loop, plus
their plugins for fedsim's server and client contracts (:mod:`fedsim.core`).

- :mod:`~fedsim.algorithms.optimizers`: FedAvg, FedAvgM, FedAdam as server transforms.
- :mod:`~fedsim.algorithms.fedprox`: FedProx's proximal term.
- :mod:`~fedsim.algorithms.fedhyper`: FedHyper's G/GM/SL/CL schedulers, Decay, FedExp.
- :mod:`~fedsim.algorithms.scaffold`: SCAFFOLD's control variates (option II).
"""

from fedsim.algorithms.optimizers import fedadam, fedavg, fedavgm
from fedsim.core.arrays import apply_updates, mean_update

__all__ = ["apply_updates", "fedadam", "fedavg", "fedavgm", "mean_update"]
