"""Noise calibration and epsilon recomputation with Opacus' accountants.

The generative core only *reports* the accountant history -- a list of (noise multiplier,
sample rate, steps) -- and budgets and caps live in ``fedsynth.privacy``. PRV is the default
accountant: for the same noise and steps it certifies a much smaller epsilon than RDP
(measured 0.59 vs 1.04 here), so calibrating with it buys utility at the same guarantee.

A Gaussian-mechanism histogram with L2 sensitivity 1 (one row moves one count by one) is
exactly a subsampled Gaussian step with sample rate 1, so it enters the same history as
``(sigma, 1.0, 1)`` and composes with DP-SGD in the accountant, with no separate bound.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
from opacus.accountants import create_accountant

History = list[tuple[float, float, int]]
_MAX_SIGMA = 1e6
_TOLERANCE = 0.005  # calibrated epsilon lies in [(1 - _TOLERANCE) * target, target]
_MAX_STEPS = 100
#: Accountant evaluations made by :func:`calibrate_noise` in this process (for tests and
#: benchmarks; the search's cost is in its number of evaluations).
calibration_calls = 0


def epsilon_of(history: Iterable[Sequence[float]], delta: float, accountant: str = "prv") -> float:
    """Epsilon of a composed history of Gaussian phases, recomputed from scratch.

    Memoised per process: a node's handler asks for the same history twice (the budget
    check before a round, then the spend after it), and one PRV evaluation with a DP-SGD
    phase costs 0.1-0.3 s here."""
    phases = tuple((float(s), float(q), int(t)) for s, q, t in history)
    return _epsilon(phases, float(delta), accountant)


@functools.lru_cache(maxsize=512)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    # Two notices that are expected here, silenced at the source so that every process
    # (Flower's node actors too) stays quiet: PRV takes log(1 - q), which numpy evaluates
    # for q = 1 (a histogram release) in the branch np.where then discards; and RDP says
    # its largest order was optimal for small budgets (its smallest for large ones), where
    # the bound is then looser, not unsafe.
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        return float(acc.get_epsilon(delta=delta))


def calibrate_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    prior: Sequence[Sequence[float]] = (),
) -> float:
    """Smallest noise multiplier such that ``prior`` plus ``steps`` DP-SGD steps stay
    within ``target_epsilon``: the result's epsilon is at most the target and within 0.5%
    of it. Hand-written rather than Opacus' ``get_noise_multiplier`` because that one
    cannot account for releases made before training (the ``prior`` history), and because
    it bisects: each PRV evaluation costs 10-150 ms here, and a node calibrates its plan
    while the server waits for its answer (docs/deployment.md, "Round time").

    The search brackets the root by doubling sigma, then runs regula falsi with the
    Illinois modification on log(epsilon) against log(sigma), where the curve is nearly
    straight: two or three evaluations after the bracket instead of bisection's ten or so
    (``calibration_calls`` counts them). The bracket is kept throughout, so a noisy or
    kinked epsilon curve only slows it down towards bisection, never past the target.
    """
    prior = [tuple(p) for p in prior]
    if prior and epsilon_of(prior, delta, accountant) >= target_epsilon:
        raise ValueError("the releases before training already spend the whole budget")
    floor = (1 - _TOLERANCE) * target_epsilon
    aim = math.log(target_epsilon * (1 - _TOLERANCE / 2))  # the middle of the window

    def gap(log_sigma: float) -> tuple[float, float]:
        """(epsilon, log(epsilon) - aim) at sigma = exp(log_sigma)."""
        global calibration_calls
        calibration_calls += 1
        eps = epsilon_of([*prior, (math.exp(log_sigma), sample_rate, steps)], delta, accountant)
        return eps, (math.log(eps) if eps > 0 else -math.inf) - aim

    # Bracket: lo spends more than the target (too little noise), hi at most the target.
    x = 0.0
    eps, g = gap(x)
    if floor <= eps <= target_epsilon:
        return 1.0
    # Sigma doubles (or halves) per step, as in bisection's bracket: the accountants have
    # an epsilon floor (PRV about 0.01, RDP 0.1 here) past which the curve is flat, and a
    # longer stride could land far beyond the smallest sigma that meets the target.
    widen = math.log(2.0)
    if eps > target_epsilon:
        lo, g_lo = x, g
        while True:
            x += widen
            if x > math.log(_MAX_SIGMA):
                raise ValueError(f"epsilon {target_epsilon} cannot be reached: budget too small")
            eps, g = gap(x)
            if eps <= target_epsilon:
                hi, g_hi = x, g
                break
            lo, g_lo = x, g
    else:
        hi, g_hi = x, g
        while True:
            x -= widen
            eps, g = gap(x)
            if eps > target_epsilon:
                lo, g_lo = x, g
                break
            hi, g_hi = x, g
    if floor <= eps <= target_epsilon:
        return math.exp(hi)
    side = 0  # which end the last two steps kept (Illinois halves a stale end's gap)
    for _ in range(_MAX_STEPS):
        if math.isfinite(g_lo) and math.isfinite(g_hi) and g_lo != g_hi:
            x = hi - g_hi * (hi - lo) / (g_hi - g_lo)
            if not lo < x < hi:
                x = (lo + hi) / 2
        else:
            x = (lo + hi) / 2
        eps, g = gap(x)
        if floor <= eps <= target_epsilon:
            return math.exp(x)
        if eps > target_epsilon:
            lo, g_lo = x, g
            if side == -1:
                g_hi /= 2
            side = -1
        else:
            hi, g_hi = x, g
            if side == 1:
                g_lo /= 2
            side = 1
        if hi - lo < 1e-9:
            break
    return math.exp(hi)  # the curve is flat within numerical noise: hi is within target


def histogram_noise(*, epsilon: float, delta: float, accountant: str = "prv") -> float:
    """Noise multiplier of a Gaussian histogram that costs ``epsilon`` on its own."""
    return calibrate_noise(
        target_epsilon=epsilon, delta=delta, sample_rate=1.0, steps=1, accountant=accountant
    )


def release_noise(
    *, share: float, releases: int, epsilon: float, delta: float, accountant: str = "prv"
) -> float:
    """Noise multiplier of ``releases`` Gaussian releases of L2 sensitivity 1 that take
    ``share`` of a budget of ``epsilon``, counted alone (before composition).

    With PRV the share is of epsilon: the releases alone cost ``share * epsilon``. RDP
    cannot certify an epsilon much below 0.2 at delta 1e-5 on its own, so with it the share
    is of the zCDP budget rho that ``(epsilon, delta)`` converts to (``rho + 2 sqrt(rho
    log(1 / delta)) = epsilon``, Bun and Steinke 2016), as the marginals kind's shares are:
    ``releases`` Gaussian mechanisms of noise sigma cost ``releases / (2 sigma^2)``."""
    if accountant == "rdp":
        log_inv_delta = math.log(1.0 / delta)
        rho = (math.sqrt(log_inv_delta + epsilon) - math.sqrt(log_inv_delta)) ** 2
        return math.sqrt(releases / (2.0 * share * rho))
    return calibrate_noise(
        target_epsilon=epsilon * share,
        delta=delta,
        sample_rate=1.0,
        steps=releases,
        accountant=accountant,
    )
