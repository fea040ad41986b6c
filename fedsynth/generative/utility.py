"""ML utility (:func:`tstr`): train-on-synthetic/test-on-real. A histogram gradient boosting
classifier is trained once on synthetic rows and once on the real training rows, and both are
scored by ROC AUC on the same held-out real rows (binary target: ROC AUC; more classes: macro
one-vs-rest AUC). ``tstr_auc`` close to ``trtr_auc`` means the synthetic data carries the
signal needed to predict the target.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score

from fedsynth.generative.schema import Column, ColumnType, Schema
from fedsynth.generative.typed import _cap, _codes, _columns, _numbers, _threads

__all__ = ["synthetic_auc", "tstr"]

# HistGradientBoosting takes at most max_bins - 1 = 254 categories per categorical feature;
# wider categoricals are passed as their (ordered) level codes instead.
_MAX_NATIVE_CATEGORIES = 254
# An integer target with at most this many distinct values is treated as class labels.
_MAX_INTEGER_CLASSES = 50


def _features(frame: pd.DataFrame, schema: Schema, target: Column) -> pd.DataFrame:
    """Model inputs: numbers as float64 (datetimes as epoch seconds), categoricals as pandas
    categories with the declared levels (HistGradientBoosting's native categorical support),
    nulls as NaN (HistGradientBoosting's native missing-value support)."""
    out: dict[str, Any] = {}
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
                    np.where(codes == len(col.levels), -1, codes), categories=pd.Index(col.levels)
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
    # A feature with no value in the training rows tells the classifier nothing, and
    # scikit-learn's binning fails on it (1.9: "window shape cannot be larger than input").
    empty = [name for name in x_train.columns if x_train[name].isna().all()]
    x_train, x_test = x_train.drop(columns=empty), x_test.drop(columns=empty)
    if x_train.shape[1] == 0:
        return 0.5, "every feature is null in the training rows: AUC set to 0.5 (chance)"
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


def synthetic_auc(
    synthetic: pd.DataFrame, real: pd.DataFrame, schema: Schema, seed: int = 0
) -> float | None:
    """TSTR alone: ROC AUC on ``real`` rows of the classifier :func:`tstr` fits on
    ``synthetic`` rows; None without a binary categorical/boolean target. (A federated
    node scores the global model this way on its own rows; it has no holdout of others.)"""
    target = schema.target
    if target is None or not target.is_discrete or len(target.levels) != 2:
        return None
    synthetic = _columns(synthetic, schema, "synthetic")
    real = _columns(real, schema, "real")
    synth_rows, y_synth = _labels(synthetic, target)
    real_rows, y_real = _labels(real, target)
    if len(np.unique(y_real)) < 2:
        return None
    with _threads(1):
        auc, _ = _fit_and_score(
            _features(synth_rows, schema, target),
            y_synth,
            _features(real_rows, schema, target),
            y_real,
            [1],
            seed,
        )
    return auc
