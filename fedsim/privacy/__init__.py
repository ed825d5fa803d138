"""Differential privacy for fedsim's clients, importable into any torch loop (no Flower, no YAML).

- :mod:`~fedsim.privacy.accounting`: the per-client ledger, ε from Opacus' PRV/RDP accountants,
  calibration that never overshoots.
- :mod:`~fedsim.privacy.mechanisms`: DP-SGD, DiceSGD and client-level DP as pure functions.
- :mod:`~fedsim.privacy.optimizers`: DP-SGD and DiceSGD optimizers on Opacus' per-sample gradients.
"""

from fedsim.privacy.accounting import Event, Ledger, calibrate, epsilon

__all__ = ["Event", "Ledger", "calibrate", "epsilon"]
