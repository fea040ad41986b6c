"""Membership-inference attacks on released synthetic rows: an empirical privacy check.

Threat model. The attacker holds the released synthetic table and a *reference* sample of
real rows drawn from the same population but not used in training (public or bought data),
and is handed target rows, half of them training rows (members) and half unseen rows
(non-members). For each target it outputs a score, higher meaning "more likely a member".
It never sees the model's weights: a no-box attack on released rows, which is what
fedsynth's API gives an analyst (any number of rows, no weights).

Two attacks from the synthetic-data privacy literature:

* :func:`dcr_scores` -- distance to closest record: a target is scored by minus its
  distance to the nearest synthetic row. This is the full black-box attack of GAN-Leaks
  (Chen et al., "GAN-Leaks: A Taxonomy of Membership Inference Attacks against Generative
  Models", CCS 2020) and the distance-based linkage test of Stadler et al. ("Synthetic
  Data -- Anonymisation Groundhog Day", USENIX Security 2022). The distance is the Gower
  distance of the quality report's DCR (:mod:`fedsynth.generative.distance`).
* :func:`density_ratio_scores` -- DOMIAS (van Breugel et al., "Membership Inference Attacks
  against Synthetic Data through Overfitting Detection", AISTATS 2023): a target is scored by
  ``log p_synth(x) - log p_ref(x)``, two Gaussian kernel density estimates on the same Gower
  embedding, so that a row in a region the generator over-represents *compared with the
  population* stands out, where DCR alone mistakes any dense region for memorisation.

:func:`attack_auc` turns member and non-member scores into the attack's ROC AUC (0.5 =
chance, 1 = every member ranked above every non-member) with a stratified percentile
bootstrap confidence interval, and the true-positive rate at a 1% false-positive rate
(Carlini et al., "Membership Inference Attacks From First Principles", S&P 2022).

What this shows and what it does not: a high AUC is evidence of leakage; an AUC near 0.5 says
only that *these* attacks failed. The guarantee is the DP bound: under (epsilon, delta)-DP no
attack reaches TPR > e^epsilon * FPR + delta at any FPR, whatever it knows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import logsumexp
from scipy.stats import bootstrap, mannwhitneyu
from sklearn.metrics import roc_auc_score
from sklearn.metrics.pairwise import euclidean_distances
from sklearn.model_selection import KFold

from fedsynth.generative.distance import _gower_embedding, _nearest
from fedsynth.generative.schema import Schema
from fedsynth.generative.typed import _columns, _threads

__all__ = [
    "ATTACKS",
    "AttackAUC",
    "attack_auc",
    "dcr_scores",
    "density_ratio_scores",
    "dp_auc_bound",
    "membership_inference",
]

#: Attack names, as used in :func:`membership_inference` results and the benchmark.
ATTACKS = ("dcr", "domias")
#: Kernel bandwidths (Gower embedding units: a numeric column spans [0, 1], two different
#: categories are 0.5 * sqrt(2) apart) searched by cross-validated likelihood.
BANDWIDTHS = tuple(float(b) for b in np.geomspace(0.005, 0.5, 9))
#: Rows used to choose a bandwidth (a seeded subsample; the density itself uses all rows).
BANDWIDTH_ROWS = 2000
#: False-positive rate at which the true-positive rate is reported.
LOW_FPR = 0.01
#: Fewest non-members for that: 10 of them above the threshold. With fewer, the threshold is
#: one of the top few scores and neither the rate nor a bootstrap interval means much.
MIN_NONMEMBERS_FOR_TPR = 1000


def _embed(frames: dict[str, pd.DataFrame], schema: Schema) -> list[np.ndarray]:
    """Gower embeddings of the named frames (names appear in errors), all on one layout."""
    for name, frame in frames.items():
        if len(frame) == 0:
            raise ValueError(f"{name}: no rows; a membership-inference attack needs some")
    return _gower_embedding([_columns(f, schema, n) for n, f in frames.items()], schema)


def dcr_scores(
    targets: pd.DataFrame,
    synthetic: pd.DataFrame,
    schema: Schema,
    *,
    n_threads: int | None = 1,
) -> np.ndarray:
    """Minus the Gower distance from each target row to its closest synthetic row.

    The distance is that of :func:`fedsynth.generative.distance.dcr` (mean over modelled
    columns of the Gower column distance, in [0, 1]), found exactly. A member copied or
    closely imitated by the generator scores near 0, the maximum.
    """
    target, synth = _embed({"targets": targets, "synthetic": synthetic}, schema)
    with _threads(n_threads):
        return -_nearest(synth, target) / len(schema.modelled)


def _kde_log_density(
    fit: np.ndarray, queries: np.ndarray, bandwidths: np.ndarray, chunk: int = 1024
) -> np.ndarray:
    """Gaussian kernel density estimate of ``fit`` at ``queries`` for several bandwidths at
    once: ``log p_h(x) = logsumexp_j(-|x - f_j|^2 / 2h^2) - log n - d/2 log(2 pi h^2)``,
    shape (len(bandwidths), len(queries)).

    The density of scikit-learn's ``KernelDensity(kernel="gaussian")``, written out because
    its tree-based ``score_samples`` is wrong, by hundreds of nats, wherever every kernel
    underflows (a target far from all rows at a small bandwidth; scikit-learn issue #25799,
    open) -- exactly where a memorisation test works. Here ``logsumexp`` keeps it exact, and
    one matrix of squared distances (``chunk`` queries at a time) serves every bandwidth;
    at the ~100 dimensions of a one-hot embedded table a tree would visit every row anyway.
    """
    n, d = fit.shape
    h2 = np.asarray(bandwidths, dtype=np.float64)[:, None, None] ** 2
    out = np.empty((h2.shape[0], len(queries)))
    for start in range(0, len(queries), chunk):
        sq = euclidean_distances(queries[start : start + chunk], fit, squared=True)
        out[:, start : start + chunk] = logsumexp(-sq[None] / (2.0 * h2), axis=2)
    return out - math.log(n) - 0.5 * d * np.log(2.0 * math.pi * h2[:, :, 0])


def _best_bandwidth(rows: np.ndarray, seed: int, folds: int = 3) -> float:
    """The bandwidth of :data:`BANDWIDTHS` with the highest ``folds``-fold cross-validated
    log-likelihood on a seeded subsample of at most :data:`BANDWIDTH_ROWS` of ``rows``
    (what scikit-learn's ``GridSearchCV`` over ``KernelDensity`` does, with exact densities)."""
    rng = np.random.default_rng(seed)
    rows = rows[rng.permutation(len(rows))[:BANDWIDTH_ROWS]]
    grid = np.asarray(BANDWIDTHS)
    total = np.zeros(grid.size)
    for fit, held in KFold(n_splits=min(folds, len(rows))).split(rows):
        total += _kde_log_density(rows[fit], rows[held], grid).sum(axis=1)
    return float(grid[int(np.argmax(total))])


def density_ratio_scores(
    targets: pd.DataFrame,
    synthetic: pd.DataFrame,
    reference: pd.DataFrame,
    schema: Schema,
    *,
    bandwidth: float | None = None,
    seed: int = 0,
    n_threads: int | None = 1,
) -> np.ndarray:
    """DOMIAS score ``log p_synth(x) - log p_ref(x)`` of each target row.

    Both densities are Gaussian kernel density estimates on the Gower
    embedding of :mod:`fedsynth.generative.distance`, where a numeric column spans [0, 1] and
    a categorical one is a one-hot scaled by 1/2. As in DOMIAS, each density is fitted to its
    own rows: its bandwidth is the one of :data:`BANDWIDTHS` with the best cross-validated
    likelihood on them (no membership labels are used), unless ``bandwidth`` fixes both. A
    generator that repeats its training rows thus gets a sharp synthetic density while the
    reference density stays smooth. (One shared bandwidth, the synthetic one, was tried: on
    rows that repeat each member five times it lowered the AUC from 0.998 to 0.79.)
    ``reference`` must hold real rows that are neither training rows nor targets.
    """
    target, synth, ref = _embed(
        {"targets": targets, "synthetic": synthetic, "reference": reference}, schema
    )
    with _threads(n_threads):
        h_synth = np.array([bandwidth or _best_bandwidth(synth, seed)])
        h_ref = np.array([bandwidth or _best_bandwidth(ref, seed)])
        log_synth = _kde_log_density(synth, target, h_synth)[0]
        log_ref = _kde_log_density(ref, target, h_ref)[0]
    return log_synth - log_ref


@dataclass(frozen=True)
class AttackAUC:
    """ROC AUC of an attack and its true-positive rate at a low false-positive rate, each
    with a bootstrap confidence interval.

    ``ci_low``/``ci_high`` (AUC) and ``tpr_ci_low``/``tpr_ci_high``: percentile intervals at
    ``confidence`` from the same ``n_resamples`` resamples, which redraw members and
    non-members separately (the 50/50 design is fixed). ``tpr_at_low_fpr``: the share of
    members scored above the threshold that at most :data:`LOW_FPR` of the non-members
    exceed; under (epsilon, delta)-DP its expectation is at most e^epsilon * LOW_FPR + delta.
    The three are None with fewer than :data:`MIN_NONMEMBERS_FOR_TPR` non-members.
    """

    auc: float
    ci_low: float
    ci_high: float
    tpr_at_low_fpr: float | None
    tpr_ci_low: float | None
    tpr_ci_high: float | None
    n_members: int
    n_nonmembers: int
    n_resamples: int
    confidence: float

    @property
    def n_targets(self) -> int:
        return self.n_members + self.n_nonmembers

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "n_targets": self.n_targets}


def _auc(members: np.ndarray, nonmembers: np.ndarray, axis: int = -1) -> np.ndarray:
    """ROC AUC as the Mann-Whitney U statistic over the pair count (ties count 1/2);
    vectorised along ``axis`` for the bootstrap."""
    u = mannwhitneyu(members, nonmembers, axis=axis).statistic
    return np.asarray(u / (members.shape[axis] * nonmembers.shape[axis]))


def _tpr_at_low_fpr(members: np.ndarray, nonmembers: np.ndarray, axis: int = -1) -> np.ndarray:
    """Share of members strictly above the non-members' (1 - LOW_FPR) quantile (the
    "higher" one, so that at most LOW_FPR of the non-members are above it); vectorised."""
    threshold = np.quantile(nonmembers, 1.0 - LOW_FPR, axis=axis, method="higher", keepdims=True)
    return np.asarray(np.mean(members > threshold, axis=axis))


def attack_auc(
    member_scores: np.ndarray,
    nonmember_scores: np.ndarray,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> AttackAUC:
    """ROC AUC of membership scores (higher = member) and TPR at :data:`LOW_FPR`, with
    bootstrap CIs.

    The AUC is scikit-learn's ``roc_auc_score``. The intervals are scipy's percentile
    bootstrap with members and non-members resampled independently (a stratified bootstrap
    over targets), so they reflect which targets were drawn, not the randomness of training
    or of the synthetic sample.
    """
    members = np.asarray(member_scores, dtype=np.float64)
    nonmembers = np.asarray(nonmember_scores, dtype=np.float64)
    for name, scores in (("member_scores", members), ("nonmember_scores", nonmembers)):
        if scores.ndim != 1 or scores.size < 2:
            raise ValueError(f"{name}: need a 1-d array of at least 2 scores, got {scores.shape}")
        if not np.isfinite(scores).all():
            raise ValueError(f"{name}: {int((~np.isfinite(scores)).sum())} scores are not finite")
    labels = np.r_[np.ones(members.size), np.zeros(nonmembers.size)]
    auc = float(roc_auc_score(labels, np.r_[members, nonmembers]))
    statistics = [_auc, _tpr_at_low_fpr] if nonmembers.size >= MIN_NONMEMBERS_FOR_TPR else [_auc]
    intervals = [
        bootstrap(
            (members, nonmembers),
            statistic,
            n_resamples=n_resamples,
            confidence_level=confidence,
            method="percentile",
            vectorized=True,
            batch=100,
            rng=np.random.default_rng(seed),  # the same resamples for both statistics
        ).confidence_interval
        for statistic in statistics
    ]
    tpr = None
    if len(intervals) == 2:
        tpr = float(_tpr_at_low_fpr(members, nonmembers))
    return AttackAUC(
        auc=auc,
        ci_low=float(intervals[0].low),
        ci_high=float(intervals[0].high),
        tpr_at_low_fpr=tpr,
        tpr_ci_low=None if tpr is None else float(intervals[1].low),
        tpr_ci_high=None if tpr is None else float(intervals[1].high),
        n_members=members.size,
        n_nonmembers=nonmembers.size,
        n_resamples=n_resamples,
        confidence=confidence,
    )


def membership_inference(
    members: pd.DataFrame,
    nonmembers: pd.DataFrame,
    synthetic: pd.DataFrame,
    reference: pd.DataFrame,
    schema: Schema,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    n_threads: int | None = 1,
) -> dict[str, AttackAUC]:
    """Run every attack of :data:`ATTACKS` on the same targets: ``{name: AttackAUC}``.

    ``members`` are training rows, ``nonmembers`` real rows never trained on, ``reference``
    the attacker's real rows (neither of the two). All are typed frames of ``schema``.
    """
    targets = pd.concat(
        [_columns(members, schema, "members"), _columns(nonmembers, schema, "nonmembers")],
        ignore_index=True,
    )
    n = len(members)
    scores = {
        "dcr": dcr_scores(targets, synthetic, schema, n_threads=n_threads),
        "domias": density_ratio_scores(
            targets, synthetic, reference, schema, seed=seed, n_threads=n_threads
        ),
    }
    return {
        name: attack_auc(s[:n], s[n:], n_resamples=n_resamples, seed=seed)
        for name, s in scores.items()
    }


def dp_auc_bound(epsilon: float, delta: float = 0.0) -> float:
    """Largest ROC AUC any membership test can reach against an (epsilon, delta)-DP
    mechanism: the area under TPR = min(1, e^eps FPR + delta, 1 - e^-eps (1 - delta - FPR))
    (the hypothesis-testing view of DP, Kairouz et al. 2015). 1.0 for epsilon = inf."""
    if math.isinf(epsilon):
        return 1.0
    e = math.exp(epsilon)
    fpr = np.linspace(0.0, 1.0, 200_001)
    tpr = np.minimum.reduce([np.ones_like(fpr), e * fpr + delta, 1.0 - (1.0 - delta - fpr) / e])
    return float(np.trapezoid(np.clip(tpr, 0.0, 1.0), fpr))
