"""The FastAPI service: models and synthetic rows for analysts, budgets and the audit trail
for compliance officers, keys for admins. ``fedsynth serve`` runs it with uvicorn.

Every route but ``/health`` needs a bearer key (``fedsynth.server.api.keys``). Roles:
analyst (models, samples), compliance (model metadata, budgets, audit), admin (all, keys).
A key scoped to some federations sees only their models and budgets, and gets 404 for any
other model, so that a 403 does not confirm that it exists. Refused requests (401, 403) and
every sample request and key change are audit events in the same hash chain as training.
"""

from __future__ import annotations

import csv
import io
import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from fastapi import Depends, FastAPI, HTTPException, Query, Request, status
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

import fedsynth
from fedsynth.generative.export import iter_encoded
from fedsynth.generative.model import SynthModel
from fedsynth.privacy.keys import KeyStore as SigningKeys
from fedsynth.server.api.budgets import BudgetHistory, BudgetList, budgets, history
from fedsynth.server.api.keys import ApiKeyError, KeyInfo, KeyStore, Principal
from fedsynth.server.api.ratelimit import DEFAULT_FAILURES, FailureLimiter
from fedsynth.server.audit import AuditEntry, AuditLog
from fedsynth.server.records import ROLES, Database, database_url
from fedsynth.server.registry import ModelRegistry, ModelVersion, RegistryError

DEFAULT_MAX_ROWS = 10_000_000
MEDIA_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "ndjson": "application/x-ndjson",
    "parquet": "application/vnd.apache.parquet",
}
ANALYST, COMPLIANCE, ADMIN = ROLES
SYNTHETIC_ROWS = 16_384  # rows per streamed chunk
#: Largest integer a SQLite or PostgreSQL BIGINT column holds (cursors are audit ``seq``).
MAX_INT64 = 2**63 - 1
# Module level: FastAPI resolves the route annotations against this module's globals.
_BEARER = HTTPBearer(auto_error=False)


# ---------------------------------------------------------------------------- bodies


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorOut(_Out):
    """The body of every refusal but 422: what went wrong and what to do."""

    detail: str = Field(examples=["missing API key: send Authorization: Bearer <key>"])


def _not_a_number(value: object) -> object:
    """Refuse a number where the document says date-time.

    Pydantic alone reads ``until=0.5`` as 0.5 s after 1970: the OpenAPI document declares
    ``format: date-time`` (RFC 3339 text), and a client sending a number means something else.
    """
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return value  # pydantic parses (and names the field if it cannot)
        raise ValueError(f"expected an RFC 3339 date-time (2024-05-01T12:00:00Z), got {value!r}")
    return value


IsoDateTime = Annotated[datetime, BeforeValidator(_not_a_number)]


class Health(_Out):
    status: Literal["ok"] = "ok"
    version: str


class ModelSummary(_Out):
    id: str = Field(examples=["bank-v1"])
    federation: str
    sector: str
    kind: str = Field(examples=["gan"])
    version: int
    round: int
    epsilon: float | None = Field(
        description="Largest epsilon spent by a contributing node; null: trained without DP"
    )
    delta: float
    created_at: str


class ModelList(_Out):
    models: list[ModelSummary]


class ModelDetail(ModelSummary):
    schema_: list[dict[str, Any]] = Field(alias="schema", serialization_alias="schema")
    participants: list[str]
    node_privacy: dict[str, dict[str, float | None]]
    quality: dict[str, Any]
    secure_aggregation: bool | None
    noise: dict[str, Any] | None = Field(
        default=None,
        description="Marginals models: whose noise protects a node ('own', or 'shared' "
        "across 'split' nodes under secure aggregation) and 'own_noise_epsilon', what one "
        "node's own noise alone is worth (against a server that sees its update); null "
        "for GAN and VAE models, whose DP-SGD noise is always each node's own",
    )


class SampleRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"n": 1000, "seed": 7, "conditions": {"student": "Yes"}, "format": "csv"}]
        },
    )
    n: int = Field(ge=1, description="Rows to generate")
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    conditions: dict[str, str | bool | int] | None = Field(
        default=None, description="Equality conditions on categorical or boolean columns"
    )
    format: Literal["csv", "ndjson", "parquet"] = "csv"


class AuditOut(_Out):
    seq: int
    created_at: str
    event_type: str
    actor: str
    payload: dict[str, Any]
    prev_hash: str
    hash: str


class AuditPage(_Out):
    entries: list[AuditOut]
    next_cursor: int | None = Field(description="Pass as `cursor` for the next page")


class ChainOut(_Out):
    ok: bool
    checked: int
    first_bad: int | None
    reason: str


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["analyst", "compliance", "admin"]
    federations: list[str] | None = Field(default=None, description="Scope; null: all")
    label: str = Field(default="", max_length=200)


class KeyOut(_Out):
    id: str
    role: str
    federations: list[str] | None
    label: str
    created_at: str
    revoked_at: str | None


class KeyCreated(KeyOut):
    key: str = Field(description="The bearer token; shown once, never stored")


# ---------------------------------------------------------------------------- responses

_HEADER = {"schema": {"type": "string"}}
_ERRORS: dict[int, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "The body is not UTF-8 JSON"},
    401: {
        "model": ErrorOut,
        "description": "No key, or an unknown or revoked one",
        "headers": {"WWW-Authenticate": {**_HEADER, "required": True}},
    },
    403: {"model": ErrorOut, "description": "The key's role may not use this route"},
    404: {"model": ErrorOut, "description": "Not found, or outside the key's federations"},
    500: {
        "model": ErrorOut,
        "description": "The model's files failed their signature or integrity check: "
        "refused, and audited as model_refused",
    },
    429: {
        "model": ErrorOut,
        "description": "Too many failed authentications from this client",
        "headers": {
            "Retry-After": {
                "schema": {"type": "integer", "minimum": 1},
                "required": True,
                "description": "Seconds until this client may try again",
            }
        },
    },
}


def _refusals(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI responses for refusals ``codes`` (401 and 429 come with every key check)."""
    return {code: _ERRORS[code] for code in sorted({401, 429, *codes})}


_PROVENANCE_HEADERS = {
    "Content-Disposition": _HEADER,
    **{
        f"X-Fedsynth-{name}": {**_HEADER, "required": True, "description": text}
        for name, text in (
            ("Model", "Model id"),
            ("Model-Version", "Model version"),
            ("Epsilon", "Largest epsilon spent by a contributing node; inf: no DP"),
            ("Delta", "Delta of the DP guarantee"),
            ("Label", "Always `synthetic`"),
        )
    },
}


# ---------------------------------------------------------------------------- the app


class Services:
    """What the routes share: records, audit chain, registry, API keys, loaded models."""

    def __init__(self, home: Path, max_rows: int, auth_failures: int = DEFAULT_FAILURES) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.db = Database(database_url(home))
        self.audit = AuditLog(self.db)
        self.registry = ModelRegistry(home / "registry", SigningKeys(home / "keys"), self.db)
        self.keys = KeyStore(self.db)
        self.limiter = FailureLimiter(auth_failures)
        self.max_rows = max_rows
        self._models: dict[str, SynthModel] = {}
        self._versions: dict[str, ModelVersion] = {}
        self._lock = threading.Lock()

    def model(self, model_id: str) -> SynthModel:
        """The verified model (loaded once); a refusal is audited and raises RegistryError."""
        with self._lock:
            if model_id not in self._models:
                self._models[model_id] = self._verified(model_id, self.registry.load)
            return self._models[model_id]

    def manifest(self, model_id: str) -> dict[str, Any]:
        """The signed manifest, re-read and checked; a refusal is audited as in ``model``."""
        return self._verified(model_id, self.registry.manifest)

    def _verified(self, model_id: str, read: Callable[[str], Any]) -> Any:
        try:
            return read(model_id)
        except RegistryError as exc:  # the reason names files and checks, never key bytes
            self.audit.append("model_refused", "api", {"model": model_id, "reason": str(exc)})
            raise

    def authenticate(self, token: str, client: str, where: dict[str, str]) -> Principal | None:
        """Check a bearer key; a failure is audited (with the key id, never the key) and
        counted against ``client``, which is refused after too many."""
        principal, key_id = self.keys.authenticate(token)
        if principal is None:
            self.audit.append(
                "auth_failed", f"key:{key_id}", {**where, "reason": "unknown or revoked key"}
            )
            if self.limiter.failed(client):
                self.audit.append(
                    "auth_rate_limited",
                    "anonymous",
                    {**where, "client": client, "failures": self.limiter.failures},
                )
        return principal

    def visible_version(self, model_id: str, who: Principal) -> ModelVersion:
        """The version ``model_id`` if ``who`` may see it; 404 otherwise, also for a model
        outside the key's scope, so that the answer does not confirm that it exists."""
        version = self._versions.get(model_id)
        if version is None:
            try:
                version = self.registry.get(model_id)
            except RegistryError:
                version = None
            else:
                self._versions[model_id] = version  # versions are never changed once written
        if version is None or not who.sees(version.federation):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no model {model_id!r}")
        return version

    def samples(self, model_id: str, body: SampleRequest, who: Principal) -> Response:
        """Stream ``body.n`` synthetic rows; one audit event when the stream ends (for one
        chunk's worth, the rows and the event are made before the response starts).

        Raises 404 for a model ``who`` cannot see, and 422 naming the field for a too large
        ``n`` or a condition the schema does not allow.
        """
        version = self.visible_version(model_id, who)
        if body.n > self.max_rows:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                [
                    {
                        "type": "less_than_equal",
                        "loc": ["body", "n"],
                        "msg": f"at most {self.max_rows} rows per request",
                        "input": body.n,
                        "ctx": {"le": self.max_rows},
                    }
                ],
            )
        model = self.model(model_id)
        conditions = dict(body.conditions or {})
        for column, value in conditions.items():
            try:
                model.codec.condition_level(column, value)
            except (KeyError, ValueError) as exc:
                raise HTTPException(
                    status.HTTP_422_UNPROCESSABLE_CONTENT,
                    [
                        {
                            "type": "value_error",
                            "loc": ["body", "conditions", column],
                            "msg": str(exc).strip("'\""),
                            "input": value,
                        }
                    ],
                ) from None
        provenance = _provenance(version)
        chunks = model.iter_samples(
            body.n, seed=body.seed, conditions=conditions, chunk_size=SYNTHETIC_ROWS
        )
        one_chunk = body.n <= SYNTHETIC_ROWS
        stream = iter_encoded(chunks, model.schema, body.format, provenance, ahead=not one_chunk)
        record = {
            "model": model_id,
            "role": who.role,
            "n": body.n,
            "seed": body.seed,
            "conditions": {k: str(v) for k, v in conditions.items()},
            "format": body.format,
        }
        headers = {
            "Content-Disposition": f'attachment; filename="{model_id}-synthetic.{body.format}"',
            **{f"X-Fedsynth-{k.replace('_', '-').title()}": v for k, v in provenance.items()},
        }
        audited = _audited(stream, self.audit, f"key:{who.key_id}", record)
        if one_chunk:
            # Made here, in the request's worker thread, audit event included: streaming one
            # chunk would add a read-ahead thread and a thread hop per chunk and at the end.
            return Response(b"".join(audited), media_type=MEDIA_TYPES[body.format], headers=headers)
        return StreamingResponse(audited, media_type=MEDIA_TYPES[body.format], headers=headers)

    def audit_page(
        self,
        who: Principal,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        event_type: str | None = None,
        actor: str | None = None,
        cursor: int = 0,
        limit: int = 100,
    ) -> AuditPage:
        """Up to ``limit`` entries after ``cursor`` that ``who`` may see, with the cursor of
        the next page (None on the last)."""
        entries: list[AuditEntry] = []
        after = cursor
        while len(entries) < limit:  # a scoped key skips other federations' events
            batch = self.audit.events(
                since=since,
                until=until,
                event_type=event_type,
                actor=actor,
                after_seq=after,
                limit=limit,
            )
            if not batch:
                break
            after = batch[-1].seq
            entries += [e for e in batch if _visible(e, who)]
        entries = entries[:limit]
        more = bool(entries) and len(entries) == limit
        return AuditPage(
            entries=[AuditOut(**e.__dict__) for e in entries],
            next_cursor=entries[-1].seq if more else None,
        )

    def audit_export(self, who: Principal, format: str) -> StreamingResponse:
        """The whole trail ``who`` may see, streamed as CSV or NDJSON; the export is itself
        an audit event."""
        if format not in ("csv", "ndjson"):
            raise ValueError(f"audit export format must be csv or ndjson, got {format!r}")
        self.audit.append("audit_exported", f"key:{who.key_id}", {"format": format})
        return StreamingResponse(
            _export(self.audit, who, format),
            media_type=MEDIA_TYPES[format],
            headers={"Content-Disposition": f'attachment; filename="fedsynth-audit.{format}"'},
        )


def create_app(
    home: Path, *, max_rows: int = DEFAULT_MAX_ROWS, auth_failures: int = DEFAULT_FAILURES
) -> FastAPI:
    # Concurrency comes from requests, one thread each: torch's intra-op threads on top
    # spin against each other (bank model on a busy 2-core machine: 44k rows/s with 2
    # threads, 328k with 1; python bench/api.py measures the server).
    torch.set_num_threads(1)
    services = Services(home, max_rows, auth_failures)
    app = FastAPI(
        title="fedsynth",
        version=fedsynth.__version__,
        description=(
            "Synthetic rows from federated, differentially private models; privacy budgets "
            "and a verifiable audit trail. Every route but /health needs `Authorization: "
            "Bearer <key>` (create keys with `fedsynth keys create --role ...`)."
        ),
    )
    app.state.services = services

    @app.exception_handler(RegistryError)
    def refused(request: Request, exc: RegistryError) -> JSONResponse:
        # Audited where it was raised (Services.model / manifest); no server paths here.
        model_id = request.path_params.get("model_id", "")
        detail = f"model {model_id!r} failed its signature or integrity check and is refused"
        return JSONResponse({"detail": f"{detail}; see audit event model_refused"}, 500)

    def require(*roles: str) -> Callable[..., Principal]:
        def dependency(
            request: Request,
            credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
        ) -> Principal:
            where = {"method": request.method, "path": request.url.path}
            client = request.client.host if request.client else "unknown"
            wait = services.limiter.retry_after(client)
            if wait:
                raise HTTPException(
                    status.HTTP_429_TOO_MANY_REQUESTS,
                    f"too many failed authentications from this client: retry in {wait} s",
                    headers={"Retry-After": str(wait)},
                )
            if credentials is None:
                services.audit.append("auth_failed", "anonymous", {**where, "reason": "no key"})
                raise HTTPException(
                    status.HTTP_401_UNAUTHORIZED,
                    "missing API key: send Authorization: Bearer <key>",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            principal = services.authenticate(credentials.credentials, client, where)
            if principal is None:
                raise HTTPException(
                    status.HTTP_401_UNAUTHORIZED,
                    "unknown or revoked API key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            if principal.role not in roles:
                services.audit.append(
                    "forbidden",
                    f"key:{principal.key_id}",
                    {**where, "role": principal.role, "allowed": list(roles)},
                )
                raise HTTPException(
                    status.HTTP_403_FORBIDDEN,
                    f"role {principal.role!r} may not use this route (needs {' or '.join(roles)})",
                )
            return principal

        return dependency

    readers = Depends(require(ANALYST, COMPLIANCE, ADMIN))
    analysts = Depends(require(ANALYST, ADMIN))
    officers = Depends(require(COMPLIANCE, ADMIN))
    admins = Depends(require(ADMIN))

    @app.get("/health", tags=["service"])
    def health() -> Health:
        return Health(version=fedsynth.__version__)

    @app.get("/v1/models", tags=["models"], responses=_refusals())
    def list_models(who: Principal = readers) -> ModelList:
        versions = [v for v in services.registry.list() if who.sees(v.federation)]
        return ModelList(models=[_summary(v) for v in versions])

    @app.get("/v1/models/{model_id}", tags=["models"], responses=_refusals(404, 500))
    def get_model(model_id: str, who: Principal = readers) -> ModelDetail:
        version = services.visible_version(model_id, who)
        manifest = services.manifest(model_id)
        model = services.model(model_id)
        privacy = model.metadata.get("privacy", {})
        return ModelDetail(
            **_summary(version).model_dump(),
            schema=list(model.metadata["schema"]["columns"]),
            participants=list(manifest.get("participants", [])),
            node_privacy={k: dict(v) for k, v in manifest.get("node_privacy", {}).items()},
            quality=dict(model.metadata.get("quality") or {}),
            secure_aggregation=privacy.get("secure_aggregation"),
            noise=(
                {
                    "kind": privacy["noise"],
                    "split": privacy.get("noise_split", 1),
                    "own_noise_epsilon": privacy.get("own_noise_epsilon"),
                    "mechanism": privacy.get("mechanism"),
                }
                if "noise" in privacy
                else None
            ),
        )

    @app.post(
        "/v1/models/{model_id}/samples",
        tags=["models"],
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "The rows, streamed in chunks, in the requested `format`",
                "content": {media: {} for media in MEDIA_TYPES.values()},
                "headers": _PROVENANCE_HEADERS,
            },
            **_refusals(400, 403, 404, 500),
        },
        # After FastAPI's own 422 (which it adds only when no 422 is declared).
        openapi_extra={
            "responses": {
                "422": {"description": "Invalid body or condition; `loc` names the field"}
            }
        },
    )
    def sample(model_id: str, body: SampleRequest, who: Principal = analysts) -> Response:
        return services.samples(model_id, body, who)

    @app.get("/v1/privacy/budgets", tags=["privacy"], responses=_refusals(403))
    def list_budgets(who: Principal = officers) -> BudgetList:
        return BudgetList(budgets=[b for b in budgets(services.db) if who.sees(b.federation)])

    @app.get(
        "/v1/privacy/budgets/{federation}/{node}", tags=["privacy"], responses=_refusals(403, 404)
    )
    def budget_history(federation: str, node: str, who: Principal = officers) -> BudgetHistory:
        found = history(services.db, federation, node) if who.sees(federation) else None
        if found is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no node {node!r} in {federation!r}")
        return found

    @app.get("/v1/audit", tags=["audit"], responses=_refusals(403))
    def audit(
        who: Principal = officers,
        since: IsoDateTime | None = None,
        until: IsoDateTime | None = None,
        event_type: str | None = None,
        actor: str | None = None,
        cursor: Annotated[
            int, Query(ge=0, le=MAX_INT64, description="`next_cursor` of the previous page")
        ] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> AuditPage:
        return services.audit_page(
            who,
            since=since,
            until=until,
            event_type=event_type,
            actor=actor,
            cursor=cursor,
            limit=limit,
        )

    @app.get("/v1/audit/verify", tags=["audit"], responses=_refusals(403))
    def verify(who: Principal = officers) -> ChainOut:
        result = services.audit.verify()
        return ChainOut(
            ok=result.ok, checked=result.checked, first_bad=result.first_bad, reason=result.reason
        )

    @app.get(
        "/v1/audit/export",
        tags=["audit"],
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "The trail, streamed in the requested `format`",
                "content": {MEDIA_TYPES[f]: {} for f in ("csv", "ndjson")},
            },
            **_refusals(403),
        },
    )
    def export(
        who: Principal = officers,
        format: Literal["csv", "ndjson"] = "ndjson",
    ) -> StreamingResponse:
        return services.audit_export(who, format)

    @app.post(
        "/v1/keys",
        tags=["keys"],
        status_code=status.HTTP_201_CREATED,
        responses=_refusals(400, 403),
    )
    def create_key(body: KeyCreate, who: Principal = admins) -> KeyCreated:
        audit = (services.audit, f"key:{who.key_id}")  # key and event: one transaction
        info, token = services.keys.create(body.role, body.federations, body.label, audit=audit)
        return KeyCreated(**_key(info).model_dump(), key=token)

    @app.get("/v1/keys", tags=["keys"], responses=_refusals(403))
    def list_keys(who: Principal = admins) -> list[KeyOut]:
        return [_key(k) for k in services.keys.list()]

    @app.delete("/v1/keys/{key_id}", tags=["keys"], responses=_refusals(403, 404))
    def revoke_key(
        key_id: Annotated[str, PathParam(max_length=32)], who: Principal = admins
    ) -> KeyOut:
        try:
            info = services.keys.revoke(key_id, audit=(services.audit, f"key:{who.key_id}"))
        except ApiKeyError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        return _key(info)

    return app


# ---------------------------------------------------------------------------- helpers


def _summary(v: ModelVersion) -> ModelSummary:
    epsilon = v.epsilon if v.epsilon is not None and math.isfinite(v.epsilon) else None
    return ModelSummary(
        id=v.id,
        federation=v.federation,
        sector=v.sector,
        kind=v.kind,
        version=v.version,
        round=v.round,
        epsilon=epsilon,
        delta=v.delta,
        created_at=v.created_at.isoformat()
        if isinstance(v.created_at, datetime)
        else str(v.created_at),
    )


def _provenance(v: ModelVersion) -> dict[str, str]:
    epsilon = v.epsilon if v.epsilon is not None and math.isfinite(v.epsilon) else math.inf
    return {
        "model": v.id,
        "model_version": str(v.version),
        "epsilon": "inf" if math.isinf(epsilon) else f"{epsilon:.6g}",
        "delta": f"{v.delta:g}",
        "label": "synthetic",
    }


def _audited(
    stream: Iterator[bytes], audit: AuditLog, actor: str, record: dict[str, Any]
) -> Iterator[bytes]:
    """Pass the bytes on; when the stream ends (or breaks) write one audit event."""
    started, sent, outcome = time.perf_counter(), 0, "completed"
    try:
        for data in stream:
            sent += len(data)
            yield data
    except GeneratorExit:
        outcome = "client disconnected"
        raise
    except Exception as exc:
        outcome = f"error: {type(exc).__name__}: {exc}"[:500]
        raise
    finally:
        audit.append(
            "sample_request",
            actor,
            {
                **record,
                "bytes": sent,
                "duration_s": round(time.perf_counter() - started, 3),
                "outcome": outcome,
            },
        )


def _visible(entry: AuditEntry, who: Principal) -> bool:
    if who.federations is None:
        return True
    federation = entry.payload.get("federation")
    return isinstance(federation, str) and who.sees(federation)


def _export(audit: AuditLog, who: Principal, fmt: str) -> Iterator[bytes]:
    fields = ("seq", "created_at", "event_type", "actor", "payload", "prev_hash", "hash")
    if fmt == "csv":
        yield (",".join(fields) + "\r\n").encode()
    after = 0
    while True:
        batch = audit.events(after_seq=after, limit=1000)
        if not batch:
            return
        after = batch[-1].seq
        out = io.StringIO()
        writer = csv.writer(out)
        for entry in (e for e in batch if _visible(e, who)):
            row = {f: getattr(entry, f) for f in fields}
            if fmt == "csv":
                writer.writerow(
                    [
                        json.dumps(row["payload"], sort_keys=True) if f == "payload" else row[f]
                        for f in fields
                    ]
                )
            else:
                out.write(json.dumps(row, sort_keys=True) + "\n")
        yield out.getvalue().encode()


def _key(info: KeyInfo) -> KeyOut:
    return KeyOut(**info.__dict__)
