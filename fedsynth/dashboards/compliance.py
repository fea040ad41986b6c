"""Compliance pages: budgets per federation and node, a node's rounds, the audit trail.

They show what nodes reported and what the audit chain holds; never a row. A key scoped to
some federations sees only their budgets and events, as in the API.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, status
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from fedsynth.dashboards import figures
from fedsynth.dashboards.sessions import Session
from fedsynth.dashboards.site import ADMIN, COMPLIANCE, PageNotFound, Site
from fedsynth.server.api.budgets import Budget, budgets, histories, history

AUDIT_PAGE = 50


def routes(site: Site) -> APIRouter:
    router = APIRouter(prefix="/compliance")
    services = site.services
    officer = Depends(site.guard(COMPLIANCE, ADMIN))

    @router.get("", response_class=HTMLResponse)
    def overview(request: Request, session: Session = officer) -> Response:
        who = session.principal
        by_federation: dict[str, list[Budget]] = defaultdict(list)
        for b in budgets(services.db):
            if who.sees(b.federation):
                by_federation[b.federation].append(b)
        federations = []
        for name, rows in sorted(by_federation.items()):
            found = histories(services.db, name)
            charted = {b.node: found[b.node] for b in rows if b.node in found}
            caps = {b.node: b.epsilon_cap for b in rows}
            federations.append(
                {
                    "name": name,
                    "rows": [_budget_row(b) for b in rows],
                    "figure": figures.burndown(name, charted, caps),
                }
            )
        return site.render(
            request,
            "compliance_overview.html",
            session,
            title="Privacy budgets",
            federations=federations,
            chain=services.audit.verify(),
            near_cap=figures.NEAR_CAP,
        )

    @router.get("/nodes/{federation}/{node}", response_class=HTMLResponse)
    def node_page(
        request: Request, federation: str, node: str, session: Session = officer
    ) -> Response:
        found = (
            history(services.db, federation, node) if session.principal.sees(federation) else None
        )
        if found is None:
            raise PageNotFound(f"No node {node!r} in federation {federation!r}.")
        budget = next(
            (b for b in budgets(services.db) if (b.federation, b.node) == (federation, node)), None
        )
        caps = {node: budget.epsilon_cap if budget else None}
        return site.render(
            request,
            "compliance_node.html",
            session,
            title=f"{node} in {federation}",
            federation=federation,
            node=node,
            budget=_budget_row(budget) if budget else None,
            history=found,
            figure=figures.burndown(federation, {node: found}, caps),
            scores=figures.SCORES,
        )

    @router.get("/audit", response_class=HTMLResponse)
    def audit_page(
        request: Request,
        session: Session = officer,
        event_type: Annotated[str, Query(max_length=64)] = "",
        actor: Annotated[str, Query(max_length=128)] = "",
        since: Annotated[str, Query(max_length=40)] = "",
        until: Annotated[str, Query(max_length=40)] = "",
        cursor: Annotated[int, Query(ge=0)] = 0,
    ) -> Response:
        errors: list[str] = []
        start, end = _moment(since, "since", errors), _moment(until, "until", errors)
        page = services.audit_page(
            session.principal,
            since=start,
            until=end,
            event_type=event_type or None,
            actor=actor or None,
            cursor=cursor,
            limit=AUDIT_PAGE,
        )
        filters = {"event_type": event_type, "actor": actor, "since": since, "until": until}
        return site.render(
            request,
            "compliance_audit.html",
            session,
            status.HTTP_422_UNPROCESSABLE_CONTENT if errors else 200,
            title="Audit trail",
            entries=[] if errors else page.entries,
            next_cursor=None if errors else page.next_cursor,
            cursor=cursor,
            filters=filters,
            query={k: v for k, v in filters.items() if v},
            errors=errors,
            chain=services.audit.verify(),
        )

    @router.get("/audit/export")
    def export(
        session: Session = officer, format: Literal["csv", "ndjson"] = "csv"
    ) -> StreamingResponse:
        return services.audit_export(session.principal, format)

    return router


def _budget_row(b: Budget) -> dict[str, object]:
    return {**b.model_dump(), "near_cap": figures.near_cap(b.epsilon_spent, b.epsilon_cap)}


def _moment(text: str, field: str, errors: list[str]) -> datetime | None:
    """A filter time from an ``<input type="datetime-local">`` (read as UTC) or ISO 8601."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        errors.append(f"{field}: {text!r} is not a date and time (use YYYY-MM-DDTHH:MM)")
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
