"""Login with an API key, logout, and the landing redirect.

The login form is protected against cross-site posting by a double-submit token (a
SameSite=Strict cookie and the same value in a hidden field), since no session exists yet.
A failed login is an audit event like a refused API call; the key itself is never logged.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Form, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from fedsynth.dashboards.sessions import SESSION_HOURS
from fedsynth.dashboards.site import LOGIN_CSRF_COOKIE, PREFIX, SESSION_COOKIE, Site, home_of


def routes(site: Site) -> APIRouter:
    router = APIRouter()
    audit = site.services.audit

    def login_page(request: Request, error: str = "", next_path: str = "", code: int = 200):
        token = site.new_login_csrf()
        response = site.render(
            request,
            "login.html",
            None,
            code,
            title="Sign in",
            error=error,
            csrf_token=token,
            next_path=_safe_next(next_path),
        )
        site.set_cookie(request, response, LOGIN_CSRF_COOKIE, token, max_age=3600)
        return response

    @router.get("", response_class=HTMLResponse)
    @router.get("/", response_class=HTMLResponse)
    def landing(request: Request) -> Response:
        session = site.session(request)
        target = home_of(session.principal.role) if session else f"{PREFIX}/login"
        return RedirectResponse(target, status.HTTP_303_SEE_OTHER)

    @router.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "") -> Response:
        session = site.session(request)
        if session is not None:
            return RedirectResponse(
                _safe_next(next) or home_of(session.principal.role), status.HTTP_303_SEE_OTHER
            )
        return login_page(request, next_path=next)

    @router.post("/login", response_class=HTMLResponse)
    def login(
        request: Request,
        api_key: Annotated[str, Form(max_length=300)] = "",
        csrf_token: Annotated[str, Form(max_length=100)] = "",
        next: Annotated[str, Form(max_length=500)] = "",
    ) -> Response:
        cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        if not cookie or not hmac.compare_digest(cookie, csrf_token):
            return login_page(
                request,
                "The form expired or came from another site: please sign in again.",
                next,
                status.HTTP_403_FORBIDDEN,
            )
        where = {"method": "POST", "path": request.url.path}
        client = request.client.host if request.client else "unknown"
        wait = site.services.limiter.retry_after(client)
        if wait:
            refused = login_page(
                request,
                f"Too many failed sign-ins from this address: try again in {wait} s.",
                next,
                status.HTTP_429_TOO_MANY_REQUESTS,
            )
            refused.headers["Retry-After"] = str(wait)
            return refused
        if not api_key.strip():
            audit.append("auth_failed", "anonymous", {**where, "reason": "no key"})
            return login_page(request, "Enter your API key.", next, status.HTTP_401_UNAUTHORIZED)
        principal = site.services.authenticate(api_key.strip(), client, where)
        if principal is None:
            return login_page(
                request,
                "Unknown or revoked API key. Ask an administrator for a key "
                "(fedsynth keys create --role analyst|compliance).",
                next,
                status.HTTP_401_UNAUTHORIZED,
            )
        token = site.sessions.start(principal)
        audit.append("dashboard_login", f"key:{principal.key_id}", {"role": principal.role})
        response = RedirectResponse(
            _safe_next(next) or home_of(principal.role), status.HTTP_303_SEE_OTHER
        )
        site.set_cookie(request, response, SESSION_COOKIE, token, max_age=SESSION_HOURS * 3600)
        response.delete_cookie(LOGIN_CSRF_COOKIE, path=PREFIX)
        return response

    @router.post("/logout")
    def logout(request: Request, csrf_token: Annotated[str, Form(max_length=100)] = "") -> Response:
        session = site.session(request)
        if session is not None and site.sessions.check_csrf(session, csrf_token):
            site.sessions.end(request.cookies.get(SESSION_COOKIE))
            audit.append("dashboard_logout", f"key:{session.principal.key_id}", {})
        response = RedirectResponse(f"{PREFIX}/login", status.HTTP_303_SEE_OTHER)
        if session is None or site.sessions.check_csrf(session, csrf_token):
            response.delete_cookie(SESSION_COOKIE, path=PREFIX)
        return response

    return router


def _safe_next(path: str) -> str:
    """Only a dashboard path of this site: never an absolute or scheme-relative URL."""
    if path.startswith(PREFIX + "/") and not path.startswith("//") and "\\" not in path:
        return path if path.rstrip("/") not in (f"{PREFIX}/login", f"{PREFIX}/logout") else ""
    return ""
