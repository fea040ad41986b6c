"""No secret reaches a log: the registry's signing and encryption keys, API keys (those
a request sent and those the API created), dashboard session tokens.

A real ``fedsynth serve`` process at its normal log level handles every kind of request
that carries a secret, good and bad; then its whole output is searched for each secret
in every spelling a log line could hold it (text, hex, base64)."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx

from fedsynth.dashboards.site import SESSION_COOKIE
from fedsynth.privacy.keys import ENCRYPTION_KEY_FILE, SIGNING_KEY_FILE
from tests.dashboard_server import csrf_field
from tests.factories import populate
from tests.http import serve_process


def registry_secrets(keys_dir: Path) -> list[str]:
    """Every spelling of the registry's private keys (those that exist) that a log or a
    message could contain."""
    spellings, raws = [], []
    signing = keys_dir / SIGNING_KEY_FILE
    if signing.exists():
        pem = signing.read_text()
        body = "".join(line for line in pem.splitlines() if not line.startswith("-----"))
        spellings.append(body[:40])
        raws.append(base64.b64decode(body)[-32:])  # PKCS8 Ed25519: the seed is the tail
    if (keys_dir / ENCRYPTION_KEY_FILE).exists():
        raws.append((keys_dir / ENCRYPTION_KEY_FILE).read_bytes())
    assert raws, f"no registry key in {keys_dir}"
    for raw in raws:
        spellings += [
            raw.hex(),
            base64.b64encode(raw).decode(),
            base64.urlsafe_b64encode(raw).decode().rstrip("="),
            repr(raw)[2:-1],
        ]
    return spellings


def leaked(text: str, secrets: list[str]) -> list[str]:
    return [s[:8] + "…" for s in secrets if s and s in text]


def test_a_served_session_logs_no_key_and_no_session_token(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    tokens = populate(home)
    secrets = registry_secrets(home / "keys") + list(tokens.values())
    with serve_process(home, tmp_path / "serve.log") as server:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for token in tokens.values():  # every role, on its routes and on others
                auth = {"Authorization": f"Bearer {token}"}
                for path in ("/v1/models", "/v1/privacy/budgets", "/v1/audit", "/v1/keys"):
                    assert http.get(path, headers=auth).status_code in (200, 403)
            wrong = tokens["analyst"][:-4] + "AAAA"  # a near miss is a secret too
            secrets.append(wrong)
            assert (
                http.get("/v1/models", headers={"Authorization": f"Bearer {wrong}"}).status_code
                == 401
            )
            admin = {"Authorization": f"Bearer {tokens['admin']}"}
            created = http.post("/v1/keys", json={"role": "analyst"}, headers=admin)
            assert created.status_code == 201, created.text
            secrets.append(created.json()["key"])
            sample = http.post(
                "/v1/models/bank-v1/samples",
                json={"n": 50, "seed": 1, "format": "csv"},
                headers={"Authorization": f"Bearer {tokens['analyst']}"},
            )
            assert sample.status_code == 200

            form = http.get("/dashboards/login")
            refused = http.post(
                "/dashboards/login", data={"api_key": wrong, "csrf_token": csrf_field(form.text)}
            )
            assert refused.status_code == 401
            signed_in = http.post(
                "/dashboards/login",
                data={"api_key": tokens["compliance"], "csrf_token": csrf_field(refused.text)},
            )
            assert signed_in.status_code == 303
            secrets.append(http.cookies[SESSION_COOKIE])
            assert http.get("/dashboards/compliance/audit").status_code == 200
        output = server.output()

    assert "GET /v1/models" in output  # the access log was on, so there was text to search
    assert leaked(output + secrets[-1], secrets) != []  # and the search finds what is there
    assert leaked(output, secrets) == []
    # Nor in any log-like file the server left in its home.
    for path in home.rglob("*"):
        if path.is_file() and path.suffix in (".log", ".jsonl", ".txt"):
            assert leaked(path.read_text(errors="replace"), secrets) == [], path
