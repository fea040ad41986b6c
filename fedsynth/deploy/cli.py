"""Operator commands for a real deployment (mounted into ``fedsynth`` by the CLI root).

Coordinator: ``certs_create`` (private CA + SuperLink certificate), ``server_start``
(``flower-superlink`` with TLS and node authentication), ``server_connect`` (the Flower
connection ``flwr run`` uses). Institution: ``node_keys`` (its authentication key pair)
and ``node_join`` (checks its inputs, then becomes ``flower-supernode``).

``node_join`` and ``server_start`` replace the current process with the Flower one
(``os.execve``), so a service manager's stop signal reaches Flower directly.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from fedsynth.deploy import launch
from fedsynth.deploy.certificates import (
    CertificateError,
    ServerCertificates,
    create_node_key,
    create_server_certificates,
)
from fedsynth.deploy.prompt_supernode import MIN_POLL_S

deploy_app = typer.Typer(
    help="Deployment on Flower's engine: certificates, SuperLink, SuperNodes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
#: Beside the node's ledger: the secret its SuperNode and warm executor share.
EXECUTOR_SECRET = "superexec.secret"


def _fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code=2)


def _exec(cmd: list[str], env: dict[str, str]) -> NoReturn:
    console.print("starting: " + " ".join(cmd), markup=False, highlight=False, soft_wrap=True)
    try:
        os.execve(cmd[0], cmd, env)
    except OSError as exc:
        raise _fail(f"cannot start {cmd[0]}: {exc}") from None


# ------------------------------------------------------------------------------ coordinator


@deploy_app.command("certs-create")
def certs_create(
    out: Annotated[Path, typer.Option("--out", help="Folder for ca.pem, ca.key, server.*")],
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host",
            help="Name or IP the nodes dial (repeatable); localhost and 127.0.0.1 are "
            "always included",
        ),
    ] = None,
    days: Annotated[int, typer.Option(help="Validity of the server certificate")] = 365,
) -> None:
    """Create the federation's private CA (or reuse the one in --out) and issue the
    SuperLink's TLS certificate."""
    try:
        certs = create_server_certificates(out, host or [], days=days)
    except CertificateError as exc:
        raise _fail(str(exc)) from None
    what = "created a new CA" if certs.created_ca else "reused the CA"
    console.print(
        f"{what} in {certs.folder}; server certificate for {', '.join(certs.hosts)}",
        markup=False,
    )
    console.print(
        f"give {certs.ca_cert} to every institution; keep {certs.ca_key.name} and "
        f"{certs.server_key.name} private (mode 0600)",
        markup=False,
    )


@deploy_app.command("server-start")
def server_start(
    certs: Annotated[Path, typer.Option("--certs", help="Folder from `certs create`")],
    state: Annotated[Path, typer.Option("--state", help="Folder for the SuperLink's state")],
    host: Annotated[
        str,
        typer.Option(
            help="Interface to listen on. Loopback by default: the port also serves "
            "Flower's unauthenticated Control API (docs/deployment.md); expose it "
            "through a proxy that forwards only /v1/fleet/, or firewall it"
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The SuperLink's one HTTPS port")] = (
        launch.SUPERLINK_PORT
    ),
    node_auth: Annotated[
        bool,
        typer.Option(
            "--node-auth/--no-node-auth",
            help="Admit only SuperNodes whose public key was registered",
        ),
    ] = True,
    in_memory: Annotated[
        bool,
        typer.Option(
            "--in-memory",
            help="Keep the SuperLink's state in memory, not in STATE/superlink.db: "
            "faster rounds (docs/deployment.md, 'Round time'), but a restart forgets the "
            "registered node keys (register them again) and the runs in flight",
        ),
    ] = False,
) -> None:
    """Become ``flower-superlink`` with TLS (and node authentication, by default)."""
    try:
        certificates = ServerCertificates.in_folder(certs)
    except CertificateError as exc:
        raise _fail(str(exc)) from None
    if not 0 < port < 65536:
        raise _fail(f"--port {port}: not a TCP port")
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(
            f"[bold yellow]note:[/] listening on {escape(host)}: whoever reaches port {port} "
            "can use Flower's Control API (start runs, register node keys); allow only the "
            "institutions' addresses, or forward only /v1/fleet/ (docs/deployment.md)"
        )
    state.mkdir(parents=True, exist_ok=True)
    cmd = launch.superlink_command(
        certificates,
        host=host,
        port=port,
        database=None if in_memory else state / "superlink.db",
        node_auth=node_auth,
        log_file=state / "superlink.log",
    )
    _exec(cmd, launch.flower_environment())


@deploy_app.command("server-connect")
def server_connect(
    address: Annotated[str, typer.Option(help="The SuperLink as host:port")],
    root_cert: Annotated[Path, typer.Option("--root-cert", help="The federation's ca.pem")],
    name: Annotated[str, typer.Option(help="Connection name for `flwr run . NAME`")] = ("fedsynth"),
) -> None:
    """Write the Flower connection that ``flwr run . NAME`` submits through
    (``$FLWR_HOME/config.toml``, default ``~/.flwr/config.toml``)."""
    if not root_cert.is_file():
        raise _fail(f"--root-cert {root_cert}: no such file")
    path = launch.write_connection(name, address, root_cert)
    console.print(f"{path}: [superlink.{name}] -> {address}; now: flwr run . {name}", markup=False)


# ------------------------------------------------------------------------------ institution


@deploy_app.command("node-keys")
def node_keys(
    out: Annotated[Path, typer.Option("--out", help="Folder for NAME.key and NAME.pub")],
    name: Annotated[str, typer.Option(help="File name stem, e.g. the institution")],
    force: Annotated[bool, typer.Option(help="Replace an existing key pair")] = False,
) -> None:
    """Create this node's authentication key pair; send NAME.pub to the coordinator."""
    try:
        key = create_node_key(out, name, overwrite=force)
    except CertificateError as exc:
        raise _fail(str(exc)) from None
    console.print(
        f"private key {key.private_key} (mode 0600, stays here); send {key.public_key} to "
        f"the coordinator, who runs: flwr supernode register {key.public_key.name} <connection>",
        markup=False,
    )


@deploy_app.command("node-join")
def node_join(
    superlink: Annotated[str, typer.Option(help="The coordinator's SuperLink, host:port")],
    data: Annotated[Path, typer.Option(help="This institution's table, CSV or Parquet")],
    ledger: Annotated[Path, typer.Option(help="This node's privacy ledger (JSON file)")],
    cap: Annotated[float, typer.Option(help="This node's epsilon cap for the federation")],
    institution: Annotated[str, typer.Option(help="Name the federation knows you by")],
    root_cert: Annotated[
        Path | None, typer.Option("--root-cert", help="The federation's ca.pem")
    ] = None,
    key: Annotated[
        Path | None,
        typer.Option("--key", help="Private key from `node keys` (node authentication)"),
    ] = None,
    outbox: Annotated[
        Path | None, typer.Option(help="Log of every outgoing message (default: beside ledger)")
    ] = None,
    spec: Annotated[
        Path | None,
        typer.Option(help="Check the table against this federation spec before joining"),
    ] = None,
    runtime_port: Annotated[
        int, typer.Option(help="Local port of this node's Runtime API (one per node)")
    ] = launch.SUPERNODE_RUNTIME_PORT,
    insecure: Annotated[
        bool, typer.Option(help="Connect WITHOUT TLS (testing on one machine only)")
    ] = False,
    warm: Annotated[
        bool,
        typer.Option(
            help="Start each ClientApp from a fork server with torch and Opacus loaded "
            "(--no-warm: Flower's fresh process per message)"
        ),
    ] = True,
    poll_s: Annotated[
        float,
        typer.Option(
            "--poll-s",
            help="While a run is active, ask for the next message 50 ms after a reply, then "
            "twice as long each time up to this many seconds (0: Flower's fixed 3 s)",
            min=0.0,
            max=3.0,
        ),
    ] = launch.NODE_POLL_S,
    own_noise_cap: Annotated[
        float | None,
        typer.Option(
            "--own-noise-cap",
            help="Largest epsilon under this node's own share of split noise alone "
            '(privacy.noise = "shared": what a server that sees its update could learn); '
            "default: --cap",
        ),
    ] = None,
) -> None:
    """Check this node's inputs, then become ``flower-supernode`` connected to the
    SuperLink over TLS. The table never leaves this machine."""
    from fedsynth.clients.node import NodeConfig, NodeConfigError

    if insecure:
        if root_cert is not None or key is not None:
            raise _fail("--insecure cannot be combined with --root-cert or --key")
        console.print(
            "[bold red on white] WARNING: --insecure: no TLS. Model updates, budgets and "
            "the app code travel in clear text and the SuperLink is not authenticated; "
            "anyone on the path can read or replace them. Test on one machine only. [/]"
        )
    elif root_cert is None:
        raise _fail(
            "--root-cert is required (the federation's ca.pem from the coordinator); "
            "a node does not connect without TLS unless --insecure is given"
        )
    elif not root_cert.is_file():
        raise _fail(f"--root-cert {root_cert}: no such file")
    if key is not None and not key.is_file():
        raise _fail(f"--key {key}: no such file")
    if 0 < poll_s < MIN_POLL_S:
        raise _fail(f"--poll-s must be 0 (Flower's fixed 3 s) or at least {MIN_POLL_S:g} s")
    if not data.is_file():
        raise _fail(f"--data {data}: no such file")
    ledger = ledger.expanduser().resolve()
    raw: dict[str, str | float] = {
        "institution": institution,
        "data-path": str(data.expanduser().resolve()),
        "ledger-path": str(ledger),
        "outbox-path": str((outbox or ledger.with_name("outbox.jsonl")).expanduser().resolve()),
        "epsilon-cap": cap,
        **({"own-noise-cap": own_noise_cap} if own_noise_cap is not None else {}),
    }
    try:
        NodeConfig.from_mapping(raw, "fedsynth node join")
    except NodeConfigError as exc:
        raise _fail(str(exc)) from None
    if spec is not None:
        _check_table(data, spec)
    ledger.parent.mkdir(parents=True, exist_ok=True)
    secret = launch.write_executor_secret(ledger.parent / EXECUTOR_SECRET) if warm else None
    try:
        cmd = launch.supernode_command(
            superlink,
            raw,
            root_certificates=None if insecure else root_cert,
            private_key=key,
            runtime_port=runtime_port,
            executor_secret=secret,
            poll_s=poll_s or None,
        )
    except ValueError as exc:
        raise _fail(str(exc)) from None
    env = launch.flower_environment(task_poll_s=launch.NODE_TASK_POLL_S)
    if secret is not None:
        # execve keeps this pid, so the executor follows the SuperNode it becomes.
        executor = launch.warm_executor_command(runtime_port, os.getpid(), secret)
        subprocess.Popen(executor, env=env)  # noqa: S603 - our own interpreter and module
    _exec(cmd, env)


@deploy_app.command("node-executor", hidden=True)
def node_executor(
    runtime_api_address: Annotated[str, typer.Option(help="The SuperNode's Runtime API")],
    parent_pid: Annotated[int, typer.Option(help="Exit when this process (the SuperNode) does")],
    secret_file: Annotated[Path, typer.Option(help="The SuperNode's SuperExec secret")],
) -> None:
    """Run by ``node-join --warm``: Flower's SuperExec with a fork-server executor."""
    from fedsynth.deploy import warm_executor

    warm_executor.run(runtime_api_address, parent_pid, secret_file)


def _check_table(data: Path, spec: Path) -> None:
    from fedsynth.generative.spec import SpecError, load_spec
    from fedsynth.generative.table import TableError, check_table

    try:
        loaded = load_spec(spec)
        rows = check_table(data, loaded.schema)  # streamed: memory bounded by a block
    except (SpecError, TableError) as exc:
        raise _fail(str(exc)) from None
    problem = loaded.rows_problem(rows)  # e.g. privacy.delta against 1/rows
    if problem is not None:
        raise _fail(problem)
    console.print(f"{data}: {rows:,} rows fit {spec}", markup=False)
