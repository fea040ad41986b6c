"""Schemathesis against the live OpenAPI document of a real server, with and without keys.

The server is the real app on a free port (``tests.http.serving``) over a home with two
registered models, budget records and keys (``tests.factories.populate``). Schemathesis
loads ``/openapi.json`` from it and runs its engine, what ``schemathesis run`` runs (the
examples, coverage, fuzzing and stateful phases), against every operation, once per caller:
no key and an admin key in the fast suite, an analyst and a compliance key in the slow one.
Every response must pass ``CHECKS``: no 5xx; a documented status code, content type and
headers; a body that matches the documented schema; invalid input refused with a 4xx; and
no route but ``/health`` served without a valid key.

Generation is deterministic (fixed seed, hypothesis derandomized), with ``EXAMPLES`` cases
per operation in the fuzzing phase, so a failure reproduces on the next run.

The fuzzer revokes keys: ``DELETE /v1/keys/{key_id}`` gets ids that ``GET /v1/keys`` and
``POST /v1/keys`` returned, its own among them. Once its key is revoked every request is a
documented 401 and the run proves nothing, so a ``before_call`` hook points any such request
at a fresh victim key instead, and each run asserts that its key still works afterwards.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.engine import events, from_schema
from schemathesis.hooks import GLOBAL_HOOK_DISPATCHER
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from fedsynth.server.api.app import create_app
from fedsynth.server.api.keys import KeyStore
from fedsynth.server.records import Database, database_url
from tests.factories import populate
from tests.http import serving

#: Test cases per operation in the fuzzing phase; the other phases derive theirs from the
#: document (its examples, boundary values, links between operations).
EXAMPLES = 20
SEED = 6
#: Rows a sample request may ask for: fuzzing stays cheap, and a larger ``n`` is a 422.
MAX_ROWS = 50
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "ignored_auth",
)
ROLES = ("analyst", "compliance", "admin")
#: Operations a role may use; it must be refused (403) every other one but /health.
ALLOWED = {
    "analyst": {
        "GET /v1/models",
        "GET /v1/models/{model_id}",
        "POST /v1/models/{model_id}/samples",
    },
    "compliance": {
        "GET /v1/models",
        "GET /v1/models/{model_id}",
        "GET /v1/privacy/budgets",
        "GET /v1/privacy/budgets/{federation}/{node}",
        "GET /v1/audit",
        "GET /v1/audit/verify",
        "GET /v1/audit/export",
    },
}


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("home")
    populate(home)
    keys = KeyStore(Database(database_url(home)))
    # The fuzzer's own keys, one per role; populate's keys are fair game for revocation.
    own = {role: keys.create(role, label=f"fuzzer {role}") for role in ROLES}
    # ignored_auth sends wrong keys on purpose: the default 10 failures a minute would turn
    # the rest of the run into 429s (test_refusals_are_documented checks the 429 itself).
    app = create_app(home, max_rows=MAX_ROWS, auth_failures=1_000_000)
    with serving(app) as url:
        yield {"url": url, "keys": keys, "own": own}


@pytest.fixture
def protected(api) -> Iterator[Counter[str]]:
    """Point any ``DELETE /v1/keys/{key_id}`` of a fuzzer key at a fresh victim key
    instead; counts the redirections by key id."""
    own_ids = {info.id for info, _ in api["own"].values()}
    redirected: Counter[str] = Counter()

    def before_call(context, case, kwargs):
        key_id = (case.path_parameters or {}).get("key_id")
        if case.method.upper() == "DELETE" and key_id in own_ids:
            victim, _ = api["keys"].create("analyst", label="victim")
            case.path_parameters = {**case.path_parameters, "key_id": victim.id}
            redirected[key_id] += 1

    schemathesis.hook(before_call)  # global: the only scope before_call has
    try:
        yield redirected
    finally:
        GLOBAL_HOOK_DISPATCHER.unregister(before_call)


@dataclass
class Report:
    """What one schemathesis run did: statuses per operation, failed checks, errors."""

    statuses: dict[str, Counter[int]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def run_schemathesis(url: str, token: str | None) -> Report:
    """``schemathesis run <url>/openapi.json`` with ``CHECKS``, in this process."""
    config: dict[str, Any] = {
        "seed": SEED,
        "workers": 1,
        "cache": {"enabled": False},
        "generation": {"max-examples": EXAMPLES, "deterministic": True, "database": "none"},
        "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
    }
    if token is not None:
        config["headers"] = {"Authorization": f"Bearer {token}"}
    schema = schemathesis.openapi.from_url(
        f"{url}/openapi.json", config=schemathesis.Config.from_dict(config)
    )
    report = Report()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            for case_id, interaction in recorder.interactions.items():
                label = recorder.cases[case_id].value.operation.label
                status = interaction.response.status_code if interaction.response else 0
                report.statuses.setdefault(label, Counter())[status] += 1
            for case_id, checks in recorder.checks.items():
                for check in checks:
                    if check.failure_info is not None:
                        label = recorder.cases[case_id].value.operation.label
                        failure = check.failure_info.failure
                        report.failures.append(
                            f"[{event.phase.name}] {label}: {check.name}: {failure.title}: "
                            f"{failure.message}\n{check.failure_info.code_sample}"
                        )
        elif isinstance(event, events.NonFatalError):
            report.errors.append(f"{event.label}: {event.value!r}")
        elif isinstance(event, events.FatalError):
            report.errors.append(repr(event.exception))
    return report


def _operations(url: str) -> set[str]:
    document = httpx.get(f"{url}/openapi.json").json()
    return {f"{m.upper()} {path}" for path, ops in document["paths"].items() for m in ops}


def _assert_clean(report: Report, url: str) -> None:
    assert not report.errors, report.errors
    assert not report.failures, "\n\n".join(report.failures)
    assert set(report.statuses) == _operations(url), "schemathesis skipped an operation"


def test_without_a_key_every_route_but_health_is_401_and_as_documented(api, protected):
    report = run_schemathesis(api["url"], None)
    _assert_clean(report, api["url"])
    for label, statuses in report.statuses.items():
        if label == "GET /health":
            assert 200 in statuses, (label, statuses)
        else:  # FastAPI reads a JSON body (400, 422) before the key is checked
            assert 401 in statuses and set(statuses) <= {400, 401, 405, 422}, (label, statuses)


@pytest.mark.parametrize(
    "role",
    [
        pytest.param("analyst", marks=pytest.mark.slow),
        pytest.param("compliance", marks=pytest.mark.slow),
        "admin",
    ],
)
def test_with_a_key_no_server_error_and_every_response_as_documented(api, protected, role):
    info, token = api["own"][role]
    report = run_schemathesis(api["url"], token)
    _assert_clean(report, api["url"])
    allowed = ALLOWED.get(role, set(report.statuses))
    for label, statuses in report.statuses.items():
        served = any(200 <= s < 300 for s in statuses)
        if label == "GET /health" or label in allowed:
            assert served, f"{role} never got past the checks of {label}: {dict(statuses)}"
        else:
            assert not served and 403 in statuses, (role, label, dict(statuses))
    assert api["keys"].principal(info.id) is not None, f"the fuzzer revoked its own {role} key"


def test_refusals_are_documented_401_then_429_with_retry_after(tmp_path):
    """The failure limit's 429 (off in the runs above) against the same document."""
    with serving(create_app(tmp_path / "home", auth_failures=1)) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        operation = schema["/v1/audit"]["GET"]
        checks = [
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_headers_conformance,
            response_schema_conformance,
        ]
        wrong = {"Authorization": "Bearer fsk_nobody_secret"}
        first = operation.Case(headers=wrong).call_and_validate(checks=checks)
        assert first.status_code == 401 and first.headers["www-authenticate"] == ["Bearer"]
        second = operation.Case(headers=wrong).call_and_validate(checks=checks)
        assert second.status_code == 429 and int(second.headers["retry-after"][0]) >= 1


# What the fuzzer found, pinned so that a change of generator cannot lose them.


@pytest.mark.parametrize(
    "params,field",
    [
        ({"cursor": 2**63}, "cursor"),  # was a 500: OverflowError in SQLite
        ({"until": "0.5"}, "until"),  # was read as 0.5 s after 1970
        ({"since": "1e9"}, "since"),
    ],
)
def test_audit_query_out_of_range_or_not_a_date_time_is_422_naming_it(api, params, field):
    _, token = api["own"]["compliance"]
    response = httpx.get(
        f"{api['url']}/v1/audit", params=params, headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 422, response.text
    assert [e["loc"] for e in response.json()["detail"]] == [["query", field]]


def test_audit_accepts_rfc3339_date_times(api):
    _, token = api["own"]["compliance"]
    response = httpx.get(
        f"{api['url']}/v1/audit",
        params={"since": "2020-01-01T00:00:00Z", "until": "2999-01-01t00:00:00+01:00"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 200 and response.json()["entries"]


def test_too_many_rows_is_a_documented_validation_error(api):
    _, token = api["own"]["analyst"]
    response = httpx.post(
        f"{api['url']}/v1/models/clinic-v1/samples",
        json={"n": MAX_ROWS + 1},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "n"] and error["type"] == "less_than_equal"
    assert error["ctx"] == {"le": MAX_ROWS}
