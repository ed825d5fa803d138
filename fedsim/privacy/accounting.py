"""Per-client privacy accounting: a ledger of (noise multiplier, sample rate, steps) events, ε from
Opacus' RDP and PRV accountants, and noise calibration that never overshoots its target.

The ledger is the whole history of a client: one event per round it actually trained in,
counting only real (non-skipped) optimizer steps, consecutive equal (σ, q) merged by adding
steps. ε is always recomputed from the whole ledger with a fresh accountant, so it is the
cumulative ε over every round the client took part in (a new accountant per round would give
the ε of that round alone). The events are public: anyone can recompute ε from
``privacy.json`` with an independent accountant.

Example:
    >>> ledger = Ledger()
    >>> ledger.add(1.0, 0.01, 500); ledger.add(1.0, 0.01, 500)
    >>> ledger.events
    [Event(noise_multiplier=1.0, sample_rate=0.01, steps=1000)]
    >>> round(ledger.epsilon(1e-5, "rdp"), 4)
    2.1014

References:
    Mironov, Rényi Differential Privacy, arXiv:1702.07476; Gopi, Lee, Wutschitz, Numerical
    Composition of Differential Privacy (PRV), arXiv:2106.02848; Opacus (Yousefpour et al.,
    arXiv:2109.12298).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Iterable, Mapping, Sequence

ACCOUNTANTS = ("prv", "rdp")


@dataclass(frozen=True)
class Event:
    """``steps`` steps of the Poisson-subsampled Gaussian mechanism at noise multiplier σ and rate q."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def _accountant(name: str):
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant '{name}' (known: {', '.join(ACCOUNTANTS)})")
    from opacus.accountants import PRVAccountant, RDPAccountant
    return PRVAccountant() if name == "prv" else RDPAccountant()


def epsilon(events: Iterable[Event], delta: float, accountant: str = "prv") -> float:
    """ε(δ) of composing ``events``, from a fresh Opacus accountant (0 for no events).

    ``prv`` is Opacus' PRV accountant (an upper bound, tight); ``rdp`` the Rényi accountant
    (looser). Never Opacus' Gaussian (CLT) accountant: it can under-estimate ε.
    """
    history = tuple((float(e.noise_multiplier), float(e.sample_rate), int(e.steps)) for e in events if e.steps > 0)
    if not history:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in history):
        return math.inf
    return _epsilon(history, float(delta), accountant)


@lru_cache(maxsize=4096)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    """A fresh accountant's ε (cached: a client and the server's mirror ask for the same ledgers)."""
    acc = _accountant(accountant)
    acc.history = list(history)
    with warnings.catch_warnings():          # RDP: "optimal order is the largest alpha" (the bound still holds)
        warnings.simplefilter("ignore", UserWarning)
        return float(acc.get_epsilon(delta=delta))


@dataclass
class Ledger:
    """A client's privacy history. It only grows: there is no way to remove an event."""

    events: list[Event] = field(default_factory=list)

    def add(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Record ``steps`` real steps at (σ, q); merged into the last event when (σ, q) repeat."""
        if steps < 0:
            raise ValueError(f"steps must be >= 0 (got {steps})")
        if steps == 0:
            return
        last = self.events[-1] if self.events else None
        if last is not None and (last.noise_multiplier, last.sample_rate) == (noise_multiplier, sample_rate):
            self.events[-1] = Event(last.noise_multiplier, last.sample_rate, last.steps + int(steps))
        else:
            self.events.append(Event(float(noise_multiplier), float(sample_rate), int(steps)))

    @property
    def steps(self) -> int:
        """All steps recorded."""
        return sum(e.steps for e in self.events)

    def epsilon(self, delta: float, accountant: str = "prv") -> float:
        """Cumulative ε(δ) of the whole ledger."""
        return epsilon(self.events, delta, accountant)

    def after(self, noise_multiplier: float, sample_rate: float, steps: int) -> "Ledger":
        """This ledger with one more event (to check a planned round against a budget)."""
        out = Ledger(list(self.events))
        out.add(noise_multiplier, sample_rate, steps)
        return out

    def to_list(self) -> list[dict]:
        """JSON-ready events (``privacy.json``, client state)."""
        return [asdict(e) for e in self.events]

    @staticmethod
    def from_list(items: Sequence[Mapping]) -> "Ledger":
        """Inverse of :meth:`to_list`."""
        return Ledger([Event(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in items])

    def extends(self, older: "Ledger") -> bool:
        """Whether this ledger is ``older`` plus (possibly) more steps: ledgers never roll back."""
        if len(self.events) < len(older.events):
            return False
        for i, e in enumerate(older.events):
            mine = self.events[i]
            if (mine.noise_multiplier, mine.sample_rate) != (e.noise_multiplier, e.sample_rate):
                return False
            if mine.steps < e.steps or (mine.steps != e.steps and i < len(older.events) - 1):
                return False
        return True


def calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv",
              tolerance: float = 0.01) -> float:
    """The noise multiplier σ whose ε(δ) after ``steps`` steps at rate ``sample_rate`` lies in
    ``[target - tolerance, target]``: never above the target.

    ε(σ) decreases in σ: a bracket is found by doubling, then Brent's method on ``log σ`` finds
    the root of ``ε(σ) - (target - tolerance/2)`` (a handful of accountant calls, each a fresh
    accountant; results are cached). The answer is checked once more and σ raised until the
    target holds (PRV's ε carries its own numerical error, so the check matters).

    Example:
        >>> sigma = calibrate(6.0, 1e-5, 1 / 116, 500)
        >>> 5.99 <= epsilon([Event(sigma, 1 / 116, 500)], 1e-5) <= 6.0
        True
    """
    if not target_epsilon > 0:
        raise ValueError(f"target epsilon must be > 0 (got {target_epsilon})")
    if not 0 < sample_rate <= 1 or steps < 1:
        raise ValueError(f"need 0 < sample_rate <= 1 and steps >= 1 (got {sample_rate}, {steps})")
    return _calibrate(float(target_epsilon), float(delta), float(sample_rate), int(steps), accountant, float(tolerance))


@lru_cache(maxsize=1024)
def _calibrate(target: float, delta: float, q: float, steps: int, accountant: str, tolerance: float) -> float:
    from scipy.optimize import brentq

    def eps(sigma: float) -> float:
        return epsilon([Event(sigma, q, steps)], delta, accountant)

    aim = target - tolerance / 2
    lo, hi = 0.25, 1.0
    while eps(hi) > aim:
        lo, hi = hi, 2 * hi
        if hi > 1e4:
            raise ValueError(f"no noise multiplier below 1e4 reaches epsilon {target} at delta {delta}")
    while eps(lo) <= aim and lo > 1e-3:
        lo /= 2
    sigma = math.exp(brentq(lambda log_s: eps(math.exp(log_s)) - aim, math.log(lo), math.log(hi),
                            xtol=1e-4, rtol=1e-6))
    while eps(sigma) > target:
        sigma *= 1.001
    return sigma
