"""Streaming writers: valid CSV/Parquet/NDJSON, chunk by chunk, provenance in Parquet."""

import io
import json
import threading
import time

import pandas as pd
import pyarrow.parquet as pq
import pytest

from fedsynth.generative.export import format_for_path, iter_encoded, read_ahead, write_file
from fedsynth.generative.training import train
from tests.factories import small_frame, small_spec


@pytest.fixture(scope="module")
def model():
    return train(small_frame(), small_spec("vae", steps=3))


@pytest.mark.parametrize("fmt", ["csv", "parquet", "ndjson"])
def test_chunked_output_equals_the_sampled_rows(model, fmt):
    chunks = list(
        iter_encoded(
            model.iter_samples(2500, seed=4, chunk_size=1000),
            model.schema,
            fmt,
            {"synthetic": "true", "model": "m1"},
        )
    )
    assert len(chunks) >= 3  # bytes leave chunk by chunk, not at the end
    data = b"".join(chunks)
    expected = model.sample(2500, seed=4, chunk_size=1000)
    if fmt == "csv":
        got = pd.read_csv(io.BytesIO(data))
    elif fmt == "parquet":
        table = pq.read_table(io.BytesIO(data))
        provenance = json.loads(table.schema.metadata[b"fedsynth"])
        assert provenance == {"synthetic": "true", "model": "m1"}
        got = table.to_pandas()
    else:
        got = pd.read_json(io.BytesIO(data), lines=True)
    assert list(got.columns) == list(expected.columns) and len(got) == 2500
    pd.testing.assert_series_equal(got["ward"].astype(str), expected["ward"].astype(str))
    pd.testing.assert_series_equal(
        got["cost"], expected["cost"], check_dtype=False, rtol=1e-9, check_names=False
    )
    # datetimes are written in the column's declared format (%Y-%m-%d)
    first = got["admitted"].dropna().iloc[0]
    assert str(first)[:10] == expected["admitted"].dropna().iloc[0].strftime("%Y-%m-%d")


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".ndjson"])
def test_zero_rows_still_make_a_valid_file(model, tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    write_file(model.iter_samples(0), model.schema, path, {"synthetic": "true"})
    assert path.exists() and not path.with_name(path.name + ".partial").exists()
    if suffix == ".parquet":
        assert pq.read_table(path).num_rows == 0
    if suffix == ".csv":
        assert path.read_text().startswith('"ward"')


def test_unknown_output_format_is_refused():
    with pytest.raises(ValueError, match="unknown output format 'xlsx'"):
        format_for_path("rows.xlsx")


def test_read_ahead_keeps_order_and_stays_within_its_depth():
    made: list[int] = []

    def items():
        for i in range(50):
            made.append(i)
            yield i

    seen = []
    for item in read_ahead(items(), depth=2):
        time.sleep(0.002)
        # At most the item being handed over, `depth` queued and the one consumed.
        assert len(made) - len(seen) <= 2 + 2
        seen.append(item)
    assert seen == list(range(50))


def test_read_ahead_raises_the_producers_error_in_its_place():
    def items():
        yield 1
        yield 2
        raise ValueError("bad chunk")

    got = []
    with pytest.raises(ValueError, match="bad chunk"):
        for item in read_ahead(items(), depth=3):
            got.append(item)
    assert got == [1, 2]


def test_read_ahead_stops_its_worker_when_the_consumer_stops():
    made: list[int] = []

    def items():
        for i in range(10_000):
            made.append(i)
            yield i

    stream = read_ahead(items(), depth=2)
    assert next(stream) == 0
    stream.close()  # as when a client disconnects mid-stream
    deadline = time.time() + 5
    while any(t.name == "fedsynth-read-ahead" for t in threading.enumerate()):
        assert time.time() < deadline, "worker still running after the consumer stopped"
        time.sleep(0.05)
    assert len(made) < 10
