"""The ``fedsynth`` command: the composition root that wires the parts together.

Errors a user can fix (bad spec, bad table, bad model file, bad option) are printed as
one clear message and exit with status 2; nothing is written in that case.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedsynth.home import fedsynth_home

if TYPE_CHECKING:
    from fastapi import FastAPI

app = typer.Typer(
    help="fedsynth: differentially private synthetic data from tables that cannot be shared.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def _fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code=2)


def _parse_conditions(items: list[str]) -> dict[str, str]:
    conditions: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise _fail(f"--condition {item!r}: expected COLUMN=VALUE")
        conditions[name.strip()] = value.strip()
    return conditions


@app.command()
def train(
    spec: Annotated[Path, typer.Option(help="Federation spec (TOML), e.g. federations/bank.toml")],
    data: Annotated[Path, typer.Option(help="Training table, CSV or Parquet")],
    out: Annotated[Path, typer.Option(help="Directory to write the model artifact to")],
    epsilon: Annotated[
        float | None, typer.Option(help="Override privacy.target_epsilon (inf: no DP)")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Override training.seed")] = None,
) -> None:
    """Train the spec's model on one local table (no federation): a GAN or VAE with
    DP-SGD, or the marginals kind (noisy marginals and a graphical model)."""
    from fedsynth.generative.spec import SpecError, load_spec, parse_spec
    from fedsynth.generative.table import TableError, load_table
    from fedsynth.generative.training import TrainingError, check_rows
    from fedsynth.generative.training import train as train_model

    try:
        loaded = load_spec(spec)
        if epsilon is not None or seed is not None:
            raw = loaded.model_dump(mode="python")
            if epsilon is not None:
                raw["privacy"]["target_epsilon"] = epsilon
            if seed is not None:
                raw["training"]["seed"] = seed
            loaded = parse_spec(raw, source=f"{spec.name} (with overrides)")
        # streamed: the table is checked block by block and only typed columns are kept
        frame = load_table(data, loaded.schema)
        check_rows(len(frame), loaded)  # e.g. privacy.delta against 1/rows, before training
    except (SpecError, TableError, TrainingError) as exc:
        raise _fail(str(exc)) from None

    console.print(
        f"training [bold]{loaded.model.kind}[/] on {len(frame):,} rows of {data.name}, "
        f"target epsilon {loaded.privacy.target_epsilon:g} at delta {loaded.privacy.delta:g}"
    )
    if loaded.model.kind == "marginals":
        from fedsynth.generative.marginals import train_marginals

        with console.status("measuring marginals and fitting the graphical model"):
            fitted = train_marginals([frame], loaded)
        fitted.save(out)
        sigma = fitted.metadata["privacy"]["sigma"]
        console.print(
            f"saved {out} (epsilon {fitted.metadata['privacy']['epsilon']}, noise "
            f"{sigma['one_way']:.1f} / {sigma['scores']:.1f} / {sigma['two_way']:.1f} on the "
            f"one-way counts / pair scores / {len(fitted.edges)} pair counts, "
            f"{fitted.metadata['training']['fit_seconds']:.1f} s)"
        )
        return
    bar = Progress(
        TextColumn("epoch {task.fields[epoch]}"),
        BarColumn(),
        TextColumn("step {task.completed}/{task.total}"),
        TextColumn("{task.fields[losses]}"),
        TextColumn("epsilon {task.fields[eps]}"),
        TimeElapsedColumn(),
        console=console,
    )
    with bar:
        task = bar.add_task("train", total=None, epoch="-", losses="", eps="-")

        def report(p) -> None:
            losses = " ".join(f"{k} {v:.3f}" for k, v in p.losses.items())
            eps = "inf" if math.isinf(p.epsilon) else f"{p.epsilon:.3f}"
            bar.update(
                task,
                completed=p.step,
                total=p.steps,
                epoch=f"{p.epoch}/{p.epochs}",
                losses=losses,
                eps=eps,
            )

        try:
            model = train_model(frame, loaded, progress=report)
        except TrainingError as exc:
            raise _fail(str(exc)) from None
    model.save(out)
    privacy = model.metadata["privacy"]
    console.print(
        f"saved {out} (epsilon {privacy['epsilon']}, noise multiplier "
        f"{privacy['noise_multiplier']:.3f}, {privacy['steps']} steps, "
        f"{model.metadata['training']['fit_seconds']:.1f} s)"
    )


@app.command()
def sample(
    model: Annotated[Path, typer.Option(help="Model directory written by `fedsynth train`")],
    n: Annotated[int, typer.Option("-n", "--rows", min=0, help="Number of rows")],
    out: Annotated[Path, typer.Option(help="Output file: .csv, .parquet or .ndjson")],
    seed: Annotated[int, typer.Option(help="Same seed, same rows")] = 0,
    condition: Annotated[
        list[str], typer.Option(help="COLUMN=VALUE on a categorical column (repeatable)")
    ] = [],  # noqa: B006 - typer needs a literal default
) -> None:
    """Generate synthetic rows, streamed to a file with constant memory."""
    from fedsynth.generative.export import format_for_path, write_file
    from fedsynth.generative.model import ModelFileError, SynthModel

    conditions = _parse_conditions(condition)
    try:
        format_for_path(out)
        loaded = SynthModel.load(model)
        loaded.codec.condition_vector(conditions, 0)  # validate before writing
    except (ModelFileError, ValueError) as exc:
        raise _fail(str(exc)) from None
    started = time.perf_counter()
    provenance = {
        "synthetic": "true",
        "model": str(model),
        "epsilon": str(loaded.metadata["privacy"]["epsilon"]),
        "delta": str(loaded.metadata["privacy"]["delta"]),
    }
    size = write_file(loaded.iter_samples(n, seed, conditions), loaded.schema, out, provenance)
    elapsed = time.perf_counter() - started
    console.print(
        f"wrote {n:,} synthetic rows to {out} ({size / 1e6:.1f} MB, "
        f"{n / max(elapsed, 1e-9):,.0f} rows/s)"
    )


@app.command()
def report(
    model: Annotated[Path, typer.Option(help="Model directory")],
    real: Annotated[Path, typer.Option(help="The real rows the model was trained on")],
    holdout: Annotated[
        Path | None, typer.Option(help="Real rows NOT used in training (for TSTR and DCR)")
    ] = None,
    rows: Annotated[
        int | None, typer.Option(help="Synthetic rows (default: as many as real)")
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Quality report: fidelity (column shapes, pair trends), utility (TSTR), privacy (DCR)."""
    from fedsynth.generative import quality
    from fedsynth.generative.model import ModelFileError, SynthModel
    from fedsynth.generative.table import TableError, load_table

    try:
        loaded = SynthModel.load(model)
        train_rows = load_table(real, loaded.schema)
        held = load_table(holdout, loaded.schema) if holdout else None
    except (ModelFileError, TableError) as exc:
        raise _fail(str(exc)) from None
    synthetic = loaded.sample(rows or len(train_rows), seed=seed)
    scores = quality.quality_report(train_rows, synthetic, loaded.schema)
    result: dict[str, object] = {
        "model": str(model),
        "epsilon": loaded.metadata["privacy"]["epsilon"],
        "delta": loaded.metadata["privacy"]["delta"],
        "quality": scores.quality,
        "column_shapes": scores.column_shapes,
        "column_pair_trends": scores.column_pair_trends,
    }
    if held is not None:
        result.update(quality.evaluate(train_rows, held, synthetic, loaded.schema, seed=seed))
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    table = Table(title=f"quality report: {model}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
    if held is None:
        console.print("give --holdout to add TSTR utility and distance to closest record (DCR)")


@app.command()
def demo(
    quick: Annotated[
        bool, typer.Option(help="Two short rounds per federation (about 3 minutes in all)")
    ] = False,
    no_serve: Annotated[
        bool, typer.Option("--no-serve", help="Stop after training: do not start the API")
    ] = False,
    port: Annotated[int, typer.Option(help="Port of the API started at the end")] = 8000,
) -> None:
    """Federated demo: bank, hospital and retail, three nodes each, DP-SGD + SecAgg+."""
    from fedsynth.demo.data import DemoDataError
    from fedsynth.demo.run import run_demo
    from fedsynth.server.app import RoundEvent
    from fedsynth.server.secagg import RoundFailed

    home = fedsynth_home()
    console.print(f"FEDSYNTH_HOME = {home}")
    started = time.perf_counter()

    def report(event: RoundEvent) -> None:
        spent = ", ".join(
            f"{k} {'inf' if v is None else f'{v:.3f}'}" for k, v in event.epsilons.items()
        )
        refused = f"; refused: {', '.join(event.refused)}" if event.refused else ""
        console.print(
            f"[bold]{event.federation}[/] round {event.round}/{event.rounds} {event.status}: "
            f"epsilon {spent}{refused}  [{time.perf_counter() - started:.0f} s]",
            highlight=False,
        )

    try:
        results = run_demo(home, quick=quick, on_round=report)
    except (DemoDataError, FileNotFoundError, RoundFailed) as exc:
        raise _fail(str(exc)) from None
    # No vertical rules: the nine columns then fit an 80-column terminal untruncated.
    table = Table(
        title="fedsynth demo: one federated DP model per sector (3 nodes each)",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        collapse_padding=True,
        pad_edge=False,
    )
    for name in (
        "sector",
        "model",
        "kind",
        "rounds",
        "rows",
        "max node ε",
        "quality",
        "TSTR",
        "TRTR",
    ):
        left = name in ("sector", "model", "kind")
        table.add_column(name, justify="left" if left else "right", no_wrap=True)

    def fmt(value: object) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    for r in results:
        spent = [e for e in r.node_epsilons.values() if e is not None]
        table.add_row(
            r.sector,
            r.model_id,
            r.kind,
            str(r.rounds),
            f"{sum(r.node_rows):,}",
            fmt(max(spent)) if spent else "inf",
            fmt(r.quality),
            fmt(r.tstr_auc),
            fmt(r.trtr_auc),
        )
    Console().print(table)
    console.print(
        f"done in {time.perf_counter() - started:.0f} s. Models are signed and encrypted under "
        f"{home / 'registry'}; try: fedsynth models list, fedsynth audit verify"
    )
    if no_serve:
        return
    _serve_demo(home, port)


def _serve_demo(home: Path, port: int) -> None:
    """Start the API over the demo's home, with one fresh key per role."""
    import uvicorn

    api = _api(home)
    services = api.state.services
    url = f"http://127.0.0.1:{port}"
    lines = [
        f"API: {url}  (OpenAPI docs: {url}/docs; Ctrl-C stops it)",
        f"Dashboards: {url}/dashboards  (sign in with the compliance or analyst key)",
    ]
    for role in ("analyst", "compliance", "admin"):
        info, token = services.keys.create(role, label="fedsynth demo")
        services.audit.append("key_created", "demo", {"key": info.id, "role": role})
        lines.append(f"  {role:<10} key: {token}")
    lines.append(f'  try: curl -H "Authorization: Bearer <analyst key>" {url}/v1/models')
    Console().print("\n".join(lines), highlight=False, soft_wrap=True)
    uvicorn.run(
        api, host="127.0.0.1", port=port, log_level="warning", timeout_keep_alive=KEEP_ALIVE_S
    )


# ------------------------------------------------------------------------------ models
models_app = typer.Typer(
    help="The signed model registry under FEDSYNTH_HOME.", no_args_is_help=True
)
app.add_typer(models_app, name="models")


def _registry():
    from fedsynth.privacy.keys import KeyStore
    from fedsynth.server.records import Database, database_url
    from fedsynth.server.registry import ModelRegistry

    home = fedsynth_home()
    db = Database(database_url(home))
    return ModelRegistry(home / "registry", KeyStore(home / "keys"), db)


def _version_dict(v) -> dict[str, object]:
    return {
        "id": v.id,
        "federation": v.federation,
        "sector": v.sector,
        "kind": v.kind,
        "version": v.version,
        "round": v.round,
        "epsilon": v.epsilon if v.epsilon is None or math.isfinite(v.epsilon) else "inf",
        "delta": v.delta,
        "created_at": v.created_at.isoformat()
        if hasattr(v.created_at, "isoformat")
        else str(v.created_at),
    }


@models_app.command("list")
def models_list(
    as_json: Annotated[bool, typer.Option("--json", help="A JSON array on stdout")] = False,
) -> None:
    """Registered model versions, newest first; epsilon is the largest node's spend."""
    versions = [_version_dict(v) for v in _registry().list()]
    if as_json:
        sys.stdout.write(json.dumps(versions, indent=2) + "\n")
        return
    if not versions:
        console.print("no model registered yet: run fedsynth demo")
        return
    table = Table(title="registered models")
    for name in ("id", "sector", "kind", "version", "round", "epsilon", "delta", "created_at"):
        table.add_column(name)
    for v in versions:
        eps = v["epsilon"]
        table.add_row(
            *(str(v[k]) for k in ("id", "sector", "kind", "version", "round")),
            "inf" if eps is None or eps == math.inf else f"{eps:.3f}",
            f"{v['delta']:g}",
            str(v["created_at"]),
        )
    Console().print(table)


@models_app.command("show")
def models_show(model_id: Annotated[str, typer.Argument(help="e.g. bank-v1")]) -> None:
    """A model version's signed manifest (signature checked) as JSON; a refusal is audited."""
    from fedsynth.server.audit import AuditLog
    from fedsynth.server.registry import RegistryError

    registry = _registry()
    try:
        manifest = registry.manifest(model_id)
    except RegistryError as exc:
        AuditLog(registry.db).append(
            "model_refused", "cli", {"model": model_id, "reason": str(exc)}
        )
        raise _fail(str(exc)) from None
    sys.stdout.write(json.dumps(manifest, indent=2, default=str) + "\n")


# ------------------------------------------------------------------------------ audit
audit_app = typer.Typer(help="The hash-chained audit log.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def audit_verify() -> None:
    """Recompute the chain; exit 0 when it verifies, 1 naming the first bad entry."""
    from fedsynth.server.audit import AuditLog
    from fedsynth.server.records import Database, database_url

    status = AuditLog(Database(database_url(fedsynth_home()))).verify()
    if status.ok:
        Console().print(f"audit chain verified: {status.checked} entries")
        return
    Console().print(f"[bold red]audit chain broken[/] at entry {status.first_bad}: {status.reason}")
    raise typer.Exit(code=1)


# ------------------------------------------------------------------------------ API
@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    max_rows: Annotated[
        int, typer.Option(help="Largest n one sample request may ask for")
    ] = 10_000_000,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Server processes. One process uses about one core; keys, sessions and the "
            "audit chain live in the database, so workers share them.",
        ),
    ] = 1,
) -> None:
    """Serve the HTTP API (models, samples, budgets, audit) and the dashboards over
    FEDSYNTH_HOME."""
    import uvicorn

    home = fedsynth_home()
    console.print(
        f"FEDSYNTH_HOME = {home}; API docs at http://{host}:{port}/docs, "
        f"dashboards at http://{host}:{port}/dashboards"
    )
    api = _api(home, max_rows=max_rows)  # also creates the database tables, once
    if workers == 1:
        uvicorn.run(api, host=host, port=port, log_level="info", timeout_keep_alive=KEEP_ALIVE_S)
        return
    # Worker processes import the app by name and build it from the environment.
    os.environ.update({"FEDSYNTH_HOME": str(home), MAX_ROWS_ENV: str(max_rows)})
    uvicorn.run(
        "fedsynth.cli:api_from_environment",
        factory=True,
        workers=workers,
        host=host,
        port=port,
        log_level="info",
        timeout_keep_alive=KEEP_ALIVE_S,
    )


MAX_ROWS_ENV = "FEDSYNTH_MAX_ROWS"
#: How long the server keeps an idle connection. Longer than clients' own pool expiry
#: (httpx: 5 s, uvicorn's default too): with equal timers a client can send a request on a
#: connection the server is closing, and gets "disconnected without a response" (seen
#: once in 24,343 requests of bench/soak.py with uvicorn's default).
KEEP_ALIVE_S = 30


def api_from_environment() -> FastAPI:
    """The app of one ``fedsynth serve --workers N`` process (uvicorn calls this)."""
    return _api(fedsynth_home(), max_rows=int(os.environ.get(MAX_ROWS_ENV, "10000000")))


def _api(home: Path, **settings: Any) -> FastAPI:
    """The HTTP API with the dashboards mounted on it (the CLI composes the two parts)."""
    from fedsynth.dashboards import mount_dashboards
    from fedsynth.server.api.app import create_app

    api = create_app(home, **settings)
    mount_dashboards(api)
    return api


keys_app = typer.Typer(help="API keys (bearer tokens) for the HTTP API.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _api_keys():
    from fedsynth.server.api.keys import KeyStore
    from fedsynth.server.audit import AuditLog
    from fedsynth.server.records import Database, database_url

    db = Database(database_url(fedsynth_home()))
    return KeyStore(db), AuditLog(db)


@keys_app.command("create")
def keys_create(
    role: Annotated[str, typer.Option(help="analyst, compliance or admin")],
    federation: Annotated[
        list[str] | None,
        typer.Option(help="Limit the key to this federation (repeatable); default: all"),
    ] = None,
    label: Annotated[str, typer.Option(help="A note, e.g. who holds the key")] = "",
) -> None:
    """Create a key; the key itself is printed alone on the last line, once."""
    from fedsynth.server.api.keys import ApiKeyError

    keys, audit = _api_keys()
    try:
        info, token = keys.create(role, federation, label, audit=(audit, "cli"))
    except ApiKeyError as exc:
        raise _fail(str(exc)) from None
    console.print(f"key {info.id} ({info.role}); store it now, it is not shown again:")
    sys.stdout.write(token + "\n")


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key id (not the key)")]) -> None:
    """Revoke a key: every request with it is refused from now on."""
    from fedsynth.server.api.keys import ApiKeyError

    keys, audit = _api_keys()
    try:
        keys.revoke(key_id, audit=(audit, "cli"))
    except ApiKeyError as exc:
        raise _fail(str(exc)) from None
    Console().print(f"key {key_id} revoked")


@keys_app.command("list")
def keys_list() -> None:
    """Key ids, roles, scopes and revocation (never the keys themselves)."""
    keys, _ = _api_keys()
    table = Table(title="API keys")
    for name in ("id", "role", "federations", "label", "created", "revoked"):
        table.add_column(name)
    for k in keys.list():
        table.add_row(
            k.id,
            k.role,
            ", ".join(k.federations or ["all"]),
            k.label,
            k.created_at,
            k.revoked_at or "",
        )
    Console().print(table)


# ------------------------------------------------------------------------------ node
node_app = typer.Typer(help="What runs at an institution.", no_args_is_help=True)
app.add_typer(node_app, name="node")


@node_app.command("outbox")
def node_outbox(
    path: Annotated[Path, typer.Option("--outbox", help="The node's outbox.jsonl")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines as stored")] = False,
) -> None:
    """Every message that left this node: time, round, kind, bytes, epsilon reported."""
    from fedsynth.clients.outbox import read_outbox

    entries = read_outbox(path)
    if as_json:
        for entry in entries:
            sys.stdout.write(json.dumps(entry) + "\n")
        return
    if not entries:
        console.print(f"{path}: nothing has left this node")
        return
    table = Table(title=f"outbox: {path}")
    for name in ("time", "round", "type", "bytes", "holds", "status", "epsilon reported"):
        table.add_column(name)
    for e in entries:
        content = e.get("content", {})
        holds = (
            "error"
            if "error" in content
            else ", ".join(
                [
                    *(f"{k}: {n} arrays" for k, n in content.get("arrays", {}).items() if n),
                    *content.get("configs", []),
                ]
            )
        )
        eps = e.get("epsilon_reported")
        table.add_row(
            e["time"],
            str(e["round"]),
            e["type"],
            f"{e['bytes']:,}",
            holds,
            str(e.get("status", "")),
            "" if eps is None else f"{eps:.4f}",
        )
    Console().print(table)


# ------------------------------------------------------------------------------ deployment
def _mount_deployment() -> None:
    """``fedsynth certs create``, ``server start|connect``, ``node keys|join``: the
    deployment engine's commands (fedsynth/deploy/cli.py, docs/deployment.md)."""
    from fedsynth.deploy import cli as deploy

    certs_app = typer.Typer(help="The federation's TLS certificates.", no_args_is_help=True)
    certs_app.command("create")(deploy.certs_create)
    app.add_typer(certs_app, name="certs")
    server_app = typer.Typer(help="The coordinator's SuperLink.", no_args_is_help=True)
    server_app.command("start")(deploy.server_start)
    server_app.command("connect")(deploy.server_connect)
    app.add_typer(server_app, name="server")
    node_app.command("keys")(deploy.node_keys)
    node_app.command("join")(deploy.node_join)


_mount_deployment()


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
