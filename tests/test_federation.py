"""A real federated run in Flower's simulation engine (Ray), checked from every side.

One run, shared by the tests of this module: the bank federation over four nodes for two
rounds with SecAgg+, node 3 capped below one round's cost (so it refuses), and node 0's
table carrying a canary row whose values a client mod looks for in every outgoing message.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable
from sqlalchemy import select, text
from typer.testing import CliRunner

from fedsynth.cli import app as cli
from fedsynth.demo.data import prepare_demo_tables
from fedsynth.demo.nodes import dirichlet_split, write_nodes
from fedsynth.demo.simulate import simulate
from fedsynth.generative.accounting import epsilon_of
from fedsynth.generative.spec import load_spec
from fedsynth.generative.table import read_table
from fedsynth.privacy.keys import KeyStore
from fedsynth.privacy.ledger import PrivacyLedger
from fedsynth.server.audit import AuditLog
from fedsynth.server.records import Database, Participation, RoundRecord, database_url
from fedsynth.server.registry import ModelRegistry, RegistryError
from tests.factories import FEDERATIONS

CANARY = {"balance": 2718.2818, "income": 31415.926}
ROUNDS = 2


def canary_patterns() -> list[bytes]:
    out = []
    for value in CANARY.values():
        out += [struct.pack("<f", value), struct.pack("<d", value), repr(value).encode()]
        out.append(f"{value:.2f}".encode())
    return out


def leaks(message: Message) -> list[str]:
    """Where a message holds a canary value (raw float32/64 bytes or its text)."""
    if not message.has_content():
        return []
    found = []
    patterns = canary_patterns()
    content = message.content
    for name, record in content.array_records.items():
        for key, array in record.items():
            if any(p in array.data for p in patterns):
                found.append(f"array {name}.{key}")
    for records in (content.config_records, content.metric_records):
        for name, record in records.items():
            for key, value in record.items():
                values = value if isinstance(value, list) else [value]
                blob = b"".join(v if isinstance(v, bytes) else str(v).encode() for v in values)
                if any(p in blob for p in patterns):
                    found.append(f"record {name}.{key}")
    return found


def make_canary_mod(log: Path):
    def canary_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(message, context)
        with log.open("a") as f:
            f.write(json.dumps({"type": message.metadata.message_type, "leaks": leaks(reply)}))
            f.write("\n")
        return reply

    return canary_mod


def bank_nodes(home: Path, last_cap: float) -> Path:
    """The bank table dealt to four nodes (cap 2.0; the last one ``last_cap``), node 0's
    first row replaced by the canary."""
    tables = prepare_demo_tables(home / "data", names=("bank",))
    parts = dirichlet_split(read_table(tables["bank"]), "default", 4, seed=1)
    canary_row = parts[0].iloc[[0]].copy()
    canary_row["balance"], canary_row["income"] = str(CANARY["balance"]), str(CANARY["income"])
    parts[0] = pd.concat([canary_row, parts[0].iloc[1:]], ignore_index=True)
    nodes = home / "nodes"
    write_nodes("bank", parts, nodes, epsilon_cap=2.0)
    config = nodes / "node-3" / "node.toml"
    config.write_text(config.read_text().replace("epsilon-cap = 2.0", f"epsilon-cap = {last_cap}"))
    assert str(CANARY["balance"]) in (nodes / "node-0" / "data.csv").read_text()
    return nodes


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    nodes = bank_nodes(home, last_cap=0.05)
    canary_log = home / "canary.jsonl"
    outcome = simulate(
        FEDERATIONS / "bank.toml",
        nodes,
        4,
        home,
        rounds=ROUNDS,
        steps=8,
        extra_mods=[make_canary_mod(canary_log)],
    )
    db = Database(database_url(home))
    return {"home": home, "nodes": nodes, "outcome": outcome, "db": db, "canary": canary_log}


def test_run_completes_and_registers_a_verifiable_model_that_samples(run):
    home, outcome = run["home"], run["outcome"]
    assert outcome.status == "completed" and outcome.model_id == "bank-v1"
    registry = ModelRegistry(home / "registry", KeyStore(home / "keys"), run["db"])
    model = registry.load(outcome.model_id)
    rows = model.sample(500, seed=3)
    assert list(rows.columns) == ["default", "student", "balance", "income"]
    assert rows["balance"].between(0, 3000).all()
    assert model.sample(50, seed=1).equals(registry.load(outcome.model_id).sample(50, seed=1))
    nodes = model.metadata["privacy"]["nodes"]
    assert sorted(nodes) == ["bank-a", "bank-b", "bank-c"]  # bank-d refused
    assert model.metadata["training"]["rounds"] == ROUNDS


def test_each_ledger_grows_every_round_and_equals_a_recomputation(run):
    spec = load_spec(FEDERATIONS / "bank.toml")
    for i in range(3):
        ledger = PrivacyLedger(run["nodes"] / f"node-{i}" / "ledger.json")
        entries = ledger.section("bank")["entries"]
        trains = [e for e in entries if e["kind"] == "train"]
        assert [e["round"] for e in trains] == list(range(1, ROUNDS + 1))
        after = [e["epsilon_after"] for e in entries]
        assert all(b > a for a, b in zip(after, after[1:], strict=False))
        history = [h for e in entries for h in e["history"]]
        recomputed = epsilon_of(history, spec.privacy.delta, spec.privacy.accountant)
        assert recomputed == pytest.approx(after[-1], rel=1e-9)
        assert recomputed == pytest.approx(ledger.epsilon("bank", spec.privacy.delta))
        assert recomputed <= spec.privacy.target_epsilon * 1.01


def test_the_node_over_its_cap_refused_and_the_refusal_is_recorded(run):
    ledger = PrivacyLedger(run["nodes"] / "node-3" / "ledger.json")
    section = ledger.section("bank")
    assert section["entries"] == []  # it never spent anything
    assert [r["round"] for r in section["refusals"]] == list(range(1, ROUNDS + 1))
    with run["db"].session() as s:
        refused = s.scalars(select(Participation).where(Participation.status == "refused")).all()
        assert {(p.node, p.round) for p in refused} == {("bank-d", r) for r in range(1, ROUNDS + 1)}
        trained = s.scalars(select(Participation).where(Participation.status == "trained")).all()
        assert len(trained) == 3 * ROUNDS and {p.epsilon_cap for p in trained} == {2.0}
        rounds = s.scalars(select(RoundRecord)).all()
        assert [(r.round, r.status, r.participants) for r in rounds] == [
            (r, "completed", 3) for r in range(1, ROUNDS + 1)
        ]
    events = AuditLog(run["db"]).events(event_type="node_refused_budget")
    assert {(e.actor, e.payload["round"]) for e in events} == {
        ("bank-d", r) for r in range(1, ROUNDS + 1)
    }
    assert all(e.payload["would_reach"] > e.payload["cap"] == 0.05 for e in events)


def test_no_canary_value_ever_left_a_node(run):
    lines = [json.loads(line) for line in run["canary"].read_text().splitlines()]
    assert len(lines) >= ROUNDS * 3 * 5  # queries, four SecAgg+ stages, evaluations
    assert {line["type"] for line in lines} == {"query", "train", "evaluate"}
    assert [line for line in lines if line["leaks"]] == []


def test_the_canary_detector_finds_a_raw_row(run):
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    row = np.array([CANARY["balance"], CANARY["income"]], dtype=np.float32)
    as_array = Message(RecordDict({"a": ArrayRecord([row])}), dst_node_id=1, message_type="train")
    as_text = Message(
        RecordDict({"c": ConfigRecord({"row": f"Yes,No,{CANARY['balance']:.2f}"})}),
        dst_node_id=1,
        message_type="train",
    )
    assert leaks(as_array) and leaks(as_text)


def test_secure_aggregation_was_used_and_recorded(run):
    events = AuditLog(run["db"]).events(event_type="round_completed")
    assert len(events) == ROUNDS and all(e.payload["secure_aggregation"] for e in events)
    assert AuditLog(run["db"]).events(event_type="secure_aggregation_off") == []
    outbox = (run["nodes"] / "node-0" / "outbox.jsonl").read_text().splitlines()
    trains = [json.loads(line) for line in outbox if '"train"' in line]
    # Every train reply went through SecAgg+ (its config record), none held plain arrays.
    assert trains and all("secaggplus_configs" in t["content"]["configs"] for t in trains)
    assert all(not any(t["content"]["arrays"].values()) for t in trains)


def test_cli_lists_models_and_verifies_then_detects_tampering(run, monkeypatch):
    monkeypatch.setenv("FEDSYNTH_HOME", str(run["home"]))
    runner = CliRunner()
    listed = runner.invoke(cli, ["models", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    models = json.loads(listed.stdout)
    assert [m["id"] for m in models] == ["bank-v1"]
    assert models[0]["sector"] == "bank" and models[0]["kind"] == "gan"
    assert 0 < models[0]["epsilon"] <= 1.01 and models[0]["version"] == 1
    ok = runner.invoke(cli, ["audit", "verify"])
    assert ok.exit_code == 0 and "verified" in ok.stdout
    with run["db"].session() as s:
        s.execute(text("UPDATE audit_events SET payload_json = '{}' WHERE seq = 2"))
    broken = runner.invoke(cli, ["audit", "verify"])
    assert broken.exit_code == 1 and "entry 2" in broken.stdout


def test_a_flipped_byte_in_the_registered_model_is_refused(run):
    home = run["home"]
    weights = next((home / "registry" / "bank" / "v1").glob("weights*.enc"))
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    weights.write_bytes(bytes(blob))
    with pytest.raises(RegistryError):
        ModelRegistry(home / "registry", KeyStore(home / "keys"), run["db"]).load("bank-v1")
