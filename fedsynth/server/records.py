"""What the coordinator remembers: federations, runs, rounds, spend, models, audit events.

Why a database and not files: the API, the Flower server and the CLI read and write these
records at the same time, from several processes. The embedded default is SQLite in WAL mode
(readers never block the writer); a deployment sets ``FEDSYNTH_DATABASE_URL`` to a
PostgreSQL URL. The schema uses only portable types and SQL; the SQLite pragmas are the one
dialect-specific part.

The server stores only what nodes report (epsilon, steps, scalar scores), never a row.
Timestamps are timezone-aware UTC, except ``AuditEvent.created_at``: an ISO-8601 string,
so that the audit chain hashes the exact text that is stored.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

DATABASE_URL_ENV = "FEDSYNTH_DATABASE_URL"
RUN_STATUSES = ("running", "completed", "failed")
ROUND_STATUSES = ("completed", "failed", "skipped")
PARTICIPATION_STATUSES = ("trained", "refused", "failed")
ROLES = ("analyst", "compliance", "admin")
#: Execution option that makes a SQLite transaction start with ``BEGIN IMMEDIATE``.
IMMEDIATE_OPTION = "fedsynth_begin_immediate"


def database_url(home: Path) -> str:
    """``$FEDSYNTH_DATABASE_URL`` if set, else a SQLite file under ``home``."""
    return os.environ.get(DATABASE_URL_ENV) or f"sqlite:///{home}/fedsynth.db"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite keeps no zone: we add it back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()}: pass a timezone-aware one")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _one_of(column: str, values: tuple[str, ...], name: str) -> CheckConstraint:
    allowed = ", ".join(f"'{v}'" for v in values)
    return CheckConstraint(f"{column} IN ({allowed})", name=name)


class Base(DeclarativeBase):
    pass


class Federation(Base):
    __tablename__ = "federations"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    sector: Mapped[str] = mapped_column(String(64))
    spec_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (_one_of("status", RUN_STATUSES, "ck_runs_status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    federation: Mapped[str] = mapped_column(ForeignKey("federations.name"), index=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="running")
    secure_aggregation: Mapped[bool] = mapped_column(Boolean)
    rounds_planned: Mapped[int] = mapped_column(Integer)
    min_nodes: Mapped[int] = mapped_column(Integer)
    config_json: Mapped[str] = mapped_column(Text, default="{}")


class RoundRecord(Base):
    __tablename__ = "rounds"
    __table_args__ = (
        UniqueConstraint("run_id", "round", name="uq_rounds_run_round"),
        _one_of("status", ROUND_STATUSES, "ck_rounds_status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    participants: Mapped[int] = mapped_column(Integer, default=0)


class Participation(Base):
    """One node's answer to one round, as the node reported it (the server cannot spend)."""

    __tablename__ = "participations"
    __table_args__ = (_one_of("status", PARTICIPATION_STATUSES, "ck_participations_status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    node: Mapped[str] = mapped_column(String(128), index=True)
    status: Mapped[str] = mapped_column(String(16))
    epsilon_spent: Mapped[float | None] = mapped_column(Float, nullable=True)
    epsilon_cap: Mapped[float | None] = mapped_column(Float, nullable=True)
    delta: Mapped[float | None] = mapped_column(Float, nullable=True)
    steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="")


class NodeReport(Base):
    """Scalar evaluation scores a node returned (DP releases, never rows)."""

    __tablename__ = "node_reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    node: Mapped[str] = mapped_column(String(128))
    metrics_json: Mapped[str] = mapped_column(Text)


class ModelVersionRecord(Base):
    """A registered model version; the signed manifest itself lives in ``metadata_json``."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("federation", "version", name="uq_model_versions"),)

    id: Mapped[str] = mapped_column(String(160), primary_key=True)
    federation: Mapped[str] = mapped_column(ForeignKey("federations.name"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), nullable=True)
    round: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    sector: Mapped[str] = mapped_column(String(64))
    #: The largest epsilon any contributing node reported (inf: no DP guarantee).
    epsilon: Mapped[float | None] = mapped_column(Float, nullable=True)
    delta: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    path: Mapped[str] = mapped_column(String(1024))
    metadata_json: Mapped[str] = mapped_column(Text)


class AuditEvent(Base):
    """One link of the audit chain; ``seq`` is assigned by the audit log (1, 2, 3, ...)."""

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    created_at: Mapped[str] = mapped_column(String(40), index=True)
    event_type: Mapped[str] = mapped_column(String(64), index=True)
    actor: Mapped[str] = mapped_column(String(128), index=True)
    payload_json: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class ApiKey(Base):
    """An API key: only the SHA-256 of its secret is stored (``fedsynth.server.api.keys``)."""

    __tablename__ = "api_keys"
    __table_args__ = (_one_of("role", ROLES, "ck_api_keys_role"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    federations_json: Mapped[str | None] = mapped_column(Text, nullable=True)  # null: all
    label: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class Database:
    """An engine, its tables, and sessions that commit on success and roll back on error."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = create_engine(url)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_connect)
            event.listen(self.engine, "begin", _sqlite_begin)
        self._create_tables()
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def _create_tables(self, attempts: int = 20) -> None:
        """Create missing tables. On SQLite, ``create_all`` reads (does the table exist?)
        then writes in one deferred transaction; when another process creates the tables
        at the same moment, SQLite answers "database is locked" at once instead of waiting
        (upgrading a read to a write could deadlock), so the whole step is retried."""
        for attempt in range(attempts):
            try:
                Base.metadata.create_all(self.engine)
                return
            except OperationalError as exc:
                if "locked" not in str(exc) or attempt == attempts - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))

    def __repr__(self) -> str:
        return f"Database({self.engine.url.render_as_string(hide_password=True)!r})"

    @contextmanager
    def session(self, *, immediate: bool = False) -> Iterator[Session]:
        """A session in one transaction: committed if the block returns, else rolled back.

        ``immediate=True`` takes SQLite's write lock when the transaction begins
        (``BEGIN IMMEDIATE``), so a read-then-write cannot race another process; other
        backends ignore it. Objects stay readable after the block (no expiry on commit).
        """
        session = self._sessions()
        try:
            if immediate:
                session.connection(execution_options={IMMEDIATE_OPTION: True})
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def dispose(self) -> None:
        """Close pooled connections (tests, and before a process forks)."""
        self.engine.dispose()


def _sqlite_connect(dbapi_connection: Any, connection_record: Any) -> None:
    # Let SQLAlchemy emit BEGIN itself (see _sqlite_begin): the sqlite3 module's own
    # transaction handling cannot start a transaction with BEGIN IMMEDIATE.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout=30000")  # first: the others may have to wait
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    immediate = connection.get_execution_options().get(IMMEDIATE_OPTION, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
