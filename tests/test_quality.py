"""Quality scores: ours equal SDMetrics' on the same data; and evaluate(), which bundles the
quality, utility (tests/test_utility.py) and privacy (tests/test_distance.py) scores.

SDMetrics is only a test dependency (it pulls copulas, under the Business Source License);
fedsynth.generative.quality re-implements its QualityReport and these tests compare the two.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

from fedsynth.generative import distance, utility
from fedsynth.generative.quality import (
    QualityScores,
    column_pair_trends,
    column_shapes,
    dcr,
    evaluate,
    quality_report,
    quality_score,
    tstr,
)
from fedsynth.generative.schema import ColumnType, Schema
from tests.customers import SCHEMA, make_frame


@pytest.fixture(scope="module")
def real() -> pd.DataFrame:
    return make_frame(1500, seed=1)


@pytest.fixture(scope="module")
def synthetic() -> pd.DataFrame:
    return make_frame(1200, seed=2, shift=1.0)


# --------------------------------------------------------------------------------------------
# SDMetrics reference


SDTYPES = {
    ColumnType.INTEGER: "numerical",
    ColumnType.FLOAT: "numerical",
    ColumnType.CATEGORICAL: "categorical",
    ColumnType.BOOLEAN: "boolean",
    ColumnType.DATETIME: "datetime",
}


def sdmetrics_metadata(schema: Schema) -> dict:
    return {"columns": {c.name: {"sdtype": SDTYPES[c.type]} for c in schema.modelled}}


def sdmetrics_report(real, synthetic, schema, *, thresholds: tuple[float, float] | None = None):
    """SDMetrics 0.32 single-table QualityReport (deprecated alias, same code as the
    unified sdmetrics.reports.QualityReport for one table)."""
    pytest.importorskip("sdmetrics")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its own FutureWarning and pandas' observed=False
        from sdmetrics.reports.single_table import QualityReport

        report = QualityReport()
        if thresholds is not None:
            report.real_correlation_threshold, report.real_association_threshold = thresholds
        report.generate(real, synthetic, sdmetrics_metadata(schema), verbose=False)
    return report


def sd_columns(report) -> dict[str, float]:
    details = report.get_details("Column Shapes")
    return dict(zip(details["Column"], details["Score"].astype(float), strict=True))


def sd_pairs(report) -> dict[tuple[str, str], float]:
    details = report.get_details("Column Pair Trends")
    keys = zip(details["Column 1"], details["Column 2"], strict=True)
    return dict(zip(keys, details["Score"].astype(float), strict=True))


def sd_properties(report) -> tuple[float, float]:
    props = report.get_properties().set_index("Property")["Score"]
    return float(props["Column Shapes"]), float(props["Column Pair Trends"])


def assert_same(ours: float, theirs: float, what: str, tol: float = 1e-9) -> None:
    if math.isnan(theirs) or math.isnan(ours):
        assert math.isnan(theirs) and math.isnan(ours), f"{what}: ours {ours}, SDMetrics {theirs}"
    else:
        assert abs(ours - theirs) <= tol, f"{what}: ours {ours}, SDMetrics {theirs}"


def assert_matches_report(ours: QualityScores, report) -> None:
    theirs_columns = sd_columns(report)
    assert list(ours.per_column) == list(theirs_columns)
    for name, score in theirs_columns.items():
        assert_same(ours.per_column[name], score, f"column {name}")
    theirs_pairs = sd_pairs(report)
    assert list(ours.per_pair) == list(theirs_pairs)
    for pair, score in theirs_pairs.items():
        assert_same(ours.per_pair[pair], score, f"pair {pair}")
    shapes, trends = sd_properties(report)
    assert_same(ours.column_shapes, shapes, "column shapes")
    assert_same(ours.column_pair_trends, trends, "column pair trends")
    assert_same(ours.quality, report.get_score(), "quality")


# --------------------------------------------------------------------------------------------
# Quality report vs SDMetrics


def test_matches_sdmetrics_quality_report_with_its_default_thresholds(real, synthetic):
    report = sdmetrics_report(real, synthetic, SCHEMA)
    assert "Error" not in report.get_details("Column Pair Trends")
    ours = quality_report(real, synthetic, SCHEMA)
    assert_matches_report(ours, report)
    # The thresholds really select: some pairs count, some do not.
    scores = np.array(list(ours.per_pair.values()))
    assert 0 < np.isnan(scores).sum() < len(scores)
    assert quality_score(real, synthetic, SCHEMA) == ours.quality
    assert column_shapes(real, synthetic, SCHEMA) == (ours.column_shapes, ours.per_column)


def test_matches_sdmetrics_quality_report_scoring_every_pair(real, synthetic):
    report = sdmetrics_report(real, synthetic, SCHEMA, thresholds=(0, 0))
    ours = quality_report(
        real, synthetic, SCHEMA, real_correlation_threshold=0, real_association_threshold=0
    )
    assert not any(math.isnan(s) for s in ours.per_pair.values())
    assert_matches_report(ours, report)
    details = report.get_details("Column Pair Trends").set_index(["Column 1", "Column 2"])
    # Every kind of pair is exercised: numeric-numeric, mixed, discrete-discrete, datetime.
    assert details.loc[("age", "income"), "Metric"] == "CorrelationSimilarity"
    assert details.loc[("visits", "signup"), "Metric"] == "CorrelationSimilarity"
    assert details.loc[("income", "segment"), "Metric"] == "ContingencySimilarity"
    assert details.loc[("segment", "member"), "Metric"] == "ContingencySimilarity"
    assert details.loc[("member", "signup"), "Metric"] == "ContingencySimilarity"


def test_matches_sdmetrics_when_synthetic_misses_categories_and_columns_differ(real):
    # Synthetic rows without "business" and "island", with no nulls in income, and with a
    # shifted range: exercises TVComplement's pseudo-count and SDMetrics' per-frame bins.
    synthetic = make_frame(900, seed=3, shift=3.0, business=False)
    synthetic = synthetic[synthetic["region"] != "island"].reset_index(drop=True)
    synthetic["income"] = synthetic["income"].fillna(1_000.0) * 1.3
    for thresholds in [None, (0, 0)]:
        report = sdmetrics_report(real, synthetic, SCHEMA, thresholds=thresholds)
        kwargs = {}
        if thresholds is not None:
            kwargs = dict(real_correlation_threshold=0, real_association_threshold=0)
        assert_matches_report(quality_report(real, synthetic, SCHEMA, **kwargs), report)
    # Real rows missing a category that the synthetic rows hold: the 1e-6 pseudo-count.
    report = sdmetrics_report(synthetic, real, SCHEMA, thresholds=(0, 0))
    ours = quality_report(
        synthetic, real, SCHEMA, real_correlation_threshold=0, real_association_threshold=0
    )
    assert_matches_report(ours, report)


def test_matches_sdmetrics_on_degenerate_synthetic_columns(real):
    # All-null, constant and almost-all-null columns: SDMetrics gives NaN (or an error) for
    # those scores and leaves them out of the averages; so do we.
    synthetic = make_frame(1200, seed=5, shift=1.0)
    synthetic["income"] = np.nan
    synthetic["visits"] = pd.array([7] * len(synthetic), dtype="Int64")
    synthetic["member"] = pd.array([None] * len(synthetic), dtype="boolean")
    synthetic["signup"] = synthetic["signup"].where(synthetic.index < 2)
    for thresholds, kwargs in [
        (None, {}),
        ((0, 0), dict(real_correlation_threshold=0, real_association_threshold=0)),
    ]:
        report = sdmetrics_report(real, synthetic, SCHEMA, thresholds=thresholds)
        ours = quality_report(real, synthetic, SCHEMA, **kwargs)
        assert math.isnan(ours.per_column["income"]) and math.isnan(ours.per_column["member"])
        assert_matches_report(ours, report)


def test_declared_level_absent_from_real_data_differs_from_sdmetrics_as_documented(synthetic):
    # A declared category that never occurs in the real data: SDMetrics (pandas
    # observed=False) builds an all-zero row for Cramer's V, scipy rejects it and SDMetrics
    # drops every pair with that column ("Error"). We drop empty rows first, which is what
    # SDMetrics computes when the same values come as plain strings.
    real = make_frame(1500, seed=4, business=False)
    assert "business" not in set(real["segment"].dropna())
    ours = quality_report(real, synthetic, SCHEMA)

    report = sdmetrics_report(real, synthetic, SCHEMA)
    details = report.get_details("Column Pair Trends")
    failed = details[details["Error"].notna()]
    assert len(failed) > 0
    assert ((failed["Column 1"] == "segment") | (failed["Column 2"] == "segment")).all()

    def as_text(frame: pd.DataFrame) -> pd.DataFrame:
        return frame.astype({"segment": object, "region": object})

    report = sdmetrics_report(as_text(real), as_text(synthetic), SCHEMA)
    assert "Error" not in report.get_details("Column Pair Trends")
    assert_matches_report(ours, report)

    # Without thresholds no Cramer's V is computed and SDMetrics agrees on the typed frames.
    report = sdmetrics_report(real, synthetic, SCHEMA, thresholds=(0, 0))
    ours = quality_report(
        real, synthetic, SCHEMA, real_correlation_threshold=0, real_association_threshold=0
    )
    assert_matches_report(ours, report)


def test_identical_frames_score_one(real):
    scores = quality_report(real, real.copy(), SCHEMA)
    assert scores.quality == 1.0
    assert scores.column_shapes == 1.0
    assert scores.column_pair_trends == 1.0
    assert all(v == 1.0 for v in scores.per_column.values())


def test_independently_shuffled_columns_lose_pair_trends_but_keep_shapes(real):
    rng = np.random.default_rng(7)
    shuffled = pd.DataFrame(
        {name: real[name].sample(frac=1, random_state=rng).to_numpy() for name in real}
    ).astype(real.dtypes.to_dict())
    own = quality_report(real, make_frame(1500, seed=8), SCHEMA)
    scores = quality_report(real, shuffled, SCHEMA)
    assert scores.column_shapes == pytest.approx(1.0, abs=1e-12)
    assert scores.column_pair_trends < own.column_pair_trends - 0.1
    assert scores.quality < own.quality
    everything = column_pair_trends(
        real, shuffled, SCHEMA, real_correlation_threshold=0, real_association_threshold=0
    )[0]
    assert everything < 1.0


def test_unknown_category_is_an_error(real):
    bad = real.copy()
    bad["region"] = bad["region"].astype(object)
    bad.loc[0, "region"] = "atlantis"
    with pytest.raises(ValueError, match="atlantis"):
        column_shapes(real, bad, SCHEMA)


def test_fedsynth_does_not_import_sdmetrics_or_copulas():
    code = (
        "import sys, fedsynth.generative.quality; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('sdmetrics', 'copulas')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_quality_reexports_tstr_and_dcr():
    assert tstr is utility.tstr and dcr is distance.dcr


# --------------------------------------------------------------------------------------------
# Everything at once


@pytest.fixture(scope="module")
def split():
    return make_frame(2000, seed=11), make_frame(1500, seed=12)


def test_evaluate_is_flat_and_json_safe(split):
    train, holdout = split
    result = evaluate(train, holdout, make_frame(1500, seed=51, shift=0.5), SCHEMA)
    assert list(result) == [
        "quality",
        "column_shapes",
        "column_pair_trends",
        "tstr_auc",
        "trtr_auc",
        "auc_kind",
        "dcr_synth_train",
        "dcr_holdout",
        "dcr_share_closer_to_train",
    ]
    json.dumps(result, allow_nan=False)
    for key in ["quality", "column_shapes", "column_pair_trends", "tstr_auc", "trtr_auc"]:
        assert 0.5 < result[key] <= 1.0, key
    assert result["auc_kind"] == "binary"
    assert 0 < result["dcr_synth_train"] < 1 and 0 < result["dcr_holdout"] < 1
    assert 0.3 < result["dcr_share_closer_to_train"] < 0.7
