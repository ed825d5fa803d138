"""Local training loops (pure PyTorch) used by every engine's clients."""

from fedsim.train.local import evaluate, local_train, make_optimizer

__all__ = ["evaluate", "local_train", "make_optimizer"]
