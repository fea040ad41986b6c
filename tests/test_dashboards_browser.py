"""The dashboards in a real browser: Debian's Chromium, driven by Playwright, headless and
kept off the network, against a real uvicorn server on loopback.

Screenshots of every page at 1280x800 and 390x844 are written to artifacts/screenshots/
(ignored by git). ``.ci/run`` installs Chromium; elsewhere without it these tests skip,
saying why, except under CI, where a missing browser is a failure.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import text

from fedsynth.server.records import Database, database_url
from tests.dashboard_server import CAP, LATEST_EPSILON, dashboards
from tests.factories import populate, small_spec

CHROMIUM = os.environ.get("FEDSYNTH_TEST_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[1] / "artifacts" / "screenshots"
SIZES = {"desktop": (1280, 800), "phone": (390, 844)}
#: Keep the browser to loopback: no name resolves but 127.0.0.1, no background traffic.
OFFLINE_ARGS = [
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--no-proxy-server",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-domain-reliability",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--metrics-recording-only",
]

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect
if not shutil.which(CHROMIUM):
    if os.environ.get("CI"):
        raise RuntimeError(f"CI must install Chromium ({CHROMIUM} not found): see .ci/run")
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

QUALITY = {"column_shapes": 0.81, "dcr_mean": 0.2}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    tokens = populate(home, quality=QUALITY)
    with dashboards(home) as url:
        yield {"url": url, "tokens": tokens, "home": home}


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=OFFLINE_ARGS)
        yield chromium
        chromium.close()


def _page(browser, size: str = "desktop"):
    width, height = SIZES[size]
    context = browser.new_context(
        viewport={"width": width, "height": height}, accept_downloads=True
    )
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # Console errors count (a CSP violation, a failed script) but not an HTTP status, such
    # as the 403 of a refused page: tests assert those directly.
    page.on(
        "console",
        lambda m: (
            errors.append(m.text)
            if m.type == "error" and not m.text.startswith("Failed to load resource")
            else None
        ),
    )
    page.errors = errors  # type: ignore[attr-defined]
    return page


def _login(page, site, role: str) -> None:
    """Sign in with the keyboard alone: the key field has focus, Enter submits."""
    page.goto(site["url"] + "/dashboards/login")
    expect(page.locator("#api_key")).to_be_focused()
    page.keyboard.type(site["tokens"][role])
    page.keyboard.press("Enter")
    page.wait_for_url(lambda url: "/dashboards/login" not in url)


def _charts_drawn(page) -> None:
    """Every chart drawn by plotly.js (the page's script marks each one when done). A
    locator, not wait_for_function, whose string predicate the page's CSP forbids."""
    expect(page.locator("[data-figure]:not([data-rendered='true'])")).to_have_count(0)


def _shoot(page, name: str, size: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}-{size}.png"), full_page=True)


def test_compliance_chart_has_one_trace_per_node_with_its_latest_epsilon(site, browser):
    page = _page(browser)
    _login(page, site, "compliance")
    assert page.url.endswith("/dashboards/compliance")
    _charts_drawn(page)
    traces = page.evaluate(
        "() => document.getElementById('burndown-clinic').data"
        ".map(t => [t.meta.node, t.y[t.y.length - 1], t.name])"
    )
    assert sorted(node for node, _, _ in traces) == sorted(LATEST_EPSILON)
    for node, last, name in traces:
        assert last == pytest.approx(LATEST_EPSILON[node])
        assert "past 80% of cap" in name  # both are past 0.8 of a cap of 1.0
    caps = page.evaluate(
        "() => document.getElementById('burndown-clinic').layout.shapes.map(s => s.y0)"
    )
    assert caps == [CAP]
    rendered = page.locator("#burndown-clinic .scatterlayer .trace").count()
    assert rendered == len(LATEST_EPSILON)  # drawn in the SVG, not only in the data
    for node, epsilon in LATEST_EPSILON.items():
        cell = page.locator(f'tr[data-node="{node}"] td.epsilon')
        assert cell.inner_text().strip() == f"{epsilon:.3f}"
    assert page.errors == []  # type: ignore[attr-defined]


def test_audit_page_shows_verified_then_the_first_tampered_entry(site, browser):
    page = _page(browser)
    _login(page, site, "compliance")
    page.goto(site["url"] + "/dashboards/compliance/audit")
    status = page.locator("#chain-status")
    assert "Audit chain verified" in status.inner_text()
    db = Database(database_url(site["home"]))
    with db.session() as s:
        original = s.execute(text("SELECT payload_json FROM audit_events WHERE seq = 2")).scalar()
        s.execute(text("UPDATE audit_events SET payload_json = '{\"forged\": true}' WHERE seq = 2"))
    try:
        page.reload()
        assert "Audit chain broken at entry 2" in status.inner_text()
        assert page.locator('tr.broken[data-seq="2"]').count() == 1
        _shoot(page, "audit-broken", "desktop")
    finally:
        with db.session() as s:
            s.execute(
                text("UPDATE audit_events SET payload_json = :p WHERE seq = 2"), {"p": original}
            )
    page.reload()
    assert "Audit chain verified" in status.inner_text()


def test_analyst_downloads_10000_rows_as_csv_with_the_schemas_columns(site, browser, tmp_path):
    page = _page(browser)
    _login(page, site, "analyst")
    assert page.url.endswith("/dashboards/analyst")
    page.get_by_role("link", name="clinic-v1").click()
    _charts_drawn(page)
    assert page.get_by_label("Rows", exact=True).input_value() == "10000"
    page.get_by_label("Format", exact=True).select_option("csv")
    with page.expect_download() as download:
        page.get_by_role("button", name="Download rows").click()
    path = tmp_path / download.value.suggested_filename
    download.value.save_as(path)
    frame = pd.read_csv(path)
    assert len(frame) == 10_000
    assert list(frame.columns) == [c.name for c in small_spec().schema.modelled]
    assert page.errors == []  # type: ignore[attr-defined]


def test_roles_cannot_open_each_others_pages(site, browser):
    for role, other in (
        ("analyst", "/dashboards/compliance"),
        ("compliance", "/dashboards/analyst"),
    ):
        page = _page(browser)
        _login(page, site, role)
        response = page.goto(site["url"] + other)
        assert response is not None and response.status == 403
        assert page.get_by_role("heading", name="Not for your role").is_visible()
        page.context.close()


PAGES = {
    "compliance": [
        ("budgets", "/dashboards/compliance"),
        ("node", "/dashboards/compliance/nodes/clinic/west"),
        ("audit", "/dashboards/compliance/audit"),
    ],
    "analyst": [
        ("catalogue", "/dashboards/analyst"),
        ("model", "/dashboards/analyst/models/clinic-v1"),
        ("forbidden", "/dashboards/compliance"),
    ],
}


@pytest.mark.parametrize("size", sorted(SIZES))
def test_every_page_renders_without_errors_at_both_sizes(site, browser, size):
    page = _page(browser, size)
    page.goto(site["url"] + "/dashboards/login")
    _shoot(page, "login", size)
    for role, pages in PAGES.items():
        _login(page, site, role)
        for name, path in pages:
            page.goto(site["url"] + path)
            _charts_drawn(page)
            # Nothing wider than the window but the scrolling table boxes.
            overflow = page.evaluate(
                "() => document.documentElement.scrollWidth - window.innerWidth"
            )
            assert overflow <= 0, f"{path} is {overflow}px wider than a {size} screen"
            _shoot(page, name, size)
        page.locator("form.logout button").click()
        page.wait_for_url("**/dashboards/login")
    assert page.errors == []  # type: ignore[attr-defined]
    assert len(list(SCREENSHOTS.glob(f"*-{size}.png"))) >= 1 + sum(map(len, PAGES.values()))
