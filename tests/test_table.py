"""Reading tables (CSV, Parquet) and validating them against a schema."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedsynth.generative.schema import Schema
from fedsynth.generative.table import (
    TableError,
    check_table,
    load_table,
    read_table,
    validate_table,
)
from fedsynth.generative.tablefile import TableFile

SCHEMA = Schema(
    columns=[
        {"name": "customer_id", "type": "integer", "role": "identifier"},
        {"name": "default", "type": "categorical", "role": "target", "categories": ["No", "Yes"]},
        {"name": "grade", "type": "categorical", "categories": ["B", "A", "1"], "nullable": True},
        {"name": "balance", "type": "float", "min": 0.0, "max": 3000.0},
        {"name": "age", "type": "integer", "min": 18, "max": 100, "nullable": True},
        {"name": "student", "type": "boolean", "nullable": True},
        {
            "name": "opened",
            "type": "datetime",
            "min": "2015-01-01",
            "max": "2016-01-01",
            "nullable": True,
        },
    ]
)

CSV_TEXT = """customer_id,default,grade,balance,age,student,opened
101,No,A,10.5,30,yes,2015-03-01 10:00:00
102,Yes,B,0,18,No,2015-12-31
103,No,,3000,,,NA
104,No,1,2999.5,100.0,TRUE,2015-06-01T12:30:00
105,Yes,NA,1.25,45,0,2015-01-01
"""


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return path


def good_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "customer_id": [1, 2, 3, 4],
            "default": ["No", "Yes", "No", "No"],
            "grade": ["A", None, "B", "A"],
            "balance": [1.0, 2.0, 3.0, 4.0],
            "age": [20, 30, 40, 50],
            "student": [True, False, True, False],
            "opened": pd.to_datetime(["2015-01-02", "2015-02-03", "2015-03-04", "2015-04-05"]),
        }
    )


def problems_of(df: pd.DataFrame, schema: Schema = SCHEMA) -> TableError:
    with pytest.raises(TableError) as info:
        validate_table(df, schema)
    return info.value


# --- the typed frame ---------------------------------------------------------------------


def test_csv_typed_frame_dtypes_and_values(tmp_path: Path) -> None:
    df = read_table(write(tmp_path / "t.csv", CSV_TEXT))
    assert all(dtype == np.dtype(object) for dtype in df.dtypes)  # CSV is read as text
    typed = validate_table(df, SCHEMA)

    # identifiers checked then dropped; modelled columns in schema order
    assert list(typed.columns) == ["default", "grade", "balance", "age", "student", "opened"]
    assert str(typed["age"].dtype) == "Int64"
    assert typed["balance"].dtype == np.float64
    assert str(typed["student"].dtype) == "boolean"
    assert typed["opened"].dtype == np.dtype("datetime64[ns]")
    for name, levels in [("default", ["No", "Yes"]), ("grade", ["B", "A", "1"])]:
        assert isinstance(typed[name].dtype, pd.CategoricalDtype)
        assert list(typed[name].cat.categories) == levels

    assert typed["age"].tolist()[:2] == [30, 18] and typed["age"].isna().tolist()[2]
    assert typed["age"].iloc[3] == 100
    assert typed["student"].tolist() == [True, False, pd.NA, True, False]
    assert typed["grade"].isna().tolist() == [False, False, True, False, True]
    assert typed["opened"].iloc[3] == pd.Timestamp("2015-06-01 12:30:00")
    assert pd.isna(typed["opened"].iloc[2])
    assert typed["balance"].tolist() == [10.5, 0.0, 3000.0, 2999.5, 1.25]


def test_input_frame_is_not_modified() -> None:
    df = good_frame()
    before = df.copy()
    typed = validate_table(df, SCHEMA)
    pd.testing.assert_frame_equal(df, before)
    typed.loc[0, "balance"] = 99.0
    assert df.loc[0, "balance"] == 1.0


def test_native_values_are_accepted() -> None:
    df = good_frame()
    df["default"] = pd.Categorical(df["default"])
    df["grade"] = [1, None, 1, 1]  # a numeric category equals its string "1"
    df["age"] = [20.0, 30.0, np.nan, 50.0]  # whole floats are integers
    df["student"] = [1, 0, 1, 0]
    typed = validate_table(df, SCHEMA)
    assert typed["grade"].tolist()[0] == "1"
    assert typed["age"].isna().tolist() == [False, False, True, False]
    assert typed["student"].tolist() == [True, False, True, False]


def test_parquet_round_trip(tmp_path: Path) -> None:
    typed = validate_table(read_table(write(tmp_path / "t.csv", CSV_TEXT)), SCHEMA)
    for suffix in (".parquet", ".pq"):
        path = tmp_path / f"t{suffix}"
        with_id = typed.assign(customer_id=[1, 2, 3, 4, 5])
        with_id.to_parquet(path)
        again = validate_table(read_table(path), SCHEMA)
        pd.testing.assert_frame_equal(again, typed)


def test_csv_round_trip(tmp_path: Path) -> None:
    typed = validate_table(good_frame(), SCHEMA)
    path = tmp_path / "out.csv"
    typed.assign(customer_id=range(4)).to_csv(path, index=False)
    pd.testing.assert_frame_equal(validate_table(read_table(path), SCHEMA), typed)


def test_index_is_kept() -> None:
    df = good_frame().set_axis([10, 20, 30, 40])
    assert validate_table(df, SCHEMA).index.tolist() == [10, 20, 30, 40]


# --- value problems ------------------------------------------------------------------------


def test_out_of_bounds_message_names_column_rows_and_sample() -> None:
    df = good_frame()
    df = pd.concat([df] * 3, ignore_index=True)  # 12 rows
    df["balance"] = df["balance"].astype(object)
    df.loc[[1, 5, 9], "balance"] = ["3120.5", "4000", "3000.01"]
    df.loc[2, "balance"] = -1
    error = problems_of(df)
    message = str(error)
    assert "column 'balance': 3 values above max 3000.0 at rows 2, 6, 10 (e.g. 3120.5)" in message
    assert "column 'balance': 1 value below min 0.0 at row 3 (e.g. -1)" in message
    kinds = {(p.column, p.kind): p for p in error.problems}
    above = kinds[("balance", "above_max")]
    assert above.count == 3 and above.rows == (2, 6, 10)


def test_all_problems_are_collected_in_one_error() -> None:
    df = good_frame().drop(columns=["customer_id"])
    df["extra"] = 1
    df["default"] = ["No", "Maybe", "No", "Perhaps"]
    df["age"] = ["20", "3.5", "x", "17"]
    df["student"] = ["yes", "nope", None, "t"]
    df["opened"] = ["2015-01-01", "yesterday", "2016-02-01", None]
    df["balance"] = [1.0, None, 2.0, 3.0]
    error = problems_of(df)
    lines = str(error).splitlines()
    assert lines[0] == "table does not match the schema (9 problems):"
    by_kind = {(p.column, p.kind) for p in error.problems}
    assert by_kind == {
        ("customer_id", "missing_column"),
        ("extra", "extra_column"),
        ("default", "unknown_category"),
        ("age", "wrong_type"),
        ("age", "below_min"),
        ("student", "wrong_type"),
        ("opened", "wrong_type"),
        ("opened", "above_max"),
        ("balance", "null"),
    }
    text = str(error)
    assert "column 'customer_id' (identifier): declared in the spec but missing" in text
    assert "column 'extra': not declared in the spec" in text
    assert "column 'default': 2 values not among the declared categories at rows 2, 4 " in text
    assert "(e.g. 'Maybe'); declared: 'No', 'Yes'" in text
    assert "column 'age': 2 values of the wrong type (not a whole number) at rows 2, 3" in text
    assert "column 'age': 1 value below min 18 at row 4 (e.g. 17)" in text
    assert "column 'student': 1 value of the wrong type" in text and "(e.g. 'nope')" in text
    assert "column 'opened': 1 value of the wrong type (not an ISO 8601" in text
    assert "column 'opened': 1 value after max 2016-01-01 at row 3 (e.g. 2016-02-01" in text
    assert "column 'balance': 1 null value (the column is not nullable) at row 2" in text


def test_only_first_five_rows_are_listed() -> None:
    df = pd.concat([good_frame()] * 5, ignore_index=True)
    df["default"] = "Nope"
    error = problems_of(df)
    (problem,) = error.problems
    assert problem.count == 20 and problem.rows == (1, 2, 3, 4, 5)
    assert "20 values not among the declared categories at rows 1, 2, 3, 4, 5, ..." in str(error)


def test_null_tokens_and_non_nullable() -> None:
    df = good_frame().astype({"balance": object})
    df.loc[[0, 3], "balance"] = ["", "NA"]
    error = problems_of(df)
    assert "column 'balance': 2 null values (the column is not nullable) at rows 1, 4" in str(error)


def test_integer_accepts_whole_numbers_only() -> None:
    df = good_frame().astype({"age": object})
    df["age"] = ["3e1", " 40 ", 50.0, "60"]
    assert validate_table(df, SCHEMA)["age"].tolist() == [30, 40, 50, 60]
    df["age"] = ["30", "30.5", "inf", "nan"]
    (wrong,) = problems_of(df).problems
    assert (wrong.kind, wrong.rows, wrong.count) == ("wrong_type", (2, 3, 4), 3)


def test_float_rejects_text() -> None:
    df = good_frame().astype({"balance": object})
    df.loc[2, "balance"] = "12,5"
    (problem,) = problems_of(df).problems
    assert problem.kind == "wrong_type" and problem.rows == (3,)
    assert "(e.g. '12,5')" in problem.message


def test_boolean_spellings() -> None:
    df = pd.concat([good_frame()] * 3, ignore_index=True)
    spellings = ["true", "False", "YES", "no", "1", "0", "t", "F", " True ", "", None, "NA"]
    df["student"] = spellings
    got = validate_table(df, SCHEMA)["student"]
    assert got.tolist()[:9] == [True, False, True, False, True, False, True, False, True]
    assert got.isna().tolist()[9:] == [True, True, True]
    df["student"] = [2, 0, 1, 1] * 3
    assert problems_of(df).problems[0].rows == (1, 5, 9)


def test_datetime_bounds_and_timezones() -> None:
    df = good_frame().astype({"opened": object})
    df["opened"] = ["2015-01-01", "2015-06-01T02:00:00+02:00", "2014-12-31 23:59:59", None]
    error = problems_of(df)
    (problem,) = error.problems
    assert problem.kind == "below_min" and problem.rows == (3,)
    assert "before min 2015-01-01 at row 3 (e.g. 2014-12-31 23:59:59)" in problem.message
    df.loc[2, "opened"] = "2016-01-01"  # max is inclusive
    typed = validate_table(df, SCHEMA)
    assert typed["opened"].iloc[1] == pd.Timestamp("2015-06-01 00:00:00")  # to UTC, naive


def test_datetime_mixed_offsets_do_not_leak_onto_naive_values() -> None:
    df = good_frame().astype({"opened": object})
    df["opened"] = ["2015-06-01T02:00:00+02:00", "2015-03-01 10:00:00", "2015-03-02T00:00Z", None]
    typed = validate_table(df, SCHEMA)
    assert typed["opened"].tolist()[:3] == [
        pd.Timestamp("2015-06-01 00:00:00"),
        pd.Timestamp("2015-03-01 10:00:00"),
        pd.Timestamp("2015-03-02 00:00:00"),
    ]


def test_parquet_aware_timestamps_become_naive_utc(tmp_path: Path) -> None:
    df = good_frame()
    df["opened"] = df["opened"].dt.tz_localize("America/New_York")
    path = tmp_path / "t.parquet"
    df.to_parquet(path)
    typed = validate_table(read_table(path), SCHEMA)
    assert typed["opened"].dtype == np.dtype("datetime64[ns]")
    assert typed["opened"].iloc[0] == pd.Timestamp("2015-01-02 05:00:00")


def test_datetime_format_is_accepted() -> None:
    schema = Schema(
        columns=[
            {"name": "t", "type": "datetime", "min": "2015-01-01", "max": "2016-01-01",
             "format": "%d/%m/%Y %H:%M"},
        ]
    )  # fmt: skip
    df = pd.DataFrame({"t": ["31/12/2015 23:00", "2015-03-04 05:06:07"]})
    assert validate_table(df, schema)["t"].tolist() == [
        pd.Timestamp("2015-12-31 23:00"),
        pd.Timestamp("2015-03-04 05:06:07"),
    ]


def test_missing_and_duplicate_columns() -> None:
    df = good_frame().drop(columns=["balance"])
    (problem,) = problems_of(df).problems
    assert (problem.column, problem.kind) == ("balance", "missing_column")
    df = pd.concat([good_frame(), good_frame()[["age"]]], axis=1)
    (problem,) = problems_of(df).problems
    assert (problem.column, problem.kind) == ("age", "duplicate_column")


def test_identifiers_are_dropped_but_required() -> None:
    typed = validate_table(good_frame(), SCHEMA)
    assert "customer_id" not in typed.columns
    (problem,) = problems_of(good_frame().drop(columns=["customer_id"])).problems
    assert (problem.column, problem.kind) == ("customer_id", "missing_column")


def test_vectorised_on_a_million_rows() -> None:
    n = 1_000_000
    rng = np.random.default_rng(0)
    balances = np.array([f"{x:.2f}" for x in rng.uniform(0, 3000, 1000)], dtype=object)
    stamps = pd.date_range("2015-01-01", "2015-12-31", periods=1000).astype(str).to_numpy()
    df = pd.DataFrame(
        {
            "customer_id": rng.choice(balances, n),
            "default": rng.choice(np.array(["No", "Yes"], dtype=object), n),
            "grade": rng.choice(np.array(["A", "B", ""], dtype=object), n),
            "balance": rng.choice(balances, n),
            "age": rng.choice(np.array([str(a) for a in range(18, 101)], dtype=object), n),
            "student": rng.choice(np.array(["yes", "no", "NA"], dtype=object), n),
            "opened": rng.choice(stamps.astype(object), n),
        }
    )
    start = time.perf_counter()
    typed = validate_table(df, SCHEMA)
    elapsed = time.perf_counter() - start
    assert len(typed) == n
    assert elapsed < 30, f"validate_table took {elapsed:.1f}s for 10^6 rows"


# --- reading -------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TableError, match="no such file"):
        read_table(tmp_path / "nope.csv")


def test_unsupported_suffix(tmp_path: Path) -> None:
    with pytest.raises(TableError, match=r"unsupported file type '\.xlsx'.*\.csv, \.parquet"):
        read_table(write(tmp_path / "t.xlsx", "a\n1\n"))


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_empty_file(tmp_path: Path, suffix: str) -> None:
    with pytest.raises(TableError, match="the file is empty"):
        read_table(write(tmp_path / f"t{suffix}", b""))


def test_header_only(tmp_path: Path) -> None:
    with pytest.raises(TableError, match="header but no data rows"):
        read_table(write(tmp_path / "t.csv", "a,b,c\n"))


def test_parquet_without_rows(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pd.DataFrame({"a": pd.Series([], dtype="float64")}).to_parquet(path)
    with pytest.raises(TableError, match="header but no data rows"):
        read_table(path)


def test_non_utf8_csv_names_offset_and_line(tmp_path: Path) -> None:
    data = b"name,city\nAnna,Berlin\n" + "Zoé,Orléans\n".encode("latin-1")
    with pytest.raises(TableError) as info:
        read_table(write(tmp_path / "t.csv", data))
    message = str(info.value)
    assert "not UTF-8" in message
    assert "byte 0xe9 at byte offset 24 (line 3)" in message


def test_utf8_bom_is_skipped(tmp_path: Path) -> None:
    df = read_table(write(tmp_path / "t.csv", b"\xef\xbb\xbfa,b\n1,\xc3\xa9\n"))
    assert list(df.columns) == ["a", "b"] and df.loc[0, "b"] == "é"


def test_csv_keeps_text_and_reads_only_empty_and_na_as_null(tmp_path: Path) -> None:
    df = read_table(write(tmp_path / "t.csv", "a,b,c\n007,NA,\nnull,None,n/a\n"))
    assert df["a"].tolist() == ["007", "null"]
    assert df["b"].isna().tolist() == [True, False]
    assert df["c"].isna().tolist() == [True, False]


def test_duplicate_csv_header(tmp_path: Path) -> None:
    with pytest.raises(TableError, match=r"duplicate column names in the header: \['a'\]"):
        read_table(write(tmp_path / "t.csv", "a,b,a\n1,2,3\n"))


def test_ragged_csv(tmp_path: Path) -> None:
    with pytest.raises(TableError, match="not a valid CSV file"):
        read_table(write(tmp_path / "t.csv", "a,b\n1,2\n3,4,5\n"))


def test_truncated_parquet(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    good_frame().to_parquet(path)
    data = path.read_bytes()
    write(path, data[: len(data) // 2])
    with pytest.raises(TableError, match="not a readable Parquet file"):
        read_table(path)


def test_csv_named_parquet_is_corrupt(tmp_path: Path) -> None:
    with pytest.raises(TableError, match="not a readable Parquet file"):
        read_table(write(tmp_path / "t.pq", CSV_TEXT))


def test_table_error_is_a_value_error() -> None:
    assert issubclass(TableError, ValueError)


# --- streamed validation (check_table, load_table) ---------------------------------------


def _text_table(n: int) -> pd.DataFrame:
    """``n`` valid rows for SCHEMA, as text (what a CSV holds)."""
    rng = np.random.default_rng(7)
    return pd.DataFrame(
        {
            "customer_id": [str(i) for i in range(n)],
            "default": rng.choice(["No", "Yes"], n),
            "grade": rng.choice(["A", "B", "1", ""], n),
            "balance": [f"{x:.2f}" for x in rng.uniform(0, 3000, n)],
            "age": [str(a) for a in rng.integers(18, 101, n)],
            "student": rng.choice(["yes", "no", ""], n),
            "opened": [str(d.date()) for d in pd.Timestamp("2015-01-01") + pd.to_timedelta(
                rng.integers(0, 365, n), unit="D")],
        }
    )  # fmt: skip


def _with_problems(df: pd.DataFrame) -> pd.DataFrame:
    """Problems spread over the table (0-based positions; data rows are one more)."""
    df = df.copy()
    df.loc[[6, 2499, 4998], "balance"] = ["3001", "9999.5", "3000.01"]
    df.loc[9, "balance"] = ""
    df.loc[[1199, 3332], "default"] = ["Maybe", "maybe"]
    df.loc[3999, "age"] = "forty"
    df.loc[4997, "opened"] = "2014-12-31"
    return df


def _problems(error: TableError) -> list[tuple]:
    return [(p.column, p.kind, p.rows, p.count, p.sample, p.message) for p in error.problems]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_streamed_check_reports_what_the_in_memory_check_reports(
    tmp_path: Path, suffix: str
) -> None:
    df = _with_problems(_text_table(5000))
    path = tmp_path / f"t{suffix}"
    if suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path, row_group_size=700)
    with TableFile(path, block_bytes=4096) as source:
        assert sum(1 for _ in source.batches()) >= 8  # the problems lie in different blocks
    with pytest.raises(TableError) as in_memory:
        validate_table(read_table(path), SCHEMA)
    with pytest.raises(TableError) as streamed:
        check_table(path, SCHEMA, block_bytes=4096)
    assert _problems(streamed.value) == _problems(in_memory.value)
    assert str(streamed.value) == str(in_memory.value)
    text = str(streamed.value)
    assert "column 'balance': 3 values above max 3000.0 at rows 7, 2500, 4999 (e.g. 3001)" in text
    assert "column 'balance': 1 null value (the column is not nullable) at row 10" in text
    assert "column 'default': 2 values not among the declared categories at rows 1200, 3333" in text
    assert "column 'age': 1 value of the wrong type (not a whole number) at row 4000" in text
    assert "column 'opened': 1 value before min 2015-01-01 at row 4998" in text


def test_streamed_check_lists_the_first_rows_over_all_blocks(tmp_path: Path) -> None:
    df = _text_table(3000)
    df.loc[[5, 1501, 2998, 2999], "age"] = "17"
    df.loc[range(100, 3000, 100), "age"] = "101"  # 29 rows, one every ~2 blocks
    path = tmp_path / "t.csv"
    df.to_csv(path, index=False)
    with pytest.raises(TableError) as info:
        check_table(path, SCHEMA, block_bytes=4096)
    below, above = info.value.problems
    assert (below.kind, below.rows, below.count) == ("below_min", (6, 1502, 2999, 3000), 4)
    assert (above.kind, above.rows, above.count) == ("above_max", (101, 201, 301, 401, 501), 29)


def test_streamed_check_reports_header_problems_and_counts_rows(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    _text_table(2000).drop(columns=["customer_id"]).assign(extra="x").to_csv(path, index=False)
    with pytest.raises(TableError) as info:
        check_table(path, SCHEMA, block_bytes=4096)
    assert [(p.column, p.kind) for p in info.value.problems] == [
        ("customer_id", "missing_column"),
        ("extra", "extra_column"),
    ]
    _text_table(2000).to_csv(path, index=False)
    assert check_table(path, SCHEMA, block_bytes=4096) == 2000


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_load_table_is_the_typed_frame_of_the_whole_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"t{suffix}"
    df = _text_table(3000)
    if suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        validate_table(df, SCHEMA).assign(customer_id=range(3000)).to_parquet(
            path, row_group_size=400
        )
    loaded = load_table(path, SCHEMA, block_bytes=4096)
    pd.testing.assert_frame_equal(loaded, validate_table(read_table(path), SCHEMA))
    assert loaded.index.equals(pd.RangeIndex(3000))


def test_a_streamed_file_error_names_the_data_row(tmp_path: Path) -> None:
    lines = ["a,b"] + ["1,2"] * 5000 + ["3,4,5"] + ["1,2"] * 10
    path = write(tmp_path / "t.csv", "\n".join(lines) + "\n")
    schema = Schema(columns=[{"name": n, "type": "integer", "min": 0, "max": 9} for n in "ab"])
    with pytest.raises(TableError, match="data row 5001: Expected 2 columns, got 3"):
        check_table(path, schema, block_bytes=4096)


def test_non_utf8_byte_deep_in_a_streamed_file_names_offset_and_line(tmp_path: Path) -> None:
    head = b"name,city\n" + b"Anna,Berlin\n" * 20000
    path = write(tmp_path / "t.csv", head + "Zoé,Orléans\n".encode("latin-1"))
    schema = Schema(
        columns=[{"name": n, "type": "categorical", "categories": ["x"]} for n in ("name", "city")]
    )
    with pytest.raises(TableError) as info:
        check_table(path, schema, block_bytes=4096)
    offset = len(head) + 2
    assert f"byte 0xe9 at byte offset {offset} (line 20002)" in str(info.value)


def test_quoted_values_may_span_lines(tmp_path: Path) -> None:
    df = read_table(write(tmp_path / "t.csv", 'a,b\n1,"x\ny"\n2,z\n'))
    assert df.to_dict("list") == {"a": ["1", "2"], "b": ["x\ny", "z"]}


def test_an_unclosed_quote_is_reported(tmp_path: Path) -> None:
    text = "a,b\n" + "1,2\n" * 3000 + '3,"4\n' + "1,2\n" * 3000
    schema = Schema(columns=[{"name": n, "type": "integer", "min": 0, "max": 9} for n in "ab"])
    with pytest.raises(TableError, match="a row longer than the block of 4096 bytes"):
        check_table(write(tmp_path / "t.csv", text), schema, block_bytes=4096)


def test_a_long_bad_value_is_shortened_in_the_message(tmp_path: Path) -> None:
    df = good_frame().astype({"balance": object})
    df.loc[1, "balance"] = "x" * 10_000
    (problem,) = problems_of(df).problems
    assert problem.sample == repr("x" * 47 + "...")
