"""Bad input: every bad table or spec is refused before anything is trained or written, with
a message that names the column, row, key or field to fix.

Each bad table is refused the same way by the streamed check (``check_table``), by
``fedsynth train`` (no model directory appears) and by a node (its ledger is not touched);
a delta too large for the node's row count is refused before training with the row count
in the message. The last tests validate large files in a subprocess and measure its peak
memory: a few-MB file always, a 2 GB file in the slow suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.task_identity import TaskIdentity
from typer.testing import CliRunner

from fedsynth.cli import app as cli
from fedsynth.generative.spec import FederationSpec, load_spec, parse_spec
from fedsynth.generative.table import TableError, check_table, read_table, validate_table
from fedsynth.privacy import protocol
from tests.factories import FEDERATIONS

BANK = FEDERATIONS / "bank.toml"
HOSPITAL = FEDERATIONS / "hospital.toml"
ROWS = 400


def bank_text(n: int = ROWS, seed: int = 0) -> pd.DataFrame:
    """A valid table for federations/bank.toml, as text (what a CSV holds)."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "default": rng.choice(["No", "Yes"], n),
            "student": rng.choice(["No", "Yes"], n),
            "balance": [f"{x:.2f}" for x in rng.uniform(0, 3000, n)],
            "income": [f"{x:.2f}" for x in rng.uniform(0, 80000, n)],
        }
    )


def _csv(df: pd.DataFrame) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        path = folder / "bank.csv"
        df.to_csv(path, index=False)
        return path

    return write


def _bytes(name: str, data: bytes) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(data)
        return path

    return write


def _truncated_parquet(folder: Path) -> Path:
    path = folder / "bank.parquet"
    bank_text().to_parquet(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _changed(**cells: tuple[int, str]) -> pd.DataFrame:
    df = bank_text()
    for column, (row, value) in cells.items():
        df.loc[row - 1, column] = value  # ``row`` counts data rows from 1, as messages do
    return df


_HEADER = b"default,student,balance,income\n"
_LATIN1 = _HEADER + b"No,No,1.0,2.0\n" * 3 + "Non,No,é,2.0\n".encode("latin-1")

#: name -> (how to write the file, what the message must say)
BAD_TABLES: dict[str, tuple[Callable[[Path], Path], list[str]]] = {
    "missing column": (
        _csv(bank_text().drop(columns=["income"])),
        ["column 'income': declared in the spec but missing from the table"],
    ),
    "extra column": (
        _csv(bank_text().assign(ssn="123-45-6789")),
        ["column 'ssn': not declared in the spec"],
    ),
    "wrong type": (
        _csv(_changed(balance=(3, "12,5"))),
        ["column 'balance': 1 value of the wrong type (not a number) at row 3 (e.g. '12,5')"],
    ),
    "out of bounds": (
        _csv(_changed(income=(7, "90000"))),
        ["column 'income': 1 value above max 80000.0 at row 7 (e.g. 90000)"],
    ),
    "unknown category": (
        _csv(_changed(student=(5, "Maybe"))),
        ["column 'student': 1 value not among the declared categories at row 5 (e.g. 'Maybe')"],
    ),
    "null where not allowed": (
        _csv(_changed(default=(2, ""))),
        ["column 'default': 1 null value (the column is not nullable) at row 2"],
    ),
    "empty file": (_bytes("bank.csv", b""), ["bank.csv: the file is empty"]),
    "header only": (
        _bytes("bank.csv", _HEADER),
        ["bank.csv: the table has a header but no data rows"],
    ),
    "not UTF-8": (
        _bytes("bank.csv", _LATIN1),
        [f"bank.csv: not UTF-8 text: byte 0xe9 at byte offset {len(_LATIN1) - 6} (line 5)"],
    ),
    "truncated Parquet": (
        _truncated_parquet,
        ["bank.parquet: not a readable Parquet file (truncated or corrupt?)"],
    ),
    "duplicate column": (
        _bytes("bank.csv", b"default,student,balance,balance\nNo,No,1.0,2.0\n"),
        ["bank.csv: duplicate column names in the header: ['balance']"],
    ),
    "ragged row": (
        _bytes("bank.csv", _HEADER + b"No,No,1.0,2.0\nNo,No,1.0,2.0,3.0\n"),
        ["bank.csv: not a valid CSV file: CSV parse error: data row 2: Expected 4 columns"],
    ),
}
CASES = list(BAD_TABLES)


def _flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines at the terminal width


@pytest.fixture(autouse=True)
def task_identity():
    """Flower stamps messages with the running task's identity; the test is the server."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


# --- tables ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_a_bad_table_is_refused_naming_what_to_fix(tmp_path: Path, case: str) -> None:
    write, expected = BAD_TABLES[case]
    path = write(tmp_path)
    schema = load_spec(BANK).schema
    with pytest.raises(TableError) as streamed:
        check_table(path, schema, block_bytes=4096)
    with pytest.raises(TableError) as in_memory:
        validate_table(read_table(path), schema)
    for fragment in expected:
        assert fragment in str(streamed.value)
    assert str(streamed.value) == str(in_memory.value)


@pytest.mark.parametrize("case", CASES)
def test_train_refuses_a_bad_table_and_writes_nothing(tmp_path: Path, case: str) -> None:
    write, expected = BAD_TABLES[case]
    out = tmp_path / "model"
    args = ["train", "--spec", str(BANK), "--data", str(write(tmp_path)), "--out", str(out)]
    result = CliRunner().invoke(cli, args, env={"FEDSYNTH_HOME": str(tmp_path / "home")})
    assert result.exit_code == 2, result.output
    for fragment in expected:
        assert fragment in _flat(result.output)
    assert "training" not in result.output  # refused before training started
    assert not out.exists()


def _spec_with_delta(delta: float) -> FederationSpec:
    raw = load_spec(BANK).model_dump(mode="python")
    raw["privacy"]["delta"] = delta
    return parse_spec(raw)


def test_train_refuses_a_delta_too_large_for_the_rows(tmp_path: Path) -> None:
    spec = tmp_path / "bank.toml"
    spec.write_text(BANK.read_text().replace("delta = 1e-5", "delta = 0.01"))
    data = _csv(bank_text())(tmp_path)
    out = tmp_path / "model"
    args = ["train", "--spec", str(spec), "--data", str(data), "--out", str(out)]
    result = CliRunner().invoke(cli, args, env={"FEDSYNTH_HOME": str(tmp_path / "home")})
    assert result.exit_code == 2, result.output
    assert (
        "privacy.delta = 0.01 must be below 1/rows = 0.0025 (400 rows); a larger delta "
        "allows releasing a whole row" in _flat(result.output)
    )
    assert not out.exists()


# --- a node ----------------------------------------------------------------------------


def _node(folder: Path, data: Path) -> Context:
    config = {
        "institution": "bank-a",
        "data-path": str(data),
        "ledger-path": str(folder / "node" / "ledger.json"),
        "outbox-path": str(folder / "node" / "outbox.jsonl"),
        "epsilon-cap": 5.0,
    }
    return Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={})


def _config(spec: FederationSpec) -> dict:
    from fedsynth.server.app import spec_json

    return {protocol.SPEC: spec_json(spec), protocol.RUN: 1, protocol.ROUND: 1}


def _query(context: Context, spec: FederationSpec) -> dict:
    from fedsynth.clients import app as node_app

    content = RecordDict({protocol.CONFIG: ConfigRecord(_config(spec))})
    reply = node_app.query(Message(content, dst_node_id=7, message_type="query"), context)
    return dict(reply.content.config_records[protocol.CONFIG])


def _local_note(context: Context) -> str:
    """The full reason a node did not take part, which only its own outbox keeps."""
    from fedsynth.clients.outbox import LOCAL_NOTE_RECORD

    return str(context.state.config_records[LOCAL_NOTE_RECORD]["detail"])


@pytest.mark.parametrize("case", ["unknown category", "missing column", "truncated Parquet"])
def test_a_node_with_a_bad_table_answers_invalid_and_keeps_its_ledger_untouched(
    tmp_path: Path, case: str
) -> None:
    write, expected = BAD_TABLES[case]
    context = _node(tmp_path, write(tmp_path))
    answer = _query(context, load_spec(BANK))
    assert answer[protocol.STATUS] == protocol.INVALID
    kinds = {"unknown category": "unknown_category", "missing column": "missing_column"}
    column = {"unknown category": "student", "missing column": "income"}
    sent = [(kinds[case], column[case])] if case in kinds else [("unreadable_table", "")]
    assert protocol.decode_problems(answer[protocol.PROBLEMS]) == sent
    # what to fix, with rows and values, stays in the node's outbox note
    note = _local_note(context)
    for fragment in expected:
        assert fragment in note and fragment not in repr(answer)
    assert not (tmp_path / "node").exists()  # no ledger, no lock file


def test_a_node_refuses_to_train_on_a_bad_table_before_touching_its_ledger(
    tmp_path: Path,
) -> None:
    from fedsynth.clients import app as node_app
    from fedsynth.generative import rounds

    spec = load_spec(BANK)
    context = _node(tmp_path, _csv(_changed(income=(7, "-1")))(tmp_path))
    arrays = rounds.pack(rounds.get_arrays(rounds.initial_model(spec)))
    fitins = FitIns(ndarrays_to_parameters(arrays), _config(spec))
    message = Message(
        compat.fitins_to_recorddict(fitins, True), dst_node_id=7, message_type="train"
    )
    with pytest.raises(node_app.NodeInvalid, match=r"below the declared min \(column 'income'\)"):
        node_app.train(message, context)
    note = _local_note(context)
    assert "column 'income': 1 value below min 0.0 at row 7" in note
    assert not (tmp_path / "node").exists()


def test_a_node_refuses_a_delta_too_large_for_its_rows(tmp_path: Path) -> None:
    spec = _spec_with_delta(0.01)
    context = _node(tmp_path, _csv(bank_text())(tmp_path))
    answer = _query(context, spec)
    assert answer[protocol.STATUS] == protocol.INVALID
    assert protocol.decode_problems(answer[protocol.PROBLEMS]) == [("row_count", "")]
    note = _local_note(context)
    assert "privacy.delta = 0.01 must be below 1/rows = 0.0025 (400 rows)" in note
    assert "400" not in repr(answer)  # the node's row count stays on the node
    assert not (tmp_path / "node").exists()


def test_node_join_refuses_a_delta_too_large_for_its_rows(tmp_path: Path) -> None:
    spec = tmp_path / "bank.toml"
    spec.write_text(BANK.read_text().replace("delta = 1e-5", "delta = 0.01"))
    data = _csv(bank_text())(tmp_path)
    ledger = tmp_path / "node" / "ledger.json"
    args = ["--superlink", "127.0.0.1:1", "--ledger", str(ledger), "--insecure"]
    args += ["--data", str(data), "--cap", "1", "--institution", "a", "--spec", str(spec)]
    # In a subprocess: on success node-join would become flower-supernode.
    done = subprocess.run(
        [sys.executable, "-m", "fedsynth.deploy", "node-join", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "privacy.delta = 0.01 must be below 1/rows = 0.0025 (400 rows)" in _flat(done.stderr)
    assert not ledger.parent.exists()


# --- large files: streamed validation in bounded memory -----------------------------------

# Validates a file in a fresh process and prints what it found and its peak memory (RSS, KiB).
# A warm-up run over a prefix brings the process to its steady state first (lazy imports,
# Arrow kernels, the CSV reader's read-ahead of up to 32 blocks), so the growth of the peak
# measures what the rest of the file costs. With "whole" the same file is then read and
# validated whole, for comparison.
_VALIDATE = """
import json, resource, sys, time
from fedsynth.generative.spec import load_spec
from fedsynth.generative.table import TableError, check_table, read_table, validate_table

spec, path, warm, block, whole = sys.argv[1:6]
schema = load_spec(spec).schema
def peak():
    # VmHWM, this process image's peak RSS. (ru_maxrss is no use here: Linux carries
    # the parent's peak over fork and exec, so the child would report pytest's.)
    try:
        with open("/proc/self/status") as status:
            return next(int(l.split()[1]) for l in status if l.startswith("VmHWM:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    check_table(warm, schema, block_bytes=int(block))
except TableError:
    pass
result = {"warm_kib": peak()}
start = time.perf_counter()
try:
    result["rows"] = check_table(path, schema, block_bytes=int(block))
except TableError as exc:
    result["error"] = str(exc)
    result["problems"] = [[p.column, p.kind, list(p.rows), p.count] for p in exc.problems]
result["seconds"] = time.perf_counter() - start
result["peak_kib"] = peak()
if whole == "whole":
    try:
        validate_table(read_table(path), schema)
    except TableError:
        pass
    result["whole_peak_kib"] = peak()
print(json.dumps(result))
"""


def _validate_in_subprocess(
    spec: Path, path: Path, warm: Path, block: int, whole: bool = False
) -> dict:
    args = [str(spec), str(path), str(warm), str(block), "whole" if whole else "-"]
    done = subprocess.run(
        [sys.executable, "-c", _VALIDATE, *args],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _bank_csv_lines(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    columns = [
        np.array(["No", "Yes"])[rng.integers(0, 2, n)],
        np.array(["No", "Yes"])[rng.integers(0, 2, n)],
        np.char.mod("%.4f", rng.uniform(0, 3000, n)),
        np.char.mod("%.4f", rng.uniform(0, 80000, n)),
    ]
    lines = columns[0]
    for column in columns[1:]:
        lines = np.char.add(np.char.add(lines, ","), column)
    return lines.tolist()


def test_streamed_check_of_a_few_mb_names_absolute_rows_in_bounded_memory(
    tmp_path: Path,
) -> None:
    n = 200_000  # 5.5 MB of CSV: 84 blocks of 64 KiB
    lines = _bank_csv_lines(n, seed=1)
    bad = {3: "Maybe,No,1.0,1.0", 100_001: "No,No,-5.0,1.0", 199_999: "No,No,1.0,90000.5"}
    for row, line in bad.items():
        lines[row - 1] = line
    path = tmp_path / "bank.csv"
    path.write_text("default,student,balance,income\n" + "\n".join(lines) + "\n")
    warm = tmp_path / "warm.csv"  # the first half: 42 blocks
    warm.write_text("default,student,balance,income\n" + "\n".join(lines[: n // 2]) + "\n")

    found = _validate_in_subprocess(BANK, path, warm, block=64 * 1024, whole=True)

    assert found["problems"] == [
        ["default", "unknown_category", [3], 1],
        ["balance", "below_min", [100_001], 1],
        ["income", "above_max", [199_999], 1],
    ]
    # The streamed check of the whole file costs a few MB over the warm-up on its first
    # half (measured 2-7 MB, whatever the file size); reading it whole costs about 100 MB.
    streamed = found["peak_kib"] - found["warm_kib"]
    whole = found["whole_peak_kib"] - found["warm_kib"]
    assert streamed < 16 * 1024 and streamed * 5 < whole, found


@pytest.mark.slow
def test_a_2_gb_table_is_validated_in_bounded_memory(tmp_path: Path) -> None:
    from fedsynth.demo.data import prepare_demo_tables

    demo = prepare_demo_tables(tmp_path / "demo", names=["hospital"])["hospital"]
    header, body = demo.read_bytes().split(b"\n", 1)
    rows_per_copy = body.count(b"\n")
    copies = (2 << 30) // len(body) + 1
    first = body.split(b"\n", 1)[0].split(b",")
    columns = header.decode().split(",")
    gender = columns.index("gender")
    bad_line = b",".join([*first[:gender], b"martian", *first[gender + 1 :]]) + b"\n"
    path = tmp_path / "hospital-2gb.csv"
    try:
        start = time.perf_counter()
        with path.open("wb") as handle:
            handle.write(header + b"\n")
            for _ in range(copies):
                handle.write(body)
            handle.write(bad_line)  # near the end: a few thousand good rows follow
            tail = body[: body.index(b"\n", 500_000) + 1]
            handle.write(tail)
        size = path.stat().st_size
        written = time.perf_counter() - start
        bad_row = copies * rows_per_copy + 1
        rows = bad_row + tail.count(b"\n")
        assert size > 2 << 30

        found = _validate_in_subprocess(HOSPITAL, path, demo, block=1 << 20)
    finally:
        path.unlink(missing_ok=True)

    sys.stderr.write(  # shown with pytest -s; the figures go into docs
        f"\n2 GB check: {size / 2**30:.2f} GiB, {rows:,} rows (bad value at row {bad_row:,}), "
        f"written in {written:.0f} s, "
        f"validated in {found['seconds']:.0f} s ({size / 2**20 / found['seconds']:.0f} MiB/s), "
        f"peak RSS {found['peak_kib'] / 1024:.0f} MiB (after warm-up "
        f"{found['warm_kib'] / 1024:.0f} MiB)\n"
    )
    assert found["problems"] == [["gender", "unknown_category", [bad_row], 1]]
    message = f"column 'gender': 1 value not among the declared categories at row {bad_row}"
    assert message in found["error"]
    assert "(e.g. 'martian')" in found["error"]
    assert found["peak_kib"] < 1 << 20, found  # under 1 GiB for a file over 2 GiB
