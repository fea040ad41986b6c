"""Reading a user's table and checking it against the declared schema.

:func:`read_table` reads a CSV or Parquet file as it is (CSV: every column as text) and
:func:`validate_table` checks it against a :class:`~fedsynth.generative.schema.Schema`,
returning the *typed frame* the codec expects: the modelled columns only, in schema order,
with one fixed pandas dtype per column type (see ``TYPED_DTYPES``).

Every problem found is collected, not just the first, into one :class:`TableError` whose
message has one line per problem, for example::

    table does not match the schema (2 problems):
      column 'balance': 3 values above max 3000.0 at rows 17, 204, 9051 (e.g. 3120.5)
      column 'student': 1 value not among the declared categories at row 12 (e.g. 'maybe'); ...

Row numbers are 1-based data rows (the header is not counted): row 1 is the first row
below the header, as a spreadsheet user would count it. All checks are vectorised.
"""

from __future__ import annotations

import codecs
import csv
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from fedsynth.generative.schema import Column, ColumnType, Schema

#: Cell values read as null in CSV files (and in text columns of a frame).
NULL_TOKENS: tuple[str, ...] = ("", "NA")

#: Pandas dtype of each column type in the typed frame (categorical: levels in order).
TYPED_DTYPES: dict[ColumnType, str] = {
    ColumnType.INTEGER: "Int64",
    ColumnType.FLOAT: "float64",
    ColumnType.CATEGORICAL: "category",
    ColumnType.BOOLEAN: "boolean",
    ColumnType.DATETIME: "datetime64[ns]",
}

#: How many offending row numbers a problem line shows (and ``Problem.rows`` keeps).
SHOWN_ROWS = 5

CSV_SUFFIXES = frozenset({".csv"})
PARQUET_SUFFIXES = frozenset({".parquet", ".pq"})

_TRUE = ("true", "t", "yes", "1")
_FALSE = ("false", "f", "no", "0")
_NS_PER_S = 1_000_000_000


@dataclass(frozen=True)
class Problem:
    """One problem of a table.

    ``kind`` is one of ``missing_column``, ``extra_column``, ``duplicate_column``,
    ``wrong_type``, ``below_min``, ``above_max``, ``unknown_category``, ``null``.
    ``rows`` holds the first :data:`SHOWN_ROWS` offending 1-based data row numbers and
    ``count`` the number of offending rows (0 for column-level problems).
    """

    column: str
    kind: str
    rows: tuple[int, ...] = ()
    count: int = 0
    sample: object = None
    message: str = ""


class TableError(ValueError):
    """A table cannot be read or does not match its schema.

    ``problems`` lists what :func:`validate_table` found (empty for reading errors).
    """

    def __init__(self, message: str, problems: Sequence[Problem] = ()) -> None:
        super().__init__(message)
        self.problems: list[Problem] = list(problems)


# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a ``.csv``, ``.parquet`` or ``.pq`` file into a DataFrame, without typing it.

    CSV cells are read as strings (UTF-8, an optional byte order mark is skipped); the
    empty string and ``NA`` become null. Parquet columns keep their stored types. Raises
    :class:`TableError` for a missing, empty, header-only, non-UTF-8 or corrupt file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in CSV_SUFFIXES | PARQUET_SUFFIXES:
        raise TableError(
            f"{path}: unsupported file type {path.suffix or '(no suffix)'!r}; "
            "use .csv, .parquet or .pq"
        )
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TableError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise TableError(f"{path}: is a directory, not a table file") from None
    except OSError as exc:
        raise TableError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not data.strip():
        raise TableError(f"{path}: the file is empty")
    frame = _read_csv(path, data) if suffix in CSV_SUFFIXES else _read_parquet(path, data)
    if len(frame) == 0:
        raise TableError(f"{path}: the table has a header but no data rows")
    return frame


def _read_csv(path: Path, data: bytes) -> pd.DataFrame:
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        line = data.count(b"\n", 0, offset) + 1
        raise TableError(
            f"{path}: not UTF-8 text: byte 0x{data[offset]:02x} at byte offset {offset} "
            f"(line {line}) is invalid ({exc.reason}); save the file as UTF-8"
        ) from None
    del data
    try:
        header = next(csv.reader(io.StringIO(text[: text.find("\n") + 1 or None])))
    except (StopIteration, csv.Error) as exc:
        raise TableError(f"{path}: cannot read the CSV header ({exc})") from None
    duplicated = sorted({h for h in header if header.count(h) > 1})
    if duplicated:
        raise TableError(f"{path}: duplicate column names in the header: {duplicated}")
    try:
        frame = pd.read_csv(
            io.StringIO(text),
            dtype=str,
            keep_default_na=False,
            na_values=list(NULL_TOKENS),
        )
    except pd.errors.EmptyDataError:
        raise TableError(f"{path}: the file is empty") from None
    except (pd.errors.ParserError, csv.Error, ValueError) as exc:
        raise TableError(f"{path}: not a valid CSV file: {str(exc).strip()}") from None
    return frame


def _read_parquet(path: Path, data: bytes) -> pd.DataFrame:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise TableError(
            f"{path}: not a readable Parquet file (truncated or corrupt?): {exc}"
        ) from None
    names = table.column_names
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise TableError(f"{path}: duplicate column names: {duplicated}")
    try:
        return table.to_pandas()
    except (pa.ArrowException, ValueError) as exc:
        raise TableError(f"{path}: Parquet data cannot be converted: {exc}") from None


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------


@dataclass
class _Checker:
    """Collects the problems of one column as boolean masks over the rows."""

    name: str
    problems: list[Problem] = field(default_factory=list)

    def add(
        self,
        kind: str,
        mask: np.ndarray,
        what: str,
        sample: str | None = None,
        noun: str = "value",
        hint: str = "",
    ) -> None:
        """Record the rows in ``mask`` as 'column 'x': N <noun>s <what> at rows ...'."""
        positions = np.flatnonzero(mask)
        count = int(positions.size)
        if count == 0:
            return
        rows = tuple(int(p) + 1 for p in positions[:SHOWN_ROWS])
        shown = ", ".join(str(r) for r in rows) + (", ..." if count > SHOWN_ROWS else "")
        plural = "s" if count > 1 else ""
        text = f"column {self.name!r}: {count} {noun}{plural} {what} at row{plural} {shown}"
        if sample is not None:
            text += f" (e.g. {sample})"
        self.problems.append(Problem(self.name, kind, rows, count, sample, text + hint))


def validate_table(df: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """Check ``df`` against ``schema`` and return the typed frame of the modelled columns.

    Identifier columns must be present and are then dropped. Values may be strings (as
    read from CSV) or native types. Raises one :class:`TableError` listing every problem;
    ``df`` is never modified. The typed frame keeps ``df``'s index.
    """
    problems: list[Problem] = []
    names = [str(c) for c in df.columns]
    counts = pd.Series(names, dtype=object).value_counts()
    duplicated = set(counts.index[counts > 1])
    for name in sorted(duplicated):
        problems.append(
            Problem(name, "duplicate_column", message=f"column {name!r}: appears more than once")
        )
    present = set(names)
    modelled = {c.name for c in schema.modelled}
    for col in schema.columns:
        if col.name not in present:
            role = "" if col.name in modelled else " (identifier)"
            problems.append(
                Problem(
                    col.name,
                    "missing_column",
                    message=f"column {col.name!r}{role}: declared in the spec but missing "
                    "from the table",
                )
            )
    declared = {c.name for c in schema.columns}
    for name in dict.fromkeys(names):
        if name not in declared:
            problems.append(
                Problem(
                    name,
                    "extra_column",
                    message=f"column {name!r}: not declared in the spec (declare it, with "
                    'role = "identifier" if it must not be modelled, or drop it)',
                )
            )
    typed: dict[str, pd.Series] = {}
    positions = {n: i for i, n in enumerate(names)}
    for col in schema.modelled:
        if col.name not in present or col.name in duplicated:
            continue
        checker = _Checker(col.name)
        result = _check_column(df.iloc[:, positions[col.name]], col, checker)
        problems.extend(checker.problems)
        if not checker.problems:
            typed[col.name] = pd.Series(result, index=df.index, name=col.name)
    if problems:
        count = len(problems)
        lines = "\n  ".join(p.message for p in problems)
        raise TableError(
            f"table does not match the schema ({count} problem{'s' if count > 1 else ''}):"
            f"\n  {lines}",
            problems,
        )
    return pd.DataFrame({c.name: typed[c.name] for c in schema.modelled}, index=df.index)


def _is_text(series: pd.Series) -> bool:
    return series.dtype == object or isinstance(series.dtype, pd.StringDtype)


def _null_mask(series: pd.Series) -> np.ndarray:
    null = series.isna().to_numpy(dtype=bool)
    if _is_text(series):
        null = null | series.isin(NULL_TOKENS).to_numpy(dtype=bool)
    return null


def _sample(series: pd.Series, mask: np.ndarray) -> str | None:
    """The first offending value as the user wrote it (strings quoted)."""
    if not mask.any():
        return None
    value = series.iloc[int(np.argmax(mask))]
    return repr(value) if isinstance(value, str) else str(value)


def _check_column(series: pd.Series, col: Column, checker: _Checker) -> object:
    null = _null_mask(series)
    if col.type is ColumnType.CATEGORICAL:
        result = _categorical(series, col, null, checker)
    elif col.type is ColumnType.BOOLEAN:
        result = _boolean(series, null, checker)
    elif col.type is ColumnType.DATETIME:
        result = _datetime(series, col, null, checker)
    else:
        result = _numeric(series, col, null, checker)
    if null.any() and not col.nullable:
        checker.add("null", null, "(the column is not nullable)", noun="null value")
    return result


def _numeric(series: pd.Series, col: Column, null: np.ndarray, checker: _Checker) -> object:
    dtype = series.dtype
    exact = None
    if pd.api.types.is_bool_dtype(dtype):
        values = np.full(len(series), np.nan)  # a flag is not a number
    elif pd.api.types.is_numeric_dtype(dtype):
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        if pd.api.types.is_integer_dtype(dtype) and not isinstance(
            dtype, pd.api.extensions.ExtensionDtype
        ):
            exact = series.to_numpy()
    else:
        values = _parse_numbers(series, null)
    bad = ~null & ~np.isfinite(values)
    if col.type is ColumnType.INTEGER:
        whole = np.mod(np.where(bad | null, 0.0, values), 1.0) == 0.0
        bad = bad | (~null & ~whole)
        what = "of the wrong type (not a whole number)"
    else:
        what = "of the wrong type (not a number)"
    checker.add("wrong_type", bad, what, _sample(series, bad))
    ok = ~null & ~bad
    low, high = col.bounds
    below = ok & (values < low)
    above = ok & (values > high)
    checker.add("below_min", below, f"below min {col.min}", _number_sample(values, below))
    checker.add("above_max", above, f"above max {col.max}", _number_sample(values, above))
    if checker.problems:
        return None
    if col.type is ColumnType.INTEGER:
        if exact is None:
            exact = np.rint(np.where(null, 0.0, values))
        return pd.arrays.IntegerArray(exact.astype(np.int64), null.copy())
    return np.where(null, np.nan, values)


def _text_array(series: pd.Series, null: np.ndarray) -> pa.Array:
    """Values as an Arrow string array (null where ``null``), for fast C++ string kernels."""
    if _is_text(series):
        # (nulls need no replacing first: ``mask`` hides them from Arrow)
        objects = series.to_numpy() if series.dtype == object else series.to_numpy(object)
        try:
            return pa.array(objects, type=pa.string(), mask=null, from_pandas=True)
        except (pa.ArrowException, TypeError, ValueError):
            pass  # not all strings (mixed native values): convert them one by one
    objects = _as_text(series, null).to_numpy(dtype=object, na_value=None)  # type: ignore[call-overload]
    return pa.array(objects, type=pa.string(), mask=null, from_pandas=True)


def _parse_numbers(series: pd.Series, null: np.ndarray) -> np.ndarray:
    """Text to float64 (NaN for null or unparseable), in Arrow's C++ parser when possible."""
    text = pc.utf8_trim_whitespace(_text_array(series, null))
    try:
        return pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:
        pass  # some values are not numbers: find them, slowly
    parsed = pd.to_numeric(pd.Series(text.to_numpy(zero_copy_only=False)), errors="coerce")
    return parsed.to_numpy(dtype=np.float64, na_value=np.nan)


def _number_sample(values: np.ndarray, mask: np.ndarray) -> str | None:
    if not mask.any():
        return None
    value = float(values[int(np.argmax(mask))])
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def _as_text(series: pd.Series, null: np.ndarray) -> pd.Series:
    """Values as strings (null -> <NA>); whole floats print as integers ('1', not '1.0')."""
    if pd.api.types.is_float_dtype(series.dtype):
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        finite = np.isfinite(values)
        if np.all(np.mod(values[finite], 1.0) == 0.0) and np.all(np.abs(values[finite]) < 2**53):
            ints = pd.arrays.IntegerArray(np.where(finite, values, 0).astype(np.int64), ~finite)
            series = pd.Series(ints, index=series.index)
    text = series.astype("string")
    return text.mask(null) if null.any() else text


def _categorical(series: pd.Series, col: Column, null: np.ndarray, checker: _Checker) -> object:
    levels = col.levels
    if series.dtype == object and pd.api.types.infer_dtype(series, skipna=True) == "string":
        text = series  # already strings (CSV): null tokens are masked by ``null`` below
    else:
        text = _as_text(series, null)
    codes = np.asarray(pd.Categorical(text.to_numpy(), categories=levels).codes)
    unknown = ~null & (codes < 0)
    if unknown.any():
        shown = ", ".join(repr(level) for level in levels[:10])
        more = f", ... ({len(levels)} in all)" if len(levels) > 10 else ""
        checker.add(
            "unknown_category",
            unknown,
            "not among the declared categories",
            _sample(text, unknown),
            hint=f"; declared: {shown}{more}",
        )
        return None
    return pd.Categorical.from_codes(np.where(null, -1, codes), categories=pd.Index(levels))


def _boolean(series: pd.Series, null: np.ndarray, checker: _Checker) -> object:
    dtype = series.dtype
    if pd.api.types.is_bool_dtype(dtype):
        values = series.to_numpy(dtype=bool, na_value=False)
        bad = np.zeros(len(series), dtype=bool)
    elif pd.api.types.is_numeric_dtype(dtype):
        numbers = series.to_numpy(dtype=np.float64, na_value=np.nan)
        values = numbers == 1.0
        bad = ~null & ~(values | (numbers == 0.0))
    else:
        text = pc.utf8_lower(pc.utf8_trim_whitespace(_text_array(series, null)))
        values = pc.is_in(text, value_set=pa.array(_TRUE)).to_numpy(zero_copy_only=False)
        false = pc.is_in(text, value_set=pa.array(_FALSE)).to_numpy(zero_copy_only=False)
        bad = ~null & ~values & ~false
    checker.add(
        "wrong_type",
        bad,
        "of the wrong type (not true/false, yes/no, 1/0 or t/f)",
        _sample(series, bad),
    )
    if bad.any():
        return None
    return pd.arrays.BooleanArray(values & ~null, null.copy())


def _datetime(series: pd.Series, col: Column, null: np.ndarray, checker: _Checker) -> object:
    if pd.api.types.is_datetime64_any_dtype(series.dtype):
        aware = series
        if getattr(series.dtype, "tz", None) is not None:
            aware = aware.dt.tz_convert("UTC").dt.tz_localize(None)
        stamps: np.ndarray = aware.to_numpy(dtype="datetime64[ns]")
    elif pd.api.types.is_numeric_dtype(series.dtype) or pd.api.types.is_bool_dtype(series.dtype):
        stamps = np.full(len(series), np.datetime64("NaT"), dtype="datetime64[ns]")
    else:
        stamps = _parse_datetimes(pc.utf8_trim_whitespace(_text_array(series, null)), col.format)
    parsed = ~np.isnat(stamps)
    bad = ~null & ~parsed
    expected = "an ISO 8601 date or datetime" + (f" or {col.format!r}" if col.format else "")
    checker.add("wrong_type", bad, f"of the wrong type (not {expected})", _sample(series, bad))
    seconds = np.where(parsed, stamps.view(np.int64), 0) / _NS_PER_S
    low, high = col.bounds
    ok = ~null & parsed
    below = ok & (seconds < low)
    above = ok & (seconds > high)
    checker.add("below_min", below, f"before min {col.min}", _stamp_sample(stamps, below))
    checker.add("above_max", above, f"after max {col.max}", _stamp_sample(stamps, above))
    if checker.problems:
        return None
    return np.where(null, np.datetime64("NaT"), stamps).astype("datetime64[ns]")


# A UTC offset after a time of day: 'T10:00Z', ' 10:00:00.5+02:00', '10:00:00-0500'.
_OFFSET = r"\d:\d\d(:\d\d([.,]\d*)?)?\s*([Zz]|[+-]\d\d(:?\d\d)?)$"


def _parse_datetimes(text: pa.Array, fmt: str | None) -> np.ndarray:
    """datetime64[ns] values, naive (aware ones converted to UTC); unparseable -> NaT."""
    values = text.to_numpy(zero_copy_only=False)
    stamps = np.full(len(values), np.datetime64("NaT"), dtype="datetime64[ns]")
    todo = ~text.is_null().to_numpy(zero_copy_only=False)
    aware = None
    for pattern in ([fmt] if fmt else []) + ["ISO8601"]:
        if not todo.any():
            break
        got = _to_datetime(values[todo], pattern, utc=False)
        if got is None:  # some values carry a UTC offset: parse them apart from the rest
            if aware is None:
                matches = pc.fill_null(pc.match_substring_regex(text, _OFFSET), False)
                aware = matches.to_numpy(zero_copy_only=False)
            got = np.full(int(todo.sum()), np.datetime64("NaT"), dtype="datetime64[ns]")
            part = aware[todo]
            for mask, utc in ((~part, False), (part, True)):
                if mask.any():
                    parsed = _to_datetime(values[todo][mask], pattern, utc=utc)
                    if parsed is not None:
                        got[mask] = parsed
        stamps[todo] = got
        todo = todo & np.isnat(stamps)
    return stamps


def _to_datetime(values: np.ndarray, pattern: str, utc: bool) -> np.ndarray | None:
    """Parse with pandas; None if the result mixes naive and aware values (or offsets)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pandas warns about mixed time zones
        try:
            got = pd.to_datetime(values, format=pattern, errors="coerce", utc=utc)
        except (ValueError, TypeError, OverflowError):
            return None
    if not isinstance(got, pd.DatetimeIndex):
        return None
    if got.tz is not None:
        if not utc:
            return None  # pandas may apply one value's offset to naive neighbours
        got = got.tz_localize(None)
    return got.to_numpy(dtype="datetime64[ns]")


def _stamp_sample(stamps: np.ndarray, mask: np.ndarray) -> str | None:
    if not mask.any():
        return None
    return pd.Timestamp(stamps[int(np.argmax(mask))]).isoformat(sep=" ")
