"""Reading a user's table and checking it against the declared schema.

:func:`read_table` reads a CSV or Parquet file as it is (CSV: every column as text) and
:func:`validate_table` checks a frame against a :class:`~fedsynth.generative.schema.Schema`,
returning the *typed frame* the codec expects: the modelled columns only, in schema order,
with one fixed pandas dtype per column type (see ``TYPED_DTYPES``).

:func:`check_table` does the same checks on a file streamed block by block, so its memory
is bounded by the block size, not the file size (a node validates a table of any size
before it trains); :func:`load_table` streams too and keeps the typed blocks. All three
run the same column checks and report the same problems with the same (absolute) rows.

Every problem found is collected, not just the first, into one :class:`TableError` whose
message has one line per problem, for example::

    table does not match the schema (2 problems):
      column 'balance': 3 values above max 3000.0 at rows 17, 204, 9051 (e.g. 3120.5)
      column 'student': 1 value not among the declared categories at row 12 (e.g. 'maybe'); ...

Row numbers are 1-based data rows (the header is not counted): row 1 is the first row
below the header, as a spreadsheet user would count it. All checks are vectorised.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from fedsynth.generative.schema import Column, ColumnType, Schema
from fedsynth.generative.tablefile import (
    BLOCK_BYTES,
    CSV_SUFFIXES,
    NULL_TOKENS,
    PARQUET_SUFFIXES,
    TableError,
    TableFile,
)

__all__ = [
    "BLOCK_BYTES",
    "CSV_SUFFIXES",
    "NULL_TOKENS",
    "PARQUET_SUFFIXES",
    "SHOWN_ROWS",
    "TYPED_DTYPES",
    "Problem",
    "TableError",
    "check_table",
    "load_table",
    "read_table",
    "validate_table",
]

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

#: Value problems of one column, in the order a message lists them.
VALUE_KINDS = ("wrong_type", "below_min", "above_max", "unknown_category", "null")

_SAMPLE_CHARS = 50  # a longer sample value is cut
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


# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a ``.csv``, ``.parquet`` or ``.pq`` file into a DataFrame, without typing it.

    CSV cells are read as strings (UTF-8, an optional byte order mark is skipped); the
    empty string and ``NA`` become null. Parquet columns keep their stored types. Raises
    :class:`TableError` for a missing, empty, header-only, non-UTF-8 or corrupt file.
    The whole table is in memory: :func:`check_table` validates a file of any size.
    """
    with TableFile(path) as source:
        batches = list(source.batches())
        if not batches:
            raise TableError(f"{source.path}: the table has a header but no data rows")
        table = pa.Table.from_batches(batches, schema=source.schema)
        del batches
        try:
            return table.to_pandas()
        except (pa.ArrowException, ValueError) as exc:
            raise TableError(f"{source.path}: the data cannot be converted: {exc}") from None


def check_table(path: str | Path, schema: Schema, *, block_bytes: int = BLOCK_BYTES) -> int:
    """Validate a table file against ``schema`` block by block; return its number of rows.

    Raises the :class:`TableError` that ``validate_table(read_table(path), schema)`` would
    raise (same problems, same rows), but holds only one block of about ``block_bytes``
    of the file in memory at a time (see :mod:`fedsynth.generative.tablefile`).
    """
    rows, _ = _scan(path, schema, block_bytes, keep=False)
    return rows


def load_table(path: str | Path, schema: Schema, *, block_bytes: int = BLOCK_BYTES) -> pd.DataFrame:
    """The typed frame of a table file (what ``validate_table(read_table(path))`` returns,
    with a fresh 0-based index), validated and typed block by block: the raw text is never
    held in memory all at once, only the typed columns."""
    _, typed = _scan(path, schema, block_bytes, keep=True)
    assert typed is not None
    return typed


def _scan(
    path: str | Path, schema: Schema, block_bytes: int, keep: bool
) -> tuple[int, pd.DataFrame | None]:
    findings = _Findings(schema)
    parts: list[pd.DataFrame] = []
    rows = 0
    with TableFile(path, block_bytes) as source:
        findings.check_header(source.names)
        wanted = [c.name for c in schema.modelled if c.name in findings.checkable]
        for batch in source.batches():
            index = pd.RangeIndex(rows, rows + batch.num_rows)
            chunk = _block_frame(batch.select(wanted)).set_axis(index) if wanted else None
            typed = findings.check_rows(chunk, offset=rows) if chunk is not None else None
            rows += batch.num_rows
            del batch, chunk
            if keep and findings.ok and typed is not None:
                parts.append(pd.DataFrame(typed, index=index))
            else:
                parts.clear()  # a problem was found: nothing will be returned
        if rows == 0:
            raise TableError(f"{source.path}: the table has a header but no data rows")
    findings.raise_if_any()
    if not keep:
        return rows, None
    return rows, pd.concat(parts) if len(parts) > 1 else parts[0]


def _block_frame(batch: pa.RecordBatch) -> pd.DataFrame:
    """A block as pandas, text kept in Arrow (no Python string per cell): the checks run
    Arrow's C++ kernels on it, several times faster than on Python strings."""
    text = pd.ArrowDtype(pa.string())
    mapper = {pa.string(): text, pa.large_string(): text}.get
    return batch.to_pandas(types_mapper=mapper, use_threads=False)  # threads cost more here


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------


@dataclass
class _Tally:
    """One value problem of one column, summed over the blocks of a table."""

    column: str
    kind: str
    what: str
    noun: str
    hint: str
    count: int = 0
    rows: list[int] = field(default_factory=list)
    sample: str | None = None

    def problem(self) -> Problem:
        rows = tuple(self.rows)
        shown = ", ".join(str(r) for r in rows) + (", ..." if self.count > SHOWN_ROWS else "")
        plural = "s" if self.count > 1 else ""
        text = (
            f"column {self.column!r}: {self.count} {self.noun}{plural} {self.what} "
            f"at row{plural} {shown}"
        )
        if self.sample is not None:
            text += f" (e.g. {self.sample})"
        return Problem(self.column, self.kind, rows, self.count, self.sample, text + self.hint)


class _Findings:
    """The problems of one table, found block by block (a frame in memory is one block)."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.header: list[Problem] = []
        self.values: dict[tuple[str, str], _Tally] = {}
        self.checkable: set[str] = set()  # modelled columns present exactly once

    @property
    def ok(self) -> bool:
        return not self.header and not self.values

    def check_header(self, names: list[str]) -> None:
        counts = pd.Series(names, dtype=object).value_counts()
        duplicated = set(counts.index[counts > 1])
        for name in sorted(duplicated):
            self.header.append(
                Problem(
                    name, "duplicate_column", message=f"column {name!r}: appears more than once"
                )
            )
        present = set(names)
        modelled = {c.name for c in self.schema.modelled}
        for col in self.schema.columns:
            if col.name not in present:
                role = "" if col.name in modelled else " (identifier)"
                self.header.append(
                    Problem(
                        col.name,
                        "missing_column",
                        message=f"column {col.name!r}{role}: declared in the spec but missing "
                        "from the table",
                    )
                )
        declared = {c.name for c in self.schema.columns}
        for name in dict.fromkeys(names):
            if name not in declared:
                self.header.append(
                    Problem(
                        name,
                        "extra_column",
                        message=f"column {name!r}: not declared in the spec (declare it, with "
                        'role = "identifier" if it must not be modelled, or drop it)',
                    )
                )
        self.checkable = (present & modelled) - duplicated

    def check_rows(self, df: pd.DataFrame, offset: int) -> dict[str, object]:
        """Check the modelled columns of one block whose first row is data row
        ``offset + 1``; return the typed values of the columns without problems."""
        positions = {str(n): i for i, n in enumerate(df.columns)}
        typed: dict[str, object] = {}
        for col in self.schema.modelled:
            if col.name not in self.checkable:
                continue
            checker = _Checker(col.name, self, offset)
            result = _check_column(df.iloc[:, positions[col.name]], col, checker)
            if not checker.found:
                typed[col.name] = result
        return typed

    def raise_if_any(self) -> None:
        problems = list(self.header)
        for col in self.schema.modelled:
            for kind in VALUE_KINDS:
                tally = self.values.get((col.name, kind))
                if tally is not None:
                    problems.append(tally.problem())
        if problems:
            count = len(problems)
            lines = "\n  ".join(p.message for p in problems)
            raise TableError(
                f"table does not match the schema ({count} problem{'s' if count > 1 else ''}):"
                f"\n  {lines}",
                problems,
            )


@dataclass
class _Checker:
    """Adds the problems of one column of one block to the table's findings."""

    name: str
    findings: _Findings
    offset: int = 0
    found: bool = False

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
        if positions.size == 0:
            return
        self.found = True
        tally = self.findings.values.setdefault(
            (self.name, kind), _Tally(self.name, kind, what, noun, hint)
        )
        tally.count += int(positions.size)
        room = SHOWN_ROWS - len(tally.rows)
        tally.rows.extend(self.offset + int(p) + 1 for p in positions[:room])
        if tally.sample is None:
            tally.sample = sample


def validate_table(df: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """Check ``df`` against ``schema`` and return the typed frame of the modelled columns.

    Identifier columns must be present and are then dropped. Values may be strings (as
    read from CSV) or native types. Raises one :class:`TableError` listing every problem;
    ``df`` is never modified. The typed frame keeps ``df``'s index.
    """
    findings = _Findings(schema)
    findings.check_header([str(c) for c in df.columns])
    typed = findings.check_rows(df, offset=0)
    findings.raise_if_any()
    return pd.DataFrame(
        {name: pd.Series(values, index=df.index, name=name) for name, values in typed.items()},
        index=df.index,
    )


def _is_text(series: pd.Series) -> bool:
    return (
        series.dtype == object
        or isinstance(series.dtype, pd.StringDtype)
        or _arrow_text(series) is not None
    )


def _arrow_text(series: pd.Series) -> pa.Array | None:
    """The Arrow strings behind an Arrow-backed text column (streamed blocks), else None."""
    dtype = series.dtype
    if isinstance(dtype, pd.ArrowDtype):
        kind = dtype.pyarrow_dtype
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            return None
    elif not (isinstance(dtype, pd.StringDtype) and dtype.storage == "pyarrow"):
        return None
    chunks = series.array.__arrow_array__()  # the Arrow interchange protocol: no copy
    array = chunks.combine_chunks() if isinstance(chunks, pa.ChunkedArray) else chunks
    return array.cast(pa.string()) if array.type != pa.string() else array


def _null_mask(series: pd.Series) -> np.ndarray:
    arrow = _arrow_text(series)
    if arrow is not None:
        tokens = pc.is_in(arrow, value_set=pa.array(NULL_TOKENS, type=pa.string()))
        return pc.or_(arrow.is_null(), tokens).to_numpy(zero_copy_only=False)
    null = series.isna().to_numpy(dtype=bool)
    if _is_text(series):
        null = null | series.isin(NULL_TOKENS).to_numpy(dtype=bool)
    return null


def _sample(series: pd.Series, mask: np.ndarray) -> str | None:
    """The first offending value as the user wrote it (strings quoted)."""
    if not mask.any():
        return None
    value = series.iloc[int(np.argmax(mask))]
    if not isinstance(value, str):
        return str(value)
    return repr(value if len(value) <= _SAMPLE_CHARS else value[: _SAMPLE_CHARS - 3] + "...")


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
    if checker.found:
        return None
    if col.type is ColumnType.INTEGER:
        if exact is None:
            exact = np.rint(np.where(null, 0.0, values))
        return pd.arrays.IntegerArray(exact.astype(np.int64), null.copy())
    return np.where(null, np.nan, values)


def _text_array(series: pd.Series, null: np.ndarray) -> pa.Array:
    """Values as an Arrow string array (null where ``null``), for fast C++ string kernels."""
    arrow = _arrow_text(series)
    if arrow is not None:
        if (null & ~arrow.is_null().to_numpy(zero_copy_only=False)).any():
            arrow = pc.if_else(pa.array(null), pa.scalar(None, type=pa.string()), arrow)
        return arrow
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
    arrow = _arrow_text(series)
    if arrow is not None:  # (null tokens are masked by ``null`` below)
        found = pc.index_in(arrow, value_set=pa.array(levels, type=pa.string()))
        codes = pc.fill_null(found, -1).to_numpy(zero_copy_only=False)
        text = series
    else:
        if series.dtype == object and pd.api.types.infer_dtype(series, skipna=True) == "string":
            text = series  # already strings (CSV)
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
    if checker.found:
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
