"""Typed-frame access shared by the quality, utility and distance scores.

Every scoring function takes *typed frames*: pandas DataFrames holding the schema's modelled
columns (identifiers dropped) with dtypes integer -> ``Int64``, float -> ``float64``,
categorical -> ``Categorical`` whose categories are the declared levels, boolean ->
``boolean``, datetime -> ``datetime64[ns]``; nulls are NA/NaN/NaT. Real and synthetic frames
follow the same contract.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits  # a scikit-learn dependency

from fedsynth.generative.schema import Column, ColumnType, Schema


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


def _threads(n_threads: int | None):
    # The callers (fedsynth.generative.utility and .distance) import scikit-learn (and its
    # OpenMP runtime) at module level on purpose: a limit set before the OpenMP library is
    # loaded would not apply to it.
    return nullcontext() if n_threads is None else threadpool_limits(limits=n_threads)


def _cap(frame: pd.DataFrame, max_rows: int | None, rng: np.random.Generator) -> pd.DataFrame:
    if max_rows is None or len(frame) <= max_rows:
        return frame
    return frame.iloc[np.sort(rng.choice(len(frame), size=max_rows, replace=False))]
