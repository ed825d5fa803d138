"""Derived randomness: every random draw in a run comes from (seed, purpose, round, client).

Nothing depends on process-global RNG state or on the order in which clients reply,
which is what lets the engines (in-process, workers, Flower deployment) agree bit for bit.

Example:
    >>> derive_seed(0, "train", 3, 7) == derive_seed(0, "train", 3, 7)
    True
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def derive_seed(seed: int, purpose: str, *keys: int) -> int:
    """A 63-bit seed that is a pure function of the run seed, a purpose tag and integer keys."""
    entropy = [int(seed), zlib.crc32(purpose.encode()), *(int(k) for k in keys)]
    return int(np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


def numpy_rng(seed: int, purpose: str, *keys: int) -> np.random.Generator:
    """A numpy Generator for one purpose (partitioning, client sampling, ...)."""
    return np.random.default_rng(derive_seed(seed, purpose, *keys))


def torch_generator(seed: int, purpose: str, *keys: int) -> torch.Generator:
    """A CPU torch Generator for one purpose (data order, model init, ...)."""
    return torch.Generator().manual_seed(derive_seed(seed, purpose, *keys))
