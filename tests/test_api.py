"""The HTTP API over real HTTP: a uvicorn server on a free port, httpx as the client."""

from __future__ import annotations

import io
import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pandas as pd
import pyarrow.parquet as pq
import pytest
from sqlalchemy import text

from fedsynth.server.api.app import create_app
from fedsynth.server.audit import AuditLog
from fedsynth.server.records import Database, database_url
from tests.factories import populate
from tests.http import serve_process, serving


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    tokens = populate(home)
    with serving(create_app(home, max_rows=3_000_000)) as url:
        yield {"url": url, "tokens": tokens, "db": Database(database_url(home)), "home": home}


def _client(server, role: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {server['tokens'][role]}"} if role else {}
    return httpx.Client(base_url=server["url"], headers=headers, timeout=120)


ROUTES = [
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/clinic-v1", None),
    ("POST", "/v1/models/clinic-v1/samples", {"n": 10}),
    ("GET", "/v1/privacy/budgets", None),
    ("GET", "/v1/privacy/budgets/clinic/north", None),
    ("GET", "/v1/audit", None),
    ("GET", "/v1/audit/verify", None),
    ("GET", "/v1/audit/export", None),
    ("GET", "/v1/keys", None),
    ("POST", "/v1/keys", {"role": "analyst"}),
]
ALLOWED = {
    "analyst": {0, 1, 2},
    "compliance": {0, 1, 3, 4, 5, 6, 7},
    "admin": set(range(len(ROUTES))),
}


@pytest.mark.parametrize("role", [None, "analyst", "compliance", "admin"])
def test_role_matrix(server, role):
    with _client(server, role) as client:
        assert client.get("/health").status_code == 200
        for i, (method, path, body) in enumerate(ROUTES):
            status = client.request(method, path, json=body).status_code
            if role is None:
                assert status == 401, (path, status)
            elif i in ALLOWED[role]:
                assert status in (200, 201), (role, path, status)
            else:
                assert status == 403, (role, path, status)


def test_unknown_and_revoked_keys_are_refused_and_audited(server):
    with httpx.Client(base_url=server["url"]) as client:
        bad = client.get("/v1/models", headers={"Authorization": "Bearer fsk_nope_123"})
        assert bad.status_code == 401
    with _client(server, "admin") as admin:
        created = admin.post("/v1/keys", json={"role": "analyst"}).json()
        with httpx.Client(base_url=server["url"]) as client:
            auth = {"Authorization": f"Bearer {created['key']}"}
            assert client.get("/v1/models", headers=auth).status_code == 200
            assert admin.delete(f"/v1/keys/{created['id']}").json()["revoked_at"]
            assert client.get("/v1/models", headers=auth).status_code == 401
    failures = AuditLog(server["db"]).events(event_type="auth_failed", limit=1000)
    assert any(e.actor == "key:nope" for e in failures)
    assert any(e.actor == f"key:{created['id']}" for e in failures)
    assert not any(created["key"] in json.dumps(e.payload) for e in failures)


def test_models_list_and_detail_carry_provenance_and_privacy(server):
    with _client(server, "compliance") as client:
        models = client.get("/v1/models").json()["models"]
        assert {m["id"] for m in models} == {"clinic-v1", "bank-v1"}
        assert all(m["sector"] and m["epsilon"] == pytest.approx(0.9) for m in models)
        detail = client.get("/v1/models/clinic-v1").json()
        assert [c["name"] for c in detail["schema"]][:2] == ["patient", "ward"]
        assert detail["node_privacy"]["south"]["epsilon"] == 0.9
        assert detail["participants"] == ["north", "south"]


def test_a_scoped_key_sees_only_its_federation_and_gets_404_elsewhere(server):
    with _client(server, "clinic-analyst") as client:
        assert [m["id"] for m in client.get("/v1/models").json()["models"]] == ["clinic-v1"]
        assert client.get("/v1/models/bank-v1").status_code == 404
        assert client.post("/v1/models/bank-v1/samples", json={"n": 5}).status_code == 404
        assert client.post("/v1/models/clinic-v1/samples", json={"n": 5}).status_code == 200


def test_same_seed_same_bytes_and_provenance_headers(server):
    with _client(server, "analyst") as client:
        body = {"n": 3000, "seed": 11, "format": "csv"}
        first = client.post("/v1/models/clinic-v1/samples", json=body)
        second = client.post("/v1/models/clinic-v1/samples", json=body)
        other = client.post("/v1/models/clinic-v1/samples", json={**body, "seed": 12})
    assert first.status_code == 200 and first.content == second.content != other.content
    assert first.headers["x-fedsynth-model"] == "clinic-v1"
    assert first.headers["x-fedsynth-label"] == "synthetic"
    assert float(first.headers["x-fedsynth-epsilon"]) == pytest.approx(0.9)
    frame = pd.read_csv(io.BytesIO(first.content))
    assert len(frame) == 3000 and "patient" not in frame.columns


def test_conditions_are_honoured_in_every_row_and_parquet_carries_provenance(server):
    with _client(server, "analyst") as client:
        body = {"n": 2000, "seed": 1, "conditions": {"ward": "rare"}, "format": "parquet"}
        response = client.post("/v1/models/clinic-v1/samples", json=body)
    table = pq.read_table(io.BytesIO(response.content))
    assert table.num_rows == 2000 and set(table.column("ward").to_pylist()) == {"rare"}
    provenance = json.loads(table.schema.metadata[b"fedsynth"])
    assert provenance["model"] == "clinic-v1" and provenance["label"] == "synthetic"


@pytest.mark.parametrize(
    "body,field",
    [
        ({"n": 0}, "n"),
        ({"n": 10, "format": "xlsx"}, "format"),
        ({"n": 10, "conditions": {"nope": "a"}}, "nope"),
        ({"n": 10, "conditions": {"ward": "zzz"}}, "ward"),
        ({"n": 10, "extra": 1}, "extra"),
        ({"n": 10_000_000}, "n"),
    ],
)
def test_invalid_bodies_get_422_naming_the_field(server, body, field):
    with _client(server, "analyst") as client:
        response = client.post("/v1/models/clinic-v1/samples", json=body)
    assert response.status_code == 422
    assert field in json.dumps(response.json()["detail"])


def test_budgets_and_history_per_node(server):
    with _client(server, "compliance") as client:
        budgets = {b["node"]: b for b in client.get("/v1/privacy/budgets").json()["budgets"]}
        assert budgets["north"]["epsilon_spent"] == pytest.approx(0.82)  # its evaluation
        assert budgets["north"]["epsilon_remaining"] == pytest.approx(0.18)
        assert budgets["north"]["rounds_trained"] == 2 and budgets["west"]["refusals"] == 2
        history = client.get("/v1/privacy/budgets/clinic/north").json()
        assert [r["epsilon_spent"] for r in history["rounds"]] == [0.5, 0.8]
        assert client.get("/v1/privacy/budgets/clinic/nobody").status_code == 404


def test_audit_count_equals_requests_under_concurrency_and_the_chain_verifies(server):
    audit = AuditLog(server["db"])
    before = audit.count()

    def one(i: int) -> int:
        with _client(server, "analyst") as client:
            return client.post(
                "/v1/models/clinic-v1/samples", json={"n": 20, "seed": i}
            ).status_code

    with ThreadPoolExecutor(max_workers=20) as pool:
        statuses = list(pool.map(one, range(200)))
    assert statuses == [200] * 200
    events = audit.events(after_seq=before, event_type="sample_request", limit=1000)
    assert len(events) == 200 and audit.count() == before + 200
    assert sorted(e.payload["seed"] for e in events) == list(range(200))
    assert all(e.payload["outcome"] == "completed" and e.payload["bytes"] > 0 for e in events)
    with _client(server, "compliance") as client:
        assert client.get("/v1/audit/verify").json()["ok"] is True


def test_audit_paging_filters_and_export(server):
    with _client(server, "compliance") as client:
        page = client.get("/v1/audit", params={"limit": 5}).json()
        assert len(page["entries"]) == 5 and page["next_cursor"] == page["entries"][-1]["seq"]
        nxt = client.get("/v1/audit", params={"limit": 5, "cursor": page["next_cursor"]}).json()
        assert nxt["entries"][0]["seq"] == page["next_cursor"] + 1
        only = client.get("/v1/audit", params={"event_type": "auth_failed"}).json()["entries"]
        assert only and {e["event_type"] for e in only} == {"auth_failed"}
        exported = client.get("/v1/audit/export", params={"format": "csv"})
        rows = pd.read_csv(io.BytesIO(exported.content))
        assert list(rows.columns[:3]) == ["seq", "created_at", "event_type"] and len(rows) > 5


def test_a_tampered_audit_row_is_reported_with_its_index(server):
    with server["db"].session() as s:
        s.execute(text("UPDATE audit_events SET actor = 'someone-else' WHERE seq = 3"))
    with _client(server, "compliance") as client:
        result = client.get("/v1/audit/verify").json()
    assert result["ok"] is False and result["first_bad"] == 3


def test_streaming_two_million_rows_keeps_memory_flat(server):
    def rss_mib() -> float:
        with open("/proc/self/status") as f:
            line = next(row for row in f if row.startswith("VmRSS"))
        return int(line.split()[1]) / 1024

    with _client(server, "analyst") as client:
        warm = client.post("/v1/models/clinic-v1/samples", json={"n": 100_000})
        assert warm.status_code == 200
        before, peak, total = rss_mib(), 0.0, 0
        with client.stream("POST", "/v1/models/clinic-v1/samples", json={"n": 2_000_000}) as r:
            for chunk in r.iter_bytes():
                total += len(chunk)
                peak = max(peak, rss_mib())
        assert r.status_code == 200
    assert total > 2_000_000 * 20  # every row arrived (CSV, > 20 bytes a row)
    # The server runs in this process: RSS covers it. Bounded growth, not proportional to n.
    assert peak - before < 300, (before, peak)


def test_worker_processes_share_keys_and_one_audit_chain(tmp_path):
    """``fedsynth serve --workers 2``: two processes behind one port, one database."""
    home = tmp_path / "home"
    home.mkdir()
    tokens = populate(home)
    with serve_process(home, tmp_path / "serve.log", workers=2) as server:
        url = server.url
        audit = AuditLog(Database(database_url(home)))
        before = audit.count()
        headers = {"Authorization": f"Bearer {tokens['analyst']}"}

        def ask(seed: int) -> httpx.Response:
            body = {"n": 100, "seed": seed, "format": "csv"}
            return httpx.post(f"{url}/v1/models/clinic-v1/samples", json=body, headers=headers)

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(ask, range(40)))
        assert [r.status_code for r in responses] == [200] * 40
        assert all(len(r.text.splitlines()) == 101 for r in responses)
        pids = set(re.findall(r"Started server process \[(\d+)\]", server.output()))
        assert len(pids) == 2
        assert audit.count() == before + 40
        assert audit.verify().ok
