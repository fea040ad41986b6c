"""The API with the dashboards over a home that ``tests.factories.populate`` filled.

Shared by the HTTP and the browser tests of the dashboards: a real uvicorn server over the
app the CLI builds (``fedsynth.cli._api``: the API with the dashboards mounted).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from fedsynth.cli import _api
from tests.http import serving

#: What tests.factories.clinic_records makes the nodes report: latest epsilon and cap.
LATEST_EPSILON = {"north": 0.82, "west": 0.95}
CAP = 1.0


@contextmanager
def dashboards(home: Path, **settings: int) -> Iterator[str]:
    """Serve the API and dashboards over ``home``; yields the base URL."""
    with serving(_api(home, **settings)) as url:
        yield url


def csrf_field(html: str) -> str:
    """The value of a page's hidden ``csrf_token`` form field."""
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "no csrf_token field on the page"
    return found.group(1)


def logged_in(url: str, token: str) -> httpx.Client:
    """A browser-like client of the dashboards at ``url``, signed in with ``token``."""
    browser = httpx.Client(base_url=url, timeout=60)
    form = browser.get("/dashboards/login")
    browser.post("/dashboards/login", data={"api_key": token, "csrf_token": csrf_field(form.text)})
    return browser
