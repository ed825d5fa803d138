"""fedsim's algorithms as pure cores: no Flower, no YAML, importable into any federated loop."""

from fedsim.algorithms.aggregate import ServerOptimizer, apply_step, mean_update, server_optimizer

__all__ = ["ServerOptimizer", "apply_step", "mean_update", "server_optimizer"]
