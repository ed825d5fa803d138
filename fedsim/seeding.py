"""Derived randomness: every random draw in a run comes from (seed, purpose, round, client).

Nothing depends on process-global RNG state or on the order in which clients reply,
which is what lets the engines (in-process, workers, Flower deployment) agree bit for bit.

Example:
    >>> derive_seed(0, "train", 3, 7) == derive_seed(0, "train", 3, 7)
    True
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch


def derive_seed(seed: int, purpose: str, *keys: int) -> int:
    """A 63-bit seed that is a pure function of the run seed, a purpose tag and integer keys."""
    entropy = [int(seed), zlib.crc32(purpose.encode()), *(int(k) for k in keys)]
    return int(np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


def numpy_rng(seed: int, purpose: str, *keys: int) -> np.random.Generator:
    """A numpy Generator for one purpose (partitioning, client sampling, ...)."""
    return np.random.default_rng(derive_seed(seed, purpose, *keys))


@contextmanager
def torch_rng(seed: int, purpose: str, *keys: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run a block on torch's global RNG seeded from (seed, purpose, keys), restoring it afterwards.

    For code that draws from the global RNG (weight init, dropout). Seeds the CPU generator and,
    for a CUDA ``device``, that device's generator; never touches other devices (seeding all
    of them, as ``torch.manual_seed`` does, costs milliseconds per call).
    """
    value = derive_seed(seed, purpose, *keys)
    device = torch.device(device)
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(value)
        if cuda:
            torch.cuda.manual_seed(value)
        yield


def torch_generator(seed: int, purpose: str, *keys: int) -> torch.Generator:
    """A CPU torch Generator for one purpose (data order, model init, ...)."""
    return torch.Generator().manual_seed(derive_seed(seed, purpose, *keys))
