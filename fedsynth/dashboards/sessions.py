"""Dashboard sessions: an API key exchanged once for a session cookie.

Why not keep the API key in the browser: the key is a long-lived bearer secret; the cookie
holds a fresh random token (256 bits) that expires after :data:`SESSION_HOURS`, is sent
only to ``/dashboards`` (HttpOnly, SameSite=Strict, Secure over TLS), and is stored here
only as its SHA-256. Each request re-reads the key behind the session, so revoking the key
(``fedsynth keys revoke``) ends its sessions at once. Sessions live in the database, not in
process memory, so that several server processes share them and a restart keeps them.

Each session carries its own CSRF token, which every form that changes state or asks for
rows posts back; :meth:`SessionStore.check_csrf` compares it in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from fedsynth.server.api.keys import KeyStore, Principal
from fedsynth.server.records import Base, Database, UTCDateTime, utcnow

SESSION_HOURS = 8


class DashboardSession(Base):
    __tablename__ = "dashboard_sessions"

    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


@dataclass(frozen=True)
class Session:
    """A live session: who it acts for and the CSRF token its forms must send back."""

    principal: Principal
    csrf_token: str


class SessionStore:
    def __init__(self, db: Database, keys: KeyStore) -> None:
        self.db = db
        self.keys = keys
        DashboardSession.__table__.create(db.engine, checkfirst=True)  # type: ignore[attr-defined]

    def start(self, principal: Principal) -> str:
        """Open a session for an authenticated key; returns the cookie value."""
        token = secrets.token_urlsafe(32)
        now = utcnow()
        with self.db.session() as s:
            s.add(
                DashboardSession(
                    token_sha256=_digest(token),
                    key_id=principal.key_id,
                    csrf_token=secrets.token_urlsafe(32),
                    created_at=now,
                    expires_at=now + timedelta(hours=SESSION_HOURS),
                )
            )
        return token

    def resolve(self, token: str | None) -> Session | None:
        """The live session behind a cookie value; None if unknown, ended, expired or its
        key was revoked."""
        if not token:
            return None
        with self.db.session() as s:
            row = s.get(DashboardSession, _digest(token))
            if row is None or row.ended_at is not None or row.expires_at <= utcnow():
                return None
            key_id, csrf = row.key_id, row.csrf_token
        principal = self.keys.principal(key_id)
        return Session(principal, csrf) if principal is not None else None

    def end(self, token: str | None) -> None:
        if not token:
            return
        with self.db.session() as s:
            row = s.get(DashboardSession, _digest(token))
            if row is not None and row.ended_at is None:
                row.ended_at = utcnow()

    @staticmethod
    def check_csrf(session: Session, sent: str | None) -> bool:
        return bool(sent) and hmac.compare_digest(session.csrf_token, str(sent))


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
