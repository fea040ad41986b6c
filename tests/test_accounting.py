"""Noise calibration: the result meets the target from below, within the tolerance, and is
the smallest such noise (what bisection finds), in fewer accountant evaluations."""

from __future__ import annotations

import pytest

from fedsynth.generative import accounting
from fedsynth.generative.accounting import calibrate_noise, epsilon_of, histogram_noise

DELTA = 1e-5


def _bisect(target: float, sample_rate: float, steps: int, prior=(), accountant="prv"):
    """The reference: plain bisection on sigma to the same window, evaluations counted."""
    calls = 0

    def eps(sigma: float) -> float:
        nonlocal calls
        calls += 1
        return epsilon_of([*prior, (sigma, sample_rate, steps)], DELTA, accountant)

    low, high = 0.0, 1.0
    while (e := eps(high)) > target:
        low, high = high, high * 2
    while target - e > 0.005 * target:
        mid = (low + high) / 2
        if (m := eps(mid)) <= target:
            high, e = mid, m
        else:
            low = mid
    return high, calls


@pytest.mark.parametrize(
    ("target", "sample_rate", "steps", "prior", "accountant"),
    [
        (1.0, 0.2, 8, [(34.0, 1.0, 1), (58.75, 1.0, 3)], "prv"),  # a node's round plan
        (3.0, 0.032, 2500, [], "prv"),  # local training
        (8.0, 0.01, 500, [], "prv"),  # sigma below 1: the bracket searches downwards
        (0.1, 1.0, 3, [], "prv"),  # evaluation scalars
        (1.0, 0.05, 1000, [], "rdp"),
    ],
)
def test_calibration_meets_the_target_from_below_like_bisection_in_fewer_evaluations(
    target, sample_rate, steps, prior, accountant
):
    accounting.calibration_calls = 0
    sigma = calibrate_noise(
        target_epsilon=target,
        delta=DELTA,
        sample_rate=sample_rate,
        steps=steps,
        prior=prior,
        accountant=accountant,
    )
    calls = accounting.calibration_calls
    spent = epsilon_of([*prior, (sigma, sample_rate, steps)], DELTA, accountant)
    assert 0.995 * target <= spent <= target
    reference, reference_calls = _bisect(target, sample_rate, steps, prior, accountant)
    # Both land in the same 0.5% window of epsilon, so on sigma they agree to about 1%.
    assert sigma == pytest.approx(reference, rel=0.01)
    assert calls < reference_calls


def test_on_the_accountants_flat_floor_the_smallest_sufficient_sigma_is_kept():
    # PRV reports about 0.01 for any sigma past ~2000 here: a wide stride would overshoot.
    sigma = histogram_noise(epsilon=0.01, delta=DELTA)
    assert sigma == pytest.approx(_bisect(0.01, 1.0, 1)[0], rel=0.01)
    assert epsilon_of([(sigma / 2, 1.0, 1)], DELTA) > 0.01


def test_an_unreachable_or_spent_budget_is_refused():
    with pytest.raises(ValueError, match="already spend the whole budget"):
        calibrate_noise(
            target_epsilon=0.5, delta=DELTA, sample_rate=0.1, steps=10, prior=[(0.5, 1.0, 1)]
        )
    with pytest.raises(ValueError, match="cannot be reached"):
        calibrate_noise(target_epsilon=1e-9, delta=DELTA, sample_rate=1.0, steps=1)
