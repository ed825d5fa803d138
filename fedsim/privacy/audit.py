"""Empirical privacy audits anyone can run: lower bounds on ε that prove a mechanism broken when
they exceed its claim.

Two audits, both pure numpy/scipy on top of the real mechanisms in :mod:`fedsim.privacy.mechanisms`:

- **Mechanism audit** (:func:`audit_mechanism`): many independent runs of ONE clipped-and-noised
  step on neighbouring inputs D (a fixed batch) and D' = D + one canary whose gradient (or client
  update) is a large vector along a fixed direction ``u`` (a correct mechanism clips it). Per run,
  the score is the projection ``<release, u>``. A threshold ``t`` is chosen on a calibration split
  of the runs; on the disjoint evaluation split, with ``S = {score > t}``,
  ``FPR = P_D[S]``, ``FNR = P_D'[not S]``, and one-sided Clopper–Pearson upper bounds
  ``FPR_u``, ``FNR_u`` (each at ``alpha / 2``, ``alpha = 1 - confidence``)::

      eps_lb = max(0, log((1 - delta - FNR_u) / FPR_u), log((1 - delta - FPR_u) / FNR_u))

  An (ε, δ)-DP mechanism has ``P_D'[S] <= e^ε P_D[S] + δ`` and ``P_D[not S] <= e^ε P_D'[not S] + δ``
  for every event fixed before the evaluation runs, so both terms are ≤ ε whenever both upper
  bounds hold: ``P[eps_lb > ε] <= alpha`` for ANY (ε, δ)-DP mechanism (no Gaussian assumption).
- **One-run audit** (:func:`one_run_bound`, :func:`one_run_audit`) of Steinke, Nasr & Jagielski:
  m canaries each included independently with probability 1/2, ONE training run, the top-k₊
  scores guessed IN and the bottom-k₋ guessed OUT. For an ε-DP run the number of correct guesses
  W out of r = k₊ + k₋ is stochastically dominated by Binomial(r, e^ε / (1 + e^ε)) (their
  main theorem; with δ > 0 the tail gains ``2 m δ · max_i P[W' in [v - i, v)] / i``). The bound is
  the largest ε whose tail ``P[Binomial(r, p_ε) >= W]`` is still ≤ alpha.

The claim an audit is compared with is the accountant's ε of exactly what was run
(:func:`claimed_epsilon`: one step at q = 1 for the mechanism audit — D and D' differ by one
example that is always present in D' — T steps at q = 1 for the one-run audit).

**Vectorised runs.** :func:`example_level_release` runs N trials of a step in one call of the
real function by a block-diagonal layout: N·B "examples" in a parameter of shape (N, d), example
(i, j) being batch example i placed in trial slot j and zero elsewhere. Its flat norm is that of
example i, so per-example clipping is exact, and the noise is drawn i.i.d. per coordinate, so row
j of the release is distributed exactly as one run of the step. This holds for any step that
clips each example by its own norm and adds i.i.d. coordinate noise (DP-SGD, DiceSGD from a zero
error state, the mutants below); a step with a norm over the whole state (DiceSGD's
``clip_error`` of a non-zero error) is run trial by trial instead.

**What the audits found** (tests in ``tests/dp/test_audit.py``): DP-SGD, DiceSGD from a fresh
error state and client-level DP stay below their claims; σ/2, no clipping, unclipped error
feedback and noise divided by n twice are flagged. DiceSGD from an error state that carries a
canary's clipped-away residual is NOT covered by the one-step ε at σ_base: fedsim's fed-back error
is clipped at C2 = r·C1 in mean scale, i.e. up to n·r·C1 in sum scale against noise
sqrt(1 + 2r)·σ·C1, so one step's sensitivity is up to C1·(1 + 2 n r) (C1·(1 + n r) when D's own
error is 0). The dicesgd spec (§2.2) warns that the reported ε does not cover the error channel;
the audits measure how far off it is.

Example:
    >>> rel = example_level_release(dpsgd_step(clip=1.0, noise_multiplier=1.5, expected_batch_size=4),
    ...                             *canary_batch(batch=3, dim=2, clip=1.0, seed=0))
    >>> res = audit_mechanism(rel, trials=4000, delta=1e-5, confidence=0.95, claimed_epsilon=2.76, seed=0)
    >>> res.flagged, 0.0 < res.epsilon_lb < 2.76
    (False, True)
    >>> round(one_run_bound(100, 100, 0.95), 3)            # every guess right: logit(0.05 ** (1 / 100))
    3.493

References:
    Jagielski, Ullman, Oprea, Auditing Differentially Private Machine Learning: How Private is
    Private SGD?, arXiv:2006.07709; Nasr, Song, Thakurta, Papernot, Carlini, Adversary
    Instantiation: Lower Bounds for Differentially Private Machine Learning, arXiv:2101.04535;
    Steinke, Nasr, Jagielski, Privacy Auditing with One (1) Training Run, arXiv:2305.08846;
    Kairouz, Oh, Viswanath, The Composition Theorem for Differential Privacy, arXiv:1311.0776
    (the hypothesis-testing view of (ε, δ)); Zhang, Bu, Wu, Hong, DiceSGD, arXiv:2311.14632.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from fedsim.privacy import mechanisms
from fedsim.privacy.accounting import Event, epsilon

Tensors = Mapping[str, torch.Tensor]
#: One step: per-sample gradients (first dimension = examples) and a generator -> released gradient.
Step = Callable[[Tensors, torch.Generator], Tensors]
#: Client-level aggregation: client updates and a numpy generator -> released aggregate.
Aggregate = Callable[[Sequence[Mapping[str, np.ndarray]], np.random.Generator], Mapping[str, np.ndarray]]
#: ``release(neighbour, n, seed)``: scores of ``n`` independent runs on D (False) or D' (True).
Release = Callable[[bool, int, int], np.ndarray]

_BLOCK_ELEMENTS = 1 << 17     # block layout: ~130k floats of per-sample gradients per call (fastest on CPU)


# --------------------------------------------------------------------------------------------
# Bounds
# --------------------------------------------------------------------------------------------

def clopper_pearson_upper(k, n, alpha: float):
    """One-sided Clopper–Pearson upper bound on a Bernoulli rate from ``k`` successes in ``n``.

    ``P_p[bound < p] <= alpha`` for every true rate p: the bound is the p with
    ``P[Binomial(n, p) <= k] = alpha``, i.e. ``Beta(1 - alpha; k + 1, n - k)`` (1 when k = n).

    Example:
        >>> round(float(clopper_pearson_upper(0, 100, 0.05)), 6)      # 1 - 0.05 ** (1 / 100)
        0.029513
    """
    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore"):
        out = stats.beta.ppf(1.0 - alpha, k + 1.0, np.maximum(n - k, 1.0))
    return np.where(k >= n, 1.0, out)


def clopper_pearson_lower(k, n, alpha: float):
    """One-sided Clopper–Pearson lower bound: ``Beta(alpha; k, n - k + 1)`` (0 when k = 0)."""
    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore"):
        out = stats.beta.ppf(alpha, np.maximum(k, 1.0), n - k + 1.0)
    return np.where(k <= 0, 0.0, out)


def epsilon_from_counts(false_positives, negatives: int, false_negatives, positives: int, *, delta: float,
                        confidence: float):
    """The hypothesis-testing lower bound on ε from error counts of one fixed test (vectorised).

    ``false_positives`` of ``negatives`` runs on D fell in the rejection region S, and
    ``false_negatives`` of ``positives`` runs on D' fell outside it. With ``FPR_u``, ``FNR_u`` the
    one-sided Clopper–Pearson upper bounds at ``(1 - confidence) / 2`` each, returns
    ``max(0, log((1 - δ - FNR_u) / FPR_u), log((1 - δ - FPR_u) / FNR_u))``: both directions of
    the (ε, δ) inequality, valid together with probability ≥ ``confidence``.

    Example:
        >>> round(float(epsilon_from_counts(0, 1000, 0, 1000, delta=0.0, confidence=0.95)), 3)  # u = 1 - 0.025**(1/1000)
        5.601
    """
    alpha = 1.0 - confidence
    fpr_u = clopper_pearson_upper(false_positives, negatives, alpha / 2)
    fnr_u = clopper_pearson_upper(false_negatives, positives, alpha / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.log(np.maximum(1.0 - delta - fnr_u, 0.0)) - np.log(fpr_u)
        b = np.log(np.maximum(1.0 - delta - fpr_u, 0.0)) - np.log(fnr_u)
    out = np.nan_to_num(np.maximum(np.maximum(a, b), 0.0), nan=0.0, posinf=np.inf)
    return out if out.ndim else float(out)


def claimed_epsilon(noise_multiplier: float, delta: float, steps: int = 1, accountant: str = "prv") -> float:
    """The accountant's ε(δ) of ``steps`` Gaussian steps at σ without subsampling (q = 1)."""
    with np.errstate(divide="ignore", invalid="ignore"):     # PRV takes log(1 - q) = log 0 at q = 1
        return epsilon([Event(float(noise_multiplier), 1.0, int(steps))], delta, accountant)


def one_run_bound(correct: int, guesses: int, confidence: float = 0.95, *, delta: float = 0.0,
                  canaries: int | None = None) -> float:
    """Lower bound on ε from a one-run canary audit (Steinke, Nasr & Jagielski, arXiv:2305.08846).

    With ``v = correct`` right out of ``r = guesses`` guesses and ``alpha = 1 - confidence``, the
    p-value of the claim "the run is (ε, δ)-DP" is (their main theorem in its approximate-DP
    form; the same p-value as jax_privacy's one-run auditor)::

        p(ε) = P[Bin(r, q) >= v] + 2 m δ · max_{1 <= i <= v} P[v - i <= Bin(r, q) < v] / i,
        q = e^ε / (1 + e^ε),  m = canaries,

    and the bound is the largest ε with ``p(ε) <= alpha`` (0 if none). For δ = 0 this is the
    logit of the Clopper–Pearson lower bound on the guess accuracy,
    ``q_lb = Beta(alpha; v, r - v + 1)``. It grows with ``correct``, is 0 when about half the
    guesses are right, and is finite for finite r even when every guess is right
    (``logit(alpha ** (1 / r))``).

    Args:
        correct: number of correct guesses v.
        guesses: number of guesses r (abstentions excluded).
        confidence: ``1 - alpha``.
        delta: δ of the claim; > 0 needs ``canaries``.
        canaries: total number of canaries m (guessed or not).

    Returns:
        ε_lb ≥ 0; with probability ≥ ``confidence`` an (ε, δ)-DP run has ε ≥ ε_lb.

    Example:
        >>> round(one_run_bound(60, 100, 0.95), 4), one_run_bound(50, 100, 0.95)
        (0.0519, 0.0)
        >>> round(one_run_bound(80, 100, 0.95), 3)             # logit of Beta(0.05; 80, 21) = 0.7226
        0.958
    """
    r, v = int(guesses), int(correct)
    if not 0 <= v <= r:
        raise ValueError(f"need 0 <= correct <= guesses (got {correct}, {guesses})")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1) (got {confidence})")
    alpha = 1.0 - confidence
    if v == 0:
        return 0.0
    if delta == 0.0:
        q_lb = float(clopper_pearson_lower(v, r, alpha))
        return max(0.0, math.log(q_lb) - math.log1p(-q_lb)) if q_lb < 1.0 else math.inf
    if canaries is None or canaries < r:
        raise ValueError("delta > 0 needs the total number of canaries (>= guesses)")
    m = int(canaries)

    def p_value(eps: float) -> float:
        q = 1.0 / (1.0 + math.exp(-eps))
        tail = float(stats.binom.sf(v - 1, r, q))                    # P[Bin >= v]
        i = np.arange(1, v + 1)
        window = stats.binom.sf(v - i - 1, r, q) - tail              # P[v - i <= Bin < v]
        return min(1.0, tail + 2.0 * m * delta * float(np.max(window / i)))

    if p_value(0.0) > alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(hi) <= alpha:                  # p(ε) -> 1 as ε -> ∞ (the tail alone does)
        lo, hi = hi, 2.0 * hi
        if hi > 1e3:
            return math.inf
    for _ in range(60):                          # keep p(lo) <= alpha: lo is a valid rejection
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if p_value(mid) <= alpha else (lo, mid)
    return lo


# --------------------------------------------------------------------------------------------
# Mechanism audit
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AuditResult:
    """Outcome of :func:`audit_mechanism` (rates and bounds on the evaluation split)."""

    epsilon_lb: float
    claimed_epsilon: float
    delta: float
    confidence: float
    trials: int                 # runs per world, calibration + evaluation
    evaluation_trials: int      # runs per world the bound is computed from
    threshold: float            # S = {score > threshold}
    fpr: float
    fnr: float
    fpr_upper: float
    fnr_upper: float

    @property
    def flagged(self) -> bool:
        """Whether the audit proves the claim wrong (at ``confidence``)."""
        return self.epsilon_lb > self.claimed_epsilon


def _candidate_thresholds(scores: np.ndarray, limit: int = 1500) -> np.ndarray:
    """Pooled scores at log-spaced ranks from both ends (the tails matter most), plus ±∞."""
    s = np.sort(scores)
    ranks = np.unique(np.round(np.geomspace(1, len(s), limit // 2)).astype(int) - 1)
    return np.unique(np.concatenate([s[ranks], s[len(s) - 1 - ranks], [-np.inf, np.inf]]))


def _counts(out_scores: np.ndarray, in_scores: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False positives (D scores > t) and false negatives (D' scores <= t) per threshold."""
    fp = len(out_scores) - np.searchsorted(np.sort(out_scores), thresholds, side="right")
    fn = np.searchsorted(np.sort(in_scores), thresholds, side="right")
    return fp, fn


def epsilon_from_scores(out_scores: np.ndarray, in_scores: np.ndarray, *, delta: float, confidence: float,
                        calibration_fraction: float = 0.5) -> tuple[float, float, int, int]:
    """ε lower bound from scores of runs on D (``out``) and D' (``in``), larger meaning "D'".

    The first ``calibration_fraction`` of each array picks the threshold (the one maximising
    :func:`epsilon_from_counts` on those runs); the rest, independent of that choice, gives the
    bound. Returns ``(eps_lb, threshold, false_positives, false_negatives)`` on the evaluation part.
    """
    out_scores, in_scores = np.asarray(out_scores, float), np.asarray(in_scores, float)
    c_out, c_in = int(len(out_scores) * calibration_fraction), int(len(in_scores) * calibration_fraction)
    if min(c_out, c_in, len(out_scores) - c_out, len(in_scores) - c_in) < 1:
        raise ValueError("need runs in both the calibration and the evaluation split of both worlds")
    cal_out, cal_in = out_scores[:c_out], in_scores[:c_in]
    ev_out, ev_in = out_scores[c_out:], in_scores[c_in:]
    thresholds = _candidate_thresholds(np.concatenate([cal_out, cal_in]))
    fp, fn = _counts(cal_out, cal_in, thresholds)
    cal = epsilon_from_counts(fp, len(cal_out), fn, len(cal_in), delta=delta, confidence=confidence)
    t = float(thresholds[int(np.argmax(cal))])
    fp_e, fn_e = _counts(ev_out, ev_in, np.array([t]))
    eps = float(epsilon_from_counts(fp_e[0], len(ev_out), fn_e[0], len(ev_in), delta=delta, confidence=confidence))
    return eps, t, int(fp_e[0]), int(fn_e[0])


def audit_mechanism(release: Release, *, trials: int, delta: float, confidence: float = 0.95,
                    claimed_epsilon: float = math.nan, seed: int = 0,
                    calibration_fraction: float = 0.5) -> AuditResult:
    """Audit one step: ``trials`` runs on D and on D', a threshold test on their scores, an ε bound.

    Args:
        release: ``release(neighbour, n, seed)`` -> scores of n independent runs on D (False) or
            D' (True), e.g. from :func:`example_level_release` or :func:`client_level_release`.
        trials: runs per world (split into calibration and evaluation).
        delta: δ of the claim.
        confidence: the bound holds with this probability for any (ε, δ)-DP mechanism.
        claimed_epsilon: the ε the mechanism claims (:func:`claimed_epsilon`); sets ``flagged``.
        seed: seeds both worlds' runs (independent streams from one ``SeedSequence``).
        calibration_fraction: share of each world's runs used to pick the threshold.

    Returns:
        An :class:`AuditResult`.
    """
    if trials < 2:
        raise ValueError(f"need at least 2 trials per world (got {trials})")
    s_out, s_in = (int(s.generate_state(1, np.uint32)[0]) for s in np.random.SeedSequence(seed).spawn(2))
    out_scores = np.asarray(release(False, trials, s_out), float).reshape(-1)
    in_scores = np.asarray(release(True, trials, s_in), float).reshape(-1)
    if len(out_scores) != trials or len(in_scores) != trials:
        raise ValueError("release returned the wrong number of scores")
    eps, t, fp, fn = epsilon_from_scores(out_scores, in_scores, delta=delta, confidence=confidence,
                                         calibration_fraction=calibration_fraction)
    n_ev_out = trials - int(trials * calibration_fraction)
    alpha = 1.0 - confidence
    return AuditResult(epsilon_lb=eps, claimed_epsilon=float(claimed_epsilon), delta=delta, confidence=confidence,
                       trials=trials, evaluation_trials=n_ev_out, threshold=t, fpr=fp / n_ev_out,
                       fnr=fn / n_ev_out, fpr_upper=float(clopper_pearson_upper(fp, n_ev_out, alpha / 2)),
                       fnr_upper=float(clopper_pearson_upper(fn, n_ev_out, alpha / 2)))


# --------------------------------------------------------------------------------------------
# Neighbouring inputs and the real mechanisms as steps
# --------------------------------------------------------------------------------------------

def canary_batch(*, batch: int, dim: int, clip: float, canary_norm: float = 10.0, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch D of ``batch`` per-sample gradients (norms in [0.1 C, 2 C]: some clipped) and a
    canary ``canary_norm · C · e_1`` (D' = D + canary; it is clipped by a correct mechanism)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    norms = clip * (0.1 + 1.9 * torch.rand(batch, 1, generator=g, dtype=torch.float64))
    base = base / base.norm(dim=1, keepdim=True) * norms
    canary = torch.zeros(dim, dtype=torch.float64)
    canary[0] = canary_norm * clip
    return base.to(dtype), canary.to(dtype)


class _Step:
    """A step with a flag saying whether the block-diagonal vectorised layout is exact for it."""

    def __init__(self, fn: Step, vectorisable: bool):
        self.fn, self.vectorisable = fn, vectorisable

    def __call__(self, per_sample: Tensors, generator: torch.Generator) -> Tensors:
        return self.fn(per_sample, generator)


def dpsgd_step(*, clip: float, noise_multiplier: float, expected_batch_size: int) -> _Step:
    """:func:`~fedsim.privacy.mechanisms.dpsgd_grad` as a :data:`Step` (looked up at call time,
    so a test can patch the module)."""
    return _Step(lambda ps, g: mechanisms.dpsgd_grad(ps, clip=clip, noise_multiplier=noise_multiplier,
                                                     expected_batch_size=expected_batch_size, generator=g), True)


def dicesgd_step(*, clip: float, error_clip: float, noise_multiplier: float, expected_batch_size: int,
                 kappa: float | None = None, error: Tensors | None = None, carry_error: bool = False) -> _Step:
    """:func:`~fedsim.privacy.mechanisms.dicesgd_grad` as a :data:`Step`.

    ``error`` is the error state each call starts from (None: zeros, a fresh round); with
    ``carry_error`` the step keeps the new error for its next call (a training run). Only the
    fresh-state, non-carrying step is vectorisable (``clip_error`` takes one norm over the state).
    """
    state: dict[str, Tensors | None] = {"e": error}

    def fn(ps: Tensors, g: torch.Generator) -> Tensors:
        grad, new_error = mechanisms.dicesgd_grad(ps, state["e"], clip=clip, error_clip=error_clip,
                                                  noise_multiplier=noise_multiplier,
                                                  expected_batch_size=expected_batch_size, kappa=kappa, generator=g)
        if carry_error:
            state["e"] = new_error
        return grad

    return _Step(fn, error is None and not carry_error)


def dicesgd_carried_error(base: torch.Tensor, canary: torch.Tensor, *, clip: float, error_clip: float,
                          expected_batch_size: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Error states after one earlier DiceSGD step on D and on D' (the canary's clipped-away
    residual is in the second). Noise never enters e, so the step runs at σ = 0."""
    out = []
    for batch in (base, torch.cat([base, canary[None]])):
        _, e = mechanisms.dicesgd_grad({"w": batch}, None, clip=clip, error_clip=error_clip, noise_multiplier=0.0,
                                       expected_batch_size=expected_batch_size)
        out.append(e)
    return out[0], out[1]


def _unit(v: torch.Tensor | np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64).reshape(-1)
    return v / np.linalg.norm(v)


def _block(batch, width: int):
    """Block-diagonal layout: row ``i * width + j`` is example i in trial slot j (zeros elsewhere)."""
    b, d = batch.shape
    lib = torch if isinstance(batch, torch.Tensor) else np
    block = lib.zeros((b * width, width, d), dtype=batch.dtype)
    rows = lib.arange(b * width)
    block[rows, rows % width] = batch.repeat_interleave(width, dim=0) if lib is torch else np.repeat(batch, width, 0)
    return block


def example_level_release(step: Step, base: torch.Tensor, canary: torch.Tensor, *, step_in: Step | None = None,
                          direction: torch.Tensor | np.ndarray | None = None,
                          vectorised: bool | None = None) -> Release:
    """Scores ``<release, u>`` of a record-level step on D = ``base`` (B, d) and D' = D + ``canary``.

    Args:
        step: the step (a parameter named ``"w"`` of shape (d,)); world D' uses ``step_in`` if given
            (e.g. a DiceSGD step from the error state D' left behind).
        base: per-sample gradients of D.
        canary: the canary's per-sample gradient.
        direction: u (default: the canary's direction).
        vectorised: block-diagonal layout (see the module docstring); default: when every step used
            says it is exact (``step.vectorisable``), else one call per run.
    """
    u = _unit(canary if direction is None else direction)
    worlds = {False: (step, base), True: (step_in or step, torch.cat([base, canary[None].to(base.dtype)]))}
    if vectorised is None:
        vectorised = all(getattr(s, "vectorisable", False) for s, _ in worlds.values())
    u_t = torch.as_tensor(u, dtype=base.dtype)

    def release(neighbour: bool, n: int, seed: int) -> np.ndarray:
        fn, batch = worlds[neighbour]
        gen = torch.Generator().manual_seed(seed)
        scores = np.empty(n)
        if not vectorised:
            for k in range(n):
                scores[k] = float(fn({"w": batch}, gen)["w"].reshape(-1) @ u_t)
            return scores
        b, d = batch.shape
        c = max(1, min(n, int(math.sqrt(_BLOCK_ELEMENTS / (b * d)))))
        for start in range(0, n, c):
            width = min(c, n - start)
            scores[start:start + width] = (fn({"w": _block(batch, width)}, gen)["w"] @ u_t).numpy()
        return scores

    return release


def client_level_step(*, clip: float, noise_multiplier: float, denominator: float) -> Aggregate:
    """:func:`~fedsim.privacy.mechanisms.client_level_mean` as an :data:`Aggregate`."""
    return lambda updates, rng: mechanisms.client_level_mean(updates, clip=clip, noise_multiplier=noise_multiplier,
                                                             denominator=denominator, rng=rng)


def _named(x: np.ndarray) -> dict[str, np.ndarray]:
    return {"w": x}


def client_level_release(aggregate: Aggregate, base: np.ndarray, canary: np.ndarray, *,
                         direction: np.ndarray | None = None, vectorised: bool = True) -> Release:
    """Scores ``<aggregate, u>`` of client-level DP on D = clients ``base`` (B, d) and D' = D + the
    canary client (its update ``canary``). ``vectorised``: the block-diagonal layout (each client
    clipped by its own norm, i.i.d. coordinate noise), else one call per run."""
    base, canary = np.asarray(base, np.float64), np.asarray(canary, np.float64).reshape(-1)
    u = _unit(canary if direction is None else direction)
    worlds = {False: base, True: np.vstack([base, canary[None]])}

    def release(neighbour: bool, n: int, seed: int) -> np.ndarray:
        clients = worlds[neighbour]
        rng = np.random.default_rng(seed)
        if not vectorised:
            return np.array([float(aggregate([{"w": c} for c in clients], rng)["w"] @ u) for _ in range(n)])
        c = max(1, min(n, 64))       # its cost is a Python loop over clients: wider blocks do not help
        scores = np.empty(n)
        for start in range(0, n, c):
            width = min(c, n - start)
            scores[start:start + width] = aggregate(list(map(_named, _block(clients, width))), rng)["w"] @ u
        return scores

    return release


# --------------------------------------------------------------------------------------------
# One-run audit
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OneRunResult:
    """Outcome of :func:`one_run_audit`."""

    epsilon_lb: float
    claimed_epsilon: float
    correct: int
    guesses: int
    canaries: int
    steps: int
    confidence: float
    delta: float

    @property
    def flagged(self) -> bool:
        """Whether the audit proves the claim wrong (at ``confidence``)."""
        return self.epsilon_lb > self.claimed_epsilon


def one_run_guesses(scores: np.ndarray, included: np.ndarray, k_pos: int, k_neg: int) -> tuple[int, int]:
    """Guess the ``k_pos`` highest scores IN and the ``k_neg`` lowest OUT; ``(correct, guesses)``.

    Example:
        >>> one_run_guesses(np.array([0.9, 0.1, 0.5, 0.8]), np.array([True, False, False, True]), 1, 2)
        (3, 3)
    """
    scores, included = np.asarray(scores, float), np.asarray(included, bool)
    if k_pos + k_neg > len(scores):
        raise ValueError("more guesses than canaries")
    order = np.argsort(scores, kind="stable")
    top, bottom = order[len(order) - k_pos:], order[:k_neg]
    return int(included[top].sum() + (~included[bottom]).sum()), int(k_pos + k_neg)


def one_run_audit(step: Step, *, canaries: int = 1000, steps: int = 16, k_pos: int | None = None,
                  k_neg: int | None = None, clip: float = 1.0, canary_norm: float = 10.0, base_examples: int = 64,
                  features: int = 4, lr: float = 0.1, confidence: float = 0.95, delta: float = 0.0,
                  claimed_epsilon: float = math.nan, seed: int = 0) -> OneRunResult:
    """One DP training run with white-box gradient canaries, then :func:`one_run_bound`.

    The model is linear least squares in ``features`` dimensions on ``base_examples`` synthetic
    points, padded with one coordinate per canary: canary j's per-sample gradient is
    ``canary_norm · C · e_{features + j}`` (clipped by a correct step). Each canary is in the data
    with probability 1/2 (independently, from ``seed``); every step uses every present example
    (q = 1), so the claim is ``claimed_epsilon(σ, δ, steps)``. A canary's score is the parameter
    change along its coordinate, ``(θ_0 - θ_T)_j``.

    Args:
        step: a :data:`Step` with ``expected_batch_size = base_examples + canaries / 2`` (public);
            stateful steps (DiceSGD with ``carry_error``) keep their state across the run.
        canaries, steps: m and T.
        k_pos, k_neg: guesses IN / OUT (default m / 4 each).
        confidence, delta: of the bound (δ > 0 uses the main theorem's δ-term).
        claimed_epsilon: sets ``flagged``.
        seed: data, inclusion and the step's noise generator.
    """
    rng = np.random.default_rng(seed)
    k_pos = canaries // 4 if k_pos is None else k_pos
    k_neg = canaries // 4 if k_neg is None else k_neg
    included = rng.random(canaries) < 0.5
    x = torch.as_tensor(rng.normal(size=(base_examples, features)), dtype=torch.float32)
    y = x @ torch.as_tensor(rng.normal(size=features), dtype=torch.float32) + 0.1 * torch.as_tensor(
        rng.normal(size=base_examples), dtype=torch.float32)
    present = np.flatnonzero(included)
    canary_grads = torch.zeros(len(present), features + canaries)
    canary_grads[torch.arange(len(present)), torch.as_tensor(features + present)] = canary_norm * clip
    theta0 = torch.zeros(features + canaries)
    theta = theta0.clone()
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    for _ in range(steps):
        residual = x @ theta[:features] - y
        base_grads = torch.zeros(base_examples, features + canaries)
        base_grads[:, :features] = residual[:, None] * x
        grad = step({"w": torch.cat([base_grads, canary_grads])}, gen)["w"]
        theta = theta - lr * grad
    scores = (theta0 - theta)[features:].double().numpy()
    correct, guesses = one_run_guesses(scores, included, k_pos, k_neg)
    eps = one_run_bound(correct, guesses, confidence, delta=delta, canaries=canaries)
    return OneRunResult(epsilon_lb=eps, claimed_epsilon=float(claimed_epsilon), correct=correct, guesses=guesses,
                        canaries=canaries, steps=steps, confidence=confidence, delta=delta)
