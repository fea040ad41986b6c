"""Dashboards over real HTTP (uvicorn on a free port, httpx as the browser): login and
sessions, roles, CSRF, downloads, empty states and security headers. The pages as a
browser draws them are tested in test_dashboards_browser.py."""

from __future__ import annotations

import io
import re

import httpx
import pandas as pd
import pytest

from fedsynth.dashboards import plotly_js
from fedsynth.dashboards.compliance import _budget_row
from fedsynth.server.api.budgets import Budget
from fedsynth.server.api.keys import KeyStore
from fedsynth.server.audit import AuditLog
from fedsynth.server.records import Database, database_url
from tests.dashboard_server import LATEST_EPSILON, csrf_field, dashboards
from tests.factories import populate, small_spec

QUALITY = {"column_shapes": 0.81, "dcr_mean": 0.2}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    tokens = populate(home, quality=QUALITY)
    with dashboards(home, max_rows=50_000) as url:
        yield {"url": url, "tokens": tokens, "home": home}


def _browser(site) -> httpx.Client:
    return httpx.Client(base_url=site["url"], timeout=60, follow_redirects=False)


def _login(site, role: str) -> httpx.Client:
    client = _browser(site)
    form = client.get("/dashboards/login")
    response = client.post(
        "/dashboards/login",
        data={"api_key": site["tokens"][role], "csrf_token": csrf_field(form.text)},
    )
    assert response.status_code == 303, response.text
    return client


def _audit(site) -> AuditLog:
    return AuditLog(Database(database_url(site["home"])))


def test_login_sets_a_strict_httponly_session_cookie_and_lands_by_role(site):
    for role, home in (
        ("compliance", "/dashboards/compliance"),
        ("analyst", "/dashboards/analyst"),
    ):
        client = _browser(site)
        form = client.get("/dashboards/login")
        assert 'name="api_key"' in form.text and '<label for="api_key">' in form.text
        response = client.post(
            "/dashboards/login",
            data={"api_key": site["tokens"][role], "csrf_token": csrf_field(form.text)},
        )
        assert response.status_code == 303
        assert response.headers["location"] == home
        cookie = next(
            c for c in response.headers.get_list("set-cookie") if c.startswith("fedsynth_session=")
        )
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/dashboards" in cookie
        assert site["tokens"][role] not in cookie  # the key itself never goes to the browser
        assert client.get(home).status_code == 200


def test_a_wrong_key_is_refused_and_audited_without_the_key(site):
    client = _browser(site)
    form = client.get("/dashboards/login")
    wrong = site["tokens"]["analyst"][:-4] + "abcd"
    response = client.post(
        "/dashboards/login", data={"api_key": wrong, "csrf_token": csrf_field(form.text)}
    )
    assert response.status_code == 401
    assert "Unknown or revoked API key" in response.text
    assert "fedsynth_session" not in response.headers.get("set-cookie", "")
    failures = _audit(site).events(event_type="auth_failed", limit=1000)
    assert any(e.payload.get("path") == "/dashboards/login" for e in failures)
    assert all(wrong not in str(e.payload) and wrong not in e.actor for e in failures)


def test_login_without_the_form_token_is_refused(site):
    client = _browser(site)
    response = client.post("/dashboards/login", data={"api_key": site["tokens"]["admin"]})
    assert response.status_code == 403
    assert "fedsynth_session" not in response.headers.get("set-cookie", "")


def test_pages_need_a_session(site):
    client = _browser(site)
    for path in ("/dashboards/compliance", "/dashboards/analyst", "/dashboards/compliance/audit"):
        response = client.get(path)
        assert response.status_code == 303
        assert response.headers["location"] == f"/dashboards/login?next={path}"
    # After login the visitor lands where it was going; a foreign target is ignored.
    for wanted, lands in (
        ("/dashboards/compliance/audit", "/dashboards/compliance/audit"),
        ("https://elsewhere.example/", "/dashboards/compliance"),
        ("//elsewhere.example/x", "/dashboards/compliance"),
    ):
        client = _browser(site)
        form = client.get("/dashboards/login", params={"next": wanted})
        response = client.post(
            "/dashboards/login",
            data={
                "api_key": site["tokens"]["admin"],
                "csrf_token": csrf_field(form.text),
                "next": wanted,
            },
        )
        assert response.headers["location"] == lands


def test_each_role_sees_only_its_pages_and_refusals_are_audited(site):
    analyst, officer, admin = (_login(site, r) for r in ("analyst", "compliance", "admin"))
    compliance_pages = [
        "/dashboards/compliance",
        "/dashboards/compliance/audit",
        "/dashboards/compliance/nodes/clinic/north",
        "/dashboards/compliance/audit/export?format=csv",
    ]
    analyst_pages = ["/dashboards/analyst", "/dashboards/analyst/models/clinic-v1"]
    before = len(_audit(site).events(event_type="forbidden", limit=1000))
    for path in compliance_pages:
        assert analyst.get(path).status_code == 403, path
        assert officer.get(path).status_code == 200, path
        assert admin.get(path).status_code == 200, path
    for path in analyst_pages:
        assert officer.get(path).status_code == 403, path
        assert analyst.get(path).status_code == 200, path
        assert admin.get(path).status_code == 200, path
    after = _audit(site).events(event_type="forbidden", limit=1000)
    assert len(after) - before == len(compliance_pages) + len(analyst_pages)
    assert "Not for your role" in officer.get("/dashboards/analyst").text


def test_overview_shows_each_nodes_latest_spend_and_flags_nodes_near_their_cap(site):
    page = _login(site, "compliance").get("/dashboards/compliance").text
    for node, epsilon in LATEST_EPSILON.items():
        row = re.search(rf'<tr[^>]*data-node="{node}">(.*?)</tr>', page, re.S)
        assert row, node
        assert f"{epsilon:.3f}" in row.group(1)
    # Both are past 80% of their cap of 1.0 (0.82 and 0.95), and so flagged.
    assert len(re.findall(r'<tr class="near-cap" data-node="(north|west)">', page)) == 2
    assert "Audit chain verified" in page


def test_only_nodes_past_80_percent_of_their_cap_are_flagged():
    def row(spent: float | None, cap: float | None) -> dict:
        budget = Budget(
            federation="f",
            node="n",
            epsilon_spent=spent,
            delta=1e-5,
            epsilon_cap=cap,
            epsilon_remaining=None,
            rounds_trained=1,
            refusals=0,
        )
        return _budget_row(budget)

    assert row(0.79, 1.0)["near_cap"] is False
    assert row(0.8, 1.0)["near_cap"] is True
    assert row(2.0, None)["near_cap"] is False and row(None, 1.0)["near_cap"] is False


def test_scoped_analyst_sees_only_its_federation_and_gets_404_elsewhere(site):
    client = _login(site, "clinic-analyst")
    catalogue = client.get("/dashboards/analyst").text
    assert "clinic-v1" in catalogue and "bank-v1" not in catalogue
    response = client.get("/dashboards/analyst/models/bank-v1")
    assert response.status_code == 404
    assert "No model &#39;bank-v1&#39;" in response.text


def test_download_form_streams_the_requested_rows_with_provenance(site):
    client = _login(site, "analyst")
    page = client.get("/dashboards/analyst/models/clinic-v1")
    response = client.post(
        "/dashboards/analyst/models/clinic-v1/download",
        data={
            "csrf_token": csrf_field(page.text),
            "n": "2500",
            "seed": "3",
            "format": "csv",
            "condition.ward": "rare",
            "condition.smoker": "",
        },
    )
    assert response.status_code == 200, response.text[:500]
    assert response.headers["x-fedsynth-label"] == "synthetic"
    assert 'filename="clinic-v1-synthetic.csv"' in response.headers["content-disposition"]
    frame = pd.read_csv(io.BytesIO(response.content))
    modelled = [c.name for c in small_spec().schema.modelled]
    assert list(frame.columns) == modelled and len(frame) == 2500
    assert (frame["ward"] == "rare").all()
    last = _audit(site).events(event_type="sample_request", limit=1000)[-1]
    assert last.payload["n"] == 2500 and last.payload["conditions"] == {"ward": "rare"}


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"n": "0"}, "n: Input should be greater than or equal to 1"),
        ({"n": "many"}, "n: Input should be a valid integer"),
        ({"n": "60000"}, "n: at most 50000 rows per request"),
        ({"format": "xlsx"}, "format: Input should be"),
        ({"condition.ward": "d"}, "condition on 'ward': 'd' is not a declared category"),
    ],
)
def test_bad_download_fields_re_show_the_form_naming_the_field(site, fields, named):
    client = _login(site, "analyst")
    page = client.get("/dashboards/analyst/models/clinic-v1")
    data = {"csrf_token": csrf_field(page.text), "n": "10", "seed": "0", "format": "csv", **fields}
    response = client.post("/dashboards/analyst/models/clinic-v1/download", data=data)
    assert response.status_code == 422
    assert named in response.text.replace("&#39;", "'")


def test_download_without_the_session_csrf_token_is_refused(site):
    client = _login(site, "analyst")
    before = len(_audit(site).events(event_type="sample_request", limit=1000))
    response = client.post(
        "/dashboards/analyst/models/clinic-v1/download",
        data={"csrf_token": "forged", "n": "10", "format": "csv"},
    )
    assert response.status_code == 422
    assert "form expired or came from another site" in response.text
    assert len(_audit(site).events(event_type="sample_request", limit=1000)) == before


def test_logout_and_key_revocation_end_the_session(site):
    client = _login(site, "compliance")
    page = client.get("/dashboards/compliance")
    assert (
        client.post("/dashboards/logout", data={"csrf_token": csrf_field(page.text)}).status_code
        == 303
    )
    assert client.get("/dashboards/compliance").status_code == 303

    db = Database(database_url(site["home"]))
    keys = KeyStore(db)
    info, token = keys.create("compliance")
    client = _browser(site)
    form = client.get("/dashboards/login")
    client.post("/dashboards/login", data={"api_key": token, "csrf_token": csrf_field(form.text)})
    assert client.get("/dashboards/compliance").status_code == 200
    keys.revoke(info.id)
    assert client.get("/dashboards/compliance").status_code == 303


def test_audit_page_filters_pages_and_names_a_bad_time(site):
    client = _login(site, "compliance")
    for _ in range(60):  # more than one page of entries
        _audit(site).append("test_event", "tester", {"federation": "clinic"})
    first = client.get("/dashboards/compliance/audit", params={"event_type": "test_event"})
    seqs = [int(s) for s in re.findall(r'data-seq="(\d+)"', first.text)]
    assert len(seqs) == 50 and seqs == sorted(seqs)
    cursor = re.search(r'href="([^"]*cursor=\d+[^"]*)"', first.text)
    assert cursor, "no next-page link"
    second = client.get(cursor.group(1).replace("&amp;", "&"))
    more = [int(s) for s in re.findall(r'data-seq="(\d+)"', second.text)]
    assert len(more) == 10 and min(more) > max(seqs)
    bad = client.get("/dashboards/compliance/audit", params={"since": "yesterday"})
    assert bad.status_code == 422 and "since: &#39;yesterday&#39; is not a date" in bad.text


def test_audit_export_downloads_the_trail(site):
    response = _login(site, "compliance").get(
        "/dashboards/compliance/audit/export", params={"format": "csv"}
    )
    assert response.status_code == 200
    frame = pd.read_csv(io.BytesIO(response.content))
    assert list(frame.columns)[:3] == ["seq", "created_at", "event_type"]
    assert len(frame) >= 5


def test_pages_carry_security_headers_and_load_scripts_only_from_this_site(site):
    client = _login(site, "admin")
    for path in (
        "/dashboards/login",
        "/dashboards/compliance",
        "/dashboards/analyst/models/clinic-v1",
    ):
        response = client.get(path)
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["cache-control"] == "no-store"
        scripts = re.findall(r"<script[^>]*\ssrc=\"([^\"]+)\"", response.text)
        assert all(src.startswith("/dashboards/static/") for src in scripts), scripts
        assert "<script>" not in response.text  # no inline script for the CSP to allow
    plotly = re.search(
        r'src="(/dashboards/static/plotly-[^"]+)"', client.get("/dashboards/compliance").text
    )
    assert plotly
    served = client.get(plotly.group(1))
    assert served.status_code == 200 and served.content == plotly_js().read_bytes()
    assert client.get("/dashboards/static/fedsynth.db").status_code == 404
    # The API's own responses pass through untouched.
    assert "content-security-policy" not in client.get("/health").headers


def test_empty_home_says_what_to_do(tmp_path):
    home = tmp_path / "empty"
    home.mkdir()
    db = Database(database_url(home))
    token = KeyStore(db).create("admin")[1]
    with dashboards(home) as url:
        client = httpx.Client(base_url=url, timeout=30)
        form = client.get("/dashboards/login")
        client.post(
            "/dashboards/login", data={"api_key": token, "csrf_token": csrf_field(form.text)}
        )
        models = client.get("/dashboards/analyst").text
        assert "No model registered yet: run <code>fedsynth demo</code>" in models
        budgets = client.get("/dashboards/compliance").text
        assert "No federation has trained yet" in budgets
