"""Faults in a federation: a node killed mid-round, the server killed mid-run.

Fast tests (seconds each) drive the real parts directly: a node's handlers with its real
ledger and release store, and the ServerApp's resume bookkeeping against a real records
database, registry and audit chain (no Flower runtime: the paths tested there need no
node). A ledger writer SIGKILLed mid-write is tests/test_ledger_properties.py's.

The slow test (``@pytest.mark.slow``) kills real processes of Flower's deployment engine
on loopback, with TLS and node authentication (the launch helpers of
``tests/test_deployment.py``): a SuperNode with its executor and app processes during a
SecAgg+ round, then the SuperLink with its ServerApp during the resumed run; it restarts
each and checks records, ledgers, checkpoints and the audit chain.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import (
    EvaluateIns,
    FitIns,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from fedsynth.clients import app as node_app
from fedsynth.clients.replay import ReleaseStore, ReplayError, digest
from fedsynth.generative import rounds
from fedsynth.privacy import protocol
from fedsynth.privacy.keys import KeyStore
from fedsynth.privacy.ledger import DuplicateRelease, PrivacyLedger
from fedsynth.server.app import FederationServer, RunNotResumable, ServerSettings, spec_json
from fedsynth.server.audit import AuditLog
from fedsynth.server.records import (
    Database,
    ModelVersionRecord,
    Participation,
    RoundRecord,
    Run,
    database_url,
)
from fedsynth.server.registry import ModelRegistry
from fedsynth.server.strategy import FederationStrategy, RoundLog
from tests.factories import FEDERATIONS, REPO

# Flower stamps messages with the running task's identity; the fixture of the handler tests
# stands in for it (autouse there, and here once imported).
from tests.test_client_app import _node, _spec, task_identity  # noqa: F401
from tests.test_deployment import (  # the deployment launch helpers
    CONNECTION,
    _running,
    flwr,
    free_port,
    marked_pids,
    node_join,
    stop_everything,
    wait_for_port,
)

DELTA = 1e-5


def _config(spec, key: str, round_: int = 1) -> dict:
    return {
        protocol.SPEC: spec_json(spec),
        protocol.RUN: 1,
        protocol.RUN_KEY: key,
        protocol.ROUND: round_,
    }


def _fit(context, spec, key, arrays, round_=1):
    """The node's train handler handed ``arrays`` (``rounds.get_arrays``' list) as the
    server sends them: packed into one vector."""
    fitins = FitIns(ndarrays_to_parameters(rounds.pack(arrays)), _config(spec, key, round_))
    message = Message(
        compat.fitins_to_recorddict(fitins, True), dst_node_id=7, message_type="train"
    )
    reply = node_app.train(message, context)
    return compat.recorddict_to_fitres(reply.content, keep_input=True)


def _evaluate(context, spec, key, arrays, round_=1):
    evalins = EvaluateIns(ndarrays_to_parameters(rounds.pack(arrays)), _config(spec, key, round_))
    message = Message(
        compat.evaluateins_to_recorddict(evalins, True), dst_node_id=7, message_type="evaluate"
    )
    return compat.recorddict_to_evaluateres(node_app.evaluate(message, context).content)


def _query(context, spec, key, round_):
    content = RecordDict({protocol.CONFIG: ConfigRecord(_config(spec, key, round_))})
    reply = node_app.query(Message(content, dst_node_id=7, message_type="query"), context)
    return dict(reply.content.config_records[protocol.CONFIG])


def _entries(tmp_path) -> list[dict]:
    return PrivacyLedger(tmp_path / "ledger.json").section("clinic").get("entries", [])


# ------------------------------------------------------------------------------ the node


def test_a_round_asked_again_is_resent_not_trained_or_spent_twice(tmp_path):
    context, spec, key = _node(tmp_path), _spec(secure=False), uuid.uuid4().hex
    start = rounds.get_arrays(rounds.initial_model(spec))
    first = _fit(context, spec, key, start)
    entries = _entries(tmp_path)
    assert [e["kind"] for e in entries] == ["release", "train"]
    # The ledger names the global model by the digest of its arrays (not of the packed
    # vector the message carried), so it matches the registry's checkpoint of the round.
    assert entries[-1]["input_sha256"] == digest(start)
    spent = PrivacyLedger(tmp_path / "ledger.json").epsilon("clinic", spec.privacy.delta)

    again = _fit(context, spec, key, start)  # the server restarted and asks round 1 again
    assert _entries(tmp_path) == entries  # no new entry: nothing trained, nothing spent
    assert first.parameters.tensors == again.parameters.tensors  # the very same bytes
    assert again.num_examples == first.num_examples
    assert again.metrics[protocol.RESENT] == 1 and first.metrics[protocol.RESENT] == 0
    assert again.metrics[protocol.EPSILON] == pytest.approx(spent)
    # Asked whether the round fits its budget, the node counts no new cost for it...
    answer = _query(context, spec, key, 1)
    assert answer[protocol.STATUS] == protocol.ACCEPT
    assert answer[protocol.AFTER] == pytest.approx(answer[protocol.SPENT])
    # ...and the next round costs one round's steps again.
    assert _query(context, spec, key, 2)[protocol.AFTER] > answer[protocol.SPENT]
    # Round 2 asked: round 1 (recorded done by the server) is never asked again, so its
    # stored update is dropped and only round 2's is kept.
    _fit(context, spec, key, parameters_to_ndarrays(first.parameters), round_=2)
    store = ReleaseStore(tmp_path / "ledger.json")
    kept = sorted(p.name for p in store.path("clinic", key, 1, "train").parent.iterdir())
    assert kept == ["round-2-train.safetensors"]


def test_a_round_asked_again_from_another_model_or_with_an_altered_update_is_refused(
    tmp_path,
):
    context, spec, key = _node(tmp_path), _spec(secure=False), uuid.uuid4().hex
    start = rounds.get_arrays(rounds.initial_model(spec))
    _fit(context, spec, key, start)
    entries = _entries(tmp_path)
    other = [a + np.float32(0.01) for a in start]
    with pytest.raises(ReplayError, match="from another global model"):
        _fit(context, spec, key, other)
    stored = ReleaseStore(tmp_path / "ledger.json").path("clinic", key, 1, "train")
    stored = stored.with_suffix(".safetensors")
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(ReplayError, match="does not match the ledger's digest"):
        _fit(context, spec, key, start)
    assert _entries(tmp_path) == entries  # refused twice, spent nothing
    # A new run (another key) is a new release, recorded as such.
    _fit(context, spec, uuid.uuid4().hex, start)
    assert [e["kind"] for e in _entries(tmp_path)] == ["release", "train", "train"]


def test_an_evaluation_asked_again_returns_the_same_scores_at_no_cost(tmp_path):
    context, spec, key = _node(tmp_path), _spec(secure=False), uuid.uuid4().hex
    start = rounds.get_arrays(rounds.initial_model(spec))
    _fit(context, spec, key, start)
    first = _evaluate(context, spec, key, start)
    entries = _entries(tmp_path)
    assert entries[-1]["kind"] == "evaluate" and first.metrics[protocol.RESENT] == 0
    again = _evaluate(context, spec, key, start)
    assert _entries(tmp_path) == entries
    assert again.metrics[protocol.RESENT] == 1 and again.loss == first.loss
    scores = {k: v for k, v in first.metrics.items() if k in entries[-1]["values"]}
    assert scores and all(again.metrics[k] == v for k, v in scores.items())
    # Another model under the same round: no scores rather than a second release.
    other = _evaluate(context, spec, key, [a * np.float32(0.5) for a in start])
    assert other.metrics[protocol.STATUS] == protocol.REFUSE and other.num_examples == 0
    assert _entries(tmp_path) == entries


def test_the_ledger_refuses_a_second_release_of_a_round_under_one_run_key(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    key = uuid.uuid4().hex
    ledger.spend("bank", "train", [(1.2, 0.05, 4)], delta=DELTA, round=1, run_key=key)
    with pytest.raises(DuplicateRelease, match=f"run {key} round 1"):
        ledger.spend("bank", "train", [(1.2, 0.05, 4)], delta=DELTA, round=1, run_key=key)
    ledger.spend("bank", "evaluate", [(3.0, 1.0, 1)], delta=DELTA, round=1, run_key=key)
    ledger.spend("bank", "train", [(1.2, 0.05, 4)], delta=DELTA, round=2, run_key=key)
    assert len(ledger.history("bank")) == 3
    assert ledger.released("bank", "train", key, 2)["round"] == 2
    assert ledger.released("bank", "train", key, 3) is None


# ------------------------------------------------------------------------------ the server


def _server(home: Path, name: str = "bank-q3", rounds_: int = 2) -> FederationServer:
    settings = ServerSettings(
        FEDERATIONS / "bank.toml", home, rounds=rounds_, steps=4, run_name=name
    )
    return FederationServer(settings)


def _trained(server: FederationServer, server_round: int, arrays) -> None:
    """What the ServerApp does after a round's aggregate: checkpoint, then record."""
    strategy = FederationStrategy(
        initial=ndarrays_to_parameters(arrays), min_nodes=3, secure=True, message_config={}
    )
    strategy.rounds[server_round] = RoundLog(
        fitted={
            f"bank-{n}": {protocol.EPSILON: 0.3 * server_round, protocol.DELTA: DELTA}
            for n in "abc"
        },
        aggregated=True,
    )
    server.registry.checkpoint("bank", server.run_id, server_round, arrays)
    server._record_round(server_round, "completed", datetime.now(UTC), strategy)


def _context(flower_run: int) -> Context:
    return Context(run_id=flower_run, node_id=0, node_config={}, state=RecordDict(), run_config={})


def test_a_named_run_resumes_under_its_record_and_key_from_its_last_recorded_round(tmp_path):
    home = tmp_path / "home"
    first = _server(home)
    first.flower_run = 11
    first.start_run()
    spec = first.spec
    model = rounds.get_arrays(rounds.initial_model(spec))
    _trained(first, 1, model)
    # Killed after checkpointing round 2 but before recording it: round 2 is not trusted.
    first.registry.checkpoint("bank", first.run_id, 2, [a + 1 for a in model])
    first._round_failed(2, datetime.now(UTC), RuntimeError("SIGKILL"))  # the earlier try

    again = _server(home)
    again.flower_run = 12
    again.start_run()
    assert (again.run_id, again.run_key) == (first.run_id, first.run_key)
    assert again.completed_rounds == 1
    loaded = again.registry.load_checkpoint("bank", again.run_id, again.completed_rounds)
    assert all(np.array_equal(a, b) for a, b in zip(loaded, model, strict=True))
    db = Database(database_url(home))
    with db.session() as s:
        runs = s.scalars(select(Run)).all()
        assert len(runs) == 1 and runs[0].status == "running"
        assert json.loads(runs[0].config_json)["attempts"] == 2
    resumed = AuditLog(db).events(event_type="run_resumed")
    assert [e.payload["completed_rounds"] for e in resumed] == [1]
    assert resumed[0].payload["flower_run"] == 12

    # The round that failed before completes now: one row, updated, not a second one.
    _trained(again, 2, [a + 2 for a in model])
    with db.session() as s:
        rows = s.scalars(select(RoundRecord).order_by(RoundRecord.round)).all()
        assert [(r.round, r.status) for r in rows] == [(1, "completed"), (2, "completed")]
    assert AuditLog(db).verify().ok

    # Another spec (here: rounds) under the same name is refused; so is a completed run.
    with pytest.raises(RunNotResumable, match="another spec"):
        _server(home, rounds_=3).start_run()
    again.finish_run("completed")
    with pytest.raises(RunNotResumable, match="has completed"):
        _server(home).start_run()
    # Without a name, every run is new.
    fresh = _server(home, name="")
    fresh.start_run()
    assert fresh.run_id != first.run_id and fresh.run_key != first.run_key


def test_a_server_killed_after_the_last_round_registers_one_model_on_resume(tmp_path):
    home = tmp_path / "home"
    first = _server(home)
    first.start_run()
    model = rounds.get_arrays(rounds.initial_model(first.spec))
    _trained(first, 1, model)

    class DiesBeforeAuditing(AuditLog):
        """The real audit log, in a process killed just before it appends ``event``."""

        def __init__(self, db, event: str) -> None:
            super().__init__(db)
            self.event = event

        def append(self, event_type, actor, payload):
            if event_type == self.event:
                raise SystemExit(f"killed before {event_type}")
            return super().append(event_type, actor, payload)

    # Killed after round 2 was checkpointed and recorded, before its audit event.
    first.audit = DiesBeforeAuditing(first.db, "round_completed")
    with pytest.raises(SystemExit):
        _trained(first, 2, [a * np.float32(0.5) for a in model])

    # Resumed: nothing left to train; the model is registered, but the process dies
    # before the audit event of the registration.
    resumed = _server(home)
    resumed.audit = DiesBeforeAuditing(resumed.db, "model_registered")
    with pytest.raises(SystemExit):
        resumed.run(None, _context(21))  # type: ignore[arg-type] -- no node needed
    db = Database(database_url(home))
    with db.session() as s:
        (model_id,) = s.scalars(select(ModelVersionRecord.id)).all()
        s.get(Run, resumed.run_id).status = "running"  # what SIGKILL would have left

    # Resumed again: the same model, not a second version; the run completes.
    assert _server(home).run(None, _context(22)) == model_id  # type: ignore[arg-type]
    registry = ModelRegistry(home / "registry", KeyStore(home / "keys"), db)
    loaded = registry.load(model_id)
    assert loaded.metadata["training"] == {
        "rounds": 2,
        "participants": ["bank-a", "bank-b", "bank-c"],
    }
    # each node's latest report (round 2's), as if the run had not been interrupted
    assert loaded.metadata["privacy"]["nodes"]["bank-a"]["epsilon"] == pytest.approx(0.6)
    assert np.allclose(rounds.get_arrays(loaded)[0], model[0] * 0.5)
    with db.session() as s:
        assert len(s.scalars(select(ModelVersionRecord)).all()) == 1
        assert s.get(Run, resumed.run_id).status == "completed"
        trained = s.scalars(select(Participation).where(Participation.status == "trained"))
        assert sorted((p.round, p.node) for p in trained) == [
            (r, f"bank-{n}") for r in (1, 2) for n in "abc"
        ]
    # The chain verifies and tells each round and the registration once; the two events
    # the kills cut off were appended on resume, marked recovered.
    audit = AuditLog(db)
    assert audit.verify().ok
    told = [
        (e.event_type, e.payload.get("round"), e.payload.get("recovered", False))
        for e in audit.events(limit=1000)
        if e.event_type in {"round_completed", "model_registered"}
    ]
    assert told == [
        ("round_completed", 1, False),
        ("round_completed", 2, True),
        ("model_registered", None, True),
    ]


# ------------------------------------------------------------------------------ real processes
#
# One scenario shared by the slow tests below, on Flower's deployment engine (loopback,
# TLS, node authentication), three SuperNodes, the bank federation, two rounds, run name
# RUN_NAME:
#
#   attempt 1  round 1 completes; in round 2, as soon as node 2's ledger holds its round-2
#              spend, node 2 (SuperNode, executor, app process) is SIGKILLed. SecAgg+ loses
#              a third of the sum and the round fails; the run is marked failed.
#   rejoin     node 2 restarts with the same key, ledger and table.
#   attempt 2  `flwr run` with the same run name resumes round 2; once node 0 has answered
#              the third SecAgg+ stage (its masked update), the SuperLink and the ServerApp
#              are SIGKILLed. The SuperLink restarts on its state; the nodes reconnect.
#   attempt 3  `flwr run` with the same run name resumes round 2 and completes the run.


NODES = 3
ROUNDS = 2
STEPS = 4
RUN_NAME = "faults-q3"
ROLE = "FEDSYNTH_FAULT_ROLE"
STAGE_DEADLINE_S = 1200  # a round takes 1.5 min on a quiet 2-core machine, 5 under load


def role_pids(marker: str, role: str) -> list[int]:
    """Live processes started for ``role`` (SuperNode or SuperLink, and the executors and
    app processes they started, which inherit the environment)."""
    tag = f"{ROLE}={role}".encode()
    found = []
    for pid in _running(marked_pids(marker)):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if tag in environ:
            found.append(pid)
    return found


def sigkill(marker: str, role: str) -> list[int]:
    pids = role_pids(marker, role)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def wait_until(what: str, check, deadline_s: float = STAGE_DEADLINE_S, every: float = 0.2):
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {deadline_s:g} s")


def run_status(home: Path) -> tuple[str, list[tuple[int, str]]] | None:
    """The named run's status and its rounds, from the ServerApp's records."""
    if not (home / "fedsynth.db").exists():
        return None
    try:
        db = Database(database_url(home))
    except OperationalError:  # "database is locked": the ServerApp is creating its tables
        return None
    try:
        with db.session() as s:
            runs = [
                r
                for r in s.scalars(select(Run)).all()
                if json.loads(r.config_json).get("name") == RUN_NAME
            ]
            if not runs:
                return None
            rows = s.scalars(select(RoundRecord).where(RoundRecord.run_id == runs[-1].id)).all()
            return runs[-1].status, sorted((r.round, r.status) for r in rows)
    except OperationalError:  # locked by a writer for longer than the busy timeout: poll again
        return None
    finally:
        db.dispose()


def ledger_entries(node: Path) -> list[dict]:
    try:
        return PrivacyLedger(node / "ledger.json").section("bank").get("entries", [])
    except Exception:  # noqa: BLE001 -- not written yet
        return []


def outbox(node: Path) -> list[dict]:
    path = node / "outbox.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def submit(home: Path, env: dict[str, str]) -> str:
    out = flwr(
        [
            "run",
            str(REPO),
            CONNECTION,
            "--format",
            "json",
            "--run-config",
            f"spec='bank' home='{home}' rounds={ROUNDS} steps={STEPS} wait-nodes-s=600 "
            f"run-name='{RUN_NAME}'",
        ],
        env,
    )
    return str(json.loads(out[out.index("{") :])["run-id"])


def flwr_json(args: list[str], env: dict[str, str], key: str) -> list[dict] | None:
    """``flwr ... --format json``'s ``key``; None while the SuperLink cannot answer (it is
    restarting: the command fails or reports ``success: false``)."""
    try:
        out = flwr([*args, "--format", "json"], env)
    except RuntimeError:
        return None
    answer = json.loads(out[out.index("{") :])
    return answer.get(key) if answer.get("success", True) else None


def online_nodes(env: dict[str, str]) -> int:
    nodes = flwr_json(["supernode", "list", CONNECTION], env, "nodes") or []
    return sum(n["status"] == "online" for n in nodes)


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    from fedsynth.demo.data import prepare_demo_tables
    from fedsynth.demo.nodes import dirichlet_split, write_nodes
    from fedsynth.deploy.certificates import create_node_key, create_server_certificates
    from fedsynth.deploy.launch import flower_environment, start_superlink, write_connection
    from fedsynth.generative.table import read_table

    root = tmp_path_factory.mktemp("faults")
    marker = f"FEDSYNTH_FAULTS_TEST={uuid.uuid4().hex}"
    base = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}

    def env(role: str, flwr_home: Path) -> dict[str, str]:
        return flower_environment(flwr_home, {**base, ROLE: role})

    certs = create_server_certificates(root / "certs")
    keys = [create_node_key(root / "keys", f"node-{i}") for i in range(NODES)]
    tables = prepare_demo_tables(root / "data", names=("bank",))
    parts = dirichlet_split(read_table(tables["bank"]), "default", NODES, seed=1)
    nodes = write_nodes("bank", parts, root / "nodes", epsilon_cap=5.0)
    home = root / "home"
    cli_env = env("cli", root / "flwr-cli")
    port = free_port()
    runtime_ports = [free_port() for _ in range(NODES)]
    processes: list[subprocess.Popen[bytes]] = []
    seen: dict = {"timings": {}, "flower_runs": []}
    t = seen["timings"]

    def start_link() -> None:
        link = start_superlink(
            certs, root / "superlink", port=port, env=env("superlink", root / "flwr-superlink")
        )
        processes.append(link)
        wait_for_port(port, link, timeout=120)

    def start_node(i: int) -> None:
        processes.append(
            node_join(
                nodes[i],
                keys[i].private_key,
                port,
                certs.ca_cert,
                runtime_ports[i],
                env(f"node-{i}", root / f"flwr-node-{i}"),
            )
        )

    def spent(i: int, kind: str, round_: int) -> list[dict]:
        return [e for e in ledger_entries(nodes[i]) if e["kind"] == kind and e["round"] == round_]

    try:
        start_link()
        write_connection(
            CONNECTION, f"127.0.0.1:{port}", certs.ca_cert, flwr_home=root / "flwr-cli"
        )
        for key in keys:
            flwr(["supernode", "register", str(key.public_key), CONNECTION], cli_env)
        for i in range(NODES):
            start_node(i)

        # attempt 1: round 1, then node 2 dies in round 2 right after recording its spend
        began = time.monotonic()
        seen["flower_runs"].append(submit(home, cli_env))
        wait_until("round 1", lambda: (run_status(home) or ("", []))[1] == [(1, "completed")])
        t["round_1_s"] = time.monotonic() - began
        wait_until("node 2's round-2 spend", lambda: spent(2, "train", 2), every=0.05)
        seen["node_killed"] = sigkill(marker, "node-2")
        killed_at = time.monotonic()
        seen["node_2_entry_at_kill"] = spent(2, "train", 2)
        failed = wait_until(
            "the round to fail",
            lambda: (s := run_status(home)) and s[0] == "failed" and s,
        )
        t["node_killed_to_round_failed_s"] = time.monotonic() - killed_at
        seen["after_node_fault"] = failed
        seen["checkpoints_after_node_fault"] = sorted(
            p.name for p in (home / "registry" / "bank" / "checkpoints").glob("run*/round*")
        )
        seen["ledgers_after_node_fault"] = [ledger_entries(n) for n in nodes]

        # node 2 rejoins
        restarted = time.monotonic()
        start_node(2)
        wait_until("node 2 online", lambda: online_nodes(cli_env) == NODES, every=2)
        t["node_restart_to_online_s"] = time.monotonic() - restarted

        # attempt 2: resumed, then the SuperLink and its ServerApp die mid-round
        began = time.monotonic()
        flower_run = submit(home, cli_env)
        seen["flower_runs"].append(flower_run)

        def masked_update_sent() -> bool:
            trains = [
                e for e in outbox(nodes[0]) if e["run"] == int(flower_run) and e["type"] == "train"
            ]
            return len(trains) >= 3  # setup, share keys, masked update

        wait_until("node 0's masked update in attempt 2", masked_update_sent, every=0.05)
        seen["server_killed"] = sigkill(marker, "superlink")
        t["attempt_2_until_kill_s"] = time.monotonic() - began
        seen["after_server_fault"] = run_status(home)
        wait_until("the server's processes to die", lambda: not role_pids(marker, "superlink"))
        restarted = time.monotonic()
        start_link()
        wait_until("the nodes to reconnect", lambda: online_nodes(cli_env) == NODES, every=2)
        t["superlink_restart_to_nodes_online_s"] = time.monotonic() - restarted

        # attempt 3: resumed again, completes
        began = time.monotonic()
        seen["flower_runs"].append(submit(home, cli_env))
        seen["final"] = wait_until(
            "the run to complete",
            lambda: (s := run_status(home)) and s[0] != "running" and s,
            every=2,
        )
        t["attempt_3_s"] = time.monotonic() - began
        seen["online_at_end"] = online_nodes(cli_env)

        def flower_runs() -> list[dict] | None:
            runs = flwr_json(["list", CONNECTION], cli_env, "runs") or []
            ours = [r for r in runs if r["run-id"] in seen["flower_runs"]]
            done = len(ours) == 3 and all(r["status"].startswith("finished") for r in ours)
            return runs if done else None

        seen["flower_runs_at_end"] = wait_until("Flower's statuses", flower_runs, 300, every=5)
    finally:
        stop_everything(processes, marker)
    seen.update(root=root, home=home, nodes=nodes, left_running=_running(marked_pids(marker)))
    sys.__stderr__.write(f"\nfault timings (loopback, TLS): {json.dumps(t)}\n")
    (root / "timings.json").write_text(json.dumps(t))
    yield seen


def _events(home: Path, run_id: int) -> list:
    db = Database(database_url(home))
    audit = AuditLog(db)
    events, after = [], 0
    while batch := audit.events(after_seq=after, limit=1000):
        events += [e for e in batch if e.payload.get("run") == run_id]
        after = batch[-1].seq
    assert audit.verify().ok, audit.verify()
    db.dispose()
    return events


def _the_run(home: Path) -> Run:
    db = Database(database_url(home))
    with db.session() as s:
        (run,) = [
            r
            for r in s.scalars(select(Run)).all()
            if json.loads(r.config_json).get("name") == RUN_NAME
        ]
    db.dispose()
    return run


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_a_killed_node_fails_the_round_cleanly_and_the_model_does_not_advance(faults):
    assert faults["node_killed"], "no process of node 2 was found to kill"
    status, rows = faults["after_node_fault"]
    assert status == "failed" and rows == [(1, "completed"), (2, "failed")]
    assert faults["checkpoints_after_node_fault"] == ["round1"]  # no round-2 model
    run = _the_run(faults["home"])
    failed = [e for e in _events(faults["home"], run.id) if e.event_type == "round_failed"]
    assert [e.payload["round"] for e in failed] == [2]
    assert "secure aggregation halted" in failed[0].payload["reason"]
    # Flower names the dead node one of two ways, by when the kill lands: before its reply
    # was announced (no heartbeat: "Node Unavailable"), or after the announcement and before
    # its objects were uploaded (they never arrive; seen in CI on 2026-12-03)
    reason = failed[0].payload["reason"]
    assert "Node Unavailable" in reason or "Reply message objects are unavailable" in reason


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_the_killed_node_had_recorded_its_spend_and_no_ledger_counts_a_round_twice(faults):
    home = faults["home"]
    run = _the_run(home)
    key = json.loads(run.config_json)["key"]
    registry = ModelRegistry(
        home / "registry", KeyStore(home / "keys"), Database(database_url(home))
    )
    round_1 = digest(registry.load_checkpoint("bank", run.id, 1))
    (at_kill,) = faults["node_2_entry_at_kill"]  # spent before it could have sent
    for i, node in enumerate(faults["nodes"]):
        entries = ledger_entries(node)
        kinds = sorted((e["kind"], e["round"]) for e in entries)
        assert kinds == [("evaluate", 2), ("release", 1), ("train", 1), ("train", 2)], i
        assert all(e["run_key"] == key for e in entries)
        (train_2,) = [e for e in entries if e["kind"] == "train" and e["round"] == 2]
        # trained once, in attempt 1, from round 1's checkpoint; re-sent after that
        assert train_2["input_sha256"] == round_1
        assert (
            entries[: len(faults["ledgers_after_node_fault"][i])]
            == (faults["ledgers_after_node_fault"][i])
        )  # nothing recorded before the faults was lost or rewritten
    (train_2,) = [
        e for e in ledger_entries(faults["nodes"][2]) if e["kind"] == "train" and e["round"] == 2
    ]
    assert train_2 == at_kill


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_the_killed_node_rejoined_and_took_part_in_the_resumed_round(faults):
    assert faults["online_at_end"] == NODES
    last = int(faults["flower_runs"][-1])
    sent = [e for e in outbox(faults["nodes"][2]) if e["run"] == last and e["type"] == "train"]
    assert len(sent) >= 3  # setup, share keys, masked update in the completing attempt


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_a_killed_server_resumes_from_its_checkpoint_and_counts_no_round_twice(faults):
    home = faults["home"]
    assert faults["server_killed"], "no SuperLink/ServerApp process was found to kill"
    status, rows = faults["after_server_fault"]
    assert status == "running" and rows == [(1, "completed"), (2, "failed")]  # no exit
    status, rows = faults["final"]
    assert status == "completed" and rows == [(1, "completed"), (2, "completed")]
    run = _the_run(home)
    assert json.loads(run.config_json)["attempts"] == 3
    db = Database(database_url(home))
    with db.session() as s:
        assert len(s.scalars(select(Run)).all()) == 1  # one run in the records, not three
        trained = s.scalars(select(Participation).where(Participation.status == "trained")).all()
        assert sorted((p.round, p.node) for p in trained) == [
            (r, f"bank-{n}") for r in (1, 2) for n in "abc"
        ]
        models = s.scalars(select(ModelVersionRecord)).all()
        assert [(m.id, m.run_id, m.round) for m in models] == [("bank-v1", run.id, ROUNDS)]
    model = ModelRegistry(home / "registry", KeyStore(home / "keys"), db).load("bank-v1")
    assert model.metadata["training"]["participants"] == ["bank-a", "bank-b", "bank-c"]
    # Flower itself marks the killed attempt failed (no heartbeat from its ServerApp) some
    # time after its SuperLink is back; by the end of attempt 3 it has.
    status = {r["run-id"]: r["status"] for r in faults["flower_runs_at_end"]}
    assert [status[r][:15] for r in faults["flower_runs"]] == [
        "finished:failed",
        "finished:failed",
        "finished:comple",
    ]


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_the_audit_chain_verifies_and_tells_each_fault(faults):
    run = _the_run(faults["home"])
    story = [
        (e.event_type, e.payload.get("round", e.payload.get("attempt")))
        for e in _events(faults["home"], run.id)
        if e.event_type
        in {
            "run_started",
            "round_completed",
            "round_failed",
            "run_failed",
            "run_resumed",
            "model_registered",
            "run_completed",
        }
    ]
    assert story == [
        ("run_started", None),
        ("round_completed", 1),
        ("round_failed", 2),
        ("run_failed", None),
        ("run_resumed", 2),  # attempt 2, killed with its SuperLink: no run_failed
        ("run_resumed", 3),
        ("round_completed", 2),
        ("model_registered", 2),
        ("run_completed", None),
    ]
    completed = [e for e in _events(faults["home"], run.id) if e.event_type == "round_completed"]
    # Every node re-sent the round-2 update it had released (and paid for) in attempt 1.
    assert completed[1].payload["resent"] == ["bank-a", "bank-b", "bank-c"]


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_every_process_of_the_fault_scenario_was_stopped(faults):
    assert faults["left_running"] == []
