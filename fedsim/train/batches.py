"""Batch sources: where a local run's batches come from.

A batch source has one method, ``epochs()``: an iterator of epochs, each an iterable of
``(x, y)`` batches on the run's device. :class:`ShuffledBatches` is the default (a fresh
permutation per epoch from the client's own generator); a Poisson-sampled Opacus
``DPDataLoader`` fits the same shape (one epoch = one pass of the loader).

Example:
    >>> import numpy as np, torch
    >>> src = ShuffledBatches(np.zeros((5, 2), "float32"), np.zeros(5, "int64"), batch_size=2, steps=4,
    ...                       generator=torch.Generator().manual_seed(0))
    >>> [[len(y) for _, y in epoch] for epoch in src.epochs()]
    [[2, 2, 1], [2]]
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch

Batch = tuple[torch.Tensor, torch.Tensor]


class ShuffledBatches:
    """``epochs`` shuffled passes over (x, y), or exactly ``steps`` batches (passes as needed).

    Args:
        x, y: the client's examples and integer labels.
        batch_size: examples per batch (the last batch of a pass may be smaller).
        epochs, steps: how long (one of them; default one epoch).
        generator: the source of the data order (derive it from seed, round and client id).
        device: where the batches go.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, *, batch_size: int, generator: torch.Generator,
                 epochs: int | None = None, steps: int | None = None, device: torch.device | str = "cpu"):
        self.x, self.y, self.batch_size, self.generator = x, y, int(batch_size), generator
        self.num_epochs, self.steps, self.device = epochs, steps, torch.device(device)

    def __len__(self) -> int:
        return len(self.y)

    def epochs(self) -> Iterator[Iterable[Batch]]:
        xs = torch.from_numpy(np.asarray(self.x)).to(self.device)
        ys = torch.from_numpy(np.asarray(self.y)).to(self.device)
        n, done, epoch = len(ys), 0, 0
        while (self.steps is not None and done < self.steps) or (self.steps is None and epoch < (self.num_epochs or 1)):
            order = torch.randperm(n, generator=self.generator)
            starts = list(range(0, n, self.batch_size))
            if self.steps is not None:
                starts = starts[:self.steps - done]
            done += len(starts)
            epoch += 1
            yield self._pass(xs, ys, order, starts)

    def _pass(self, xs: torch.Tensor, ys: torch.Tensor, order: torch.Tensor, starts: list[int]) -> Iterator[Batch]:
        for start in starts:
            idx = order[start:start + self.batch_size].to(self.device)
            yield xs[idx], ys[idx]
