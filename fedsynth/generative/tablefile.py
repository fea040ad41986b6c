"""Opening a CSV or Parquet table file as a stream of Arrow record batches.

:class:`TableFile` is the one reader behind :func:`~fedsynth.generative.table.read_table`
(the whole file) and the streamed :func:`~fedsynth.generative.table.check_table` (one
block at a time): the same file gives the same columns, values and errors either way.

- CSV: Arrow's streaming reader, ``block_bytes`` of text per batch, every column read as
  text (UTF-8, an optional byte order mark is skipped); the empty string and ``NA`` are
  null (quoted or not), all other text is kept as written (``007`` stays ``'007'``).
- Parquet: ``ParquetFile.iter_batches``, about ``block_bytes`` of uncompressed data per
  batch (the row count comes from the file's own size statistics). Arrow decodes one row
  group at a time, so a file written with huge row groups needs memory for one of them.

Problems with the file itself (missing, empty, header only, not UTF-8, truncated, ragged
rows) raise :class:`TableError` naming the file and, where there is one, the byte offset
and line or the data row (1-based, the header not counted).
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import pyarrow as pa

if TYPE_CHECKING:
    from fedsynth.generative.table import Problem

#: Cell values read as null in CSV files (and in text columns of a frame).
NULL_TOKENS: tuple[str, ...] = ("", "NA")

#: Default text (CSV) or uncompressed data (Parquet) per batch of a streamed read.
BLOCK_BYTES = 1 << 20

CSV_SUFFIXES = frozenset({".csv"})
PARQUET_SUFFIXES = frozenset({".parquet", ".pq"})

_MIN_BLOCK_BYTES = 4096
_SCAN_BYTES = 1 << 20  # bytes read at a time while looking for a header or a bad byte
_MAX_HEADER_BYTES = 16 << 20
_ARROW_ROW = re.compile(r"Row #(\d+)")


class TableError(ValueError):
    """A table cannot be read or does not match its schema.

    ``problems`` lists what validation found (empty for reading errors).
    """

    def __init__(self, message: str, problems: Sequence[Problem] = ()) -> None:
        super().__init__(message)
        self.problems: list[Problem] = list(problems)


class TableFile:
    """``with TableFile(path) as table:`` then ``table.names`` and ``table.batches()``.

    Opening checks the suffix, that the file exists and is not empty or blank, and reads
    the header (CSV) or footer (Parquet); a duplicated column name is an error here
    because Arrow cannot tell such columns apart.
    """

    def __init__(self, path: str | Path, block_bytes: int = BLOCK_BYTES) -> None:
        if block_bytes < 1:
            raise ValueError(f"block_bytes must be positive, got {block_bytes}")
        self.path = Path(path)
        self.block_bytes = block_bytes
        suffix = self.path.suffix.lower()
        if suffix not in CSV_SUFFIXES | PARQUET_SUFFIXES:
            raise TableError(
                f"{self.path}: unsupported file type {self.path.suffix or '(no suffix)'!r}; "
                "use .csv, .parquet or .pq"
            )
        self.is_csv = suffix in CSV_SUFFIXES
        self.names: list[str] = []
        self.schema: pa.Schema | None = None
        self._reader: Any = None

    # ------------------------------------------------------------------ opening
    def __enter__(self) -> TableFile:
        self._check_not_empty()
        try:
            if self.is_csv:
                self._open_csv()
            else:
                self._open_parquet()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._reader is not None:
            close = getattr(self._reader, "close", None)
            if close is not None:
                close()
            self._reader = None

    def _error(self, what: str) -> TableError:
        return TableError(f"{self.path}: {what}")

    def _check_names(self) -> None:
        duplicated = sorted({n for n in self.names if self.names.count(n) > 1})
        if duplicated:
            where = " in the header" if self.is_csv else ""
            raise self._error(f"duplicate column names{where}: {duplicated}")

    def _check_not_empty(self) -> None:
        try:
            with self.path.open("rb") as handle:
                while chunk := handle.read(_SCAN_BYTES):
                    if chunk.strip():
                        return
        except FileNotFoundError:
            raise self._error("no such file") from None
        except IsADirectoryError:
            raise self._error("is a directory, not a table file") from None
        except OSError as exc:
            raise self._error(f"cannot be read ({exc.strerror or exc})") from None
        raise self._error("the file is empty")

    def _open_csv(self) -> None:
        import pyarrow.csv as pcsv

        self.names = self._csv_header()
        self._check_names()
        # Serial parsing: Arrow reports the row of a parse error only when not threaded.
        read = pcsv.ReadOptions(block_size=self.block_bytes, use_threads=False)
        parse = pcsv.ParseOptions(newlines_in_values=True)  # quoted values may span lines
        convert = pcsv.ConvertOptions(
            column_types={name: pa.string() for name in self.names},
            null_values=list(NULL_TOKENS),
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
        )
        try:
            self._reader = pcsv.open_csv(
                str(self.path), read_options=read, parse_options=parse, convert_options=convert
            )
        except (pa.ArrowException, OSError) as exc:
            raise self._csv_error(exc) from None
        self.schema = self._reader.schema
        if self.schema.names != self.names:  # a header Python's csv module reads otherwise
            raise self._error(f"cannot read the CSV header (columns {self.schema.names})")

    def _csv_header(self) -> list[str]:
        """The first line, read by Python's csv module (Arrow needs the names up front)."""
        with self.path.open("rb") as handle:
            head = b""
            while b"\n" not in head and len(head) < _MAX_HEADER_BYTES:
                chunk = handle.read(_SCAN_BYTES)
                if not chunk:
                    break
                head += chunk
        line = head.split(b"\n", 1)[0]
        # Arrow needs the header within the first block (and rows within one block)
        self.block_bytes = max(self.block_bytes, _MIN_BLOCK_BYTES, 2 * (len(line) + 1))
        start = len(codecs.BOM_UTF8) if line.startswith(codecs.BOM_UTF8) else 0
        try:
            text = line[start:].decode("utf-8")
        except UnicodeDecodeError as exc:
            at = start + exc.start
            raise self._error(_not_utf8(head[at], at, 1, exc.reason)) from None
        try:
            return next(csv.reader(io.StringIO(text)))
        except (StopIteration, csv.Error) as exc:
            raise self._error(f"cannot read the CSV header ({exc})") from None

    def _open_parquet(self) -> None:
        import pyarrow.parquet as pq

        try:
            self._reader = pq.ParquetFile(str(self.path))
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise self._parquet_error(exc) from None
        self.schema = self._reader.schema_arrow
        # pandas stores a frame's index as columns; read_table turns them back into one
        index = (self.schema.pandas_metadata or {}).get("index_columns", [])
        hidden = {name for name in index if isinstance(name, str)}
        self.names = [name for name in self.schema.names if name not in hidden]
        self._check_names()

    # ------------------------------------------------------------------ reading
    def batches(self) -> Iterator[pa.RecordBatch]:
        """The data rows, batch by batch, in file order."""
        if self._reader is None:
            raise RuntimeError("TableFile.batches() outside 'with TableFile(...)'")
        if self.is_csv:
            yield from self._batches(iter(self._reader), self._csv_error)
        else:
            metadata = self._reader.metadata
            size = sum(
                metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups)
            )
            row_bytes = max(1, size // max(1, metadata.num_rows))
            rows = max(1, self.block_bytes // row_bytes)
            batches = self._reader.iter_batches(batch_size=rows, use_threads=False)
            yield from self._batches(batches, self._parquet_error)

    def _batches(self, batches: Iterator[pa.RecordBatch], error: Any) -> Iterator[pa.RecordBatch]:
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (pa.ArrowException, OSError, ValueError) as exc:
                raise error(exc) from None
            if batch.num_rows:
                yield batch

    def _csv_error(self, exc: Exception) -> TableError:
        message = str(exc).strip()
        if "UTF8" in message or "UTF-8" in message:
            found = _find_invalid_utf8(self.path)
            if found:
                return self._error(found)
        if "straddl" in message:
            return self._error(
                f"not a valid CSV file: a row longer than the block of {self.block_bytes} bytes "
                "(an unclosed quote?)"
            )
        # Arrow counts the header as row 1; data rows are counted from 1 below it.
        message = _ARROW_ROW.sub(lambda m: f"data row {int(m.group(1)) - 1}", message)
        return self._error(f"not a valid CSV file: {message}")

    def _parquet_error(self, exc: Exception) -> TableError:
        return self._error(f"not a readable Parquet file (truncated or corrupt?): {exc}")


def _not_utf8(byte: int, offset: int, line: int, reason: str) -> str:
    return (
        f"not UTF-8 text: byte 0x{byte:02x} at byte offset {offset} (line {line}) is "
        f"invalid ({reason}); save the file as UTF-8"
    )


def _find_invalid_utf8(path: Path) -> str | None:
    """Where the first invalid UTF-8 byte is, found with bounded memory; None if none."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    done = lines = 0  # bytes and newlines in the chunks decoded so far
    with path.open("rb") as handle:
        while True:
            chunk = handle.read(_SCAN_BYTES)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                # exc.object: the decoder's undecoded tail of the last chunk (a partial
                # character, never a newline) followed by this chunk
                data, at = exc.object, exc.start
                offset = done - (len(data) - len(chunk)) + at
                line = lines + data.count(b"\n", 0, at) + 1
                return _not_utf8(data[at], offset, line, exc.reason)
            if not chunk:
                return None
            done += len(chunk)
            lines += chunk.count(b"\n")
