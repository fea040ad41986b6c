"""Faults around the API and what it stores: the server killed mid-stream and mid-burst, a
full disk, a read-only registry, a tampered model artifact.

Everything here is real: ``fedsynth serve`` runs as its own process and is SIGKILLed; a full
disk is a file-size limit (``RLIMIT_FSIZE``: a write past it fails with EFBIG, for root too,
so this works in CI, where tests run as root); a read-only registry is ``chmod 555``, entered
with the effective uid of ``nobody`` when the tests run as root (root ignores file modes).

What the design gives for a killed stream: the ``sample_request`` event is written when the
stream ends (completed, broken or abandoned by the client), so a server killed mid-stream
leaves no entry for that request; every response a client received whole has its entry,
because the entry is committed before the last chunk is sent. A key and its
``key_created`` event are one transaction: a kill leaves both or neither.
"""

from __future__ import annotations

import itertools
import json
import os
import pwd
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, select
from typer.testing import CliRunner

from fedsynth.cli import app as cli
from fedsynth.privacy.keys import KeyStore as SigningKeys
from fedsynth.server.api.app import create_app
from fedsynth.server.audit import AuditEntry, AuditLog, AuditWriteError
from fedsynth.server.records import (
    ApiKey,
    Database,
    Federation,
    ModelVersionRecord,
    database_url,
)
from fedsynth.server.registry import ModelRegistry, RegistryError
from tests.factories import PRIVACY, populate
from tests.http import serve_process, serving
from tests.test_secrets_in_logs import registry_secrets

ROWS = 10_000_000
SAMPLES = "/v1/models/clinic-v1/samples"
PART = 8 * 2**20  # bytes of the 10M-row stream read before the kill (about 160k rows)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """One populated home (a trained model takes seconds); each test works on a copy."""
    home = tmp_path_factory.mktemp("template")
    return home, populate(home)


@pytest.fixture
def home(template, tmp_path) -> Path:
    copy = tmp_path / "home"
    shutil.copytree(template[0], copy)
    return copy


@pytest.fixture
def tokens(template) -> dict[str, str]:
    return template[1]


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ---------------------------------------------------------------------------- checks


def check_database(home: Path) -> None:
    """The database the server used opens and passes SQLite's own checks, from a fresh
    connection (which is what replays or discards the write-ahead log after a crash).
    PostgreSQL (``FEDSYNTH_DATABASE_URL``) recovers by its own log and has no such check."""
    engine = create_engine(database_url(home))
    try:
        with engine.connect() as connection:
            if engine.dialect.name == "sqlite":
                result = connection.exec_driver_sql("PRAGMA integrity_check").scalars().all()
                assert result == ["ok"]
                assert connection.exec_driver_sql("PRAGMA foreign_key_check").all() == []
            else:
                connection.exec_driver_sql("SELECT 1")
    finally:
        engine.dispose()


def entries(audit: AuditLog, after: int = 0) -> list[AuditEntry]:
    found: list[AuditEntry] = []
    while batch := audit.events(after_seq=after, limit=1000):
        found += batch
        after = batch[-1].seq
    return found


def chain_is_whole(audit: AuditLog) -> None:
    """The chain verifies and every stored entry is complete: seq 1..n without a gap, each
    hash over its own content and linked to the entry before (what ``verify`` recomputes)."""
    status = audit.verify()
    assert status.ok, status.reason
    stored = entries(audit)
    assert [e.seq for e in stored] == list(range(1, len(stored) + 1)) and status.checked == len(
        stored
    )
    assert all(e.event_type and e.actor and len(e.hash) == 64 for e in stored)


def serves_and_chains(url: str, tokens: dict[str, str], audit: AuditLog) -> None:
    """The restarted server samples, creates a key that works, and its events extend the
    verified chain."""
    before = audit.count()
    with httpx.Client(base_url=url, timeout=120) as client:
        rows = client.post(SAMPLES, json={"n": 50, "seed": 5}, headers=_auth(tokens["analyst"]))
        assert rows.status_code == 200 and len(rows.text.splitlines()) == 51
        key = client.post("/v1/keys", json={"role": "analyst"}, headers=_auth(tokens["admin"]))
        assert key.status_code == 201
        assert client.get("/v1/models", headers=_auth(key.json()["key"])).status_code == 200
        verified = client.get("/v1/audit/verify", headers=_auth(tokens["compliance"])).json()
    assert verified["ok"] is True and verified["checked"] == before + 2
    assert [e.event_type for e in entries(audit, before)] == ["sample_request", "key_created"]


@contextmanager
def restarted(home: Path) -> Iterator[str]:
    """The API started again over the same home (in this process, to save a start-up)."""
    api = create_app(home, max_rows=ROWS)
    try:
        with serving(api) as url:
            yield url
    finally:
        api.state.services.db.dispose()


# ---------------------------------------------------------------------------- load


class Burst:
    """Threads that sample rows and create keys over HTTP until the server goes away.

    Records what each client saw: the seeds of sample responses received whole, the ids of
    keys whose 201 arrived, and how many requests were cut while the server was alive when
    they were sent (in flight at the kill)."""

    def __init__(self, url: str, tokens: dict[str, str], label: str, threads: int = 8) -> None:
        self.url, self.label = url, label
        self.analyst, self.admin = _auth(tokens["analyst"]), _auth(tokens["admin"])
        self.seeds: list[int] = []
        self.keys: list[str] = []
        self.sent_samples = 0
        self.cut_in_flight = 0
        self.unexpected: list[str] = []
        self.killed_at: float | None = None
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._work, args=(i,)) for i in range(threads)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def wait_for(self, done: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.seeds) + len(self.keys) < done:
            assert time.monotonic() < deadline, f"only {len(self.seeds) + len(self.keys)} done"
            assert not self.unexpected, self.unexpected
            time.sleep(0.05)

    def join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=120)

    def _work(self, worker: int) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as client:
            for k in itertools.count():
                started = time.monotonic()
                try:
                    if k % 3 == 2:
                        body = {"role": "analyst", "label": f"{self.label} {worker}-{k}"}
                        response = client.post("/v1/keys", json=body, headers=self.admin)
                        if response.status_code == 201:
                            with self._lock:
                                self.keys.append(response.json()["id"])
                            continue
                    else:
                        seed = worker * 1_000_000 + k
                        with self._lock:
                            self.sent_samples += 1
                        body = {"n": 200, "seed": seed}
                        response = client.post(SAMPLES, json=body, headers=self.analyst)
                        if response.status_code == 200 and len(response.text.splitlines()) == 201:
                            with self._lock:
                                self.seeds.append(seed)
                            continue
                    self.unexpected.append(f"{response.status_code} {response.text[:200]}")
                    return
                except httpx.TransportError:
                    with self._lock:
                        if self.killed_at is not None and started < self.killed_at:
                            self.cut_in_flight += 1
                    return  # the server is gone


def check_burst(home: Path, audit: AuditLog, before: int, burst: Burst) -> None:
    """What a kill during a burst may and may not leave behind."""
    assert not burst.unexpected, burst.unexpected
    assert burst.cut_in_flight >= 1, "no request was in flight when the server was killed"
    new = entries(audit, before)
    samples = [e for e in new if e.event_type == "sample_request"]
    created = {e.payload["key"] for e in new if e.event_type == "key_created"}
    # Every response received whole was audited, once; nothing is audited twice or
    # invented, and a stream's entry is only ever written complete.
    seeds = [e.payload["seed"] for e in samples]
    assert len(seeds) == len(set(seeds)) and set(burst.seeds) <= set(seeds)
    assert len(samples) <= burst.sent_samples
    assert all(e.payload["outcome"] == "completed" and e.payload["n"] == 200 for e in samples)
    # A key and its key_created event are one transaction: every stored key has its event
    # and every event its key, also for the request the kill cut.
    db = Database(database_url(home))
    try:
        with db.session() as session:
            stored = set(
                session.scalars(select(ApiKey.id).where(ApiKey.label.like(f"{burst.label} %")))
            )
    finally:
        db.dispose()
    assert set(burst.keys) <= created == stored


class Stream:
    """A 10M-row CSV stream read in a thread until the server dies."""

    def __init__(self, url: str, token: str, seed: int) -> None:
        self.url, self.token, self.seed = url, token, seed
        self.received = 0
        self.status: int | None = None
        self.cut: Exception | None = None
        self._thread = threading.Thread(target=self._read)

    def start(self) -> None:
        self._thread.start()

    def wait_for(self, received: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.received < received:
            assert time.monotonic() < deadline and self.cut is None, (self.received, self.cut)
            time.sleep(0.02)

    def join(self) -> None:
        self._thread.join(timeout=120)

    def _read(self) -> None:
        body = {"n": ROWS, "seed": self.seed}
        with httpx.Client(base_url=self.url, timeout=120) as client:
            try:
                with client.stream("POST", SAMPLES, json=body, headers=_auth(self.token)) as r:
                    self.status = r.status_code
                    for chunk in r.iter_bytes():
                        self.received += len(chunk)
            except httpx.TransportError as exc:
                self.cut = exc


def check_no_entry_for(audit: AuditLog, before: int, stream: Stream) -> None:
    assert stream.status == 200
    assert stream.cut is not None, "the stream ended normally: the kill came too late"
    assert stream.received < ROWS * 20  # far from the whole stream (CSV, > 20 bytes a row)
    killed = [
        e
        for e in entries(audit, before)
        if e.event_type == "sample_request" and e.payload["seed"] == stream.seed
    ]
    assert killed == []  # the design: the entry is written when the stream ends


def kill(process: subprocess.Popen[bytes]) -> None:
    assert process.poll() is None, "the server had already stopped"
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL


# ---------------------------------------------------------------------------- kills


def test_server_killed_during_a_ten_million_row_stream_and_a_burst_of_writes(
    home, tokens, tmp_path
):
    """One SIGKILL while a 10M-row stream and a burst of samples and key creations run;
    the slow test below repeats this three times with real restarts."""
    audit = AuditLog(Database(database_url(home)))
    with serve_process(home, tmp_path / "serve.log", "--max-rows", str(ROWS)) as server:
        before = audit.count()
        stream = Stream(server.url, tokens["analyst"], seed=77)
        burst = Burst(server.url, tokens, label="burst")
        stream.start()
        burst.start()
        burst.wait_for(40)
        stream.wait_for(PART)
        burst.killed_at = time.monotonic()
        kill(server.process)
        burst.join()
        stream.join()
    check_database(home)
    chain_is_whole(audit)
    check_no_entry_for(audit, before, stream)
    check_burst(home, audit, before, burst)
    verified = CliRunner().invoke(cli, ["audit", "verify"], env={"FEDSYNTH_HOME": str(home)})
    assert verified.exit_code == 0 and f"verified: {audit.count()} entries" in verified.stdout
    with restarted(home) as url:
        serves_and_chains(url, tokens, audit)
    chain_is_whole(audit)


@pytest.mark.slow
def test_three_kills_during_streams_and_bursts_then_fedsynth_serve_starts_clean(
    home, tokens, tmp_path
):
    """Kills at random moments of a 10M-row stream and a burst running together, each
    followed by a real ``fedsynth serve`` restart over the same home."""
    rng = random.Random(6)
    audit = AuditLog(Database(database_url(home)))
    for cycle in range(3):
        log = tmp_path / f"serve{cycle}.log"
        with serve_process(home, log, "--max-rows", str(ROWS)) as server:
            before = audit.count()
            stream = Stream(server.url, tokens["analyst"], seed=1000 + cycle)
            burst = Burst(server.url, tokens, label=f"cycle{cycle}", threads=6)
            stream.start()
            burst.start()
            burst.wait_for(20)
            stream.wait_for(2**20)
            time.sleep(rng.uniform(0, 2))
            burst.killed_at = time.monotonic()
            kill(server.process)
            burst.join()
            stream.join()
        check_database(home)
        chain_is_whole(audit)
        check_burst(home, audit, before, burst)
        check_no_entry_for(audit, before, stream)
    with serve_process(home, tmp_path / "serve-final.log", "--max-rows", str(ROWS)) as server:
        serves_and_chains(server.url, tokens, audit)
    verified = subprocess.run(
        [sys.executable, "-m", "fedsynth.cli", "audit", "verify"],
        env={**os.environ, "FEDSYNTH_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verified.returncode == 0 and "audit chain verified" in verified.stdout
    check_database(home)


# ---------------------------------------------------------------------------- full disk


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes that would take any file past ``limit`` bytes fail with EFBIG, as on a full
    disk; root is bound too. Nothing may print inside: stdout may be a file."""
    # Python ignores SIGXFSZ at start-up; otherwise the kernel would kill this process.
    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def _registry(home: Path) -> ModelRegistry:
    return ModelRegistry(
        home / "registry", SigningKeys(home / "keys"), Database(database_url(home))
    )


def _register(registry: ModelRegistry, model, federation: str = "clinic"):
    return registry.register(
        model,
        federation=federation,
        sector="hospital",
        run_id=None,
        round=3,
        node_privacy=PRIVACY,
        participants=["north", "south"],
    )


def _snapshot(registry: ModelRegistry) -> tuple[list[str], list[str]]:
    """Every path under the registry, and every version row."""
    paths = sorted(p.relative_to(registry.root).as_posix() for p in registry.root.rglob("*"))
    with registry.db.session() as session:
        rows = sorted(session.scalars(select(ModelVersionRecord.id)))
    return paths, rows


def _still_intact(registry: ModelRegistry) -> None:
    for model_id in ("clinic-v1", "bank-v1"):
        assert len(registry.load(model_id).sample(20, seed=1)) == 20
        assert registry.manifest(model_id)["id"] == model_id


def test_a_full_disk_while_registering_names_the_file_and_leaves_nothing(home):
    registry = _registry(home)
    model = registry.load("clinic-v1")
    with tempfile.TemporaryDirectory() as plain:
        largest = max(p.stat().st_size for p in model.save(plain).iterdir())
    before = _snapshot(registry)
    # The plaintext fits; its ciphertext (nonce and tag added) does not.
    with file_size_limit(largest), pytest.raises(RegistryError) as refused:
        _register(registry, model)
    message = str(refused.value)
    target = home / "registry" / "clinic" / "v2" / "weights.safetensors.enc"
    assert message.startswith("model clinic-v2: cannot write") and str(target) in message
    assert "File too large" in message and "disk full" in message
    assert _snapshot(registry) == before  # no staging or version directory, no row
    _still_intact(registry)
    check_database(home)
    assert _register(registry, model).id == "clinic-v2"  # space again: the next one works


def test_a_full_disk_under_the_database_while_registering_removes_the_version(home):
    registry = _registry(home)
    model = registry.load("clinic-v1")
    audit = AuditLog(registry.db)
    wal = Path(f"{home / 'fedsynth.db'}-wal")
    limit = max(p.stat().st_size for p in (home / "registry" / "clinic" / "v1").iterdir()) + 4096
    # SQLite appends to its write-ahead log until a checkpoint (1000 pages): grow it past
    # the limit, so that the registry's files still fit but the database's next write not.
    while not wal.exists() or wal.stat().st_size <= limit:
        audit.append("padding", "test", {"pad": "x" * 3000})
    before = _snapshot(registry)
    with file_size_limit(limit), pytest.raises(RegistryError) as refused:
        _register(registry, model)
    message = str(refused.value)
    assert message.startswith("model clinic-v2: cannot record the version in Database(")
    assert str(home / "fedsynth.db") in message and "nothing was registered" in message
    assert _snapshot(registry) == before
    _still_intact(registry)
    check_database(home)
    chain_is_whole(audit)


def test_a_full_disk_refuses_an_audit_event_whole_and_the_chain_goes_on(home):
    audit = AuditLog(Database(database_url(home)))
    audit.append("before", "test", {"n": 1})
    count = audit.count()
    with file_size_limit(0), pytest.raises(AuditWriteError) as refused:
        audit.append("key_created", "test", {"key": "k1"})
    message = str(refused.value)
    assert "'key_created' event" in message and str(home / "fedsynth.db") in message
    assert "nothing was written" in message
    assert audit.count() == count
    check_database(home)
    chain_is_whole(audit)
    after = audit.append("after", "test", {"n": 2})
    assert after.seq == count + 1 and audit.verify().ok


# ---------------------------------------------------------------------------- read-only


@contextmanager
def read_only(*directories: Path) -> Iterator[None]:
    """The directories are mode 555 for the block; as root, the block runs with the
    effective uid of ``nobody``, since root ignores file modes. Their parents must be
    searchable by that user."""
    modes = [d.stat().st_mode for d in directories]
    for directory in directories:
        directory.chmod(0o555)
    try:
        if os.geteuid() != 0:
            yield
            return
        os.seteuid(pwd.getpwnam("nobody").pw_uid)
        try:
            yield
        finally:
            os.seteuid(0)
    finally:
        for directory, mode in zip(directories, modes, strict=True):
            directory.chmod(mode)


def test_a_read_only_registry_names_the_directory_and_leaves_nothing(template):
    with tempfile.TemporaryDirectory() as base:  # in /tmp: searchable by nobody
        home = Path(base) / "home"
        shutil.copytree(template[0], home)
        for path in (Path(base), home, home / "registry"):
            path.chmod(0o755)
        registry = _registry(home)
        model = registry.load("clinic-v1")  # reads the keys, while this process may
        before = _snapshot(registry)
        root, directory = home / "registry", home / "registry" / "clinic"
        with read_only(root, directory):
            assert os.access(directory, os.X_OK, effective_ids=True)
            assert not os.access(directory, os.W_OK, effective_ids=True)
            with pytest.raises(RegistryError) as refused:
                _register(registry, model)
            with pytest.raises(RegistryError) as new_federation:
                _register(registry, model, federation="ward")
        message = str(refused.value)
        assert message.startswith(f"model clinic-v2: cannot write {directory} (Permission denied")
        message = str(new_federation.value)
        assert message.startswith(f"model ward-v1: cannot write {root / 'ward'} (Permission")
        assert _snapshot(registry) == before
        with registry.db.session() as session:  # not even the new federation's row
            assert session.get(Federation, "ward") is None
        _still_intact(registry)
        check_database(home)
        registry.db.dispose()


# ---------------------------------------------------------------------------- tampering


def _flip(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))


def test_a_model_with_one_flipped_byte_is_refused_at_load_with_one_audit_event(home, tokens):
    _flip(home / "registry" / "clinic" / "v1" / "weights.safetensors.enc")
    api = create_app(home)
    audit = api.state.services.audit
    before = audit.count()
    with serving(api) as url, httpx.Client(base_url=url, timeout=60) as client:
        analyst = _auth(tokens["analyst"])
        refused = client.post(SAMPLES, json={"n": 10}, headers=analyst)
        served = client.post("/v1/models/bank-v1/samples", json={"n": 10}, headers=analyst)
    assert refused.status_code == 500 and "'clinic-v1'" in refused.json()["detail"]
    declared = api.openapi()["paths"]["/v1/models/{model_id}/samples"]["post"]["responses"]
    assert "500" in declared  # a documented answer, not a crash
    assert "refused" in refused.json()["detail"] and str(home) not in refused.text
    assert served.status_code == 200  # the other model still serves
    new = entries(audit, before)
    assert [e.event_type for e in new] == ["model_refused", "sample_request"]
    event = new[0]
    assert event.actor == "api" and event.payload["model"] == "clinic-v1"
    assert "weights.safetensors.enc" in event.payload["reason"]
    assert "altered" in event.payload["reason"]
    assert not any(form in json.dumps(event.payload) for form in registry_secrets(home / "keys"))
    assert new[1].payload["model"] == "bank-v1"  # no sample_request for the refused model
    chain_is_whole(audit)
    api.state.services.db.dispose()


def test_a_model_signed_by_another_key_is_refused_by_api_and_cli_with_audit_events(
    home, tokens, tmp_path, monkeypatch
):
    version = home / "registry" / "bank" / "v1"
    intruder = SigningKeys(tmp_path / "intruder")
    (version / "manifest.sig").write_bytes(intruder.sign((version / "manifest.json").read_bytes()))
    api = create_app(home)
    audit = api.state.services.audit
    before = audit.count()
    with serving(api) as url, httpx.Client(base_url=url, timeout=60) as client:
        detail = client.get("/v1/models/bank-v1", headers=_auth(tokens["compliance"]))
        sample = client.post(
            "/v1/models/bank-v1/samples", json={"n": 10}, headers=_auth(tokens["analyst"])
        )
    assert detail.status_code == sample.status_code == 500
    monkeypatch.setenv("FEDSYNTH_HOME", str(home))
    shown = CliRunner().invoke(cli, ["models", "show", "bank-v1"])
    assert shown.exit_code == 2 and "signature does not verify" in shown.output
    new = entries(audit, before)
    assert [(e.event_type, e.actor) for e in new] == [("model_refused", "api")] * 2 + [
        ("model_refused", "cli")
    ]
    secrets = registry_secrets(home / "keys") + registry_secrets(tmp_path / "intruder")
    for event in new:
        assert event.payload["model"] == "bank-v1"
        assert "signature does not verify" in event.payload["reason"]
        assert not any(form in json.dumps(event.payload) for form in secrets)
    chain_is_whole(audit)
    api.state.services.db.dispose()
