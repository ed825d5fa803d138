"""The DP mechanisms as pure functions: DP-SGD's clipped and noised step, DiceSGD's step with clipped
error feedback, and client-level DP aggregation.

Everything here is in *mean scale* over the expected batch size ``n`` (Opacus' convention):
DP-SGD's gradient is ``(sum_i clip(g_i, C) + N(0, (sigma C)^2 I)) / n``. Norms are taken over
all trainable tensors jointly (flat clipping), with Opacus' factor
``min(1, C / (||g_i|| + 1e-6))``. Randomness comes only from the generator passed in.

Example:
    >>> import torch
    >>> g = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}        # two examples, norms 5 and 0.5
    >>> step = dpsgd_grad(g, clip=1.0, noise_multiplier=0.0, expected_batch_size=2)
    >>> [round(v, 4) for v in step["w"].tolist()]                 # (0.6 + 0.3, 0.8 + 0.4) / 2
    [0.45, 0.6]

References:
    Abadi et al., Deep Learning with Differential Privacy, arXiv:1607.00133 (DP-SGD);
    X. Zhang, Z. Bu, Z. S. Wu, M. Hong, Differentially Private SGD Without Clipping Bias: An
    Error-Feedback Approach, arXiv:2311.14632 (DiceSGD); McMahan et al., Learning Differentially
    Private Recurrent Language Models, arXiv:1710.06963 (client-level DP-FedAvg).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch

Tensors = dict[str, torch.Tensor]


def per_sample_norms(per_sample: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``||g_i||`` over all tensors jointly, one per example (first dimension)."""
    norms = [g.reshape(len(g), -1).norm(2, dim=-1) for g in per_sample.values()]
    return torch.stack(norms, dim=1).norm(2, dim=1)


def clip_factors(per_sample: Mapping[str, torch.Tensor], clip: float) -> torch.Tensor:
    """Opacus' flat clipping factor ``min(1, C / (||g_i|| + 1e-6))`` per example."""
    return (clip / (per_sample_norms(per_sample) + 1e-6)).clamp(max=1.0)


def clipped_sum(per_sample: Mapping[str, torch.Tensor], clip: float) -> Tensors:
    """``S_c = sum_i clip(g_i, C)`` per tensor."""
    factors = clip_factors(per_sample, clip)
    return {k: torch.einsum("i,i...", factors.to(g.dtype), g) for k, g in per_sample.items()}


def noise_std(noise_multiplier: float, clip: float, kappa: float = 1.0) -> float:
    """The Gaussian noise std ``kappa * sigma * C`` (sum scale).

    0 when ``sigma = 0``, also with ``C = inf`` (the no-privacy limit: ``0 * inf`` would be NaN);
    a ValueError when it is negative or not finite (a NaN std would silently draw no noise).
    """
    if noise_multiplier == 0:
        return 0.0
    std = kappa * noise_multiplier * clip
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"noise std kappa*sigma*C = {kappa}*{noise_multiplier}*{clip} = {std}: "
                         "sigma, C and kappa must be finite and >= 0 when sigma > 0")
    return std


def gaussian(like: Mapping[str, torch.Tensor], std: float, generator: torch.Generator | None) -> Tensors:
    """Independent N(0, std^2) noise shaped like each tensor, drawn in order (as Opacus draws it)."""
    return {k: torch.normal(mean=0, std=std, size=v.shape, device=v.device, generator=generator, dtype=v.dtype)
            if std > 0 else torch.zeros(v.shape, device=v.device, dtype=v.dtype) for k, v in like.items()}


def dpsgd_grad(per_sample: Mapping[str, torch.Tensor], *, clip: float, noise_multiplier: float,
               expected_batch_size: int, generator: torch.Generator | None = None) -> Tensors:
    """DP-SGD's gradient ``(S_c + N(0, (sigma C)^2)) / n`` (DPSGD-GC: clipping biases it)."""
    s_c = clipped_sum(per_sample, clip)
    noise = gaussian(s_c, noise_std(noise_multiplier, clip), generator)
    return {k: (s_c[k] + noise[k]) / expected_batch_size for k in s_c}


def clip_error(error: Mapping[str, torch.Tensor], error_clip: float) -> Tensors:
    """``clip_e(e, C2) = e * min(1, C2 / ||e||)`` with the norm over all tensors (factor 1 when e = 0)."""
    norm = math.sqrt(sum(float((e.double() ** 2).sum()) for e in error.values()))
    factor = 1.0 if norm == 0.0 else min(1.0, error_clip / norm)
    return {k: e * factor for k, e in error.items()}


def noise_inflation(error_clip_ratio: float) -> float:
    """DiceSGD's default ``kappa = sqrt(1 + 2 r)`` with ``r = C2 / C1``."""
    return math.sqrt(1.0 + 2.0 * error_clip_ratio)


def dicesgd_from_sums(s_c: Mapping[str, torch.Tensor], s_g: Mapping[str, torch.Tensor],
                      error: Mapping[str, torch.Tensor] | None, *, clip: float, error_clip: float,
                      noise_multiplier: float, expected_batch_size: int, kappa: float | None = None,
                      generator: torch.Generator | None = None) -> tuple[Tensors, Tensors]:
    """One DiceSGD step from the sums of clipped (``S_c``) and raw (``S_g``) per-sample gradients.

    With ``fb = clip_e(e, C2)`` and ``v = S_c/n + fb`` (spec 2.1, mean scale) it returns the
    released gradient ``v + N(0, (kappa sigma C1 / n)^2)`` and the new error
    ``e' = e + S_g/n - v = (e - fb) + (S_g - S_c)/n``. The noise is drawn in sum scale,
    ``(S_c + n fb + N(0, (kappa sigma C1)^2)) / n``, so with ``C2 = 0`` the step is Opacus'
    DP-SGD bit for bit. Noise never enters ``e``; ``e`` never leaves the client. ``kappa``
    defaults to ``sqrt(1 + 2 C2/C1)``.
    """
    n = expected_batch_size
    e = dict(error) if error is not None else {k: torch.zeros_like(v) for k, v in s_c.items()}
    fed_back = clip_error(e, error_clip)
    if kappa is None:
        kappa = noise_inflation(error_clip / clip) if noise_multiplier else 1.0
    noise = gaussian(s_c, noise_std(noise_multiplier, clip, kappa), generator)
    grad = {k: (s_c[k] + n * fed_back[k] + noise[k]) / n for k in s_c}
    new_error = {k: (e[k] - fed_back[k]) + (s_g[k] - s_c[k]) / n for k in s_c}
    return grad, new_error


def dicesgd_grad(per_sample: Mapping[str, torch.Tensor], error: Mapping[str, torch.Tensor] | None, *, clip: float,
                 error_clip: float, noise_multiplier: float, expected_batch_size: int, kappa: float | None = None,
                 generator: torch.Generator | None = None) -> tuple[Tensors, Tensors]:
    """One DiceSGD step over per-sample gradients: :func:`dicesgd_from_sums` of their sums."""
    s_c = clipped_sum(per_sample, clip)
    s_g = {k: g.sum(dim=0) for k, g in per_sample.items()}
    return dicesgd_from_sums(s_c, s_g, error, clip=clip, error_clip=error_clip, noise_multiplier=noise_multiplier,
                             expected_batch_size=expected_batch_size, kappa=kappa, generator=generator)


def client_level_mean(updates: Sequence[Mapping[str, np.ndarray]], *, clip: float, noise_multiplier: float,
                      denominator: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Client-level DP aggregation: ``(sum_i clip(delta_i, C) + N(0, (sigma C)^2 I)) / m`` (float64).

    ``m`` is a fixed public denominator (the planned cohort size), so neither the noise nor the
    scale depends on how many replied or on anything a client reports about itself.
    """
    if not updates:
        raise ValueError("client-level DP needs at least one update")
    names = list(updates[0])
    total = {k: np.zeros(np.shape(updates[0][k]), np.float64) for k in names}
    for u in updates:
        norm = math.sqrt(sum(float(np.sum(np.square(np.asarray(u[k], np.float64)))) for k in names))
        factor = min(1.0, clip / (norm + 1e-12))
        for k in names:
            total[k] += factor * np.asarray(u[k], np.float64)
    std = noise_std(noise_multiplier, clip)
    return {k: (total[k] + (rng.normal(0.0, std, size=total[k].shape) if std > 0 else 0.0)) / denominator
            for k in names}
