"""The Flower ServerApp: one federation run, from spec to signed model version.

Run config (``flwr run . --run-config`` or ``[tool.flwr.app.config]``):
``spec`` (path of the federation spec, or a name under ``federations/``), ``home``
(``FEDSYNTH_HOME`` override), ``rounds`` (override of ``federation.rounds``; 0 keeps it),
``wait-nodes-s`` (how long to wait for ``min_nodes`` nodes to connect).

Each round: ask every connected node whether the round fits its budget (query), train the
nodes that accepted with SecAgg+ (or plain FedAvg when the spec turns it off, which the
audit log records), let the trained nodes score the new model, checkpoint it, and write the
round, its participants and their reported spend to the records and the audit chain. After
the last round the model is registered, signed and encrypted. Any failure marks the run
failed in the records and the audit log, and raises.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.server_config import ServerConfig
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import (
    default_evaluate_workflow,
    default_fit_workflow,
    default_init_params_workflow,
)
from flwr.serverapp import ServerApp
from flwr.serverapp.grid import Grid

from fedsynth.generative import rounds
from fedsynth.generative.spec import FederationSpec, load_spec
from fedsynth.home import fedsynth_home
from fedsynth.privacy import protocol
from fedsynth.privacy.keys import KeyStore
from fedsynth.server.audit import AuditLog
from fedsynth.server.records import (
    Database,
    Federation,
    NodeReport,
    Participation,
    RoundRecord,
    Run,
    database_url,
)
from fedsynth.server.registry import ModelRegistry
from fedsynth.server.secagg import GuardedSecAggPlusWorkflow, RoundFailed
from fedsynth.server.strategy import FederationStrategy

FEDERATIONS_DIR = Path(__file__).resolve().parents[2] / "federations"
ACTOR = "server"


@dataclass(frozen=True)
class ServerSettings:
    spec_path: Path
    home: Path
    rounds: int = 0  # 0 keeps the spec's federation.rounds
    steps: int = 0  # 0 keeps the spec's training length; else total steps per node
    wait_nodes_s: float = 120.0

    @classmethod
    def from_run_config(cls, config: dict[str, Any]) -> ServerSettings:
        spec = str(config.get("spec", "")).strip()
        if not spec:
            raise ValueError("run config: 'spec' (a federation spec file) is required")
        path = Path(spec).expanduser()
        if not path.exists() and (FEDERATIONS_DIR / f"{spec}.toml").exists():
            path = FEDERATIONS_DIR / f"{spec}.toml"
        home = Path(str(config["home"])).expanduser() if config.get("home") else fedsynth_home()
        return cls(
            path,
            home,
            int(config.get("rounds", 0)),
            int(config.get("steps", 0)),
            float(config.get("wait-nodes-s", 120)),
        )


def spec_json(spec: FederationSpec) -> str:
    raw = spec.model_dump(mode="json")
    if not spec.privacy.is_private:
        raw["privacy"]["target_epsilon"] = "inf"  # JSON has no infinity
    return json.dumps(raw, sort_keys=True)


@dataclass(frozen=True)
class RoundEvent:
    """What a finished (or skipped) round looks like to someone watching the run."""

    federation: str
    round: int
    rounds: int
    status: str
    epsilons: dict[str, float | None]  # institution -> epsilon reported
    refused: list[str]


class FederationServer:
    """Wires the records, audit log, registry and Flower workflows for one run."""

    def __init__(
        self, settings: ServerSettings, on_round: Callable[[RoundEvent], None] | None = None
    ) -> None:
        self.on_round = on_round
        spec = load_spec(settings.spec_path)
        if settings.rounds or settings.steps:
            raw = spec.model_dump(mode="python")
            if settings.rounds:
                raw["federation"]["rounds"] = settings.rounds
            if settings.steps:
                raw["training"].update(epochs=None, steps=settings.steps)
            spec = FederationSpec.model_validate(raw)
        self.spec = spec
        self.settings = settings
        home = settings.home
        home.mkdir(parents=True, exist_ok=True)
        self.db = Database(database_url(home))
        self.audit = AuditLog(self.db)
        self.registry = ModelRegistry(home / "registry", KeyStore(home / "keys"), self.db)
        self.run_id = 0
        self._refused: dict[int, list[str]] = {}
        self._caps: dict[str, float] = {}  # institution -> the cap it last reported

    # ------------------------------------------------------------------ records
    def start_run(self) -> None:
        spec = self.spec
        name = spec.federation.name
        with self.db.session() as s:
            federation = s.get(Federation, name)
            if federation is None:
                s.add(
                    Federation(
                        name=name,
                        sector=spec.federation.sector,
                        spec_json=spec_json(spec),
                        created_at=_now(),
                    )
                )
            else:
                federation.spec_json = spec_json(spec)
            run = Run(
                federation=name,
                started_at=_now(),
                status="running",
                secure_aggregation=spec.secure_aggregation.enabled,
                rounds_planned=spec.federation.rounds,
                min_nodes=spec.federation.min_nodes,
                config_json=json.dumps({"spec": str(self.settings.spec_path)}),
            )
            s.add(run)
            s.flush()
            self.run_id = int(run.id)
        payload = {
            "federation": name,
            "run": self.run_id,
            "rounds": spec.federation.rounds,
            "min_nodes": spec.federation.min_nodes,
            "secure_aggregation": spec.secure_aggregation.enabled,
            "target_epsilon": spec.privacy.target_epsilon if spec.privacy.is_private else "inf",
        }
        self.audit.append("run_started", ACTOR, payload)
        if not spec.secure_aggregation.enabled:
            self.audit.append(
                "secure_aggregation_off",
                ACTOR,
                {
                    "federation": name,
                    "run": self.run_id,
                    "note": "the server sees each node's update",
                },
            )

    def finish_run(self, status: str, detail: str = "") -> None:
        with self.db.session() as s:
            run = s.get(Run, self.run_id)
            assert run is not None
            run.status = status
            run.finished_at = _now()
        event = "run_completed" if status == "completed" else "run_failed"
        self.audit.append(
            event,
            ACTOR,
            {"federation": self.spec.federation.name, "run": self.run_id, "detail": detail[:2000]},
        )

    # ------------------------------------------------------------------ the run
    def run(self, grid: Grid, context: Context) -> str:
        """Run every round; returns the registered model id."""
        self.start_run()
        try:
            model_id = self._rounds(grid, context)
        except BaseException as exc:
            self.finish_run("failed", f"{type(exc).__name__}: {exc}")
            raise
        self.finish_run("completed", f"model {model_id}")
        return model_id

    def _rounds(self, grid: Grid, context: Context) -> str:
        spec = self.spec
        secure = spec.secure_aggregation.enabled
        initial = rounds.get_arrays(rounds.initial_model(spec))
        message_config: dict[str, Scalar] = {
            protocol.SPEC: spec_json(spec),
            protocol.RUN: self.run_id,
        }
        strategy = FederationStrategy(
            initial=ndarrays_to_parameters(initial),
            min_nodes=spec.federation.min_nodes,
            secure=secure,
            message_config=message_config,
            evaluation_rounds=spec.federation.evaluation_rounds(),
        )
        legacy = LegacyContext(
            context, config=ServerConfig(num_rounds=spec.federation.rounds), strategy=strategy
        )
        fit_workflow = (
            GuardedSecAggPlusWorkflow(
                min_nodes=spec.federation.min_nodes,
                **protocol.secagg_settings(spec.secure_aggregation, spec.federation.min_nodes),
            )
            if secure
            else default_fit_workflow
        )
        thread, stop, registered = start_update_client_manager_thread(grid, legacy.client_manager)
        try:
            registered.wait()
            if not legacy.client_manager.wait_for(
                spec.federation.min_nodes, int(self.settings.wait_nodes_s)
            ):
                raise RoundFailed(
                    f"fewer than federation.min_nodes = {spec.federation.min_nodes} nodes "
                    f"connected within {self.settings.wait_nodes_s:g} s"
                )
            default_init_params_workflow(grid, legacy)
            cfg = ConfigRecord({Key.START_TIME: time.time()})
            legacy.state.config_records[MAIN_CONFIGS_RECORD] = cfg
            trained_rounds = 0
            for server_round in range(1, spec.federation.rounds + 1):
                cfg[Key.CURRENT_ROUND] = server_round
                started = _now()
                accepted = self._ask_budgets(grid, server_round, message_config)
                strategy.eligible = set(accepted)
                if len(accepted) < spec.federation.min_nodes:
                    self._record_round(server_round, "skipped", started, strategy)
                    self.audit.append(
                        "round_skipped",
                        ACTOR,
                        {
                            "federation": spec.federation.name,
                            "run": self.run_id,
                            "round": server_round,
                            "accepted": sorted(accepted.values()),
                            "reason": "fewer nodes within budget than federation.min_nodes",
                        },
                    )
                    break
                fit_workflow(grid, legacy)
                log = strategy.rounds.get(server_round)
                if log is None or not log.aggregated:
                    raise RoundFailed(f"round {server_round}: no aggregate was produced")
                default_evaluate_workflow(grid, legacy)
                arrays = parameters_to_ndarrays(
                    compat.arrayrecord_to_parameters(
                        legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
                    )
                )
                self.registry.checkpoint(spec.federation.name, self.run_id, server_round, arrays)
                self._record_round(server_round, "completed", started, strategy)
                trained_rounds = server_round
        finally:
            stop.set()
            thread.join()
        if not trained_rounds:
            raise RoundFailed(
                "no round trained: fewer than federation.min_nodes nodes accepted the first "
                "round (see the node_refused_budget / node_invalid audit events)"
            )
        return self._register(legacy, strategy, trained_rounds)

    def _ask_budgets(
        self, grid: Grid, server_round: int, message_config: dict[str, Any]
    ) -> dict[int, str]:
        """Query every connected node; returns {node id: institution} of those that accept."""
        config = ConfigRecord(
            {**message_config, protocol.ROUND: server_round, protocol.ACTION: protocol.BUDGET}
        )
        messages = [
            Message(
                RecordDict({protocol.CONFIG: config}),
                dst_node_id=node_id,
                message_type=MessageType.QUERY,
                group_id=str(server_round),
            )
            for node_id in grid.get_node_ids()
        ]
        accepted: dict[int, str] = {}
        for reply in grid.send_and_receive(messages, timeout=self.settings.wait_nodes_s):
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                self._participation(
                    server_round, f"node-{node_id}", "failed", detail=str(reply.error.reason)
                )
                continue
            answer: dict[str, Any] = dict(reply.content.config_records[protocol.CONFIG])
            institution = str(answer.get(protocol.INSTITUTION, f"node-{node_id}"))
            status = answer.get(protocol.STATUS)
            if status == protocol.ACCEPT:
                accepted[node_id] = institution
                self._caps[institution] = float(answer[protocol.CAP])
            elif status == protocol.REFUSE:
                self._refused.setdefault(server_round, []).append(institution)
                spent, after, cap = (
                    float(answer[key]) for key in (protocol.SPENT, protocol.AFTER, protocol.CAP)
                )
                self._turned_away(
                    server_round,
                    institution,
                    "refused",
                    "node_refused_budget",
                    {"spent": spent, "would_reach": after, "cap": cap},
                    detail=f"would reach epsilon {after:.4f}",
                    epsilon=spent,
                    cap=cap,
                )
            else:
                detail = str(answer.get(protocol.DETAIL, "no detail"))
                self._turned_away(
                    server_round,
                    institution,
                    "failed",
                    "node_invalid",
                    {"detail": detail[:2000]},
                    detail=detail,
                )
        return accepted

    def _turned_away(
        self,
        server_round: int,
        institution: str,
        status: str,
        event: str,
        payload: dict[str, Any],
        *,
        detail: str,
        epsilon: float | None = None,
        cap: float | None = None,
    ) -> None:
        """A node that answered the budget query but will not train: its participation row
        and its audit event (``payload`` after the federation, run and round)."""
        self._participation(
            server_round, institution, status, epsilon=epsilon, cap=cap, detail=detail
        )
        self.audit.append(
            event,
            institution,
            {
                "federation": self.spec.federation.name,
                "run": self.run_id,
                "round": server_round,
                **payload,
            },
        )

    def _participation(
        self,
        server_round: int,
        node: str,
        status: str,
        *,
        epsilon: float | None = None,
        cap: float | None = None,
        delta: float | None = None,
        steps: int | None = None,
        detail: str = "",
    ) -> None:
        with self.db.session() as s:
            s.add(
                Participation(
                    run_id=self.run_id,
                    round=server_round,
                    node=node,
                    status=status,
                    epsilon_spent=epsilon,
                    epsilon_cap=cap,
                    delta=delta,
                    steps=steps,
                    detail=detail[:4000],
                )
            )

    def _record_round(
        self, server_round: int, status: str, started: datetime, strategy: FederationStrategy
    ) -> None:
        log = strategy.rounds.get(server_round)
        fitted = log.fitted if log else {}
        for institution, metrics in fitted.items():
            self._participation(
                server_round,
                institution,
                "trained",
                epsilon=_finite(metrics.get(protocol.EPSILON)),
                delta=float(metrics.get(protocol.DELTA, 0.0)),
                steps=int(metrics.get(protocol.STEPS, 0)),
                cap=self._caps.get(institution),
            )
        with self.db.session() as s:
            s.add(
                RoundRecord(
                    run_id=self.run_id,
                    round=server_round,
                    status=status,
                    started_at=started,
                    finished_at=_now(),
                    participants=len(fitted),
                )
            )
            for institution, metrics in (log.evaluated if log else {}).items():
                scores = {k: v for k, v in metrics.items() if k != protocol.INSTITUTION}
                s.add(
                    NodeReport(
                        run_id=self.run_id,
                        round=server_round,
                        node=institution,
                        metrics_json=json.dumps(scores),
                    )
                )
        if self.on_round is not None:
            refused = self._refused.pop(server_round, [])
            epsilons = {k: _finite(m.get(protocol.EPSILON)) for k, m in sorted(fitted.items())}
            self.on_round(
                RoundEvent(
                    self.spec.federation.name,
                    server_round,
                    self.spec.federation.rounds,
                    status,
                    epsilons,
                    refused,
                )
            )
        if status == "completed":
            self.audit.append(
                "round_completed",
                ACTOR,
                {
                    "federation": self.spec.federation.name,
                    "run": self.run_id,
                    "round": server_round,
                    "participants": sorted(fitted),
                    "secure_aggregation": self.spec.secure_aggregation.enabled,
                    "spend": {
                        k: _finite(m.get(protocol.EPSILON)) for k, m in sorted(fitted.items())
                    },
                },
            )

    def _register(
        self, legacy: LegacyContext, strategy: FederationStrategy, last_round: int
    ) -> str:
        spec = self.spec
        model = rounds.initial_model(spec)
        record = legacy.state.array_records[MAIN_PARAMS_RECORD]
        rounds.set_arrays(
            model, parameters_to_ndarrays(compat.arrayrecord_to_parameters(record, keep_input=True))
        )
        # Each node's latest report is its total (the ledger composes all its releases).
        node_privacy: dict[str, dict[str, float]] = {}
        participants: set[str] = set()
        quality: dict[str, dict[str, float]] = {}
        for r in sorted(strategy.rounds):
            log = strategy.rounds[r]
            for institution, metrics in log.fitted.items():
                participants.add(institution)
                node_privacy[institution] = {
                    "epsilon": float(metrics.get(protocol.EPSILON, math.inf)),
                    "delta": float(metrics.get(protocol.DELTA, 0.0)),
                }
            for institution, metrics in log.evaluated.items():
                if protocol.EPSILON in metrics and institution in node_privacy:
                    node_privacy[institution]["epsilon"] = float(metrics[protocol.EPSILON])
                scores = {
                    k: float(v)
                    for k, v in metrics.items()
                    if k.removesuffix("_sd") in rounds.EVALUATION_SCORES
                }
                if scores:
                    quality[institution] = scores
        # The model's epsilon is its most exposed node's; inf when trained without DP.
        largest = max((p["epsilon"] for p in node_privacy.values()), default=math.inf)
        model.metadata["privacy"].update(
            {
                "epsilon": largest if math.isfinite(largest) else "inf",
                "nodes": node_privacy,
                "secure_aggregation": spec.secure_aggregation.enabled,
            }
        )
        model.metadata["training"] = {"rounds": last_round, "participants": sorted(participants)}
        mean_quality = {
            name: sum(q[name] for q in quality.values() if name in q)
            / max(1, sum(name in q for q in quality.values()))
            for name in rounds.EVALUATION_SCORES
            if any(name in q for q in quality.values())
        }
        model.metadata["quality"] = {"nodes": quality, "mean": mean_quality}
        version = self.registry.register(
            model,
            federation=spec.federation.name,
            sector=spec.federation.sector,
            run_id=self.run_id,
            round=last_round,
            node_privacy=node_privacy,
            participants=sorted(participants),
            quality=mean_quality,
        )
        self.audit.append(
            "model_registered",
            ACTOR,
            {
                "federation": spec.federation.name,
                "run": self.run_id,
                "model": version.id,
                "round": last_round,
                "epsilon_max": _finite(largest),
                "participants": sorted(participants),
            },
        )
        return str(version.id)


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if number != float("inf") else None


def _now() -> datetime:
    return datetime.now(UTC)


def make_server_app(
    overrides: dict[str, Any] | None = None, on_round: Callable[[RoundEvent], None] | None = None
) -> ServerApp:
    """The ServerApp; ``overrides`` stand in for run config keys and ``on_round`` watches
    the rounds (both for the programmatic simulation, where the app runs in-process)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = {**dict(context.run_config), **(overrides or {})}
        FederationServer(ServerSettings.from_run_config(config), on_round).run(grid, context)

    return app


app = make_server_app()
