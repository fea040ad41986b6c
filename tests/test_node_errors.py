"""A node whose table breaks the schema, in a real federation (Flower's simulation engine):
nothing of the table reaches the coordinator, not even in the error.

Three bank nodes, SecAgg+ on, ``min_nodes = 3``. Node 2's table holds two planted values
that break the spec (a balance of 3512.7531 above its max 3000, a student status
"Maybe-7Q" outside its categories) at rows the node alone knows. The node refuses the
round; the round is skipped and the run fails. Every reply that left a node (a client mod
records each one), every file under the coordinator's home (records database, audit chain,
registry), every log record of the coordinator's process and the run's error are searched
for the planted values and for row numbers; the coordinator must still learn which
institution failed, the kind of each problem and the column, and its ``round_skipped``
event must name that cause. The node's own outbox keeps the full reason.

(In simulation the nodes run in Ray worker processes, whose output Ray forwards to the
same terminal; their log records are not the coordinator's, so the test reads the log
records of the coordinator's own process.)
"""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pandas as pd
import pytest
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedsynth.clients.outbox import read_outbox
from fedsynth.demo.nodes import write_nodes
from fedsynth.demo.simulate import simulate
from fedsynth.server.audit import AuditLog
from fedsynth.server.records import Database, Participation, Run, database_url
from fedsynth.server.secagg import RoundFailed
from tests.factories import FEDERATIONS

PLANTED = ("3512.7531", "Maybe-7Q")
PLANTED_ROWS = (137, 211)  # 1-based data rows of node 2's table
ROW_NUMBERS = re.compile(rb"\brows? \d")  # the table check's "at row 137", "at rows 1, 2"


def bank_part(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "default": rng.choice(["No", "Yes"], size=n, p=[0.9, 0.1]),
            "student": rng.choice(["No", "Yes"], size=n, p=[0.7, 0.3]),
            "balance": rng.uniform(0, 2500, size=n).round(2),
            "income": rng.uniform(1000, 70000, size=n).round(2),
        }
    )


def found_in(blob: bytes) -> list[str]:
    hits = [value for value in PLANTED if value.encode() in blob]
    return hits + (["row numbers"] if ROW_NUMBERS.search(blob) else [])


def reply_text(message: Message) -> bytes:
    """Everything a reply holds, as bytes: arrays, config and metric values, error reason."""
    if not message.has_content():
        return str(message.error.reason).encode()
    content = message.content
    parts = [a.data for r in content.array_records.values() for a in r.values()]
    for records in (content.config_records, content.metric_records):
        for name, record in records.items():
            parts.append(f"{name}: {dict(record)!r}".encode())
    return b"\n".join(parts)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("invalid")
    parts = [bank_part(300, seed) for seed in range(3)]
    bad = parts[2].astype({"balance": object, "student": object})
    bad.loc[PLANTED_ROWS[0] - 1, "balance"] = PLANTED[0]
    bad.loc[PLANTED_ROWS[1] - 1, "student"] = PLANTED[1]
    parts[2] = bad
    write_nodes("bank", parts, root / "nodes", epsilon_cap=2.0)
    assert all(v in (root / "nodes" / "node-2" / "data.csv").read_text() for v in PLANTED)

    # The mod runs in the nodes' Ray workers: it reports through a file.
    log_file = root / "replies.jsonl"

    def every_reply(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        kind = message.metadata.message_type
        try:
            reply = call_next(message, context)
        except Exception as exc:  # Flower sends the server the exception's text
            hits = found_in(str(exc).encode())
            raise
        else:
            hits = found_in(reply_text(reply))
            return reply
        finally:
            with log_file.open("a") as f:
                f.write(json.dumps({"type": kind, "hits": hits}) + "\n")

    handler = Records()
    watched = [logging.getLogger(), logging.getLogger("flwr")]
    for logger in watched:
        logger.addHandler(handler)
    home = root / "home"
    try:
        with pytest.raises(RoundFailed) as failure:
            simulate(FEDERATIONS / "bank.toml", root / "nodes", 3, home, extra_mods=[every_reply])
    finally:
        for logger in watched:
            logger.removeHandler(handler)
    return {
        "root": root,
        "home": home,
        "error": str(failure.value),
        "logs": handler.lines,
        "replies": [json.loads(line) for line in log_file.read_text().splitlines()],
        "db": Database(database_url(home)),
    }


def test_no_reply_of_any_node_holds_a_planted_value_or_a_row_number(failed_run):
    replies = failed_run["replies"]
    assert [r["type"] for r in replies] == ["query"] * 3  # the round was skipped
    assert [r for r in replies if r["hits"]] == []


def test_nothing_on_the_coordinator_holds_a_planted_value_or_a_row_number(failed_run):
    home = failed_run["home"]
    files = [p for p in home.rglob("*") if p.is_file()]
    assert home / "fedsynth.db" in files  # the records and the audit chain
    assert {str(p.relative_to(home)): found_in(p.read_bytes()) for p in files} == {
        str(p.relative_to(home)): [] for p in files
    }
    logs = "\n".join(failed_run["logs"])
    assert "bank-c (failed): cannot take part" in logs  # the ServerApp says why, no more
    assert found_in(logs.encode()) == []
    assert found_in(failed_run["error"].encode()) == []


def test_the_coordinator_learns_the_institution_the_kinds_and_the_columns(failed_run):
    audit = AuditLog(failed_run["db"])
    (invalid,) = audit.events(event_type="node_invalid")
    assert invalid.actor == "bank-c"  # the institution, not a Flower node id
    assert invalid.payload["problems"] == [
        {"kind": "unknown_category", "column": "student"},
        {"kind": "above_max", "column": "balance"},
    ]
    (skipped,) = audit.events(event_type="round_skipped")
    reason = skipped.payload["reason"]
    assert "2 node(s) accepted, fewer than federation.min_nodes = 3" in reason
    assert "bank-c (failed): cannot take part" in reason
    assert "values above the declared max (column 'balance')" in reason
    assert "within budget" not in reason  # the cause was the table, not a budget
    assert "values outside the declared categories (column 'student')" in failed_run["error"]
    with failed_run["db"].session() as s:
        (row,) = [p for p in s.query(Participation).all() if p.status == "failed"]
        assert row.node == "bank-c" and "column 'balance'" in row.detail
        assert s.query(Run).one().status == "failed"


def test_the_node_keeps_the_full_reason_in_its_own_outbox(failed_run):
    outbox = failed_run["root"] / "nodes" / "node-2" / "outbox.jsonl"
    entries = read_outbox(outbox)
    (entry,) = entries
    assert entry["status"] == "invalid"
    assert all(value in entry["local_detail"] for value in PLANTED)
    assert f"row {PLANTED_ROWS[0]}" in entry["local_detail"]
    for node in ("node-0", "node-1"):
        (accepted,) = read_outbox(failed_run["root"] / "nodes" / node / "outbox.jsonl")
        assert accepted["status"] == "accept" and "local_detail" not in accepted
