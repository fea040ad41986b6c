"""The command lines of Flower's deployment engine, and the file ``flwr run`` reads.

flwr 1.41 facts this module is built on (read from its source, ``flwr/superlink``,
``flwr/supernode``, ``flwr/cli``):

- ``flower-superlink`` serves one HTTPS port (``--host``/``--port``, default 8000) for the
  Fleet API (SuperNodes), the Control API (``flwr run``, ``flwr supernode register``) and
  the Runtime API (the ServerApp process it starts). TLS needs ``--ssl-certfile``,
  ``--ssl-keyfile`` and ``--ssl-ca-certfile``; the ServerApp's executor dials the port on
  loopback and verifies the certificate, hence 127.0.0.1 in its SAN.
- ``--enable-supernode-auth`` admits only SuperNodes whose public key was registered with
  ``flwr supernode register``; a SuperNode proves its key with
  ``--auth-supernode-private-key`` (requires TLS on both sides).
- ``flower-supernode`` pulls messages over HTTPS (``--superlink``, ``--root-certificates``)
  and starts ``flower-superexec``, which starts one ``flwr-clientapp`` process per message
  (``fedsynth node join`` uses ``--isolation process`` and runs its own executor instead,
  ``fedsynth.deploy.warm_executor``, which forks those processes with libraries loaded).
  The node's own Runtime API listens on 127.0.0.1 (``--port``, default 9094; one per node
  on a machine). All three executables are looked up on ``PATH``.
- ``flwr run <app> <connection>`` reads the connection ``[superlink.<connection>]``
  (``address``, ``root-certificates`` as an absolute path, or ``insecure``) from
  ``$FLWR_HOME/config.toml``, ``~/.flwr/config.toml`` when ``FLWR_HOME`` is unset.
- Polling: an idle SuperNode asks for work every 3 s, and the ServerApp polls for replies
  every 3 s; both are fixed in flwr 1.41. The executor's polling for new tasks (1 s by
  default) is the ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` environment variable: SuperNodes
  get :data:`NODE_TASK_POLL_S`; the SuperLink keeps 1 s (it starts one ServerApp per run,
  and at 0.1 s an idle SuperLink with its executor costs 7.6 % of a core, 1.0 % at 1 s).
"""

from __future__ import annotations

import math
import os
import secrets
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from fedsynth.deploy.certificates import ServerCertificates
from fedsynth.flower_env import FLOWER_ENV

SUPERLINK_PORT = 9092  # not Flower's 8000: that is the fedsynth API's default port
SUPERNODE_RUNTIME_PORT = 9094  # Flower's default; one per SuperNode on a machine
FLOWER_CONFIG_FILE = "config.toml"

#: A SuperNode's executor looks for a new message to run every this many seconds (Flower's
#: default: 1). A message waits half the interval on average, so 0.2 s saves about 0.4 s
#: per message (six per round); an idle node (SuperNode and executor) then costs 3.3 % of
#: a core instead of 0.8 % (measured over 30 s; 6.5 % at 0.1 s).
NODE_TASK_POLL_S = 0.2
#: While a run is active, a SuperNode asks the SuperLink for its next message every this
#: many seconds instead of Flower's fixed 3, after first asking 50 ms after a reply and
#: doubling (``fedsynth.deploy.prompt_supernode``): each of a round's six exchanges then
#: waits at most this long; the SuperLink serves about six requests per node in the two
#: seconds after a reply, two a second after that, and Flower's one per 3 s when idle.
NODE_POLL_S = 0.5
TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


def flower_executable(name: str) -> str:
    """``name`` beside this interpreter (the venv's bin folder) if there, else as is."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def flower_environment(
    flwr_home: Path | None = None,
    base: Mapping[str, str] | None = None,
    *,
    task_poll_s: float | None = None,
) -> dict[str, str]:
    """``base`` (default: this process's environment) with
    :data:`fedsynth.flower_env.FLOWER_ENV` (an operator's own value wins), the
    executor's task polling interval if given, this interpreter's bin folder first on
    ``PATH`` (SuperNode and SuperLink start ``flower-superexec`` and ``flwr-clientapp`` by
    name) and ``FLWR_HOME`` if given (where Flower installs app bundles and keeps
    ``config.toml``)."""
    env = dict(os.environ if base is None else base)
    extra = {TASK_POLL_ENV: f"{task_poll_s:g}"} if task_poll_s is not None else {}
    for key, value in {**FLOWER_ENV, **extra}.items():
        env.setdefault(key, value)  # an operator's own setting wins
    bin_dir = str(Path(sys.executable).parent)
    if env.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        env["PATH"] = os.pathsep.join([bin_dir, *filter(None, [env.get("PATH")])])
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


# ------------------------------------------------------------------------------ SuperLink


def superlink_command(
    certificates: ServerCertificates | None,
    *,
    host: str = "127.0.0.1",
    port: int = SUPERLINK_PORT,
    database: Path | None = None,
    node_auth: bool = True,
    log_file: Path | None = None,
) -> list[str]:
    """``flower-superlink`` with TLS from ``certificates`` (``None``: ``--insecure``, only
    for a test on one machine), node authentication unless ``node_auth`` is false, and its
    state in ``database`` (SQLite file; ``None``: in memory, lost on restart)."""
    cmd = [flower_executable("flower-superlink"), "--host", host, "--port", str(port)]
    if certificates is None:
        if node_auth:
            raise ValueError("node authentication needs TLS: give certificates")
        cmd.append("--insecure")
    else:
        cmd += [
            "--ssl-ca-certfile",
            str(certificates.ca_cert),
            "--ssl-certfile",
            str(certificates.server_cert),
            "--ssl-keyfile",
            str(certificates.server_key),
        ]
    if node_auth:
        cmd.append("--enable-supernode-auth")
    if database is not None:
        cmd += ["--database", str(database)]
    if log_file is not None:
        cmd += ["--log-file", str(log_file)]
    cmd.append("--disable-runtime-dependency-installation")
    return cmd


def start_superlink(
    certificates: ServerCertificates | None,
    state_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = SUPERLINK_PORT,
    node_auth: bool = True,
    env: Mapping[str, str] | None = None,
    in_memory: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``flower-superlink`` (see :func:`superlink_command`) in a new session, its
    state in ``state_dir/superlink.db`` (in memory if ``in_memory``), its output in
    ``state_dir/superlink.log``.

    The SuperLink starts its executor in a session of its own; that executor exits when
    the SuperLink does. The caller stops the returned process (``os.killpg``).
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    log = (state_dir / "superlink.log").open("ab")
    try:
        return subprocess.Popen(
            superlink_command(
                certificates,
                host=host,
                port=port,
                database=None if in_memory else state_dir / "superlink.db",
                node_auth=node_auth,
            ),
            env=flower_environment(base=env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()


# ------------------------------------------------------------------------------ SuperNode


def node_config_string(config: Mapping[str, Any]) -> str:
    """``--node-config`` text Flower parses back into ``config``: strings as TOML literal
    strings (no escapes, so Windows paths survive), numbers as TOML numbers."""
    parts = []
    for key, value in config.items():
        if isinstance(value, bool) or not isinstance(value, (str, int, float, Path)):
            raise ValueError(f"node config {key}: unsupported value {value!r}")
        if isinstance(value, (str, Path)):
            text = str(value)
            if "'" in text or "\n" in text:
                raise ValueError(f"node config {key}: {text!r} may not contain ' or a newline")
            parts.append(f"{key}='{text}'")
        else:
            if isinstance(value, float) and math.isnan(value):
                raise ValueError(f"node config {key}: NaN")
            parts.append(
                f"{key}={float(value)!r}" if isinstance(value, float) else f"{key}={value}"
            )
    return " ".join(parts)


def supernode_command(
    superlink: str,
    node_config: Mapping[str, Any],
    *,
    root_certificates: Path | None,
    private_key: Path | None = None,
    runtime_port: int = SUPERNODE_RUNTIME_PORT,
    max_wait_s: float | None = None,
    executor_secret: Path | None = None,
    poll_s: float | None = None,
) -> list[str]:
    """``flower-supernode`` dialling ``superlink`` (host:port) over TLS verified against
    ``root_certificates`` (``None``: ``--insecure``), authenticated by ``private_key``.
    ``executor_secret``: ``--isolation process`` for :func:`warm_executor_command` beside
    it, which must prove this secret to take a task from the node's Runtime API.
    ``poll_s``: run it through ``fedsynth.deploy.prompt_supernode``, which asks for the
    next message every ``poll_s`` while a run is active instead of Flower's fixed 3 s."""
    start = (
        [sys.executable, "-m", "fedsynth.deploy.prompt_supernode", "--poll-s", f"{poll_s:g}"]
        if poll_s
        else [flower_executable("flower-supernode")]
    )
    cmd = [
        *start,
        "--superlink",
        superlink,
        "--node-config",
        node_config_string(node_config),
        "--port",
        str(runtime_port),
    ]
    if root_certificates is None:
        if private_key is not None:
            raise ValueError("node authentication needs TLS: give the root certificate")
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(root_certificates)]
    if private_key is not None:
        cmd += ["--auth-supernode-private-key", str(private_key)]
    if max_wait_s is not None:
        cmd += ["--max-wait-time", f"{max_wait_s:g}"]
    if executor_secret is not None:
        cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(executor_secret)]
    return cmd


def write_executor_secret(path: Path) -> Path:
    """A fresh random secret, readable by this user only, shared by the SuperNode and its
    executor: with it (Flower's SuperExec authentication, experimental in flwr 1.41) no
    other local process can take the node's tasks from its Runtime API. Flower's own
    subprocess isolation cannot use it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an older file may have had wider permissions
        os.write(fd, secrets.token_bytes(32))
    finally:
        os.close(fd)
    return path


def warm_executor_command(runtime_port: int, supernode_pid: int, secret: Path) -> list[str]:
    """The node's executor (``fedsynth.deploy.warm_executor``) for a SuperNode started with
    ``--isolation process`` on ``runtime_port``; it exits when ``supernode_pid`` does."""
    return [
        sys.executable,
        "-m",
        "fedsynth.deploy",  # a package __main__: fork-server children do not re-import it
        "node-executor",
        "--runtime-api-address",
        f"127.0.0.1:{runtime_port}",
        "--parent-pid",
        str(supernode_pid),
        "--secret-file",
        str(secret),
    ]


# ------------------------------------------------------------------------------ flwr run


def flower_config_path(flwr_home: Path | None = None) -> Path:
    """Where ``flwr`` reads its connections: ``$FLWR_HOME/config.toml`` (the argument,
    else the environment variable, else ``~/.flwr``)."""
    home = flwr_home or Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
    return Path(home).expanduser() / FLOWER_CONFIG_FILE


def write_connection(
    name: str,
    address: str,
    root_certificates: Path | None,
    *,
    flwr_home: Path | None = None,
    make_default: bool = False,
) -> Path:
    """Add or replace ``[superlink.<name>]`` in Flower's config file so that
    ``flwr run . <name>`` submits to ``address`` over TLS verified against
    ``root_certificates`` (``None``: insecure). Other connections are kept. Returns the
    file's path."""
    path = flower_config_path(flwr_home)
    config: dict[str, Any] = {}
    if path.exists():
        config = tomllib.loads(path.read_text(encoding="utf-8"))
    entry: dict[str, Any] = {"address": address}
    if root_certificates is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(root_certificates).expanduser().resolve())
    links = config.setdefault("superlink", {})
    links[name] = entry
    if make_default or "default" not in links:
        links["default"] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config), encoding="utf-8")
    return path
