"""Local training (pure PyTorch): the standard loop over a :class:`~fedsim.core.client.LocalRun`,
batch sources, per-sample gradients, the scenario's optimizers and evaluation."""

from fedsim.train.batches import ShuffledBatches
from fedsim.train.functional import per_sample_grads
from fedsim.train.local import evaluate, local_train, make_optimizer
from fedsim.train.loop import run_local, train_local

__all__ = ["ShuffledBatches", "evaluate", "local_train", "make_optimizer", "per_sample_grads", "run_local", "train_local"]
