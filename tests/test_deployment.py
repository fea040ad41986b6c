"""The federation on Flower's deployment engine, over TLS on loopback, end to end.

One deployment shared by the tests of this module: certificates from the project's own
code, a ``flower-superlink`` with TLS and node authentication on a free port, three
SuperNodes started through ``python -m fedsynth.deploy node-join`` (each with its own table,
ledger, Flower home and key), a fourth node whose key was never registered, and one
``flwr run`` of the bank federation. Its registered model is compared with the one the
simulation engine trains from the same node tables and seeds.

Every process is stopped in the fixture's ``finally``: the process groups started here,
then any process that still carries this run's marker in its environment (the executors
and app processes Flower starts in sessions of their own).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from fedsynth.demo.data import prepare_demo_tables
from fedsynth.demo.nodes import dirichlet_split, write_nodes
from fedsynth.deploy.certificates import create_node_key, create_server_certificates
from fedsynth.deploy.launch import (
    flower_environment,
    flower_executable,
    start_superlink,
    write_connection,
)
from fedsynth.generative.rounds import get_arrays
from fedsynth.generative.spec import load_spec
from fedsynth.generative.table import read_table
from fedsynth.privacy.keys import KeyStore
from fedsynth.privacy.ledger import PrivacyLedger
from fedsynth.server.records import Database, ModelVersionRecord, RoundRecord, Run, database_url
from fedsynth.server.registry import ModelRegistry
from tests.factories import FEDERATIONS, REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

NODES = 3
ROUNDS = 1
STEPS = 8
CONNECTION = "fedsynth-test"
MARKER = "FEDSYNTH_DEPLOYMENT_TEST"
RUN_DEADLINE_S = 1500  # one round takes 1-4 min here; a loaded 2-core runner is slower


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:4]} exited with {process.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on port {port} after {timeout:g} s")


def marked_pids(marker: str) -> list[int]:
    """Processes (other than this one) whose environment carries ``marker``."""
    needle = marker.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def stop_everything(processes: list[subprocess.Popen[bytes]], marker: str) -> None:
    """SIGTERM every process group we started and every marked process, then SIGKILL
    what is left after a grace period; reap our children."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for p in processes:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
        for pid in marked_pids(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            alive = [p for p in processes if p.poll() is None]
            if not alive and not _running(marked_pids(marker)):
                return
            time.sleep(0.2)


def _running(pids: list[int]) -> list[int]:
    """``pids`` that are not zombies (a zombie holds no resources, only a table slot)."""
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            out.append(pid)
    return out


def flwr(args: list[str], env: dict[str, str], timeout: float = 120) -> str:
    done = subprocess.run(
        [flower_executable("flwr"), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"flwr {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def node_join(
    node: Path,
    key: Path,
    port: int,
    ca: Path,
    runtime_port: int,
    env: dict[str, str],
    warm: bool = True,
    poll_s: float | None = None,
) -> subprocess.Popen[bytes]:
    """``python -m fedsynth.deploy node-join`` for a folder written by ``write_nodes``."""
    import tomllib

    config = tomllib.loads((node / "node.toml").read_text())
    log = (node / "supernode.log").open("ab")
    try:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedsynth.deploy",
                "node-join",
                "--superlink",
                f"127.0.0.1:{port}",
                "--root-cert",
                str(ca),
                "--key",
                str(key),
                "--data",
                config["data-path"],
                "--ledger",
                config["ledger-path"],
                "--outbox",
                config["outbox-path"],
                "--cap",
                str(config["epsilon-cap"]),
                "--institution",
                config["institution"],
                "--runtime-port",
                str(runtime_port),
                "--warm" if warm else "--no-warm",
                *(["--poll-s", f"{poll_s:g}"] if poll_s is not None else []),
            ],
            env=env,
            cwd=node,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    yield deploy_and_run(tmp_path_factory.mktemp("deployment"))


def deploy_and_run(
    root: Path,
    *,
    warm: bool = True,
    poll_s: float | None = None,
    rounds: int = ROUNDS,
    superlink_in_memory: bool = False,
    spec: str = "bank",
) -> dict:
    """Certificates, SuperLink, three nodes and an intruder, one ``flwr run`` of
    ``rounds`` rounds; every process stopped before returning what the tests (and
    bench/deployment.py) read. ``warm``: the nodes' fork-server executor (``node-join
    --warm``), else Flower's; ``poll_s``: ``node-join --poll-s`` (None: its default);
    ``superlink_in_memory``: the SuperLink's state in memory, not in a SQLite file;
    ``spec``: the run config's spec (a name under federations/ or a file) of the bank
    table."""
    marker = f"{MARKER}={uuid.uuid4().hex}"
    base = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    certs = create_server_certificates(root / "certs")
    keys = [create_node_key(root / "keys", f"node-{i}") for i in range(NODES + 1)]
    tables = prepare_demo_tables(root / "data", names=("bank",))
    parts = dirichlet_split(read_table(tables["bank"]), "default", NODES, seed=1)
    nodes = write_nodes("bank", parts, root / "nodes", epsilon_cap=2.0)
    # The intruder: a copy of node 0's table and a key the coordinator never registered.
    intruder = write_nodes("bank", parts[:1], root / "intruder", epsilon_cap=2.0)[0]
    home = root / "home"
    cli_env = flower_environment(root / "flwr-cli", base)
    port = free_port()
    processes: list[subprocess.Popen[bytes]] = []
    timings: dict[str, float] = {}
    try:
        link = start_superlink(
            certs,
            root / "superlink",
            port=port,
            env=flower_environment(root / "flwr-superlink", base),
            in_memory=superlink_in_memory,
        )
        processes.append(link)
        wait_for_port(port, link, timeout=120)
        write_connection(
            CONNECTION, f"127.0.0.1:{port}", certs.ca_cert, flwr_home=root / "flwr-cli"
        )
        for key in keys[:NODES]:
            flwr(["supernode", "register", str(key.public_key), CONNECTION], cli_env)
        runtime_ports = [free_port() for _ in nodes]
        for i, node in enumerate(nodes):
            env = flower_environment(root / f"flwr-node-{i}", base)
            processes.append(
                node_join(
                    node,
                    keys[i].private_key,
                    port,
                    certs.ca_cert,
                    runtime_ports[i],
                    env,
                    warm,
                    poll_s,
                )
            )
        wait_for_port(runtime_ports[0], processes[-len(nodes)], timeout=120)
        stranger = unauthenticated_task_request(runtime_ports[0])
        refused = node_join(
            intruder,
            keys[NODES].private_key,
            port,
            certs.ca_cert,
            free_port(),
            flower_environment(root / "flwr-intruder", base),
        )
        processes.append(refused)

        started = time.monotonic()
        out = flwr(
            [
                "run",
                str(REPO),
                CONNECTION,
                "--format",
                "json",
                "--run-config",
                f"spec='{spec}' home='{home}' rounds={rounds} steps={STEPS * rounds} "
                "wait-nodes-s=600",
            ],
            cli_env,
        )
        flower_run = json.loads(out[out.index("{") :])["run-id"]
        status = wait_for_run(home, flower_run, cli_env)
        timings["run_s"] = time.monotonic() - started
        (_, _, recorded), _ = registered_model(home)
        timings |= {
            f"round_{r.round}_s": (r.finished_at - r.started_at).total_seconds()
            for r in recorded
            if r.finished_at is not None
        }
        try:
            refused_code: int | None = refused.wait(timeout=60)
        except subprocess.TimeoutExpired:
            refused_code = None
        listed = flwr(["supernode", "list", CONNECTION, "--format", "json"], cli_env)
        result = {
            "root": root,
            "home": home,
            "nodes": nodes,
            "parts": parts,
            "flower_status": status,
            "refused_code": refused_code,
            "refused_log": (intruder / "supernode.log").read_text(errors="replace"),
            "superlink_log": (root / "superlink" / "superlink.log").read_text(errors="replace"),
            "listed_nodes": json.loads(listed[listed.index("{") :])["nodes"],
            "stranger_asking_for_a_task": stranger,
            "timings": timings,
        }
    finally:
        stop_everything(processes, marker)
    # Stopped before the tests run: the simulation below gets the CPU to itself.
    result["left_running"] = _running(marked_pids(marker))
    return result


def unauthenticated_task_request(runtime_port: int) -> int:
    """Another local process asks a node's Runtime API for a task, as an executor would
    but without the node's SuperExec secret; returns the HTTP status (200: handed out)."""
    import httpx
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.runtime import RuntimeHttpClient

    client = RuntimeHttpClient.from_server_address(
        f"127.0.0.1:{runtime_port}", insecure=True, root_certificates=None, interceptors=[]
    )
    try:
        client.AcquireTask(AcquireTaskRequest(supported_task_types=["flwr-clientapp"]))
    except httpx.HTTPStatusError as exc:
        return exc.response.status_code
    finally:
        client.close()
    return 200


def wait_for_run(home: Path, flower_run: str, env: dict[str, str]) -> str:
    """Until the ServerApp records a finished run (or Flower reports the run finished,
    e.g. when the ServerApp failed before its first record); returns Flower's status."""
    deadline = time.monotonic() + RUN_DEADLINE_S
    next_flower_check = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (home / "fedsynth.db").exists():  # the ServerApp's records (database_url)
            db = Database(database_url(home))
            with db.session() as s:
                run = s.scalars(select(Run).order_by(Run.id.desc()).limit(1)).one_or_none()
                finished = run is not None and run.status != "running"
            db.engine.dispose()
            if finished:
                time.sleep(5)  # let the ServerApp process report back to the SuperLink
                return flower_status(flower_run, env)
        if time.monotonic() > next_flower_check:
            status = flower_status(flower_run, env)
            if status.startswith("finished"):
                return status
            next_flower_check = time.monotonic() + 60
        time.sleep(3)
    raise TimeoutError(f"run {flower_run} did not finish within {RUN_DEADLINE_S} s")


def flower_status(flower_run: str, env: dict[str, str]) -> str:
    out = flwr(["list", CONNECTION, "--run-id", flower_run, "--format", "json"], env)
    runs = json.loads(out[out.index("{") :])["runs"]
    return f"{runs[0]['status']} {runs[0]['status-details']}"


def registered_model(home: Path):
    db = Database(database_url(home))
    with db.session() as s:
        run = s.scalars(select(Run).order_by(Run.id.desc()).limit(1)).one()
        model = s.scalars(
            select(ModelVersionRecord).where(ModelVersionRecord.run_id == run.id)
        ).one_or_none()
        rounds = s.scalars(select(RoundRecord).where(RoundRecord.run_id == run.id)).all()
        summary = (run.status, model.id if model else None, rounds)
    registry = ModelRegistry(home / "registry", KeyStore(home / "keys"), db)
    return summary, (registry.load(summary[1]) if summary[1] else None)


# ------------------------------------------------------------------------------ the tests


def test_the_run_completes_over_tls_and_registers_a_verified_model(deployment):
    (status, model_id, rounds), model = registered_model(deployment["home"])
    assert deployment["flower_status"].startswith("finished:completed"), deployment["flower_status"]
    assert status == "completed" and model_id == "bank-v1"
    assert model is not None and model.metadata["training"]["rounds"] == ROUNDS
    assert sorted(model.metadata["privacy"]["nodes"]) == ["bank-a", "bank-b", "bank-c"]
    assert [(r.round, r.status, r.participants) for r in rounds] == [(1, "completed", NODES)]
    assert len(model.sample(100, seed=1)) == 100
    # Every SuperNode connection went over HTTPS: the SuperLink served nothing in clear.
    assert "Uvicorn running on https://127.0.0.1" in deployment["superlink_log"]
    seconds = {r.round: (r.finished_at - r.started_at).total_seconds() for r in rounds}
    report = {"round_s": seconds, **deployment["timings"]}
    (deployment["root"] / "timings.json").write_text(json.dumps(report))
    sys.__stderr__.write(f"\ndeployment timings (loopback, TLS): {json.dumps(report)}\n")


def test_the_nodes_forked_their_client_apps_from_the_warm_server(deployment):
    # Only the node's own executor, which holds its secret, is handed tasks.
    assert deployment["stranger_asking_for_a_task"] == 401
    for node in deployment["nodes"]:
        log = (node / "supernode.log").read_text(errors="replace")
        assert "--isolation process --superexec-auth-secret-file" in log
        assert "up to every 0.5 s" in log  # prompt polling took in this flwr
        # Budget query, three SecAgg+ stages with the training, evaluation: six tasks.
        assert log.count("ClientApp forked from the warm server") >= 5, log[-3000:]


def test_each_node_kept_its_own_ledger_and_outbox(deployment):
    spec = load_spec(FEDERATIONS / "bank.toml")
    for node in deployment["nodes"]:
        ledger = PrivacyLedger(node / "ledger.json")
        trains = [e for e in ledger.section("bank")["entries"] if e["kind"] == "train"]
        assert [e["round"] for e in trains] == [1]
        assert 0 < ledger.epsilon("bank", spec.privacy.delta) <= 2.0
        outbox = [json.loads(line) for line in (node / "outbox.jsonl").read_text().splitlines()]
        assert {e["type"] for e in outbox} == {"query", "train", "evaluate"}
        trained = [e for e in outbox if e["type"] == "train"]
        # Only SecAgg+ stages left the node; no plain weights.
        assert trained and all("secaggplus_configs" in e["content"]["configs"] for e in trained)
        assert all(not any(e["content"]["arrays"].values()) for e in trained)


def test_a_node_with_an_unregistered_key_is_refused(deployment):
    assert deployment["refused_code"] not in (None, 0), deployment["refused_log"][-2000:]
    assert "Failed to activate SuperNode" in deployment["refused_log"]
    assert re.search(r"/v1/fleet/activate-node HTTP/1.1\" 412", deployment["superlink_log"])
    (_, _, rounds), _ = registered_model(deployment["home"])
    assert rounds[0].participants == NODES  # the intruder took no part
    assert len(deployment["listed_nodes"]) == NODES


def test_every_process_of_the_deployment_was_stopped(deployment):
    assert deployment["left_running"] == []


def test_the_deployed_model_equals_the_simulated_one_up_to_secagg_rounding(deployment, tmp_path):
    """Same tables, seeds and institutions: every local step is the same computation, so
    the two global models differ by SecAgg+'s stochastic rounding and little else. A node
    scales its update by ``w_i / W`` (W: max weight) and rounds it up or down to a step of
    ``2c / Q`` (c: clipping range, Q: quantisation range); the aggregate divides by
    ``sum w_i / W``. Both runs round the same numbers, each either way, so per coordinate
    they differ by a whole number of ``unit = 2c/Q * W / sum w_i``, at most n (nodes) per
    round; a local result that differs by less than a unit can add one more step per node,
    hence the bound of ``2 n`` units per round.

    The distance of each weight's difference to a whole number of units measures how far
    the local training itself differed: at most 2.3e-4 of a unit in the runs on this
    machine, float32 storage of bit-identical results. The test allows a quarter of a unit
    (float-level differences another machine's thread count might bring); a different
    computation (other data, seeds or code) would scatter differences over the whole unit.
    The last array, the target shares, is left out of that measure: loading a model
    normalises them to sum to 1, which rescales their rounding differences."""
    from fedsynth.demo.simulate import simulate

    sim_nodes = write_nodes("bank", deployment["parts"], tmp_path / "nodes", epsilon_cap=2.0)
    outcome = simulate(
        FEDERATIONS / "bank.toml",
        tmp_path / "nodes",
        len(sim_nodes),
        tmp_path / "home",
        rounds=ROUNDS,
        steps=STEPS,
    )
    assert outcome.status == "completed"
    sim_db = Database(database_url(tmp_path / "home"))
    simulated = ModelRegistry(
        tmp_path / "home" / "registry", KeyStore(tmp_path / "home" / "keys"), sim_db
    ).load(outcome.model_id)
    _, deployed = registered_model(deployment["home"])

    secagg = load_spec(FEDERATIONS / "bank.toml").secure_aggregation
    weights = []
    for node in deployment["nodes"]:
        (train,) = [
            e
            for e in PrivacyLedger(node / "ledger.json").section("bank")["entries"]
            if e["kind"] == "train"
        ]
        weights.append(min(max(1.0, round(train["rows_weight"])), secagg.max_weight))
    unit = 2 * secagg.clipping_range / secagg.quantization_range * secagg.max_weight
    unit /= sum(weights)

    deployed_arrays = get_arrays(deployed)
    a = np.concatenate([x.ravel() for x in deployed_arrays])
    b = np.concatenate([x.ravel() for x in get_arrays(simulated)])
    assert a.shape == b.shape
    units = (a.astype(np.float64) - b) / unit
    worst = float(np.abs(units).max())
    shares = deployed_arrays[-1].size  # normalised on load: off the rounding grid
    off_grid = float(np.abs(units - np.round(units))[:-shares].max())
    sys.__stderr__.write(
        f"\nmax |deployed - simulated| = {worst * unit:.3g} = {worst:.2f} units of {unit:.3g} "
        f"(bound {2 * NODES * ROUNDS} units); largest distance to a whole unit {off_grid:.2g}\n"
    )
    assert worst <= 2 * NODES * ROUNDS
    assert off_grid <= 0.25, "the local training differed by more than float noise"
