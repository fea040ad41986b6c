"""Run one federation in Flower's simulation engine, on this machine.

The ServerApp and ClientApp are the very objects ``flwr run .`` loads (``fedsynth.server.app``,
``fedsynth.clients.app``); here they run through ``flwr.simulation.run_simulation`` so that
the demo, the tests and the benchmark need no SuperLink process to start and stop. Virtual
node ``i`` reads ``<nodes_dir>/node-<i>/node.toml``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from fedsynth.clients.app import make_client_app
from fedsynth.flower_env import SIMULATION_ENV
from fedsynth.server.app import RoundEvent, make_server_app
from fedsynth.server.records import Database, ModelVersionRecord, Run, database_url


@dataclass(frozen=True)
class Outcome:
    run_id: int
    status: str
    model_id: str | None


def simulate(
    spec: Path,
    nodes_dir: Path,
    num_nodes: int,
    home: Path,
    *,
    rounds: int = 0,
    steps: int = 0,
    extra_mods: Sequence[Any] = (),
    on_round: Callable[[RoundEvent], None] | None = None,
    cpus: int | None = None,
    verbose: bool = False,
) -> Outcome:
    """Train ``spec``'s federation over ``num_nodes`` virtual nodes; returns the run's
    outcome from the records (the ServerApp's exception propagates on failure)."""
    os.environ.update(SIMULATION_ENV)
    from flwr.simulation import run_simulation  # after the environment is set

    cpus = cpus or os.cpu_count() or 1
    server = make_server_app(
        {"spec": str(spec), "home": str(home), "rounds": rounds, "steps": steps}, on_round
    )
    client = make_client_app(extra_mods, run_config={"nodes-dir": str(nodes_dir)})
    backend = {
        # One CPU per virtual node: the default (2) runs one node at a time on 2 cores.
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "logging_level": "ERROR"},
    }
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
        logging.getLogger("flwr").addFilter(_hide_run_simulation_deprecation)
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=num_nodes,
        backend_config=backend,  # type: ignore[arg-type]
        verbose_logging=verbose,
    )
    db = Database(database_url(home))
    with db.session() as s:
        run = s.scalars(select(Run).order_by(Run.id.desc()).limit(1)).one()
        model = s.scalars(
            select(ModelVersionRecord).where(ModelVersionRecord.run_id == run.id)
        ).one_or_none()
        return Outcome(int(run.id), str(run.status), model.id if model else None)


def _hide_run_simulation_deprecation(record: logging.LogRecord) -> bool:
    """flwr 1.41 deprecates ``run_simulation`` in favour of ``flwr run`` (which starts a
    SuperLink process); the embedded default keeps the in-process engine on purpose."""
    message = record.getMessage()
    return "run_simulation" not in message and "deprecated feature" not in message.lower()
