"""Real HTTP servers for end-to-end tests: uvicorn in a thread (``serving``), or
``fedsynth serve`` as its own process (``serve_process``) where a test needs to kill it
or to read its logs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serving(app) -> Iterator[str]:
    """Run ``app`` until the block ends; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    if not server.started:
        raise RuntimeError("uvicorn did not start within 30 s")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@dataclass
class ServeProcess:
    """A running ``fedsynth serve``: its base URL, process, and combined stdout/stderr log."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def serve_process(
    home: Path, log: Path, *args: str, workers: int = 1, env: dict[str, str] | None = None
) -> Iterator[ServeProcess]:
    """Start ``fedsynth serve`` over ``home`` on a free port, wait until every worker is
    up, and stop it (SIGINT, then SIGKILL) when the block ends, unless the test killed it."""
    port = free_port()
    cmd = [sys.executable, "-m", "fedsynth.cli", "serve", "--port", str(port)]
    cmd += ["--workers", str(workers), *args]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            cmd,
            env={**os.environ, "FEDSYNTH_HOME": str(home), **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = ServeProcess(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.time() + 120
        while server.output().count("Application startup complete") < workers:
            if process.poll() is not None:
                raise RuntimeError(f"fedsynth serve exited: {server.output()[-3000:]}")
            if time.time() > deadline:
                raise RuntimeError(f"fedsynth serve did not start within 120 s: {log}")
            time.sleep(0.2)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
