"""Analyst pages: the model catalogue, one model's schema, quality and privacy, and a form
that downloads synthetic rows.

The distributions and correlations shown are of a fresh synthetic sample (post-processing
of the DP model: no budget spent). The download goes through the same path as the API's
``POST /v1/models/{id}/samples``: same validation, same provenance, one audit event.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import pandas as pd
from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError

from fedsynth.dashboards import figures
from fedsynth.dashboards.sessions import Session
from fedsynth.dashboards.site import ADMIN, ANALYST, PageNotFound, Site
from fedsynth.generative.schema import ColumnType, Role
from fedsynth.server.api.app import SampleRequest
from fedsynth.server.api.budgets import histories
from fedsynth.server.registry import ModelVersion, RegistryError

#: Rows drawn (seed 0) for a model page's charts; cached per model.
PREVIEW_ROWS = 5000
DEFAULT_DOWNLOAD_ROWS = 10_000
CONDITION_FIELD = "condition."


def routes(site: Site) -> APIRouter:
    router = APIRouter(prefix="/analyst")
    services = site.services
    analyst = Depends(site.guard(ANALYST, ADMIN))
    previews: dict[str, pd.DataFrame] = {}
    previews_lock = threading.Lock()

    def version_for(model_id: str, session: Session) -> ModelVersion:
        try:
            return services.visible_version(model_id, session.principal)
        except HTTPException:
            raise PageNotFound(f"No model {model_id!r}.") from None

    def preview(model_id: str) -> pd.DataFrame:
        with previews_lock:
            if model_id not in previews:
                previews[model_id] = services.model(model_id).sample(PREVIEW_ROWS, seed=0)
            return previews[model_id]

    def model_page(
        request: Request,
        session: Session,
        version: ModelVersion,
        *,
        form: dict[str, Any] | None = None,
        errors: list[str] | None = None,
    ) -> Response:
        try:
            model = services.model(version.id)
            manifest = services.registry.manifest(version.id)
        except RegistryError as exc:
            raise PageNotFound(f"Model {version.id} cannot be loaded: {exc}") from None
        schema = model.schema
        sample = preview(version.id)
        modelled = list(schema.modelled)
        # Nodes the server asked to train (those with a budget), not report-only ones.
        trained = {
            node: h for node, h in histories(services.db, version.federation).items() if h.rounds
        }
        run = manifest.get("run_id")
        quality = model.metadata.get("quality") or {}
        return site.render(
            request,
            "analyst_model.html",
            session,
            status.HTTP_422_UNPROCESSABLE_CONTENT if errors else 200,
            title=f"Model {version.id}",
            model=_summary(version, manifest),
            columns=schema.columns,
            identifiers=[c.name for c in schema.columns if c.role is Role.IDENTIFIER],
            conditionable=[
                c for c in modelled if c.type in (ColumnType.CATEGORICAL, ColumnType.BOOLEAN)
            ],
            distributions=[
                (c.name, figures.column_distribution(c, sample[c.name]))
                for c in modelled
                if c.name in sample
            ],
            heatmap=figures.correlation_heatmap(sample, modelled),
            spend_figure=figures.spend_per_round(trained, run),
            scores_figure=figures.scores_per_round(trained, run),
            node_quality=quality.get("nodes") or {},
            node_privacy=manifest.get("node_privacy") or {},
            secure_aggregation=model.metadata.get("privacy", {}).get("secure_aggregation"),
            noise=_noise(model.metadata.get("privacy", {})),
            scores=figures.SCORES,
            preview_rows=PREVIEW_ROWS,
            max_rows=services.max_rows,
            form=form or {"n": DEFAULT_DOWNLOAD_ROWS, "seed": 0, "format": "csv", "conditions": {}},
            errors=errors or [],
        )

    @router.get("", response_class=HTMLResponse)
    def catalogue(request: Request, session: Session = analyst) -> Response:
        rows = []
        for version in services.registry.list():
            if not session.principal.sees(version.federation):
                continue
            try:
                manifest = services.registry.manifest(version.id)
            except RegistryError as exc:
                rows.append({**_summary(version, {}), "error": str(exc)})
                continue
            rows.append(_summary(version, manifest))
        return site.render(
            request,
            "analyst_catalogue.html",
            session,
            title="Models",
            models=rows,
            scores=figures.SCORES,
        )

    @router.get("/models/{model_id}", response_class=HTMLResponse)
    def model_detail(request: Request, model_id: str, session: Session = analyst) -> Response:
        version = version_for(model_id, session)
        return model_page(request, session, version)

    @router.post("/models/{model_id}/download")
    async def download(request: Request, model_id: str, session: Session = analyst) -> Response:
        version = await run_in_threadpool(version_for, model_id, session)
        form = await request.form()
        if not site.sessions.check_csrf(session, str(form.get("csrf_token", ""))):
            return await run_in_threadpool(
                model_page,
                request,
                session,
                version,
                errors=["The form expired or came from another site: reload the page."],
            )
        conditions = {
            str(key)[len(CONDITION_FIELD) :]: str(value)
            for key, value in form.multi_items()
            if str(key).startswith(CONDITION_FIELD) and str(value)
        }
        fields = {
            "n": str(form.get("n", "")).strip(),
            "seed": str(form.get("seed", "")).strip() or "0",
            "format": str(form.get("format", "csv")),
            "conditions": conditions,
        }
        try:
            body = SampleRequest.model_validate({**fields, "conditions": conditions or None})
            return await run_in_threadpool(services.samples, model_id, body, session.principal)
        except ValidationError as exc:
            errors = [f"{_field(e['loc'])}: {e['msg']}" for e in exc.errors()]
        except HTTPException as exc:
            detail = exc.detail if isinstance(exc.detail, list) else [{"msg": exc.detail}]
            errors = [
                d["msg"]
                if "conditions" in d.get("loc", ())
                else f"{_field(d.get('loc', ()))}: {d['msg']}"
                for d in detail
            ]
        return await run_in_threadpool(
            model_page, request, session, version, form=fields, errors=errors
        )

    return router


def _summary(version: ModelVersion, manifest: dict[str, Any]) -> dict[str, Any]:
    epsilon = version.epsilon
    return {
        "id": version.id,
        "federation": version.federation,
        "sector": version.sector,
        "kind": version.kind,
        "version": version.version,
        "round": version.round,
        "epsilon": epsilon if epsilon is not None and math.isfinite(epsilon) else None,
        "delta": version.delta,
        "created_at": version.created_at.strftime("%Y-%m-%d %H:%M UTC"),
        "participants": manifest.get("participants") or [],
        "quality": manifest.get("quality") or {},
    }


def _field(loc: Any) -> str:
    """A validation error's location as the form field it came from."""
    parts = [str(p) for p in loc if p != "body"]
    if len(parts) >= 2 and parts[0] == "conditions":
        return f"condition on {parts[1]}"
    return ".".join(parts) or "form"


def _noise(privacy: dict) -> str | None:
    """Whose noise protects a node, for a marginals model (docs/privacy.md): the budget
    epsilon holds while the update is hidden in a sum; a shared share alone is worth more."""
    if privacy.get("noise") == "shared":
        own = privacy.get("own_noise_epsilon")
        alone = f"{own:.2f}" if isinstance(own, int | float) else str(own)
        return (
            f"split across {privacy.get('noise_split')} nodes under SecAgg+; "
            f"ε {alone} for a node whose update the server sees"
        )
    if privacy.get("noise") == "own":
        return "each node's own (holds even if the server sees its update)"
    return None
