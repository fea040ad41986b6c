"""What every dashboard page shares: templates, the session guard, security headers.

A page names the roles it serves with :meth:`Site.guard`; a visitor without a live session
is sent to the login page, a visitor with the wrong role gets a 403 page, and the refusal
is an audit event like the API's (with the key id, never the key).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import fedsynth
from fedsynth.dashboards.sessions import Session, SessionStore
from fedsynth.server.api.app import Services
from fedsynth.server.records import ROLES

ANALYST, COMPLIANCE, ADMIN = ROLES
PREFIX = "/dashboards"
SESSION_COOKIE = "fedsynth_session"
LOGIN_CSRF_COOKIE = "fedsynth_login_csrf"
TEMPLATES = Path(__file__).parent / "templates"

#: Pages and downloads: scripts only from this origin (plotly.js included), no framing, no
#: referrer. Plotly writes inline styles, hence 'unsafe-inline' for styles alone.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data: blob:; connect-src 'self'; font-src 'self' data:; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}


class LoginRequired(Exception):
    def __init__(self, next_path: str) -> None:
        self.next_path = next_path


class WrongRole(Exception):
    def __init__(self, session: Session, roles: tuple[str, ...]) -> None:
        self.session = session
        self.roles = roles


class PageNotFound(Exception):
    """A page's subject does not exist or is outside the visitor's scope (404, not 403,
    so that the answer does not confirm that it exists)."""


class Site:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.sessions = SessionStore(services.db, services.keys)
        self.templates = Jinja2Templates(directory=str(TEMPLATES))
        self.templates.env.globals.update(prefix=PREFIX, version=fedsynth.__version__)
        self.templates.env.filters["compact"] = _compact

    def session(self, request: Request) -> Session | None:
        return self.sessions.resolve(request.cookies.get(SESSION_COOKIE))

    def guard(self, *roles: str) -> Callable[[Request], Session]:
        """A dependency: the live session of a visitor whose role is one of ``roles``."""

        def dependency(request: Request) -> Session:
            session = self.session(request)
            if session is None:
                raise LoginRequired(request.url.path)
            if session.principal.role not in roles:
                raise WrongRole(session, roles)
            return session

        return dependency

    def render(
        self,
        request: Request,
        template: str,
        session: Session | None,
        status_code: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        return self.templates.TemplateResponse(
            request,
            template,
            {"session": session, "role": session.principal.role if session else None, **context},
            status_code=status_code,
        )

    def install(self, app: FastAPI) -> None:
        """Exception handlers for the guard and security headers on every dashboard
        response."""

        @app.exception_handler(LoginRequired)
        def to_login(request: Request, exc: LoginRequired) -> Response:
            return RedirectResponse(
                f"{PREFIX}/login?next={quote(exc.next_path)}", status.HTTP_303_SEE_OTHER
            )

        @app.exception_handler(WrongRole)
        def wrong_role(request: Request, exc: WrongRole) -> Response:
            who = exc.session.principal
            self.services.audit.append(
                "forbidden",
                f"key:{who.key_id}",
                {
                    "method": request.method,
                    "path": request.url.path,
                    "role": who.role,
                    "allowed": list(exc.roles),
                },
            )
            return self.render(
                request,
                "forbidden.html",
                exc.session,
                status.HTTP_403_FORBIDDEN,
                title="Not for your role",
                allowed=exc.roles,
            )

        @app.exception_handler(PageNotFound)
        def not_found(request: Request, exc: PageNotFound) -> Response:
            return self.render(
                request,
                "not_found.html",
                self.session(request),
                status.HTTP_404_NOT_FOUND,
                title="Not found",
                message=str(exc),
            )

        app.add_middleware(DashboardHeaders)

    @staticmethod
    def set_cookie(
        request: Request, response: Response, name: str, value: str, max_age: int
    ) -> None:
        """Every dashboard cookie: HttpOnly, SameSite=Strict, only for /dashboards, and
        Secure when the page came over TLS."""
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path=PREFIX,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )

    @staticmethod
    def new_login_csrf() -> str:
        return secrets.token_urlsafe(32)


class DashboardHeaders:
    """Security headers on every response under /dashboards, and no caching of pages.

    A plain ASGI middleware, not ``@app.middleware("http")``: that one wraps every response
    of the app, the API's long sample streams included; this one only edits the headers of
    dashboard responses and passes everything else through untouched.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        extra = dict(SECURITY_HEADERS)
        if "/static/" not in path:
            extra["Cache-Control"] = "no-store"

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in extra.items():
                    if name not in headers:
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _compact(value: Any) -> str:
    """An audit payload value as its JSON text (strings bare), numbers to 6 digits."""
    if isinstance(value, str):
        return value
    return json.dumps(_rounded(value), ensure_ascii=False, separators=(", ", ": "))


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def home_of(role: str) -> str:
    """Where a role lands after login."""
    return f"{PREFIX}/analyst" if role == ANALYST else f"{PREFIX}/compliance"
