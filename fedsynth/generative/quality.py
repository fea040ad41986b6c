"""How good and how private is a synthetic table: fidelity, ML utility and a privacy proxy.

Every function takes *typed frames* (the contract is in :mod:`fedsynth.generative.typed`).

Fidelity (:func:`quality_report`), re-implemented so that fedsynth never imports SDMetrics at
run time (SDMetrics is MIT, but it depends on ``copulas``, which is under the Business Source
License). ``tests/test_quality.py`` checks every number below against SDMetrics 0.32 on the
same data.

* **Column shapes** = SDMetrics ``QualityReport`` (single table) property "Column Shapes": the
  mean over columns of
    - ``KSComplement`` for integer, float and datetime columns: 1 - the two-sample
      Kolmogorov-Smirnov statistic (largest gap between the two empirical CDFs) of the
      non-null values; datetimes compared as nanoseconds;
    - ``TVComplement`` for categorical and boolean columns: 1 - the total variation distance
      between the category frequencies of the non-null values.
  A column that is entirely null in either frame has no score (NaN) and is left out of the mean.
* **Column pair trends** = SDMetrics property "Column Pair Trends": the mean over column pairs of
    - ``CorrelationSimilarity`` for two numeric/datetime columns: 1 - |r_real - r_synth| / 2,
      r = Pearson correlation over the rows where both are non-null;
    - ``ContingencySimilarity`` for every other pair: 1 - the total variation distance between
      the two-way frequency tables (nulls are a category of their own). A numeric column paired
      with a discrete one is first cut into the 10 equal-width bins of
      ``numpy.histogram_bin_edges``, computed **separately** on the real and on the synthetic
      frame (bin k of one is compared with bin k of the other), exactly as SDMetrics does; as in
      SDMetrics (``numpy.digitize``), nulls land in the same bin as the column's maximum.
  Like SDMetrics 0.32's ``QualityReport``, only pairs that are related in the real data count:
  a numeric pair needs |r_real| > ``real_correlation_threshold`` (default 0.5) and any other
  pair needs Cramer's V of the real table > ``real_association_threshold`` (default 0.3).
  Other pairs get a NaN score and are left out of the mean (pass 0 and 0 to score every pair,
  which is what SDMetrics < 0.27 did). No pair counting -> the property is NaN.
* **Quality** = the report's overall score: the mean of the two properties (NaN ones skipped).

Known, deliberate differences from SDMetrics (the tests pin both):

* SDMetrics groups categorical columns with pandas' ``observed=False``, so a declared level that
  never occurs in the real data gives an all-zero row in the table whose Cramer's V it computes;
  scipy then refuses the table and SDMetrics drops the pair with an error. Here empty rows and
  columns are left out first, which is what SDMetrics computes for the same data held as plain
  strings (and what it will compute once pandas defaults to ``observed=True``).
* Above 50,000 rows SDMetrics randomly (and unseeded) subsamples rows for the contingency
  pairs; here all rows are always used, so results are exact and repeatable.

ML utility and privacy live in their own modules; both functions are re-exported here:

* :func:`tstr` (:mod:`fedsynth.generative.utility`): train-on-synthetic/test-on-real ROC AUC,
  next to the train-on-real baseline.
* :func:`dcr` (:mod:`fedsynth.generative.distance`): distance to closest record, a
  memorisation (privacy) proxy.

:func:`evaluate` bundles everything into one flat JSON-safe dict.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import ks_2samp, pearsonr
from scipy.stats.contingency import association

from fedsynth.generative.distance import dcr
from fedsynth.generative.schema import Column, ColumnType, Schema
from fedsynth.generative.typed import _codes, _columns, _numbers
from fedsynth.generative.utility import tstr

__all__ = [
    "QualityScores",
    "column_pair_trends",
    "column_shapes",
    "dcr",
    "evaluate",
    "quality_report",
    "quality_score",
    "tstr",
]

# SDMetrics 0.32 QualityReport defaults (sdmetrics.reports.utils).
REAL_CORRELATION_THRESHOLD = 0.5
REAL_ASSOCIATION_THRESHOLD = 0.3
# SDMetrics rounds numbers to sys.float_info.dig - 1 decimals before the KS test.
_KS_DECIMALS = 14
# ColumnPairTrends discretises with numpy.histogram_bin_edges' default of 10 bins.
_PAIR_BINS = 10


# --------------------------------------------------------------------------------------------
# Column shapes


def _ks_complement(real: pd.Series, synthetic: pd.Series, col: Column) -> float:
    r = _numbers(real, col)
    s = _numbers(synthetic, col)
    r, s = r[~np.isnan(r)], s[~np.isnan(s)]
    if r.size == 0 or s.size == 0:
        return math.nan
    if col.type is not ColumnType.DATETIME:
        r, s = np.round(r, _KS_DECIMALS), np.round(s, _KS_DECIMALS)
    # Only the statistic is needed; method="asymp" skips scipy's exact p-value, which costs
    # O(n_real * n_synthetic) below 10,000 rows. The statistic is the same for every method.
    return float(1.0 - ks_2samp(r, s, method="asymp").statistic)


def _tv_complement(real: pd.Series, synthetic: pd.Series, col: Column) -> float:
    # Hand-written: scipy and scikit-learn have no total-variation distance. Reproduces
    # sdmetrics.utils.get_frequencies, including its 1e-6 pseudo-count for synthetic
    # categories that never occur in the real data.
    k = len(col.levels)
    r = np.bincount(_codes(real, col), minlength=k + 1)[:k].astype(np.float64)
    s = np.bincount(_codes(synthetic, col), minlength=k + 1)[:k].astype(np.float64)
    if r.sum() == 0 or s.sum() == 0:
        return math.nan
    r = r + np.where((s > 0) & (r == 0), 1e-6, 0.0)
    return float(1.0 - 0.5 * np.abs(s / s.sum() - r / r.sum()).sum())


def column_shapes(
    real: pd.DataFrame, synthetic: pd.DataFrame, schema: Schema
) -> tuple[float, dict[str, float]]:
    """SDMetrics "Column Shapes": (mean score, {column: KSComplement or TVComplement})."""
    real = _columns(real, schema, "real")
    synthetic = _columns(synthetic, schema, "synthetic")
    scores: dict[str, float] = {}
    for col in schema.modelled:
        score = _ks_complement if col.is_numeric else _tv_complement
        scores[col.name] = score(real[col.name], synthetic[col.name], col)
    return _nanmean(scores.values()), scores


# --------------------------------------------------------------------------------------------
# Column pair trends


@dataclass(frozen=True)
class _PairData:
    """One frame prepared for the pair metrics."""

    numbers: dict[str, np.ndarray]  # numeric/datetime columns as float64 (ns), NaN = null
    codes: dict[str, tuple[np.ndarray, int]]  # discrete codes and discretised numbers, size

    @classmethod
    def build(cls, frame: pd.DataFrame, schema: Schema) -> _PairData:
        numbers, codes = {}, {}
        for col in schema.modelled:
            series = frame[col.name]
            if col.is_numeric:
                values = _numbers(series, col)
                numbers[col.name] = values
                # SDMetrics ColumnPairTrends._discretize_column, on this frame alone.
                edges = np.histogram_bin_edges(values[~np.isnan(values)], bins=_PAIR_BINS)
                codes[col.name] = (np.digitize(values, bins=edges), len(edges) + 1)
            else:
                codes[col.name] = (_codes(series, col), len(col.levels) + 1)
        return cls(numbers, codes)


def _nunique(values: np.ndarray) -> int:
    return int(np.unique(values[~np.isnan(values)]).size)


def _correlation_similarity(
    real: _PairData, synthetic: _PairData, a: str, b: str, threshold: float
) -> float:
    # SDMetrics refuses a column that is constant (one distinct value) in either frame.
    for data in (real, synthetic):
        if _nunique(data.numbers[a]) == 1 or _nunique(data.numbers[b]) == 1:
            return math.nan

    def pearson(data: _PairData) -> float:
        x, y = data.numbers[a], data.numbers[b]
        both = ~(np.isnan(x) | np.isnan(y))
        if both.sum() < 2:
            return math.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant input: scipy warns and returns NaN
            return float(pearsonr(x[both], y[both]).statistic)

    r_real = pearson(real)
    if abs(r_real) <= threshold:  # (NaN compares False: it falls through to NaN below)
        return math.nan
    r_synth = pearson(synthetic)
    if math.isnan(r_real) or math.isnan(r_synth):
        return math.nan
    return 1.0 - abs(r_real - r_synth) / 2.0


def _contingency_similarity(
    real: _PairData, synthetic: _PairData, a: str, b: str, threshold: float
) -> float:
    # The 2-D frequency tables are counted with one bincount over combined codes.
    (ra, ka), (rb, kb) = real.codes[a], real.codes[b]
    (sa, _), (sb, _) = synthetic.codes[a], synthetic.codes[b]
    if ra.size == 0 or sa.size == 0:
        return math.nan
    counts_r = np.bincount(ra * kb + rb, minlength=ka * kb)
    counts_s = np.bincount(sa * kb + sb, minlength=ka * kb)
    if threshold > 0:
        table = counts_r.reshape(ka, kb)
        table = table[table.sum(axis=1) > 0][:, table.sum(axis=0) > 0]
        if min(table.shape) < 2:
            return math.nan
        if not association(table, method="cramer") > threshold:
            return math.nan
    tv = 0.5 * np.abs(counts_r / ra.size - counts_s / sa.size).sum()
    return float(1.0 - tv)


def column_pair_trends(
    real: pd.DataFrame,
    synthetic: pd.DataFrame,
    schema: Schema,
    *,
    real_correlation_threshold: float = REAL_CORRELATION_THRESHOLD,
    real_association_threshold: float = REAL_ASSOCIATION_THRESHOLD,
) -> tuple[float, dict[tuple[str, str], float]]:
    """SDMetrics "Column Pair Trends": (mean score, {(col1, col2): score}).

    Pairs follow schema order. A pair's score is NaN (and it does not count) when the real
    data shows no relation above the thresholds, or when the metric is undefined (a constant
    column, no rows).
    """
    real_data = _PairData.build(_columns(real, schema, "real"), schema)
    synth_data = _PairData.build(_columns(synthetic, schema, "synthetic"), schema)
    scores: dict[tuple[str, str], float] = {}
    for ca, cb in combinations(schema.modelled, 2):
        if ca.is_numeric and cb.is_numeric:
            score = _correlation_similarity(
                real_data, synth_data, ca.name, cb.name, real_correlation_threshold
            )
        else:
            score = _contingency_similarity(
                real_data, synth_data, ca.name, cb.name, real_association_threshold
            )
        scores[(ca.name, cb.name)] = score
    return _nanmean(scores.values()), scores


# --------------------------------------------------------------------------------------------
# Quality report


@dataclass(frozen=True)
class QualityScores:
    """SDMetrics-equivalent quality report. NaN marks a score that is undefined or excluded."""

    quality: float
    column_shapes: float
    column_pair_trends: float
    per_column: dict[str, float]
    per_pair: dict[tuple[str, str], float]


def quality_report(
    real: pd.DataFrame,
    synthetic: pd.DataFrame,
    schema: Schema,
    *,
    real_correlation_threshold: float = REAL_CORRELATION_THRESHOLD,
    real_association_threshold: float = REAL_ASSOCIATION_THRESHOLD,
) -> QualityScores:
    """Column shapes, column pair trends and their mean, as SDMetrics' QualityReport."""
    shapes, per_column = column_shapes(real, synthetic, schema)
    trends, per_pair = column_pair_trends(
        real,
        synthetic,
        schema,
        real_correlation_threshold=real_correlation_threshold,
        real_association_threshold=real_association_threshold,
    )
    return QualityScores(_nanmean([shapes, trends]), shapes, trends, per_column, per_pair)


def quality_score(
    real: pd.DataFrame,
    synthetic: pd.DataFrame,
    schema: Schema,
    *,
    real_correlation_threshold: float = REAL_CORRELATION_THRESHOLD,
    real_association_threshold: float = REAL_ASSOCIATION_THRESHOLD,
) -> float:
    """The QualityReport overall score: mean of column shapes and column pair trends."""
    return quality_report(
        real,
        synthetic,
        schema,
        real_correlation_threshold=real_correlation_threshold,
        real_association_threshold=real_association_threshold,
    ).quality


def _nanmean(values: Any) -> float:
    array = np.asarray(list(values), dtype=np.float64)
    array = array[~np.isnan(array)]
    return float(array.mean()) if array.size else math.nan


# --------------------------------------------------------------------------------------------
# Everything at once


def _json_number(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def evaluate(
    train_real: pd.DataFrame,
    holdout_real: pd.DataFrame,
    synthetic: pd.DataFrame,
    schema: Schema,
    seed: int = 0,
) -> dict[str, Any]:
    """Quality report (synthetic vs the real training rows), TSTR and DCR in one flat,
    JSON-safe dict (NaN becomes None): quality, column_shapes, column_pair_trends,
    tstr_auc, trtr_auc, auc_kind, dcr_synth_train, dcr_holdout, dcr_share_closer_to_train.
    Defaults of the underlying functions apply (SDMetrics thresholds, row caps)."""
    scores = quality_report(train_real, synthetic, schema)
    utility = tstr(train_real, synthetic, holdout_real, schema, seed=seed)
    privacy = dcr(train_real, holdout_real, synthetic, schema, seed=seed)
    return {
        "quality": _json_number(scores.quality),
        "column_shapes": _json_number(scores.column_shapes),
        "column_pair_trends": _json_number(scores.column_pair_trends),
        "tstr_auc": _json_number(utility["tstr_auc"]),
        "trtr_auc": _json_number(utility["trtr_auc"]),
        "auc_kind": utility["auc_kind"],
        "dcr_synth_train": _json_number(privacy["dcr_synth_train"]),
        "dcr_holdout": _json_number(privacy["dcr_holdout"]),
        "dcr_share_closer_to_train": _json_number(privacy["dcr_share_closer_to_train"]),
    }
