"""ML utility: train-on-synthetic/test-on-real AUC (fedsynth.generative.utility.tstr)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedsynth.generative.schema import Role, Schema
from fedsynth.generative.utility import tstr
from tests.customers import SCHEMA, make_frame


@pytest.fixture(scope="module")
def split():
    return make_frame(2000, seed=11), make_frame(1500, seed=12)


def test_tstr_informative_synthetic_gets_high_auc(split):
    train, holdout = split
    synthetic = make_frame(2000, seed=13, shift=0.5)
    result = tstr(train, synthetic, holdout, SCHEMA, seed=0)
    assert result["auc_kind"] == "binary"
    assert result["reason"] is None and result["note"] is None
    assert result["trtr_auc"] > 0.75
    assert result["tstr_auc"] > 0.75
    assert abs(result["tstr_auc"] - result["trtr_auc"]) < 0.05


def test_tstr_label_shuffled_synthetic_is_near_chance(split):
    train, holdout = split
    synthetic = make_frame(2000, seed=14)
    rng = np.random.default_rng(0)
    synthetic["churned"] = synthetic["churned"].to_numpy()[rng.permutation(len(synthetic))]
    result = tstr(train, synthetic, holdout, SCHEMA, seed=0)
    assert abs(result["tstr_auc"] - 0.5) < 0.08
    assert result["trtr_auc"] > 0.75


def test_tstr_single_class_synthetic_is_chance_with_a_note(split):
    train, holdout = split
    synthetic = make_frame(500, seed=15)
    synthetic["churned"] = pd.array([False] * len(synthetic), dtype="boolean")
    result = tstr(train, synthetic, holdout, SCHEMA)
    assert result["tstr_auc"] == 0.5
    assert "1 class" in result["note"]
    assert result["trtr_auc"] > 0.75


def test_tstr_ignores_a_feature_the_synthetic_rows_leave_all_null(split):
    # DP-CTGAN at epsilon 1 did this to loans (bench/utility.py); scikit-learn's binning
    # fails on a feature with no value at all.
    train, holdout = split
    synthetic = make_frame(2000, seed=13, shift=0.5)
    for name in ("income", "visits", "signup", "segment", "member"):
        synthetic[name] = pd.Series([None] * len(synthetic), dtype=synthetic[name].dtype)
    result = tstr(train, synthetic, holdout, SCHEMA, seed=0)
    assert result["tstr_auc"] > 0.6
    assert result["trtr_auc"] > 0.75
    for name in ("age", "region"):  # now no feature has a value
        synthetic[name] = pd.Series([None] * len(synthetic), dtype=synthetic[name].dtype)
    result = tstr(train, synthetic, holdout, SCHEMA, seed=0)
    assert result["tstr_auc"] == 0.5 and "every feature is null" in result["note"]


def test_tstr_drops_null_targets_and_handles_no_target_and_multiclass(split):
    train, holdout = split
    holdout = holdout.copy()
    holdout.loc[:99, "churned"] = pd.NA
    result = tstr(train, make_frame(800, seed=16), holdout, SCHEMA)
    assert result["n_holdout"] == len(holdout) - 100
    assert result["tstr_auc"] > 0.7

    no_target = Schema(
        columns=[
            c.model_copy(update={"role": Role.FEATURE}) if c.role is Role.TARGET else c
            for c in SCHEMA.columns
        ]
    )
    result = tstr(train, train, holdout, no_target)
    assert result["tstr_auc"] is None and result["trtr_auc"] is None
    assert "no target" in result["reason"]

    roles = {"churned": Role.FEATURE, "segment": Role.TARGET}
    multi = Schema(
        columns=[c.model_copy(update={"role": roles.get(c.name, c.role)}) for c in SCHEMA.columns]
    )
    result = tstr(train, make_frame(2000, seed=17), holdout, multi)
    assert result["auc_kind"] == "macro_ovr"
    assert 0.6 < result["tstr_auc"] <= 1.0
    assert 0.6 < result["trtr_auc"] <= 1.0
