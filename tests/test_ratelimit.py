"""Failed authentications per client: counted in a sliding window, then refused."""

from __future__ import annotations

import httpx
import pytest

from fedsynth.cli import _api
from fedsynth.server.api.app import create_app
from fedsynth.server.api.ratelimit import FailureLimiter
from fedsynth.server.audit import AuditLog
from fedsynth.server.records import Database, database_url
from tests.factories import populate
from tests.http import serving


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_client_is_refused_after_the_limit_until_the_window_passes():
    clock = Clock()
    limiter = FailureLimiter(failures=3, window_s=60, clock=clock)
    assert [limiter.failed("a"), limiter.failed("a")] == [False, False]
    assert limiter.retry_after("a") == 0
    assert limiter.failed("a") is True  # the third reaches the limit, once
    assert limiter.retry_after("a") == 60
    assert limiter.retry_after("b") == 0  # other clients are not affected
    clock.now += 45
    assert limiter.retry_after("a") == 15
    clock.now += 15
    assert limiter.retry_after("a") == 0  # the oldest failure left the window


def test_failures_spread_over_time_never_reach_the_limit():
    clock = Clock()
    limiter = FailureLimiter(failures=3, window_s=60, clock=clock)
    for _ in range(10):
        assert limiter.failed("a") is False
        clock.now += 31  # at most two in any 60 s
        assert limiter.retry_after("a") == 0


@pytest.mark.parametrize(("failures", "window"), [(0, 60), (3, 0), (3, -1)])
def test_settings_are_checked(failures, window):
    with pytest.raises(ValueError):
        FailureLimiter(failures=failures, window_s=window)


def test_api_refuses_a_client_after_three_wrong_keys_even_with_a_right_one(tmp_path):
    tokens = populate(tmp_path)
    wrong = tokens["analyst"][:-4] + "zzzz"
    with serving(create_app(tmp_path, auth_failures=3)) as url:
        client = httpx.Client(base_url=url, timeout=60)

        def models(token: str) -> httpx.Response:
            return client.get("/v1/models", headers={"Authorization": f"Bearer {token}"})

        assert [models(wrong).status_code for _ in range(3)] == [401, 401, 401]
        refused = models(tokens["analyst"])
        assert refused.status_code == 429
        assert 0 < int(refused.headers["retry-after"]) <= 60
        assert "too many failed authentications" in refused.json()["detail"]
        events = AuditLog(Database(database_url(tmp_path))).events(limit=1000)
        limited = [e for e in events if e.event_type == "auth_rate_limited"]
        assert len(limited) == 1 and limited[0].payload["client"] == "127.0.0.1"
        assert all(wrong not in str(e.payload) for e in events)
        assert client.get("/health").status_code == 200  # no key needed, never limited


def test_dashboard_sign_in_is_limited_by_the_same_counter(tmp_path):
    tokens = populate(tmp_path)
    with serving(_api(tmp_path, auth_failures=2)) as url:
        client = httpx.Client(base_url=url, timeout=60)

        def sign_in(key: str) -> httpx.Response:
            form = client.get("/dashboards/login").text
            csrf = form.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
            return client.post("/dashboards/login", data={"api_key": key, "csrf_token": csrf})

        assert [sign_in("fsk_nope_x").status_code for _ in range(2)] == [401, 401]
        refused = sign_in(tokens["compliance"])
        assert refused.status_code == 429
        assert "Too many failed sign-ins" in refused.text and refused.headers["retry-after"]
