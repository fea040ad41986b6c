"""A node's SuperExec that starts each ClientApp from a warm fork server.

flwr 1.41's SuperNode hands every message to a fresh ``flwr-clientapp`` process, and each
one imports torch, Opacus, pandas and scikit-learn again before it can answer (about 4-5 s
of CPU here, six messages a round). Flower's own warm pools serve other task types on
Kubernetes only. This executor runs Flower's SuperExec loop unchanged, but launches a
ClientApp task by forking it from Python's ``multiprocessing`` fork server, a process that
imported those libraries once (:data:`PRELOAD`). The child then runs Flower's own
``run_clientapp``, exactly what ``flwr-clientapp`` runs.

One change rides along: the fork server preloads ``fedsynth_fork_preload``, which makes
Flower's object pulls retry after 50 ms instead of 1 s (``fedsynth.deploy.prompt_pulls``),
so a ClientApp that asks for the global model a moment before its SuperNode has it does
not sleep 1 + 2 s.

What stays as Flower does it: the app's code still comes from the FAB the SuperLink sent
(nothing of fedsynth is preloaded, so ``load_app`` imports the FAB's copy), each task is
its own process with its own token, and it ends when the task does. Other task types go to
Flower's subprocess executor. Unlike Flower's default isolation, the node's Runtime API then
hands tasks only to an executor that proves the secret ``node join`` wrote for it.
``fedsynth node join`` starts this executor beside ``flower-supernode --isolation
process``; see docs/deployment.md ("Round time").

Hand-written because flwr 1.41 has no warm executor for ClientApps; it implements Flower's
``Executor`` protocol (``flwr.supercore.superexec.executor.types``) and nothing more.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
from logging import INFO
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from pathlib import Path

from flwr.supercore import log
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.tls import validate_and_resolve_root_certificates

#: Third-party modules the fork server imports once. fedsynth itself is left out on
#: purpose: the ClientApp's code must come from the FAB, as with ``flwr-clientapp``.
PRELOAD = (
    "numpy",
    "pandas",
    "pyarrow",
    "pyarrow.parquet",
    "scipy.stats",
    "sklearn.ensemble",
    "torch",
    "torch._dynamo",  # imported lazily by the first optimizer a process makes: 1 s here
    "opacus",
    "pydantic",
    "sqlalchemy",
    "flwr.clientapp",
    "flwr.supernode.runtime.run_clientapp",
    "fedsynth_fork_preload",  # prompt object pulls; in FORKSERVER_PATH, outside the package
)
#: Put on the fork server's ``PYTHONPATH`` for ``fedsynth_fork_preload`` (see its docstring).
FORKSERVER_PATH = Path(__file__).resolve().parent / "forkserver"


class ForkServerExecutor(SubprocessExecutor):
    """Flower's subprocess executor, except that ClientApp tasks fork from a warm server."""

    def __init__(self, preload: tuple[str, ...] = PRELOAD) -> None:
        context = multiprocessing.get_context("forkserver")
        assert isinstance(context, ForkServerContext)
        context.set_forkserver_preload(list(preload))
        # The fork server is a fresh interpreter started with this process's environment.
        paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if str(FORKSERVER_PATH) not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([str(FORKSERVER_PATH), *filter(None, paths)])
        self._context = context
        self._running: list[BaseProcess] = []

    def warm_up(self) -> None:
        """Start the fork server now, so that the first message does not wait for it."""
        from multiprocessing import forkserver

        forkserver.ensure_running()

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        if spec.task_type != TaskType.CLIENT_APP or spec.runtime_dependency_install:
            return super().launch(spec)  # Flower's own way for anything else
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        certificates = validate_and_resolve_root_certificates(
            spec.root_certificates_path, spec.insecure
        )
        process = self._context.Process(
            target=run_clientapp,
            kwargs={
                "runtime_api_address": spec.runtime_api_address,
                "token": spec.token,
                "insecure": spec.insecure,
                "certificates": certificates,
                "parent_pid": spec.parent_pid,
                "runtime_dependency_install": False,
            },
            name=f"flwr-clientapp-{spec.task_id}",
        )
        try:
            process.start()
        except OSError as exc:
            return LaunchResult.failed(f"fork server could not start the task: {exc}")
        self._running.append(process)
        log(
            INFO,
            "task %d: ClientApp forked from the warm server (pid %s)",
            spec.task_id,
            process.pid,
        )
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap tasks that have ended (no zombies while the node idles)."""
        still = []
        for process in self._running:
            if process.is_alive():
                still.append(process)
            else:
                process.join(0)
        self._running = still


def wait_for_runtime_api(address: str, parent_pid: int | None, timeout_s: float) -> None:
    """Block until the SuperNode listens on ``address`` (it starts after this executor)."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except OSError:
            if parent_pid is not None and not _alive(parent_pid):
                raise SystemExit(f"the SuperNode (pid {parent_pid}) has exited") from None
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"no SuperNode Runtime API at {address} after {timeout_s:g} s"
                ) from None
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run(
    runtime_api_address: str,
    parent_pid: int | None,
    secret_file: Path | None,
    timeout_s: float = 300.0,
) -> None:
    """Flower's SuperExec loop (``run_superexec``) with :class:`ForkServerExecutor`,
    proving ``secret_file``'s secret to the SuperNode (Flower's SuperExec authentication)."""
    from flwr.supercore.auth.superexec_secret import load_superexec_auth_secret
    from flwr.supercore.superexec import run_superexec as superexec

    secret = load_superexec_auth_secret(str(secret_file) if secret_file else None)

    executor = ForkServerExecutor()
    executor.warm_up()
    wait_for_runtime_api(runtime_api_address, parent_pid, timeout_s)
    # run_superexec builds its executor with get_executor(); hand it this one instead.
    superexec.get_executor = lambda *args, **kwargs: executor  # type: ignore[assignment]
    superexec.run_superexec(
        runtime_api_address=runtime_api_address,
        insecure=True,  # the Runtime API is the SuperNode's loopback socket, as Flower's default
        superexec_auth_secret=secret,
        parent_pid=parent_pid,
    )
