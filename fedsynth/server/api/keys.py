"""API keys: bearer tokens of 32 random bytes, stored only as hashes, checked in constant time.

A token reads ``fsk_<id>_<secret>``: the id finds the row, the secret
(``secrets.token_urlsafe(32)``, 256 bits) is compared by SHA-256 digest with
``hmac.compare_digest``. SHA-256 rather than a
slow password hash is deliberate: the secret is random with 256 bits of entropy, so there
is nothing to brute-force, and every request pays the check. The token itself is shown once,
at creation, and never stored or logged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from fedsynth.server.audit import AuditLog
from fedsynth.server.records import ROLES, ApiKey, Database, utcnow

PREFIX = "fsk"


class ApiKeyError(ValueError):
    """A key operation was refused (unknown role, unknown key); the message says why."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key id (never the secret), its role and federation scope."""

    key_id: str
    role: str
    federations: frozenset[str] | None  # None: every federation

    def sees(self, federation: str) -> bool:
        return self.federations is None or federation in self.federations


@dataclass(frozen=True)
class KeyInfo:
    id: str
    role: str
    federations: list[str] | None
    label: str
    created_at: str
    revoked_at: str | None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(
        self,
        role: str,
        federations: Sequence[str] | None = None,
        label: str = "",
        *,
        audit: tuple[AuditLog, str] | None = None,
    ) -> tuple[KeyInfo, str]:
        """A new key; returns its info and the token, which is never shown again.

        With ``audit`` (the log of this store's database, and the actor), the key and its
        ``key_created`` event are stored in one transaction: a crash leaves both or neither.
        """
        if role not in ROLES:
            raise ApiKeyError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        scope = sorted(set(federations)) if federations else None
        row = ApiKey(
            id=key_id,
            secret_sha256=_digest(secret),
            role=role,
            federations_json=json.dumps(scope) if scope else None,
            label=label[:200],
            created_at=utcnow(),
        )
        if audit is None:
            with self.db.session() as s:
                s.add(row)
        else:
            log, actor = audit
            payload = {"key": key_id, "role": role, "federations": scope}
            log.append("key_created", actor, payload, also=lambda s: s.add(row))
        return _info(row), f"{PREFIX}_{key_id}_{secret}"

    def revoke(self, key_id: str, *, audit: tuple[AuditLog, str] | None = None) -> KeyInfo:
        """Revoke ``key_id`` (again: no change); with ``audit``, in one transaction with
        its ``key_revoked`` event."""
        revoked: list[KeyInfo] = []

        def write(s: Session) -> None:
            row = s.get(ApiKey, key_id)
            if row is None:
                raise ApiKeyError(f"no key with id {key_id!r}")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            revoked.append(_info(row))

        if audit is None:
            with self.db.session() as s:
                write(s)
        else:
            log, actor = audit
            log.append("key_revoked", actor, {"key": key_id}, also=write)
        return revoked[-1]

    def list(self) -> list[KeyInfo]:
        with self.db.session() as s:
            return [_info(r) for r in s.scalars(select(ApiKey).order_by(ApiKey.created_at))]

    def authenticate(self, token: str) -> tuple[Principal | None, str]:
        """(principal, key id) for a valid, unrevoked token; (None, key id or "unknown")."""
        prefix, _, rest = token.partition("_")
        key_id, _, secret = rest.partition("_")
        if prefix != PREFIX or not key_id or not secret or len(key_id) > 32:
            return None, "unknown"
        with self.db.session() as s:
            row = s.get(ApiKey, key_id)
            # Compare a digest even for an unknown id, so timing does not tell ids apart.
            expected = row.secret_sha256 if row is not None else _digest("")
            matches = hmac.compare_digest(expected, _digest(secret))
            if row is None or not matches or row.revoked_at is not None:
                return None, key_id
            return _principal(row), key_id

    def principal(self, key_id: str) -> Principal | None:
        """Who key ``key_id`` is now; None once it is revoked or if it never existed.

        For sessions that were opened with the key (the dashboards): revoking the key
        ends them at their next request.
        """
        with self.db.session() as s:
            row = s.get(ApiKey, key_id)
            if row is None or row.revoked_at is not None:
                return None
            return _principal(row)


def _principal(row: ApiKey) -> Principal:
    scope = json.loads(row.federations_json) if row.federations_json else None
    return Principal(row.id, row.role, frozenset(scope) if scope else None)


def _info(row: ApiKey) -> KeyInfo:
    return KeyInfo(
        id=row.id,
        role=row.role,
        federations=json.loads(row.federations_json) if row.federations_json else None,
        label=row.label,
        created_at=row.created_at.isoformat(),
        revoked_at=row.revoked_at.isoformat() if row.revoked_at else None,
    )
