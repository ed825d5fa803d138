"""DP optimizers for Opacus' per-sample gradients: DP-SGD and DiceSGD, usable in fedsim's loop and in
any torch loop (with Opacus' ``GradSampleModule``, Poisson ``DPDataLoader`` and ``BatchMemoryManager``).

:class:`PrivateOptimizer` is Opacus' ``DPOptimizer`` with one addition for fedsim's loop:
:meth:`~PrivateOptimizer.privatize` clips, accumulates and noises *before* ``step()``, so
hooks that run after it (SCAFFOLD's correction, re-masking) post-process the private gradient
instead of being overwritten by it. Without ``privatize``, ``step()`` behaves exactly as
Opacus' ``DPOptimizer``.

:class:`GhostPrivateOptimizer` is DP-SGD with Opacus' ghost clipping (per-sample gradient norms
without per-sample gradients; for models dominated by large ``nn.Linear`` layers), with the same
:meth:`~PrivateOptimizer.privatize`.

:class:`DiceSGDOptimizer` keeps DiceSGD's error state ``e`` next to the parameters (never in
``state_dict()``, never sent): see :func:`fedsim.privacy.mechanisms.dicesgd_from_sums`.

Example:
    >>> import torch
    >>> from opacus import GradSampleModule
    >>> model = GradSampleModule(torch.nn.Linear(2, 1))
    >>> opt = DiceSGDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0,
    ...                        max_grad_norm=1.0, error_clip=1.0, expected_batch_size=4)
    >>> torch.nn.functional.mse_loss(model(torch.ones(4, 2)), torch.zeros(4, 1)).backward()
    >>> opt.step(); sorted(opt.error_state())      # by index unless names= maps parameters to names
    ['0', '1']

References:
    Opacus DPOptimizer (Yousefpour et al., arXiv:2109.12298); DiceSGD (arXiv:2311.14632).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

from fedsim.privacy.mechanisms import dicesgd_from_sums, noise_inflation, noise_std


class _Privatize:
    """What fedsim adds to an Opacus DP optimizer: :meth:`privatize` before ``step()``, and a noise
    std that is 0 (not NaN) in the no-privacy limit σ = 0, C = ∞."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._privatized: bool | None = None       # None: not privatized yet; else: step due?

    def privatize(self) -> bool:
        """Clip, accumulate, noise and scale into ``p.grad`` now; False for a virtual (skipped) step."""
        self._privatized = bool(self.pre_step())
        return self._privatized

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        if self._privatized is None:
            return super().step(closure)
        due, self._privatized = self._privatized, None
        return self.original_optimizer.step() if due else None

    def add_noise(self) -> None:
        """Opacus' ``add_noise`` with the std from :func:`~fedsim.privacy.mechanisms.noise_std`.

        Opacus computes ``sigma * C`` directly, so ``sigma = 0`` with ``C = inf`` (the no-privacy
        limit) gives a NaN std and torch raises; here that limit is plain SGD, and a NaN std from
        anything else is a ValueError.
        """
        std = noise_std(self.noise_multiplier, self.max_grad_norm)
        if std > 0:
            return super().add_noise()
        for p in self.params:
            p.grad = p.summed_grad.view_as(p)


class PrivateOptimizer(_Privatize, DPOptimizer):
    """Opacus' ``DPOptimizer`` whose private gradient can be made (:meth:`privatize`) before ``step()``."""


class GhostPrivateOptimizer(_Privatize, DPOptimizerFastGradientClipping):
    """DP-SGD with ghost clipping: Opacus' ``DPOptimizerFastGradientClipping`` with :meth:`privatize`.

    Use it with ``GradSampleModuleFastGradientClipping`` and a loss from :func:`ghost_loss`: the
    loss' ``backward()`` runs two passes (per-sample gradient norms, then the clipped sum), and no
    per-sample gradient is materialised.
    """


def ghost_loss(module: torch.nn.Module, optimizer: GhostPrivateOptimizer,
               loss_fn: Callable[..., torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    """``loss_fn(output, target, reduction=...)`` (e.g. ``F.cross_entropy``) for ghost clipping.

    The returned loss is Opacus' ``DPTensorFastGradientClipping`` (``backward()``, ``detach()``,
    ``+ scalar``); an empty Poisson batch gives a plain zero loss (its step still adds noise).
    """
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    class _Criterion:
        reduction = "mean"

        def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return loss_fn(output, target, reduction=self.reduction)

    dp_loss = DPLossFastGradientClipping(module, optimizer, _Criterion(), loss_reduction="mean")

    def loss(output: torch.Tensor, target: torch.Tensor) -> Any:
        return dp_loss(output, target) if len(target) else output.sum() * 0.0
    return loss


class DiceSGDOptimizer(PrivateOptimizer):
    """DiceSGD (mean scale, spec 2.1) on Opacus' per-sample gradients.

    Args:
        optimizer, noise_multiplier, max_grad_norm (C1), expected_batch_size, generator: as
            Opacus' ``DPOptimizer``.
        error_clip: C2 = r * C1, the clip of the fed-back error.
        kappa: the noise inflation (default ``sqrt(1 + 2 C2/C1)``).

    The error state starts at 0; :meth:`error_state` / :meth:`load_error_state` move it by
    parameter name (for ``persist_error``). ``state_dict()`` never contains it.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, error_clip: float, kappa: float | None = None,
                 names: dict[torch.nn.Parameter, str] | None = None, **kwargs):
        super().__init__(optimizer, **kwargs)
        self.error_clip = float(error_clip)
        self.kappa = noise_inflation(self.error_clip / self.max_grad_norm) if kappa is None else float(kappa)
        self._names = names
        self._error: dict[torch.nn.Parameter, torch.Tensor] = {}
        for p in self.params:
            p.raw_sum = None

    def clip_and_accumulate(self) -> None:
        for p in self.params:                           # S_g, before the parent consumes grad_sample
            raw = self._get_flat_grad_sample(p).to(p.dtype).sum(dim=0)
            p.raw_sum = raw if p.raw_sum is None else p.raw_sum + raw
        super().clip_and_accumulate()

    def add_noise(self) -> None:
        n = self.expected_batch_size * self.accumulated_iterations
        params = self.params
        s_c = {i: p.summed_grad for i, p in enumerate(params)}
        s_g = {i: p.raw_sum for i, p in enumerate(params)}
        error = {i: self._error[p] for i, p in enumerate(params)} if self._error else None
        grad, new_error = dicesgd_from_sums(s_c, s_g, error, clip=self.max_grad_norm, error_clip=self.error_clip,
                                            noise_multiplier=self.noise_multiplier, expected_batch_size=n,
                                            kappa=self.kappa, generator=self.generator)
        for i, p in enumerate(params):
            p.grad = grad[i].view_as(p)
            self._error[p] = new_error[i].detach()
            p.summed_grad = None

    def scale_grad(self) -> None:
        """Already in mean scale (``add_noise`` divides by the expected batch size)."""

    def zero_grad(self, set_to_none: bool = False) -> None:
        if not self._is_last_step_skipped:
            for p in self.params:
                p.raw_sum = None
        super().zero_grad(set_to_none)

    def error_state(self) -> dict[str, torch.Tensor]:
        """The error ``e`` by parameter name (private: only for client-local state)."""
        names = self._names or {p: str(i) for i, p in enumerate(self.params)}
        return {names[p]: e.clone() for p, e in self._error.items()}

    def load_error_state(self, error: dict[str, torch.Tensor]) -> None:
        """Continue from :meth:`error_state` (same names and shapes, else a ValueError)."""
        names = self._names or {p: str(i) for i, p in enumerate(self.params)}
        by_name = {names[p]: p for p in self.params}
        if set(error) != set(by_name):
            raise ValueError(f"error state names {sorted(error)[:3]}... differ from the parameters")
        for name, e in error.items():
            p = by_name[name]
            if tuple(e.shape) != tuple(p.shape):
                raise ValueError(f"error state '{name}' has shape {tuple(e.shape)}, the parameter {tuple(p.shape)}")
            self._error[p] = torch.as_tensor(e, dtype=p.dtype, device=p.device).clone()
