"""Records database and the hash-chained audit log: concurrency, tampering, queries."""

import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine, event, inspect, select, text
from sqlalchemy.exc import IntegrityError, StatementError

from fedsynth.server import audit
from fedsynth.server.audit import GENESIS_HASH, AuditLog, AuditWriteError, entry_hash
from fedsynth.server.records import (
    AuditEvent,
    Database,
    Federation,
    Participation,
    RoundRecord,
    Run,
    database_url,
)
from tests.test_faults_api import file_size_limit


@pytest.fixture
def db(tmp_path):
    database = Database(f"sqlite:///{tmp_path}/t.db")
    yield database
    database.dispose()


def test_database_url_prefers_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDSYNTH_DATABASE_URL", raising=False)
    assert database_url(tmp_path) == f"sqlite:///{tmp_path}/fedsynth.db"
    monkeypatch.setenv("FEDSYNTH_DATABASE_URL", "postgresql://db.example/fedsynth")
    assert database_url(tmp_path) == "postgresql://db.example/fedsynth"


def test_sqlite_connections_use_wal_foreign_keys_and_a_busy_timeout(db):
    with db.session() as session:
        assert session.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert session.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert session.execute(text("PRAGMA busy_timeout")).scalar() == 30000


def test_records_round_trip_with_aware_utc_timestamps(db):
    started = datetime(2024, 5, 1, 12, 0, tzinfo=UTC) + timedelta(microseconds=5)
    with db.session() as session:
        session.add(Federation(name="bank", sector="finance", spec_json="{}"))
        session.flush()
        run = Run(
            federation="bank",
            started_at=started,
            secure_aggregation=True,
            rounds_planned=3,
            min_nodes=2,
        )
        session.add(run)
        session.flush()
        session.add(RoundRecord(run_id=run.id, round=1, status="completed", participants=2))
        session.add(
            Participation(run_id=run.id, round=1, node="north", status="trained", epsilon_spent=0.4)
        )
    with db.session() as session:
        stored = session.execute(select(Run)).scalar_one()
        assert stored.started_at == started and stored.started_at.tzinfo is not None
        assert stored.status == "running" and stored.finished_at is None
        node = session.execute(select(Participation)).scalar_one()
        assert (node.node, node.epsilon_spent, node.epsilon_cap) == ("north", 0.4, None)


def test_constraints_hold_and_a_failed_block_rolls_back(db):
    with pytest.raises(IntegrityError):  # foreign key: no such federation
        with db.session() as session:
            session.add(
                Run(federation="nope", secure_aggregation=False, rounds_planned=1, min_nodes=1)
            )
    with pytest.raises(IntegrityError):  # status outside running|completed|failed
        with db.session() as session:
            session.add(Federation(name="bank", sector="finance", spec_json="{}"))
            session.flush()
            session.add(
                Run(
                    federation="bank",
                    status="paused",
                    secure_aggregation=False,
                    rounds_planned=1,
                    min_nodes=1,
                )
            )
    with db.session() as session:  # the whole block was rolled back, federation included
        assert session.execute(select(Federation)).first() is None
    with pytest.raises(StatementError, match="naive datetime"):
        with db.session() as session:
            session.add(Federation(name="x", sector="s", spec_json="{}", created_at=datetime.now()))


def test_immediate_session_takes_the_write_lock_at_begin(db, tmp_path):
    with db.session(immediate=True) as session:
        session.execute(select(AuditEvent.seq)).all()  # a read only, yet the lock is held
        other = sqlite3.connect(tmp_path / "t.db", timeout=0, isolation_level=None)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        other.close()


def test_first_entry_links_to_genesis_and_hash_covers_content(db):
    log = AuditLog(db)
    first = log.append("model.registered", "server", {"model": "bank-v1", "epsilon": 1.5})
    second = log.append("samples.generated", "analyst:ana", {"rows": 10, "note": "ünïcode"})
    assert (first.seq, second.seq) == (1, 2)
    assert first.prev_hash == GENESIS_HASH and second.prev_hash == first.hash
    assert first.hash == entry_hash(
        1, first.created_at, "model.registered", "server", first.payload, GENESIS_HASH
    )
    assert datetime.fromisoformat(first.created_at).tzinfo is not None
    assert log.verify().ok and log.verify().checked == 2


def test_chain_verifies_after_concurrent_appends_from_four_threads(db):
    log = AuditLog(db)
    errors = []

    def worker(name):
        try:
            for i in range(50):
                log.append("test.event", name, {"i": i})
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"t{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with db.session() as session:
        seqs = session.execute(select(AuditEvent.seq).order_by(AuditEvent.seq)).scalars().all()
    assert seqs == list(range(1, 201))
    status = log.verify()
    assert status.ok and status.checked == 200 and status.first_bad is None
    for n in range(4):  # every thread's events kept, in the order it appended them
        mine = log.events(actor=f"t{n}", limit=1000)
        assert [e.payload["i"] for e in mine] == list(range(50))


def _queue_behind_a_writer(log, events):
    """Start one thread per event while another writer holds the append lock, so that the
    events queue up; returns (threads, outcomes by event, release)."""
    outcomes = {}

    def append(name):
        try:
            outcomes[name] = log.append("test.event", name, {"name": name})
        except Exception as exc:  # checked by the caller
            outcomes[name] = exc

    audit._APPEND_LOCK.acquire()
    threads = [threading.Thread(target=append, args=(name,)) for name in events]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(log._queue) < len(events) - 1:  # the first one took the lock's turn
        assert time.monotonic() < deadline, "events did not queue"
        time.sleep(0.01)
    return threads, outcomes, audit._APPEND_LOCK.release


def test_queued_events_are_written_in_one_transaction_in_queue_order(db):
    log = AuditLog(db)
    commits = []
    event.listen(db.engine, "commit", lambda conn: commits.append(1))
    names = [f"e{i}" for i in range(16)]
    threads, outcomes, release = _queue_behind_a_writer(log, names)
    release()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert len(commits) == 2  # the first event alone, then the 15 queued behind it
    stored = log.events(limit=100)
    assert [e.seq for e in stored] == list(range(1, 17))
    assert {e.seq: e for e in stored} == {e.seq: e for e in outcomes.values()}
    assert log.verify().ok


def test_a_failed_batch_raises_in_every_waiter_and_the_chain_goes_on(db, tmp_path):
    log = AuditLog(db)
    log.append("before", "test", {})
    threads, outcomes, release = _queue_behind_a_writer(log, [f"e{i}" for i in range(8)])
    with file_size_limit(0):  # as a full disk: every write fails
        release()
        for t in threads:
            t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert all(isinstance(o, AuditWriteError) for o in outcomes.values()), outcomes
    assert "nothing was written" in str(outcomes["e3"])
    assert log.count() == 1
    assert log.append("after", "test", {}).seq == 2 and log.verify().ok


def test_concurrent_appends_from_separate_database_objects(tmp_path):
    # Two engines on one file behave like two processes: BEGIN IMMEDIATE serialises them.
    url = f"sqlite:///{tmp_path}/t.db"
    logs = [AuditLog(Database(url)), AuditLog(Database(url))]
    threads = [
        threading.Thread(target=lambda log=log: [log.append("e", "a", {}) for _ in range(25)])
        for log in logs
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    status = logs[0].verify()
    assert status.ok and status.checked == 50


def _filled(db, n=10):
    log = AuditLog(db)
    for i in range(n):
        log.append("test.event", "server", {"i": i, "node": f"n{i}"})
    return log


def test_tampered_payload_is_named(db):
    log = _filled(db)
    with db.session() as session:
        session.execute(
            text("UPDATE audit_events SET payload_json = :p WHERE seq = 7"),
            {"p": '{"i":6,"node":"evil"}'},
        )
    status = log.verify()
    assert not status.ok and status.first_bad == 7 and status.checked == 6
    assert status.reason == "entry 7: hash does not match its content"


def test_rehashed_entry_breaks_the_link_of_the_next(db):
    log = _filled(db)
    with db.session() as session:
        row = session.get(AuditEvent, 7)
        row.actor = "someone else"
        row.hash = entry_hash(
            7, row.created_at, row.event_type, row.actor, {"i": 6, "node": "n6"}, row.prev_hash
        )
        row.payload_json = '{"i":6,"node":"n6"}'
    status = log.verify()
    assert status.first_bad == 8
    assert status.reason == "entry 8: prev_hash does not link to entry 7"


@pytest.mark.parametrize("deleted, reason", [(5, "entry 5 missing"), (1, "entry 1 missing")])
def test_deleted_entry_is_named(db, deleted, reason):
    log = _filled(db)
    with db.session() as session:
        session.execute(text("DELETE FROM audit_events WHERE seq = :s"), {"s": deleted})
    status = log.verify()
    assert not status.ok and status.first_bad == deleted and status.reason == reason


def test_empty_chain_verifies(db):
    status = AuditLog(db).verify()
    assert status.ok and status.checked == 0 and status.first_bad is None


def test_non_json_payload_is_refused_naming_the_key(db):
    log = AuditLog(db)
    with pytest.raises(TypeError, match="when"):
        log.append("e", "a", {"when": datetime.now(UTC)})
    with pytest.raises(TypeError, match=r"nested.*'x'"):
        log.append("e", "a", {"nested": {"ok": 1, "x": {1, 2}}})
    with pytest.raises(TypeError, match="eps"):
        log.append("e", "a", {"eps": float("nan")})
    assert log.count() == 0


def test_events_filter_and_page(db):
    log = AuditLog(db)
    for i in range(6):
        log.append("round.completed" if i % 2 else "model.registered", f"a{i % 3}", {"i": i})
    everything = log.events()
    assert [e.seq for e in everything] == [1, 2, 3, 4, 5, 6]
    assert [e.seq for e in log.events(event_type="round.completed")] == [2, 4, 6]
    assert [e.seq for e in log.events(actor="a0")] == [1, 4]
    assert [e.seq for e in log.events(after_seq=2, limit=2)] == [3, 4]
    middle = datetime.fromisoformat(everything[3].created_at)
    assert [e.seq for e in log.events(since=middle)] == [4, 5, 6]
    assert [e.seq for e in log.events(until=middle)] == [1, 2, 3]
    assert everything[2].payload == {"i": 2}
    with pytest.raises(ValueError, match="limit"):
        log.events(limit=0)
    with pytest.raises(ValueError, match="naive"):
        log.events(since=datetime.now())


def test_processes_creating_a_fresh_database_at_once_all_succeed(tmp_path):
    """Two processes opening a new SQLite database at the same moment (a ServerApp and
    ``fedsynth serve``, say) both get their tables instead of "database is locked"."""
    import subprocess
    import sys

    code = (
        "import sys; from fedsynth.server.records import Database; "
        "Database(f'sqlite:///{sys.argv[1]}').dispose()"
    )
    for i in range(3):
        path = tmp_path / f"fresh{i}.db"
        procs = [subprocess.Popen([sys.executable, "-c", code, str(path)]) for _ in range(4)]
        assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
        assert "audit_events" in inspect(create_engine(f"sqlite:///{path}")).get_table_names()
