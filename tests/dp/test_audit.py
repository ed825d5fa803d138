"""AUD-1/AUD-2/AUD-4: the privacy audits' maths, the real mechanisms staying below their claims, and
each planted mutant being flagged.

Probability budget (fixed seeds, never re-rolled). Every mechanism audit runs at
``CONFIDENCE = 1 - 1e-6``: by the Clopper–Pearson construction (two one-sided bounds at 5e-7 each,
on an evaluation split independent of the threshold choice) ``P[eps_lb > ε]`` is at most 1e-6 for
ANY mechanism that really is (ε, δ)-DP, so a correct mechanism fails a "stays below" test with
probability ≤ 1e-6 whatever its noise looks like. The mutant tests have the opposite risk (missing
the mutant); their trial counts come from a power calculation on the Gaussian trade-off curve
(expected ε_lb, given in each test, at least ~0.8 above the claim, where the standard deviation of
ε_lb is ~0.1 at 1e5 evaluation runs). The one-run audit uses the δ = 0 bound for "stays below"
(it dominates the δ > 0 bound, so that is the stricter check) and the δ > 0 bound at the claim's
δ for flags (so a flag is a proof, not a heuristic).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from fedsim.privacy import audit as A
from fedsim.privacy import mechanisms

DELTA = 1e-5
CONFIDENCE = 1 - 1e-6
C1 = 1.0
N = 5                               # expected batch size: 4 base examples + the canary
SIGMAS = (0.7, 1.5)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _batch():
    return A.canary_batch(batch=N - 1, dim=2, clip=C1, canary_norm=10.0, seed=0)


def _report(name: str, res) -> None:
    print(f"{name}: eps_lb={res.epsilon_lb:.3f} claimed={res.claimed_epsilon:.3f} flagged={res.flagged}")


# --------------------------------------------------------------------------------------------
# The bounds (AUD-4)
# --------------------------------------------------------------------------------------------

def test_clopper_pearson_known_values_and_exact_coverage():
    """CP bounds equal the beta quantiles written out by hand, and cover at the stated level."""
    alpha = 0.05
    assert A.clopper_pearson_upper(0, 100, alpha) == pytest.approx(1 - alpha ** (1 / 100), rel=1e-12)
    assert A.clopper_pearson_lower(100, 100, alpha) == pytest.approx(alpha ** (1 / 100), rel=1e-12)
    assert A.clopper_pearson_upper(7, 50, alpha) == pytest.approx(stats.beta.ppf(0.95, 8, 43), rel=1e-12)
    assert A.clopper_pearson_lower(7, 50, alpha) == pytest.approx(stats.beta.ppf(0.05, 7, 44), rel=1e-12)
    assert A.clopper_pearson_upper(50, 50, alpha) == 1.0 and A.clopper_pearson_lower(0, 50, alpha) == 0.0
    # Definition: P[Binomial(n, upper(k)) <= k] = alpha.
    assert stats.binom.cdf(7, 50, A.clopper_pearson_upper(7, 50, alpha)) == pytest.approx(alpha, rel=1e-9)
    # Exact coverage over the whole outcome space, for a few true rates.
    k = np.arange(51)
    for p in (0.01, 0.13, 0.5, 0.87):
        miss_up = stats.binom.pmf(k, 50, p)[A.clopper_pearson_upper(k, 50, alpha) < p].sum()
        miss_lo = stats.binom.pmf(k, 50, p)[A.clopper_pearson_lower(k, 50, alpha) > p].sum()
        assert miss_up <= alpha and miss_lo <= alpha


def test_epsilon_from_counts_known_values():
    """Both directions of the (ε, δ) inequality, each from the two CP upper bounds at alpha/2."""
    n, alpha = 1000, 0.05
    u = 1 - (alpha / 2) ** (1 / n)                               # CP upper bound of 0 / n
    assert A.epsilon_from_counts(0, n, 0, n, delta=0.0, confidence=0.95) == pytest.approx(math.log((1 - u) / u))
    assert A.epsilon_from_counts(0, n, 0, n, delta=0.01, confidence=0.95) == pytest.approx(math.log((1 - 0.01 - u) / u))
    fpr_u, fnr_u = stats.beta.ppf(1 - alpha / 2, 11, n - 10), stats.beta.ppf(1 - alpha / 2, 301, n - 300)
    want = max(math.log((1 - fnr_u) / fpr_u), math.log((1 - fpr_u) / fnr_u))
    assert A.epsilon_from_counts(10, n, 300, n, delta=0.0, confidence=0.95) == pytest.approx(want)
    # The reverse direction: few false negatives, many false positives.
    assert A.epsilon_from_counts(300, n, 10, n, delta=0.0, confidence=0.95) == pytest.approx(want)
    # A coin flip of a test proves nothing.
    assert A.epsilon_from_counts(500, n, 500, n, delta=0.0, confidence=0.95) == 0.0


def test_one_run_bound_known_values_and_shape():
    """Closed form at δ = 0, monotone in correct guesses, 0 near half right, ∞ only as r -> ∞."""
    alpha = 0.05
    q = alpha ** (1 / 100)
    assert A.one_run_bound(100, 100, 0.95) == pytest.approx(math.log(q / (1 - q)), rel=1e-9)
    q = stats.beta.ppf(alpha, 80, 21)
    assert A.one_run_bound(80, 100, 0.95) == pytest.approx(math.log(q / (1 - q)), rel=1e-9)
    bounds = [A.one_run_bound(v, 1000, 0.95) for v in range(0, 1001, 10)]
    assert all(a <= b for a, b in itertools.pairwise(bounds))
    assert A.one_run_bound(500, 1000, 0.95) == 0.0 and A.one_run_bound(520, 1000, 0.95) == 0.0
    all_right = [A.one_run_bound(r, r, 0.95) for r in (10, 100, 1000, 10**4, 10**6)]
    assert all(a < b for a, b in itertools.pairwise(all_right)) and all(map(math.isfinite, all_right))
    assert all_right[-1] > 12                                  # logit(0.05 ** 1e-6) = 12.9
    assert A.one_run_bound(990, 1000, 0.95) < A.one_run_bound(1000, 1000, 0.95)


def test_one_run_bound_with_delta():
    """The main theorem's δ-term only weakens the bound, vanishes as δ -> 0, and can wipe it out."""
    v, r, m = 900, 1000, 2000
    pure = A.one_run_bound(v, r, 0.95)
    approx = [A.one_run_bound(v, r, 0.95, delta=d, canaries=m) for d in (1e-14, 1e-8, 1e-6, 1e-5)]
    assert approx[0] == pytest.approx(pure, abs=1e-6)
    assert all(a >= b for a, b in itertools.pairwise([pure, *approx]))
    # 2 m δ / v = 4.4e-5 exceeds alpha = 1e-6: no claim at δ = 1e-5 can be rejected at that level.
    assert A.one_run_bound(r, r, 1 - 1e-6, delta=1e-5, canaries=m) == 0.0
    with pytest.raises(ValueError):
        A.one_run_bound(v, r, 0.95, delta=1e-5)


def test_one_run_guesses():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    included = np.array([True, False, True, False, False, True])
    assert A.one_run_guesses(scores, included, 2, 2) == (1 + 1, 4)
    assert A.one_run_guesses(scores, included, 1, 0) == (1, 1)


# --------------------------------------------------------------------------------------------
# The vectorised layout is the real mechanism, run many times
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, kappa", [
    (lambda s: A.dpsgd_step(clip=C1, noise_multiplier=s, expected_batch_size=N), 1.0),
    (lambda s: A.dicesgd_step(clip=C1, error_clip=C1, noise_multiplier=s, expected_batch_size=N), math.sqrt(3.0)),
], ids=["dpsgd", "dicesgd"])
def test_block_layout_equals_one_call_per_run(make, kappa):
    """σ = 0: every block row equals the single-call release; σ > 0: same noise std (20k runs,
    SE of a std 0.5 %, band 3 %)."""
    base, canary = _batch()
    for neighbour in (False, True):
        block = A.example_level_release(make(0.0), base, canary, vectorised=True)(neighbour, 300, 1)
        loop = A.example_level_release(make(0.0), base, canary, vectorised=False)(neighbour, 3, 1)
        assert np.allclose(block, loop[0], rtol=1e-6, atol=1e-7) and np.allclose(loop, loop[0])
    scores = A.example_level_release(make(1.5), base, canary)(True, 20000, 2)
    assert np.std(scores) == pytest.approx(kappa * 1.5 * C1 / N, rel=0.03)


def test_client_block_layout_equals_one_call_per_run():
    """Same for client-level DP (σ > 0: 10k runs, SE of a std 0.7 %, band 3 %)."""
    base, canary = _batch()
    agg = A.client_level_step(clip=C1, noise_multiplier=0.0, denominator=4)
    for neighbour in (False, True):
        block = A.client_level_release(agg, base.double().numpy(), canary.double().numpy())(neighbour, 100, 1)
        loop = A.client_level_release(agg, base.double().numpy(), canary.double().numpy(),
                                      vectorised=False)(neighbour, 2, 1)
        assert np.allclose(block, loop[0], rtol=1e-12, atol=1e-12)
    agg = A.client_level_step(clip=C1, noise_multiplier=1.5, denominator=4)
    scores = A.client_level_release(agg, base.double().numpy(), canary.double().numpy())(True, 10000, 2)
    assert np.std(scores) == pytest.approx(1.5 * C1 / 4, rel=0.03)


# --------------------------------------------------------------------------------------------
# Real mechanisms stay below their claims (AUD-1)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("mechanism", ["dpsgd", "dicesgd"])
def test_real_record_level_step_stays_below_claim(mechanism, sigma):
    """200k runs per world (100k evaluated): DP-SGD and DiceSGD from a fresh error state, claim =
    one step at q = 1. Expected ε_lb (Gaussian curve): DP-SGD 3.4 / 1.5 at σ = 0.7 / 1.5,
    DiceSGD lower (its noise is inflated by kappa = sqrt(3)); claims 6.66 / 2.76."""
    base, canary = _batch()
    if mechanism == "dpsgd":
        step = A.dpsgd_step(clip=C1, noise_multiplier=sigma, expected_batch_size=N)
    else:
        step = A.dicesgd_step(clip=C1, error_clip=C1, noise_multiplier=sigma, expected_batch_size=N)
    res = A.audit_mechanism(A.example_level_release(step, base, canary), trials=200_000, delta=DELTA,
                            confidence=CONFIDENCE, claimed_epsilon=A.claimed_epsilon(sigma, DELTA), seed=101)
    _report(f"{mechanism} sigma={sigma}", res)
    assert 0.0 < res.epsilon_lb <= res.claimed_epsilon


@pytest.mark.parametrize("sigma", SIGMAS)
def test_real_client_level_mean_stays_below_claim(sigma):
    """Client-level DP (a client update is the per-example vector), 30k runs per world (its loop
    over updates is Python, ~40 µs per run)."""
    base, canary = _batch()
    agg = A.client_level_step(clip=C1, noise_multiplier=sigma, denominator=4)
    release = A.client_level_release(agg, base[:2].double().numpy(), canary.double().numpy())
    res = A.audit_mechanism(release, trials=30_000, delta=DELTA, confidence=CONFIDENCE,
                            claimed_epsilon=A.claimed_epsilon(sigma, DELTA), seed=102)
    _report(f"client_level_mean sigma={sigma}", res)
    assert 0.0 < res.epsilon_lb <= res.claimed_epsilon


# --------------------------------------------------------------------------------------------
# Planted mutants: each reuses the real code with one change, and is flagged (AUD-1)
# --------------------------------------------------------------------------------------------

def no_clipping(monkeypatch):
    """Mutant: per-sample clipping skipped (every factor 1) while the noise stays at σ·C."""
    monkeypatch.setattr(mechanisms, "clip_factors", lambda per_sample, clip: torch.ones(
        len(next(iter(per_sample.values())))))


def noise_divided_twice(monkeypatch, n: int):
    """Mutant: the noise is divided by n before the step divides the sum by n again."""
    real = mechanisms.gaussian
    monkeypatch.setattr(mechanisms, "gaussian", lambda like, std, generator: {
        k: v / n for k, v in real(like, std, generator).items()})


def _audit_dpsgd(sigma_used: float, sigma_claimed: float, trials: int, seed: int):
    base, canary = _batch()
    step = A.dpsgd_step(clip=C1, noise_multiplier=sigma_used, expected_batch_size=N)
    return A.audit_mechanism(A.example_level_release(step, base, canary), trials=trials, delta=DELTA,
                             confidence=CONFIDENCE, claimed_epsilon=A.claimed_epsilon(sigma_claimed, DELTA), seed=seed)


def test_flags_half_noise():
    """Catches: noise multiplier halved (σ/2 used, σ claimed). σ = 1.5, 800k runs per world:
    expected ε_lb ≈ 3.6 against the claim 2.76."""
    res = _audit_dpsgd(0.75, 1.5, 800_000, seed=201)
    _report("dpsgd sigma/2 @1.5", res)
    assert res.flagged


@pytest.mark.slow
def test_flags_half_noise_at_small_sigma():
    """Catches: σ/2 at σ = 0.7 (claim 6.66), where the test must reach FPR ~ 1e-5: 2M runs per
    world, expected ε_lb ≈ 7.7."""
    res = _audit_dpsgd(0.35, 0.7, 2_000_000, seed=202)
    _report("dpsgd sigma/2 @0.7", res)
    assert res.flagged


@pytest.mark.parametrize("sigma", SIGMAS)
def test_flags_no_clipping(monkeypatch, sigma):
    """Catches: clipping skipped, so the canary (norm 10 C) enters in full. Expected ε_lb ≈ 8.8
    (the ceiling of 100k evaluation runs) against 6.66 / 2.76."""
    no_clipping(monkeypatch)
    res = _audit_dpsgd(sigma, sigma, 200_000, seed=203)
    _report(f"dpsgd no clipping @{sigma}", res)
    assert res.flagged


@pytest.mark.parametrize("sigma", SIGMAS)
def test_flags_noise_divided_twice(monkeypatch, sigma):
    """Catches: noise std divided by n a second time (σ C / n² in mean scale). Expected ε_lb
    ≈ 8.8 / 7.0 against 6.66 / 2.76."""
    noise_divided_twice(monkeypatch, N)
    res = _audit_dpsgd(sigma, sigma, 200_000, seed=204)
    _report(f"dpsgd noise/n twice @{sigma}", res)
    assert res.flagged


class _DividedRng:
    """Mutant generator for client-level DP: its normal draws come out divided by the denominator."""

    def __init__(self, rng: np.random.Generator, by: float):
        self.rng, self.by = rng, by

    def normal(self, loc, scale, size=None):
        return self.rng.normal(loc, scale, size=size) / self.by


def test_flags_client_level_noise_divided_twice():
    """Catches: client-level noise divided by the denominator twice. σ = 1.5, m = 4, 30k runs:
    expected ε_lb ≈ 4.9 against 2.76."""
    base, canary = _batch()
    real = A.client_level_step(clip=C1, noise_multiplier=1.5, denominator=4)
    release = A.client_level_release(lambda updates, rng: real(updates, _DividedRng(rng, 4)),
                                     base[:2].double().numpy(), canary.double().numpy())
    res = A.audit_mechanism(release, trials=30_000, delta=DELTA, confidence=CONFIDENCE,
                            claimed_epsilon=A.claimed_epsilon(1.5, DELTA), seed=205)
    _report("client_level noise/m twice @1.5", res)
    assert res.flagged


# --------------------------------------------------------------------------------------------
# DiceSGD from an error state that carries the canary's residual
# --------------------------------------------------------------------------------------------

R = 1.0                             # C2 = r C1
KAPPA = math.sqrt(1 + 2 * R)


def _carried_audit(n: int, sigma: float, seed: int, trials: int = 3000):
    """One DiceSGD step (real code, one call per run: clip_error takes one norm over the state)
    after an earlier step that saw the canary (norm 100 C1) in D' only. D's examples are inside the
    clip, so D's error is exactly 0 and D' carries the canary's residual (100 - 1) C1 / n."""
    base, canary = A.canary_batch(batch=n - 1, dim=2, clip=C1, canary_norm=100.0, seed=1)
    base = base / base.norm(dim=1, keepdim=True).max() * 0.5 * C1
    e_out, e_in = A.dicesgd_carried_error(base, canary, clip=C1, error_clip=R * C1, expected_batch_size=n)
    kw = {"clip": C1, "error_clip": R * C1, "noise_multiplier": sigma, "expected_batch_size": n}
    release = A.example_level_release(A.dicesgd_step(error=e_out, **kw), base, canary,
                                      step_in=A.dicesgd_step(error=e_in, **kw))
    return A.audit_mechanism(release, trials=trials, delta=DELTA, confidence=CONFIDENCE, seed=seed)


def _with_claim(res, sigma_claimed: float):
    return dataclasses.replace(res, claimed_epsilon=A.claimed_epsilon(sigma_claimed, DELTA))


def test_dicesgd_carried_error_stays_below_its_sensitivity():
    """Control for the next test: correct DiceSGD, n = 2, σ = 2. The fed-back error differs by
    exactly C2 between the worlds, so the step is a Gaussian mechanism with sum-scale sensitivity
    C1 (1 + n r) and noise kappa σ C1: σ_eff = kappa σ / (1 + n r) = 1.155, claim 3.72. Expected
    ε_lb ≈ 0.7."""
    n, sigma = 2, 2.0
    res = _with_claim(_carried_audit(n, sigma, seed=301), KAPPA * sigma / (1 + n * R))
    _report("dicesgd carried error (correct) vs sensitivity claim", res)
    assert 0.0 < res.epsilon_lb <= res.claimed_epsilon


def test_flags_unclipped_error_feedback(monkeypatch):
    """Catches: the fed-back error is not clipped (``clip_error`` returns e unchanged), so the
    canary's whole residual is released. Same setup as the control: perfectly separable, ε_lb =
    log((1 - δ - u) / u) with u = 1 - (5e-7) ** (1 / 1500) -> 4.63, above the step's sensitivity
    claim 3.72 and the one-step DP-SGD claim 2.0."""
    monkeypatch.setattr(mechanisms, "clip_error", lambda error, error_clip: dict(error))
    n, sigma = 2, 2.0
    res = _carried_audit(n, sigma, seed=302)
    _report("dicesgd unclipped feedback", _with_claim(res, KAPPA * sigma / (1 + n * R)))
    assert _with_claim(res, KAPPA * sigma / (1 + n * R)).flagged
    assert _with_claim(res, sigma).flagged


@pytest.mark.xfail(strict=True, reason=(
    "Known gap (dicesgd spec §2.2: the reported ε does not cover the error channel): C2 = r C1 in "
    "mean scale is n r C1 in sum scale against noise sqrt(1 + 2r) σ C1, so one step from a carried "
    "error has sensitivity up to C1 (1 + 2 n r), not C1. Remove this marker once the calibration covers it."))
def test_dicesgd_carried_error_within_dpsgd_equivalent_claim():
    """Real DiceSGD, n = 16, r = 1, σ = 2, error carrying the canary's residual, audited against the
    one-step claim at σ_base (2.0): the step's true μ is 17 / (sqrt(3) · 2) = 4.9, expected ε_lb ≈
    4.5, so this assertion fails (and must, until the calibration changes)."""
    res = _with_claim(_carried_audit(16, 2.0, seed=303), 2.0)
    _report("dicesgd carried error vs sigma_base claim", res)
    assert res.epsilon_lb <= res.claimed_epsilon


# --------------------------------------------------------------------------------------------
# One-run audit (AUD-2)
# --------------------------------------------------------------------------------------------

M, T, SIGMA_RUN, DELTA_RUN = 4000, 16, 8.0, 1e-10
K = M // 4                          # 1000 guesses IN, 1000 OUT
BATCH = 64 + M // 2                 # public expected batch size: base examples + half the canaries


def _one_run(step, seed: int):
    res = A.one_run_audit(step, canaries=M, steps=T, k_pos=K, k_neg=K, base_examples=64, confidence=CONFIDENCE,
                          claimed_epsilon=A.claimed_epsilon(SIGMA_RUN, DELTA_RUN, T), seed=seed)
    strict = A.one_run_bound(res.correct, res.guesses, CONFIDENCE, delta=DELTA_RUN, canaries=M)
    print(f"one-run: correct={res.correct}/{res.guesses} eps_lb(δ=0)={res.epsilon_lb:.3f} "
          f"eps_lb(δ={DELTA_RUN})={strict:.3f} claimed={res.claimed_epsilon:.3f}")
    return res, strict


def test_one_run_real_dpsgd_stays_below_claim():
    """DP-SGD, 16 full-batch steps at σ = 8 (per-canary μ = 0.5, claim 3.11 at δ = 1e-10). Expected
    ~66 % of the 2000 guesses right, δ = 0 bound ≈ 0.5; exceeding the claim would need ≥ ~1950 right,
    a > 30-SD event for the Gaussian run (and ≤ 1e-6 for any run that is ε-DP)."""
    res, strict = _one_run(A.dpsgd_step(clip=C1, noise_multiplier=SIGMA_RUN, expected_batch_size=BATCH), seed=401)
    assert res.epsilon_lb <= res.claimed_epsilon and strict <= res.epsilon_lb


def test_one_run_flags_no_noise():
    """Catches: the noise switched off (σ = 0 run, σ = 8 claimed): every guess right, δ > 0 bound
    4.97 against the claim 3.11."""
    res, strict = _one_run(A.dpsgd_step(clip=C1, noise_multiplier=0.0, expected_batch_size=BATCH), seed=402)
    assert strict > res.claimed_epsilon


def test_one_run_flags_no_clipping(monkeypatch):
    """Catches: clipping skipped, so each canary enters at 10 C (per-canary μ = 5): (almost) every
    guess right, δ > 0 bound ≈ 4.97 against 3.11."""
    no_clipping(monkeypatch)
    res, strict = _one_run(A.dpsgd_step(clip=C1, noise_multiplier=SIGMA_RUN, expected_batch_size=BATCH), seed=403)
    assert strict > res.claimed_epsilon


@pytest.mark.xfail(strict=True, reason=(
    "Known gap (dicesgd spec §2.2): DiceSGD's error channel feeds back up to C2 = r C1 per step in mean "
    "scale, spread over the canaries' residuals and unnoised relative to sqrt(1 + 2r) σ C1 / n; the one-run "
    "audit sees it. Remove this marker once the calibration covers it."))
def test_one_run_real_dicesgd_within_dpsgd_equivalent_claim():
    """Real DiceSGD (r = 1, error carried across the 16 steps) audited against the DP-SGD-equivalent
    claim at σ_base = 8: (almost) every guess right, so this assertion fails."""
    step = A.dicesgd_step(clip=C1, error_clip=R * C1, noise_multiplier=SIGMA_RUN, expected_batch_size=BATCH,
                          carry_error=True)
    res, strict = _one_run(step, seed=404)
    assert strict <= res.claimed_epsilon
