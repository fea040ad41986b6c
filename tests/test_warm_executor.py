"""The node's fork-server executor: children start with the libraries loaded and without
fedsynth (whose code must come from the FAB, as with ``flwr-clientapp``)."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fedsynth.deploy import launch
from fedsynth.deploy.warm_executor import PRELOAD

PROBE = """
import json, sys
from fedsynth.deploy.warm_executor import ForkServerExecutor
from tests.forkserver_probe import report
executor = ForkServerExecutor(preload=sys.argv[2].split(","))
process = executor._context.Process(target=report, args=(sys.argv[1],))
process.start()
process.join(60)
executor.reconcile()
print(json.dumps({"exitcode": process.exitcode, "running": len(executor._running)}))
"""


@pytest.mark.parametrize("prompt", [False, True])
def test_fork_server_children_have_the_preload_and_not_fedsynth(tmp_path: Path, prompt: bool):
    out = tmp_path / "modules.json"
    # A package __main__ (as node-join starts it), so children skip re-importing it.
    main = tmp_path / "probe" / "__main__.py"
    main.parent.mkdir()
    main.write_text(PROBE)
    preload = ["numpy", "tests.forkserver_probe"]
    if prompt:  # what the node's executor preloads besides the libraries (PRELOAD)
        preload.insert(1, "fedsynth_fork_preload")
    done = subprocess.run(
        [sys.executable, "-m", "probe", str(out), ",".join(preload)],
        cwd=tmp_path,
        env={"PYTHONPATH": f"{tmp_path}:{Path(__file__).parents[1]}", "PATH": "/usr/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"exitcode": 0, "running": 0}
    child = json.loads(out.read_text())
    roots = child["roots"]
    assert "numpy" in roots and "tests" in roots
    assert "fedsynth" not in roots and "torch" not in roots
    # With the preload, Flower's object pulls retry promptly, still without fedsynth.
    assert child["prompt_pulls"] is prompt
    assert "fedsynth_fork_preload" in PRELOAD


def test_node_join_runs_the_supernode_with_process_isolation_and_the_executor_beside_it(
    tmp_path: Path,
):
    secret = launch.write_executor_secret(tmp_path / "node" / "superexec.secret")
    cmd = launch.supernode_command(
        "link:9092", {"institution": "a"}, root_certificates=None, executor_secret=secret
    )
    assert cmd[-4:] == ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
    assert "--isolation" not in launch.supernode_command(
        "link:9092", {"institution": "a"}, root_certificates=None
    )
    executor = launch.warm_executor_command(9101, 4242, secret)
    assert executor[1:4] == ["-m", "fedsynth.deploy", "node-executor"]
    assert executor[4:] == [
        "--runtime-api-address",
        "127.0.0.1:9101",
        "--parent-pid",
        "4242",
        "--secret-file",
        str(secret),
    ]


def test_the_executor_secret_is_random_private_and_renewed(tmp_path: Path):
    path = tmp_path / "superexec.secret"
    path.write_bytes(b"old")
    path.chmod(0o644)
    launch.write_executor_secret(path)
    first = path.read_bytes()
    assert len(first) == 32 and first != b"old"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert launch.write_executor_secret(path).read_bytes() != first
