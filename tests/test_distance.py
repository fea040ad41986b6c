"""Privacy proxy: distance to closest record (fedsynth.generative.distance.dcr)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedsynth.generative.distance import dcr
from fedsynth.generative.schema import ColumnType
from tests.customers import SCHEMA, make_frame


def naive_gower(a: pd.Series, b: pd.Series) -> float:
    """The documented distance, one row pair at a time."""
    total = 0.0
    for col in SCHEMA.modelled:
        x, y = a[col.name], b[col.name]
        if pd.isna(x) or pd.isna(y):
            total += 0.0 if (pd.isna(x) and pd.isna(y)) else 1.0
        elif col.is_numeric:
            low, high = col.bounds
            if col.type is ColumnType.DATETIME:
                x, y = x.timestamp(), y.timestamp()
            x, y = min(max(float(x), low), high), min(max(float(y), low), high)
            total += min(abs(x - y) / (high - low), 1.0)
        else:
            total += 0.0 if x == y else 1.0
    return total / len(SCHEMA.modelled)


def test_dcr_distance_is_the_documented_gower_distance():
    train, holdout, synthetic = (make_frame(n, seed=s) for n, s in [(40, 21), (40, 22), (25, 23)])
    result = dcr(train, holdout, synthetic, SCHEMA)

    def nearest(frame):
        return np.array(
            [min(naive_gower(s, r) for _, r in frame.iterrows()) for _, s in synthetic.iterrows()]
        )

    d_train, d_holdout = nearest(train), nearest(holdout)
    assert result["dcr_synth_train"] == pytest.approx(np.median(d_train), abs=1e-12)
    assert result["dcr_holdout"] == pytest.approx(np.median(d_holdout), abs=1e-12)
    share = np.mean((d_train < d_holdout - 1e-12) + 0.5 * np.isclose(d_train, d_holdout))
    assert result["dcr_share_closer_to_train"] == pytest.approx(share, abs=1e-12)
    assert result["n_matched"] == 40 and result["n_synthetic"] == 25


def test_dcr_copy_of_training_rows_is_memorisation():
    train, holdout = make_frame(1000, seed=31), make_frame(1000, seed=32)
    result = dcr(train, holdout, train.copy(), SCHEMA)
    assert result["dcr_synth_train"] == 0.0
    assert result["dcr_holdout"] > 0.0
    assert result["dcr_share_closer_to_train"] > 0.95


def test_dcr_fresh_rows_are_as_close_to_train_as_to_holdout():
    train, holdout = make_frame(1000, seed=41), make_frame(1000, seed=42)
    result = dcr(train, holdout, make_frame(1000, seed=43), SCHEMA)
    assert result["dcr_synth_train"] > 0.0
    assert result["dcr_share_closer_to_train"] == pytest.approx(0.5, abs=0.07)
    # Unequal sizes: the larger set is subsampled for the share, not for the medians.
    big_train = make_frame(3000, seed=44)
    result = dcr(big_train, holdout, big_train.iloc[:1500], SCHEMA, max_rows=500, seed=1)
    assert result["n_synthetic"] == 500 and result["n_matched"] == 1000
    assert result["dcr_synth_train"] == 0.0
    assert 0.5 < result["dcr_share_closer_to_train"] < 1.0
