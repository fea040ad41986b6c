"""Typed customer-like frames shared by the quality, utility and distance tests."""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedsynth.generative.schema import Column, Schema

SEGMENTS = ["basic", "plus", "premium", "business"]
REGIONS = ["north", "south", "east", "west", "island"]

SCHEMA = Schema(
    columns=[
        Column(name="customer_id", type="integer", role="identifier"),
        Column(name="age", type="integer", min=18, max=90),
        Column(name="income", type="float", min=0, max=250_000, nullable=True),
        Column(name="visits", type="integer", min=0, max=60, nullable=True),
        Column(name="segment", type="categorical", categories=SEGMENTS, nullable=True),
        Column(name="member", type="boolean", nullable=True),
        Column(name="signup", type="datetime", min="2010-01-01", max="2026-01-01", nullable=True),
        Column(name="region", type="categorical", categories=REGIONS),
        Column(name="churned", type="boolean", role="target"),
    ]
)
MODELLED = [c.name for c in SCHEMA.modelled]


def _with_nulls(values: pd.api.extensions.ExtensionArray, share: float, rng) -> pd.Series:
    series = pd.Series(values)
    series[rng.random(len(series)) < share] = None
    return series


def make_frame(
    n: int,
    seed: int,
    *,
    shift: float = 0.0,
    business: bool = True,
    churn_signal: float = 1.0,
) -> pd.DataFrame:
    """A typed frame of customer-like rows; ``shift`` perturbs every relation a little."""
    rng = np.random.default_rng(seed)
    age = rng.integers(18, 91, n)
    old = (age - 18) / 72
    weights = np.column_stack(
        [1.2 - old, np.full(n, 0.6 + 0.2 * shift), 0.2 + old, np.full(n, 0.15 if business else 0.0)]
    )
    weights /= weights.sum(axis=1, keepdims=True)
    segment_idx = (rng.random(n)[:, None] > np.cumsum(weights, axis=1)).sum(axis=1)
    segment_idx = np.minimum(segment_idx, 3 if business else 2)
    income = np.clip(
        (900 + 100 * shift) * age + 9_000 * segment_idx + rng.normal(0, 9_000 + 2_000 * shift, n),
        0,
        250_000,
    )
    visits = np.minimum(rng.poisson(1 + age / (6 + shift)), 60)
    member = rng.random(n) < 0.25 + 0.2 * segment_idx
    signup = pd.Timestamp("2024-06-01") - pd.to_timedelta(
        (age - 18) * 40 + rng.integers(0, 700 + 100 * int(shift), n), unit="D"
    )
    region = rng.choice(REGIONS, n, p=[0.3, 0.25, 0.2, 0.2, 0.05])
    logit = churn_signal * (1.5 - 0.25 * visits + 1.2 * (~member) - 0.02 * (age - 50))
    churned = rng.random(n) < 1 / (1 + np.exp(-logit))

    frame = pd.DataFrame(
        {
            "age": pd.array(age, dtype="Int64"),
            "income": _with_nulls(income, 0.08, rng).astype("float64"),
            "visits": _with_nulls(pd.array(visits, dtype="Int64"), 0.10, rng),
            "segment": _with_nulls(
                pd.Categorical.from_codes(segment_idx, categories=SEGMENTS), 0.05, rng
            ),
            "member": _with_nulls(pd.array(member, dtype="boolean"), 0.05, rng),
            "signup": _with_nulls(signup.values.astype("datetime64[ns]"), 0.07, rng),
            "region": pd.Categorical(region, categories=REGIONS),
            "churned": pd.array(churned, dtype="boolean"),
        }
    )
    assert frame["segment"].cat.categories.tolist() == SEGMENTS
    assert str(frame["signup"].dtype) == "datetime64[ns]"
    return frame
