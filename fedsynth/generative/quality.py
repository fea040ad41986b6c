"""How good and how private is a synthetic table: fidelity, ML utility and a privacy proxy.

Every function takes *typed frames*: pandas DataFrames holding the schema's modelled columns
(identifiers dropped) with dtypes integer -> ``Int64``, float -> ``float64``, categorical ->
``Categorical`` whose categories are the declared levels, boolean -> ``boolean``, datetime ->
``datetime64[ns]``; nulls are NA/NaN/NaT. Real and synthetic frames follow the same contract.

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

ML utility (:func:`tstr`): train-on-synthetic/test-on-real. A histogram gradient boosting
classifier is trained once on synthetic rows and once on the real training rows, and both are
scored by ROC AUC on the same held-out real rows (binary target: ROC AUC; more classes: macro
one-vs-rest AUC). ``tstr_auc`` close to ``trtr_auc`` means the synthetic data carries the
signal needed to predict the target.

Privacy proxy (:func:`dcr`): distance to closest record. For each synthetic row, the Gower-style
distance to the nearest real training row and to the nearest real holdout row. Synthetic rows
that are systematically closer to the training rows than to equally many unseen holdout rows
indicate memorisation; ``dcr_share_closer_to_train`` is about 0.5 without it and 1.0 for copies.

:func:`evaluate` bundles everything into one flat JSON-safe dict.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import ks_2samp, pearsonr
from scipy.stats.contingency import association
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors
from threadpoolctl import threadpool_limits  # a scikit-learn dependency

from fedsynth.generative.schema import Column, ColumnType, Schema

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
# HistGradientBoosting takes at most max_bins - 1 = 254 categories per categorical feature;
# wider categoricals are passed as their (ordered) level codes instead.
_MAX_NATIVE_CATEGORIES = 254
# An integer target with at most this many distinct values is treated as class labels.
_MAX_INTEGER_CLASSES = 50


# --------------------------------------------------------------------------------------------
# Typed-frame access


def _columns(frame: pd.DataFrame, schema: Schema, what: str) -> pd.DataFrame:
    names = [c.name for c in schema.modelled]
    missing = [n for n in names if n not in frame.columns]
    if missing:
        raise KeyError(f"{what} frame lacks the modelled columns {missing}")
    return frame[names]


def _numbers(series: pd.Series, col: Column) -> np.ndarray:
    """Float64 values, NaN for null; datetimes as nanoseconds since the epoch."""
    if col.type is ColumnType.DATETIME:
        stamps = series if pd.api.types.is_datetime64_any_dtype(series) else pd.to_datetime(series)
        if getattr(stamps.dt, "tz", None) is not None:
            stamps = stamps.dt.tz_convert("UTC").dt.tz_localize(None)
        ns = stamps.astype("datetime64[ns]").to_numpy().view("i8")
        out = ns.astype(np.float64)
        out[pd.isna(stamps).to_numpy()] = np.nan
        return out
    return pd.to_numeric(series).astype("float64").to_numpy(dtype=np.float64, na_value=np.nan)


def _codes(series: pd.Series, col: Column) -> np.ndarray:
    """Integer codes of a discrete column: declared level index, null = len(levels)."""
    levels = col.levels
    if col.type is ColumnType.BOOLEAN:
        values = series.astype("boolean")
        codes = values.to_numpy(dtype=np.int64, na_value=-1)
    else:
        cat = series.array if isinstance(series.dtype, pd.CategoricalDtype) else series
        cat = pd.Categorical(cat, categories=levels)
        codes = cat.codes.astype(np.int64)
        if (codes < 0).sum() != int(series.isna().sum()):
            unknown = sorted(set(series[(codes < 0) & series.notna().to_numpy()].astype(str)))
            raise ValueError(
                f"column {col.name!r}: values {unknown[:5]} are not declared categories"
            )
    codes[codes < 0] = len(levels)
    return codes


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
# ML utility: train on synthetic, test on real


def _threads(n_threads: int | None):
    # scikit-learn (and its OpenMP runtime) is imported at module level on purpose: a limit
    # set before the OpenMP library is loaded would not apply to it.
    return nullcontext() if n_threads is None else threadpool_limits(limits=n_threads)


def _cap(frame: pd.DataFrame, max_rows: int | None, rng: np.random.Generator) -> pd.DataFrame:
    if max_rows is None or len(frame) <= max_rows:
        return frame
    return frame.iloc[np.sort(rng.choice(len(frame), size=max_rows, replace=False))]


def _features(frame: pd.DataFrame, schema: Schema, target: Column) -> pd.DataFrame:
    """Model inputs: numbers as float64 (datetimes as epoch seconds), categoricals as pandas
    categories with the declared levels (HistGradientBoosting's native categorical support),
    nulls as NaN (HistGradientBoosting's native missing-value support)."""
    out = {}
    for col in schema.modelled:
        if col.name == target.name:
            continue
        series = frame[col.name]
        if col.is_numeric:
            values = _numbers(series, col)
            out[col.name] = values / 1e9 if col.type is ColumnType.DATETIME else values
        elif col.type is ColumnType.BOOLEAN:
            out[col.name] = series.astype("boolean").to_numpy(dtype=np.float64, na_value=np.nan)
        else:
            codes = _codes(series, col)
            if len(col.levels) > _MAX_NATIVE_CATEGORIES:
                out[col.name] = np.where(codes == len(col.levels), np.nan, codes.astype(float))
            else:
                out[col.name] = pd.Categorical.from_codes(
                    np.where(codes == len(col.levels), -1, codes), categories=col.levels
                )
    return pd.DataFrame(out, index=frame.index)


def _labels(frame: pd.DataFrame, target: Column) -> tuple[pd.DataFrame, np.ndarray]:
    """Rows with a non-null target, and the target as integer class labels."""
    series = frame[target.name]
    keep = series.notna().to_numpy()
    frame = frame[keep]
    if target.is_discrete:
        y = _codes(frame[target.name], target)
    else:
        y = frame[target.name].to_numpy(dtype=np.int64)
    return frame, y


def _fit_and_score(
    x_train: pd.DataFrame,
    y_train: np.ndarray,
    x_test: pd.DataFrame,
    y_test: np.ndarray,
    classes: list[int],
    seed: int,
) -> tuple[float, str | None]:
    """AUC on the test rows of a classifier fitted on the training rows (macro one-vs-rest
    over the classes present in the test rows; for two classes that is the binary AUC)."""
    present = np.unique(y_train)
    if present.size < 2:
        return 0.5, (
            f"training rows hold {present.size} class(es): no classifier can be fitted, "
            "AUC set to 0.5 (chance)"
        )
    model = HistGradientBoostingClassifier(
        categorical_features="from_dtype", early_stopping=False, random_state=seed
    )
    model.fit(x_train, y_train)
    proba = model.predict_proba(x_test)
    column = {int(c): i for i, c in enumerate(model.classes_)}
    aucs = []
    for c in classes:
        # A class the model never saw scores 0 for every row: AUC 0.5 for that class.
        score = proba[:, column[c]] if c in column else np.zeros(len(y_test))
        aucs.append(roc_auc_score(y_test == c, score))
    return float(np.mean(aucs)), None


def tstr(
    train_real: pd.DataFrame,
    synthetic: pd.DataFrame,
    holdout_real: pd.DataFrame,
    schema: Schema,
    seed: int = 0,
    *,
    max_rows: int | None = 20_000,
    n_threads: int | None = 1,
) -> dict[str, Any]:
    """Train-on-synthetic/test-on-real ROC AUC, next to the train-on-real baseline.

    Returns ``tstr_auc`` (classifier fitted on ``synthetic``), ``trtr_auc`` (fitted on
    ``train_real``), both scored on ``holdout_real``; ``auc_kind`` is ``"binary"`` (ROC AUC)
    or ``"macro_ovr"`` (unweighted mean of one-vs-rest ROC AUCs over the classes present in
    the holdout rows); ``note`` explains anything unusual, ``reason`` why AUCs are None.

    The classifier is scikit-learn's HistGradientBoostingClassifier (100 iterations, no early
    stopping, ``random_state=seed``) with native categorical and missing-value support.
    Features are all modelled columns but the target. Rows with a null target are dropped.
    Each of the three frames is capped at ``max_rows`` rows (seeded sample). ``n_threads``
    limits OpenMP threads while fitting (None: library default); the default 1 avoids the
    heavy slowdown of OpenMP spin-waiting on a busy machine.

    A categorical or boolean target is classified over its declared levels; an integer target
    with at most 50 distinct values is treated as class labels; other targets give None.
    A training set holding a single class gives AUC 0.5 (chance) and a note.
    """
    result: dict[str, Any] = {
        "tstr_auc": None,
        "trtr_auc": None,
        "auc_kind": None,
        "target": None,
        "n_train": 0,
        "n_synthetic": 0,
        "n_holdout": 0,
        "note": None,
        "reason": None,
    }
    target = schema.target
    if target is None:
        result["reason"] = "the schema declares no target column"
        return result
    result["target"] = target.name
    if not (target.is_discrete or target.type is ColumnType.INTEGER):
        result["reason"] = f"target {target.name!r} is {target.type}: AUC needs class labels"
        return result

    rng = np.random.default_rng(seed)
    frames = []
    named = {"train_real": train_real, "synthetic": synthetic, "holdout_real": holdout_real}
    for what, frame in named.items():
        frame, y = _labels(_columns(frame, schema, what), target)
        frame = _cap(frame.assign(__y=y), max_rows, rng)
        frames.append((_features(frame, schema, target), frame["__y"].to_numpy()))
    (x_tr, y_tr), (x_sy, y_sy), (x_ho, y_ho) = frames
    result.update(n_train=len(y_tr), n_synthetic=len(y_sy), n_holdout=len(y_ho))

    if target.is_discrete:
        n_classes = len(target.levels)
    else:
        n_classes = np.unique(np.concatenate([y_tr, y_ho])).size
        if n_classes > _MAX_INTEGER_CLASSES:
            result["reason"] = (
                f"integer target {target.name!r} has {n_classes} distinct values "
                f"(> {_MAX_INTEGER_CLASSES}): treated as a regression target, no AUC"
            )
            return result
    result["auc_kind"] = "binary" if n_classes == 2 else "macro_ovr"
    classes = [int(c) for c in np.unique(y_ho)]
    if len(classes) < 2:
        result["reason"] = f"the holdout rows hold {len(classes)} class(es): AUC is undefined"
        return result

    notes = []
    with _threads(n_threads):
        result["tstr_auc"], note = _fit_and_score(x_sy, y_sy, x_ho, y_ho, classes, seed)
        if note:
            notes.append(f"synthetic: {note}")
        result["trtr_auc"], note = _fit_and_score(x_tr, y_tr, x_ho, y_ho, classes, seed)
        if note:
            notes.append(f"train_real: {note}")
    result["note"] = "; ".join(notes) or None
    return result


# --------------------------------------------------------------------------------------------
# Privacy proxy: distance to closest record


def _gower_embedding(frames: list[pd.DataFrame], schema: Schema) -> list[np.ndarray]:
    """Embed rows so that the L1 (manhattan) distance between two embedded rows equals the
    sum over columns of the Gower column distances:

    * numeric/datetime: v = (x - min) / (max - min), x clipped to the declared bounds, so the
      column distance |v_a - v_b| is at most 1. A column without nulls embeds as (v,); one with
      nulls as (v/2, -v/2) with null -> (1/2, 1/2): then value-value costs |v_a - v_b|,
      null-null 0 and null-value exactly (1 - v)/2 + (1 + v)/2 = 1.
    * categorical/boolean: one-hot over the levels (plus a null slot) scaled by 1/2, so equal
      costs 0 and different (null included) costs 1/2 + 1/2 = 1.

    Hand-written because no permissive library offers a vectorised Gower distance;
    this turns it into scikit-learn's exact manhattan nearest-neighbour search.
    """
    blocks: list[list[np.ndarray]] = [[] for _ in frames]
    for col in schema.modelled:
        if col.is_numeric:
            low, high = col.bounds
            scale = 1e9 if col.type is ColumnType.DATETIME else 1.0  # ns -> epoch seconds
            values = [
                np.clip((_numbers(f[col.name], col) / scale - low) / (high - low), 0.0, 1.0)
                for f in frames
            ]
            if any(np.isnan(v).any() for v in values):
                for block, v in zip(blocks, values, strict=True):
                    null = np.isnan(v)
                    half = np.where(null, 0.5, v / 2)
                    block.append(np.column_stack([half, np.where(null, 0.5, -v / 2)]))
            else:
                for block, v in zip(blocks, values, strict=True):
                    block.append(v[:, None])
        else:
            k = len(col.levels)
            codes = [_codes(f[col.name], col) for f in frames]
            width = k + 1 if any((c == k).any() for c in codes) else k
            for block, c in zip(blocks, codes, strict=True):
                onehot = np.zeros((c.size, width))
                onehot[np.arange(c.size), c] = 0.5
                block.append(onehot)
    return [np.hstack(block) if block else np.zeros((0, 0)) for block in blocks]


def _nearest(reference: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """L1 distance from each query row to its nearest reference row (inf if no reference)."""
    if reference.shape[0] == 0:
        return np.full(queries.shape[0], np.inf)
    model = NearestNeighbors(n_neighbors=1, metric="manhattan", algorithm="brute")
    distances, _ = model.fit(reference).kneighbors(queries)
    return distances[:, 0]


def dcr(
    train_real: pd.DataFrame,
    holdout_real: pd.DataFrame,
    synthetic: pd.DataFrame,
    schema: Schema,
    max_rows: int = 2000,
    seed: int = 0,
    *,
    n_threads: int | None = 1,
) -> dict[str, Any]:
    """Distance to closest record, a memorisation (privacy) proxy.

    Distance between two rows: the mean over modelled columns of the Gower column distance --
    numeric/datetime |a - b| / (declared max - min), values clipped to the declared bounds so
    it is at most 1; categorical/boolean 0 if equal else 1; null-null 0, null-value 1. It lies
    in [0, 1]. Nearest rows are found exactly (scikit-learn, manhattan metric on the embedding
    of :func:`_gower_embedding`).

    At most ``max_rows`` synthetic rows (seeded sample) are measured. Returns

    * ``dcr_synth_train``: median distance from a synthetic row to its closest training row
      (all training rows);
    * ``dcr_holdout``: median distance to the closest holdout row (all holdout rows);
    * ``dcr_share_closer_to_train``: share of synthetic rows strictly closer to the training
      rows than to the holdout rows, ties counting one half, where the larger of the two real
      sets is first subsampled (seeded) to the size of the smaller so that both are equally
      dense. About 0.5 means no memorisation; 1.0 means copies of training rows.

    plus the row counts used. The two medians use sets of different sizes when train and
    holdout differ in size; compare them with that in mind.
    """
    frames = [
        _columns(train_real, schema, "train_real"),
        _columns(holdout_real, schema, "holdout_real"),
        _columns(synthetic, schema, "synthetic"),
    ]
    rng = np.random.default_rng(seed)
    frames[2] = _cap(frames[2], max_rows, rng)
    train, holdout, synth = _gower_embedding(frames, schema)
    p = len(schema.modelled)
    n_train, n_holdout = len(train), len(holdout)
    result: dict[str, Any] = {
        "dcr_synth_train": None,
        "dcr_holdout": None,
        "dcr_share_closer_to_train": None,
        "n_synthetic": len(synth),
        "n_train": n_train,
        "n_holdout": n_holdout,
        "n_matched": min(n_train, n_holdout),
    }
    if len(synth) == 0:
        return result

    # The size-matched comparison: a seeded subset of the larger set. The training distances
    # to all rows are the minimum over that subset and the rest, so no row is searched twice.
    matched = min(n_train, n_holdout)
    with _threads(n_threads):
        if n_train > matched:
            pick = np.zeros(n_train, dtype=bool)
            pick[rng.choice(n_train, size=matched, replace=False)] = True
            d_train_matched = _nearest(train[pick], synth)
            d_train = np.minimum(d_train_matched, _nearest(train[~pick], synth))
        else:
            d_train = d_train_matched = _nearest(train, synth)
        if n_holdout > matched:
            pick = rng.choice(n_holdout, size=matched, replace=False)
            d_holdout_matched = _nearest(holdout[pick], synth)
            rest = np.setdiff1d(np.arange(n_holdout), pick)
            d_holdout = np.minimum(d_holdout_matched, _nearest(holdout[rest], synth))
        else:
            d_holdout = d_holdout_matched = _nearest(holdout, synth)

    d_train, d_holdout = d_train / p, d_holdout / p
    d_train_matched, d_holdout_matched = d_train_matched / p, d_holdout_matched / p
    if n_train:
        result["dcr_synth_train"] = float(np.median(d_train))
    if n_holdout:
        result["dcr_holdout"] = float(np.median(d_holdout))
    if matched:
        # Distances are sums of multiples of 1/2 and of rounded floats: compare with a
        # tolerance so that exact ties (common with discrete columns) count as ties.
        tie = np.isclose(d_train_matched, d_holdout_matched, rtol=0.0, atol=1e-12)
        closer = (d_train_matched < d_holdout_matched) & ~tie
        result["dcr_share_closer_to_train"] = float(np.mean(closer + 0.5 * tie))
    return result


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
