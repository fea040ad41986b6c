"""Append-only, hash-chained audit log (design principle 4).

Every entry stores the SHA-256 of its own content and of the entry before it, so editing,
deleting or reordering any stored entry breaks the chain at that entry, and :meth:`verify`
names it. What the chain alone cannot show is the loss of its newest entries (truncation):
to detect that, record ``verify().checked`` and the last hash somewhere the database's
writers cannot change.

Appends are serialised, so none is lost or reordered: a lock within the process, and in the
database one transaction that reads the last entry and inserts the next ``seq`` (on SQLite
begun with ``BEGIN IMMEDIATE``, so two processes cannot read the same last entry). ``seq``
is the primary key: a lost race on another backend fails loudly and is retried.

An append that the database refuses (disk full, read-only file, server gone) raises
:class:`AuditWriteError` naming the database and the driver's reason; the transaction is
rolled back, so the chain never holds a partial entry.

Payloads are stored as given. Never put secrets (API keys, key material, rows) in a payload:
keeping them out is the caller's job, and the log is readable by compliance officers.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from fedsynth.server.records import AuditEvent, Database

GENESIS_HASH = "0" * 64
APPEND_ATTEMPTS = 8
MAX_EVENTS = 1000
#: Events written in one transaction at most (group commit).
MAX_BATCH = 256

_APPEND_LOCK = threading.Lock()


class AuditWriteError(RuntimeError):
    """The database refused an audit event; nothing of it was stored."""


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    created_at: str
    event_type: str
    actor: str
    payload: dict[str, Any]
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class ChainStatus:
    ok: bool
    checked: int
    first_bad: int | None
    reason: str


@dataclass
class _Pending:
    """An event waiting for the group commit, and what became of it."""

    event_type: str
    actor: str
    payload_json: str
    also: Callable[[Session], None] | None
    entry: AuditEntry | None = None
    error: Exception | None = None


class AuditLog:
    """The audit trail of one database."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._queue: list[_Pending] = []  # group commit: events waiting to be written
        self._writing = False  # a thread is writing a batch
        self._turn = threading.Condition()

    def append(
        self,
        event_type: str,
        actor: str,
        payload: dict[str, Any],
        *,
        also: Callable[[Session], None] | None = None,
    ) -> AuditEntry:
        """Add one event at the end of the chain and return it as stored.

        ``also`` writes the change the event records (say, a new API key) in the same
        transaction, so that a crash leaves both or neither. It may run more than once (a
        retried transaction) and may raise to refuse: then nothing is written.
        """
        if not event_type or not actor:
            raise ValueError("an audit event needs a non-empty event_type and actor")
        if not isinstance(payload, dict):
            raise TypeError(f"audit payload must be a dict, got {type(payload).__name__}")
        _check_json(payload, "payload")
        payload_json = _canonical(payload)
        if also is not None:  # alone: its change may refuse, and must not fail others
            with _APPEND_LOCK:
                return self._write([_Pending(event_type, actor, payload_json, also)])[0]
        # Group commit: while one thread writes a batch, the others queue their events; the
        # next free thread writes all of them in one transaction (one commit, one fsync),
        # so concurrent requests do not wait in line for each other's commits (16 threads:
        # about 2x the events/s, docs/benchmarks.md "API"). Queue order is chain order.
        mine = _Pending(event_type, actor, payload_json, None)
        with self._turn:
            self._queue.append(mine)
            while mine.entry is None and mine.error is None:
                if self._writing:  # woken when that batch is written
                    self._turn.wait()
                    continue
                self._writing = True
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                self._turn.release()  # others queue up while this batch is written
                try:
                    self._write_batch(batch)
                finally:
                    self._turn.acquire()
                    self._writing = False
                    self._turn.notify_all()
        if mine.error is not None:
            raise mine.error
        assert mine.entry is not None
        return mine.entry

    def _write_batch(self, batch: list[_Pending]) -> None:
        """Write ``batch`` and hand each waiter its entry, or the error to raise."""
        try:
            with _APPEND_LOCK:
                entries = self._write(batch)
        except Exception as exc:  # every waiter of the batch raises it, none waits forever
            for pending in batch:
                pending.error = exc
        else:
            for pending, entry in zip(batch, entries, strict=True):
                pending.entry = entry

    def _write(self, batch: list[_Pending]) -> list[AuditEntry]:
        """Write ``batch`` in one transaction, retrying a lost race; the caller holds the lock."""
        for attempt in range(APPEND_ATTEMPTS):
            try:
                return self._append_once(batch)
            except SQLAlchemyError as exc:
                reason = str(getattr(exc, "orig", None) or type(exc).__name__)
                retry = isinstance(exc, IntegrityError) or (
                    isinstance(exc, OperationalError) and "locked" in reason.lower()
                )
                if not retry or attempt == APPEND_ATTEMPTS - 1:
                    kinds = ", ".join(sorted({repr(p.event_type) for p in batch}))
                    raise AuditWriteError(
                        f"audit log: cannot append a {kinds} event to {self._db!r} "
                        f"({reason}); nothing was written and the chain is unchanged"
                    ) from exc
                time.sleep(0.01 * 2**attempt)
        raise AssertionError("unreachable")

    def _append_once(self, batch: list[_Pending]) -> list[AuditEntry]:
        entries = []
        with self._db.session(immediate=True) as session:
            for pending in batch:
                if pending.also is not None:
                    pending.also(session)
            last = session.execute(
                select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
            ).first()
            seq, prev_hash = (last[0], last[1]) if last else (0, GENESIS_HASH)
            for p in batch:
                seq += 1
                created_at = _timestamp(datetime.now(UTC))
                payload = json.loads(p.payload_json)
                digest = entry_hash(seq, created_at, p.event_type, p.actor, payload, prev_hash)
                session.add(
                    AuditEvent(
                        seq=seq,
                        created_at=created_at,
                        event_type=p.event_type,
                        actor=p.actor,
                        payload_json=p.payload_json,
                        prev_hash=prev_hash,
                        hash=digest,
                    )
                )
                entries.append(
                    AuditEntry(seq, created_at, p.event_type, p.actor, payload, prev_hash, digest)
                )
                prev_hash = digest
        return entries

    def verify(self) -> ChainStatus:
        """Walk the chain in ``seq`` order and report the first entry that is wrong."""
        checked, prev_hash = 0, GENESIS_HASH
        with self._db.session() as session:
            rows = session.execute(
                select(AuditEvent).order_by(AuditEvent.seq).execution_options(yield_per=1000)
            ).scalars()
            for row in rows:
                expected = checked + 1
                if row.seq != expected:
                    missing = f"entry {expected} missing"
                    if row.seq > expected + 1:
                        missing = f"entries {expected} to {row.seq - 1} missing"
                    return ChainStatus(False, checked, expected, missing)
                if row.prev_hash != prev_hash:
                    link = f"entry {row.seq - 1}" if row.seq > 1 else "the start of the chain"
                    reason = f"entry {row.seq}: prev_hash does not link to {link}"
                    return ChainStatus(False, checked, row.seq, reason)
                try:
                    payload = json.loads(row.payload_json)
                except json.JSONDecodeError:
                    reason = f"entry {row.seq}: payload is not valid JSON"
                    return ChainStatus(False, checked, row.seq, reason)
                digest = entry_hash(
                    row.seq, row.created_at, row.event_type, row.actor, payload, row.prev_hash
                )
                if digest != row.hash:
                    reason = f"entry {row.seq}: hash does not match its content"
                    return ChainStatus(False, checked, row.seq, reason)
                checked, prev_hash = row.seq, row.hash
        return ChainStatus(True, checked, None, f"{checked} entries verified")

    def count(self) -> int:
        with self._db.session() as session:
            return int(session.scalar(select(func.count()).select_from(AuditEvent)) or 0)

    def events(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        event_type: str | None = None,
        actor: str | None = None,
        after_seq: int = 0,
        limit: int = 100,
    ) -> list[AuditEntry]:
        """Entries in ``seq`` order with ``since <= created_at < until``, after ``after_seq``.

        Page through the log by passing the last ``seq`` seen as ``after_seq``.
        """
        if not 1 <= limit <= MAX_EVENTS:
            raise ValueError(f"limit must be between 1 and {MAX_EVENTS}, got {limit}")
        query = select(AuditEvent).where(AuditEvent.seq > after_seq)
        if since is not None:
            query = query.where(AuditEvent.created_at >= _timestamp(since, "since"))
        if until is not None:
            query = query.where(AuditEvent.created_at < _timestamp(until, "until"))
        if event_type is not None:
            query = query.where(AuditEvent.event_type == event_type)
        if actor is not None:
            query = query.where(AuditEvent.actor == actor)
        with self._db.session() as session:
            rows = session.execute(query.order_by(AuditEvent.seq).limit(limit)).scalars().all()
            return [
                AuditEntry(
                    r.seq,
                    r.created_at,
                    r.event_type,
                    r.actor,
                    json.loads(r.payload_json),
                    r.prev_hash,
                    r.hash,
                )
                for r in rows
            ]


def entry_hash(
    seq: int, created_at: str, event_type: str, actor: str, payload: Any, prev_hash: str
) -> str:
    """SHA-256 (hex) of the canonical JSON of one entry's content and its link."""
    content = {
        "seq": seq,
        "created_at": created_at,
        "event_type": event_type,
        "actor": actor,
        "payload": payload,
        "prev_hash": prev_hash,
    }
    return hashlib.sha256(_canonical(content).encode("utf-8")).hexdigest()


def _canonical(value: Any) -> str:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def _timestamp(moment: datetime, name: str = "created_at") -> str:
    """Fixed-width ISO-8601 UTC, so text order is time order."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name}: naive datetime {moment.isoformat()}, pass a timezone-aware one")
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _check_json(value: Any, where: str) -> None:
    """Raise TypeError naming the key whose value JSON cannot represent exactly."""
    if value is None or isinstance(value, str | bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError(f"audit {where}: {value} is not JSON (use a string such as 'inf')")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"audit {where}: key {key!r} must be a string")
            _check_json(item, f"{where}[{key!r}]")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
        return
    raise TypeError(f"audit {where}: {type(value).__name__} is not JSON-serialisable")
