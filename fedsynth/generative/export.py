"""Streaming writers for synthetic rows: CSV, Parquet and NDJSON with constant memory.

Chunks of typed frames go through Arrow: pyarrow's CSV writer is about 10x faster than
``DataFrame.to_csv`` (measured 2M vs 170k rows/s here), and Parquet files carry the
provenance (model, epsilon, "synthetic") in their key-value metadata.

Generating a chunk (torch) and encoding the one before (Arrow) both release the GIL, so
:func:`iter_encoded` lets a worker thread generate up to ``READ_AHEAD`` chunks ahead while it
encodes: two cores work on one stream, and memory stays bounded by those few chunks.
"""

from __future__ import annotations

import io
import json
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from fedsynth.generative.codec import Codec
from fedsynth.generative.schema import ColumnType, Schema

FORMATS = ("csv", "parquet", "ndjson")
#: Chunks a stream generates ahead of the one being encoded.
READ_AHEAD = 2
T = TypeVar("T")


def format_for_path(path: str | Path) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    fmt = {
        "csv": "csv",
        "parquet": "parquet",
        "pq": "parquet",
        "ndjson": "ndjson",
        "jsonl": "ndjson",
    }
    if suffix not in fmt:
        raise ValueError(f"{path}: unknown output format {suffix!r}; use .csv, .parquet or .ndjson")
    return fmt[suffix]


def to_arrow(frame: pd.DataFrame, schema: Schema) -> pa.Table:
    """Plain Arrow columns (strings, not dictionaries; datetimes in the declared format)."""
    arrays, names = [], []
    for column in schema.modelled:
        series = frame[column.name]
        if column.type is ColumnType.CATEGORICAL:
            array = pa.array(series.astype(object), type=pa.string(), from_pandas=True)
        elif column.type is ColumnType.DATETIME and column.format:
            array = pa.array(series.dt.strftime(column.format), type=pa.string(), from_pandas=True)
        else:
            array = pa.array(series, from_pandas=True)
        arrays.append(array)
        names.append(column.name)
    return pa.Table.from_arrays(arrays, names=names)


def iter_encoded(
    chunks: Iterable[pd.DataFrame],
    schema: Schema,
    fmt: str,
    provenance: dict[str, str],
    *,
    ahead: bool = True,
) -> Iterator[bytes]:
    """Serialise chunks one by one; the bytes of each chunk are yielded as soon as ready.

    ``ahead=False`` generates in the caller's thread: for a single chunk a worker thread
    only adds its start and hand-over to the request.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    sink = _Sink()
    writer: pa_csv.CSVWriter | pq.ParquetWriter | None = None
    arrow_schema = None
    for chunk in read_ahead(chunks, READ_AHEAD) if ahead else chunks:
        table = to_arrow(chunk, schema)
        if arrow_schema is None:
            arrow_schema = table.schema.with_metadata(
                {"fedsynth": json.dumps(provenance, sort_keys=True)}
            )
        table = table.cast(arrow_schema)
        if fmt == "ndjson":
            sink.write(_ndjson(table))
        elif fmt == "csv":
            writer = writer or pa_csv.CSVWriter(sink, table.schema)
            writer.write_table(table)
        else:
            writer = writer or pq.ParquetWriter(sink, arrow_schema, compression="snappy")
            writer.write_table(table)
        yield sink.take()
    if writer is None and fmt != "ndjson":  # zero rows: still a valid, empty file
        empty = to_arrow(Codec(schema).empty_frame(), schema)
        if fmt == "csv":
            pa_csv.write_csv(empty, sink)
        else:
            pq.write_table(empty, sink)
    elif writer is not None:
        writer.close()
    tail = sink.take()
    if tail:
        yield tail


def write_file(
    chunks: Iterable[pd.DataFrame], schema: Schema, path: str | Path, provenance: dict[str, str]
) -> int:
    """Write chunks to ``path`` atomically; returns the number of bytes written."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    written = 0
    with open(tmp, "wb") as handle:
        for data in iter_encoded(chunks, schema, format_for_path(path), provenance):
            handle.write(data)
            written += len(data)
    tmp.replace(path)
    return written


@dataclass(frozen=True)
class _Failed:
    error: BaseException


_DONE = object()


def read_ahead(items: Iterable[T], depth: int) -> Iterator[T]:
    """The items of ``items`` in order, produced by a worker thread up to ``depth`` ahead.

    The standard library has no bounded, cancellable prefetching iterator, hence this one.
    An error in ``items`` is raised here, at its place in the order. When the consumer stops
    early (a client disconnects), the worker stops after the item it is making.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    ready: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def hand_over(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not hand_over(item):
                    return
        except BaseException as error:  # handed to the consumer, raised there
            hand_over(_Failed(error))
            return
        hand_over(_DONE)

    worker = threading.Thread(target=produce, name="fedsynth-read-ahead", daemon=True)
    worker.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item  # type: ignore[misc]
    finally:
        stop.set()


class _Sink(io.RawIOBase):
    """Write-only stream that hands its bytes out on ``take()`` but keeps counting.

    Parquet footers hold absolute offsets taken from ``tell()``, so the position must
    keep growing even though the bytes already sent are dropped.
    """

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._position = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        chunk = bytes(data)
        self._parts.append(chunk)
        self._position += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._position

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


def _ndjson(table: pa.Table) -> bytes:
    frame = table.to_pandas()
    out = io.BytesIO()
    frame.to_json(out, orient="records", lines=True, date_format="iso")
    return out.getvalue()
