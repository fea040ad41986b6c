"""The node's fork-server executor: children start with the libraries loaded and without
fedsynth (whose code must come from the FAB, as with ``flwr-clientapp``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fedsynth.deploy import launch

PROBE = """
import json, sys
from fedsynth.deploy.warm_executor import ForkServerExecutor
from tests.forkserver_probe import report
executor = ForkServerExecutor(preload=("numpy", "tests.forkserver_probe"))
process = executor._context.Process(target=report, args=(sys.argv[1],))
process.start()
process.join(60)
executor.reconcile()
print(json.dumps({"exitcode": process.exitcode, "running": len(executor._running)}))
"""


def test_fork_server_children_have_the_preload_and_not_fedsynth(tmp_path: Path):
    out = tmp_path / "modules.json"
    # A package __main__ (as node-join starts it), so children skip re-importing it.
    main = tmp_path / "probe" / "__main__.py"
    main.parent.mkdir()
    main.write_text(PROBE)
    done = subprocess.run(
        [sys.executable, "-m", "probe", str(out)],
        cwd=tmp_path,
        env={"PYTHONPATH": f"{tmp_path}:{Path(__file__).parents[1]}", "PATH": "/usr/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"exitcode": 0, "running": 0}
    roots = json.loads(out.read_text())
    assert "numpy" in roots and "tests" in roots
    assert "fedsynth" not in roots and "torch" not in roots


def test_node_join_runs_the_supernode_with_process_isolation_and_the_executor_beside_it():
    cmd = launch.supernode_command(
        "link:9092", {"institution": "a"}, root_certificates=None, warm=True
    )
    assert cmd[-2:] == ["--isolation", "process"]
    assert "--isolation" not in launch.supernode_command(
        "link:9092", {"institution": "a"}, root_certificates=None
    )
    executor = launch.warm_executor_command(9101, 4242)
    assert executor[1:4] == ["-m", "fedsynth.deploy", "node-executor"]
    assert executor[-4:] == ["--runtime-api-address", "127.0.0.1:9101", "--parent-pid", "4242"]
