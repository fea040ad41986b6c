"""The records, audit chain, keys and API against a real PostgreSQL server.

.ci/run starts Debian's PostgreSQL and sets ``FEDSYNTH_TEST_POSTGRES_URL`` (a server URL
whose role may create databases); each test gets a fresh database, dropped at the end.
Outside CI without a server these tests skip, saying why.
"""

from __future__ import annotations

import os
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import create_engine, select, text

from fedsynth.generative.training import train
from fedsynth.server.api.app import create_app
from fedsynth.server.api.keys import KeyStore
from fedsynth.server.audit import AuditLog
from fedsynth.server.records import Database, Run
from tests.factories import clinic_records, small_frame, small_spec
from tests.http import serving

URL = os.environ.get("FEDSYNTH_TEST_POSTGRES_URL")
pytestmark = pytest.mark.skipif(
    not URL, reason="no PostgreSQL: set FEDSYNTH_TEST_POSTGRES_URL (.ci/run does)"
)


@pytest.fixture
def pg_url():
    """A fresh database for each test."""
    assert URL is not None
    name = f"fedsynth_test_{secrets.token_hex(4)}"
    admin = create_engine(URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f"CREATE DATABASE {name}"))
    yield URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as c:
        c.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))
    admin.dispose()


@pytest.fixture
def db(pg_url):
    database = Database(pg_url)
    yield database
    database.dispose()


def test_records_round_trip_with_timezones(db):
    clinic_records(db)
    with db.session() as s:
        loaded = s.scalars(select(Run)).one()
        assert loaded.started_at.tzinfo is not None
        assert db.engine.dialect.name == "postgresql"


def test_concurrent_audit_appends_keep_a_gapless_verified_chain(db):
    audit = AuditLog(db)
    before = audit.count()

    def append(worker: int) -> None:
        log = AuditLog(Database(db.url))  # its own engine, as another process would have
        for i in range(25):
            log.append("test_event", f"worker-{worker}", {"i": i})

    threads = [threading.Thread(target=append, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert audit.count() == before + 100
    status = audit.verify()
    assert status.ok and status.checked == before + 100
    with db.session() as s:
        s.execute(text(f"UPDATE audit_events SET payload_json = '{{}}' WHERE seq = {before + 7}"))
    broken = audit.verify()
    assert not broken.ok and broken.first_bad == before + 7


def test_api_keys_authenticate_and_revoke(db):
    keys = KeyStore(db)
    info, token = keys.create("compliance", ["bank"])
    principal, key_id = keys.authenticate(token)
    assert principal is not None and principal.federations == frozenset({"bank"})
    keys.revoke(info.id)
    assert keys.authenticate(token) == (None, info.id)


def test_the_api_on_postgresql_audits_every_concurrent_request(pg_url, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSYNTH_DATABASE_URL", pg_url)
    home = tmp_path / "home"
    app = create_app(home)  # reads FEDSYNTH_DATABASE_URL: records live in PostgreSQL
    services = app.state.services
    assert services.db.engine.dialect.name == "postgresql"
    model = train(small_frame(200), small_spec("gan", steps=3))
    services.registry.register(
        model,
        federation="pgclinic",
        sector="hospital",
        run_id=None,
        round=1,
        node_privacy={"a": {"epsilon": 1.0, "delta": 1e-4}},
        participants=["a"],
        quality=None,
    )
    _, token = services.keys.create("analyst")
    before = services.audit.count()

    def one(i: int) -> int:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as c:
            return c.post("/v1/models/pgclinic-v1/samples", json={"n": 10, "seed": i}).status_code

    with serving(app) as url, ThreadPoolExecutor(max_workers=10) as pool:
        statuses = list(pool.map(one, range(50)))
    assert statuses == [200] * 50
    assert services.audit.count() == before + 50 and services.audit.verify().ok
