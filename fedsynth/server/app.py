"""The Flower ServerApp: one federation run, from spec to signed model version.

Run config (``flwr run . --run-config`` or ``[tool.flwr.app.config]``):
``spec`` (path of the federation spec, or a name under ``federations/``), ``home``
(``FEDSYNTH_HOME`` override), ``rounds`` (override of ``federation.rounds``; 0 keeps it),
``wait-nodes-s`` (how long to wait for ``min_nodes`` nodes to connect), ``run-name``
(empty: a new run; else a resumable run, below).

Each round: ask every connected node whether the round fits its budget (query), train the
nodes that accepted with SecAgg+ (or plain FedAvg when the spec turns it off, which the
audit log records), let the trained nodes score the new model, checkpoint it, and write the
round, its participants and their reported spend to the records and the audit chain. After
the last round the model is registered, signed and encrypted. A round that fails (a node
died, secure aggregation halted) is recorded failed with ``round_failed`` in the audit log;
the model does not advance, the run is marked failed, and the exception propagates.

A ``marginals`` federation runs the same loop for its three measurement rounds
(``fedsynth.generative.marginals``): the "global arrays" are the public state (the sums
measured so far), the strategy puts each round's sum into it instead of averaging a model,
and after round 3 (with ``privacy.evaluation_share`` > 0) the nodes score the model they fit
from the finished state, as the server fits and registers it (their digests must match).

Resuming a run. Flower gives every ``flwr run`` a new run id, and a SuperLink restarted
after a crash forgets the runs it was executing; so a run that should survive a crash is
named in the run config (``run-name='bank-2025-q3'``). The name is kept, with a random
run key, in the run's record (``Run.config_json``); ``flwr run`` again with the same spec,
overrides and name (any Flower run id) finds that record and continues it:

- from the last round the records show *completed* (contiguously from round 1), starting
  from that round's checkpoint in the registry (a checkpoint written just before a crash,
  whose round was not yet recorded, is not trusted: that round is done again);
- under the same records run id, so rounds, participations, checkpoints and the model
  version stay those of one run, and a round recorded completed is never trained or
  recorded again (``rounds`` is unique per run and round);
- sending the nodes the same run key, by which each node's ledger recognises a round it
  already released: it re-sends that update instead of training and spending again
  (``fedsynth.clients.replay``), so no ledger counts a round twice;
- with ``run_resumed`` in the audit chain (attempt, completed rounds, Flower run id).

A name whose run completed is refused (choose a new name for a new run), and so is a spec
that differs from the one the run started with. A model already registered by the run
(the crash came after registration) is not registered again; the run is just completed.
Two servers resuming one name at once is an operator error this does not detect.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log as flwr_log
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
from flwr.superlink.grid.http_grid import HttpGrid
from sqlalchemy import select

from fedsynth.generative import marginals, pretraining, rounds
from fedsynth.generative.codec import codec_of
from fedsynth.generative.model import SynthModel
from fedsynth.generative.spec import FederationSpec, load_spec
from fedsynth.home import fedsynth_home
from fedsynth.privacy import protocol
from fedsynth.privacy.keys import KeyStore
from fedsynth.server.audit import AuditLog
from fedsynth.server.prompt_grid import PromptGrid, prompt_replies
from fedsynth.server.records import (
    Database,
    Federation,
    ModelVersionRecord,
    NodeReport,
    Participation,
    RoundRecord,
    Run,
    database_url,
)
from fedsynth.server.registry import ModelRegistry
from fedsynth.server.secagg import GuardedSecAggPlusWorkflow, RoundFailed
from fedsynth.server.strategy import FederationStrategy, RoundLog

FEDERATIONS_DIR = Path(__file__).resolve().parents[2] / "federations"
ACTOR = "server"
_RUN_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class RunNotResumable(ValueError):
    """The named run cannot be continued (completed, or started from another spec)."""


@dataclass(frozen=True)
class ServerSettings:
    spec_path: Path
    home: Path
    rounds: int = 0  # 0 keeps the spec's federation.rounds
    steps: int = 0  # 0 keeps the spec's training length; else total steps per node
    wait_nodes_s: float = 120.0
    run_name: str = ""  # "": a new run; else the run of this name is resumed if it exists

    @classmethod
    def from_run_config(cls, config: dict[str, Any]) -> ServerSettings:
        spec = str(config.get("spec", "")).strip()
        if not spec:
            raise ValueError("run config: 'spec' (a federation spec file) is required")
        path = Path(spec).expanduser()
        if not path.exists() and (FEDERATIONS_DIR / f"{spec}.toml").exists():
            path = FEDERATIONS_DIR / f"{spec}.toml"
        home = Path(str(config["home"])).expanduser() if config.get("home") else fedsynth_home()
        run_name = str(config.get("run-name", "")).strip()
        if run_name and not _RUN_NAME.match(run_name):
            raise ValueError(
                f"run config: 'run-name' {run_name!r} must be 1-128 letters, digits, '_', "
                "'.' or '-'"
            )
        return cls(
            path,
            home,
            int(config.get("rounds", 0)),
            int(config.get("steps", 0)),
            float(config.get("wait-nodes-s", 120)),
            run_name,
        )


def global_arrays(legacy: LegacyContext, layout: list[tuple[int, ...]] | None) -> list[Any]:
    """The global model Flower's workflow holds, as the arrays of ``rounds.get_arrays``."""
    if layout is None:
        raise ValueError("the global model's layout is unknown")
    packed = parameters_to_ndarrays(
        compat.arrayrecord_to_parameters(
            legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
        )
    )
    return rounds.unpack(packed, layout)


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
        self,
        settings: ServerSettings,
        on_round: Callable[[RoundEvent], None] | None = None,
        spec: FederationSpec | None = None,
    ) -> None:
        """``spec``: this run's spec instead of ``settings.spec_path``'s (a pre-trained
        network's synopsis run, see :func:`make_server_app`)."""
        self.on_round = on_round
        spec = spec or _spec_with_overrides(settings)
        if spec.model.kind == "marginals" and spec.federation.rounds != len(marginals.PHASES):
            # its rounds are its three measurements (fedsynth.generative.marginals)
            raw = spec.model_dump(mode="python")
            raw["federation"]["rounds"] = len(marginals.PHASES)
            spec = FederationSpec.model_validate(raw)
        self.spec = spec
        self.settings = settings
        home = settings.home
        home.mkdir(parents=True, exist_ok=True)
        self.db = Database(database_url(home))
        self.audit = AuditLog(self.db)
        self.registry = ModelRegistry(home / "registry", KeyStore(home / "keys"), self.db)
        self.run_id = 0
        self.run_key = ""  # kept across resumptions; nodes key their ledger entries by it
        self.completed_rounds = 0  # rounds a resumed run had already completed
        self.flower_run = 0
        self._refused: dict[int, list[str]] = {}
        self._why_not: dict[int, list[str]] = {}  # round -> why each node it lost did not take part
        self._caps: dict[str, float] = {}  # institution -> the cap it last reported
        self.skipped = ""  # why the last round skipped was (the round_skipped reason)
        # model.pretrain: the registered synopsis (its id) and what the model says of it
        self.synopsis_model: str | None = None
        self.pretraining: dict[str, Any] = {}

    # ------------------------------------------------------------------ records
    def start_run(self) -> None:
        """Record a new run, or reopen the named one (see the module docstring)."""
        spec = self.spec
        name = spec.federation.name
        text = spec_json(spec)
        digest = hashlib.sha256(text.encode()).hexdigest()
        resumed: dict[str, Any] | None = None
        with self.db.session(immediate=True) as s:
            federation = s.get(Federation, name)
            if federation is None:
                s.add(
                    Federation(
                        name=name,
                        sector=spec.federation.sector,
                        spec_json=text,
                        created_at=_now(),
                    )
                )
            else:
                federation.spec_json = text
            run = self._named_run(s) if self.settings.run_name else None
            if run is None:
                config = {
                    "spec": str(self.settings.spec_path),
                    "name": self.settings.run_name or None,
                    "key": uuid.uuid4().hex,
                    "spec_sha256": digest,
                    "attempts": 1,
                }
                run = Run(
                    federation=name,
                    started_at=_now(),
                    status="running",
                    secure_aggregation=spec.secure_aggregation.enabled,
                    rounds_planned=spec.federation.rounds,
                    min_nodes=spec.federation.min_nodes,
                    config_json=json.dumps(config),
                )
                s.add(run)
                s.flush()
            else:
                config = json.loads(run.config_json)
                where = f"run-name {self.settings.run_name!r} (run {run.id} of {name})"
                if run.status == "completed":
                    raise RunNotResumable(
                        f"{where} has completed; give a new run-name for a new run"
                    )
                if config.get("spec_sha256") != digest:
                    raise RunNotResumable(
                        f"{where} started from another spec (or rounds/steps); resume it "
                        "with the same spec and overrides, or give a new run-name"
                    )
                config["attempts"] = int(config.get("attempts", 1)) + 1
                run.config_json = json.dumps(config)
                run.status = "running"
                run.finished_at = None
                self.completed_rounds = _completed_rounds(s, int(run.id))
                resumed = {
                    "name": self.settings.run_name,
                    "attempt": config["attempts"],
                    "completed_rounds": self.completed_rounds,
                }
            self.run_id = int(run.id)
            self.run_key = str(config["key"])
        if resumed is not None:
            self.audit.append(
                "run_resumed",
                ACTOR,
                {
                    "federation": name,
                    "run": self.run_id,
                    **resumed,
                    "flower_run": self.flower_run,
                },
            )
            return
        payload = {
            "federation": name,
            "run": self.run_id,
            "rounds": spec.federation.rounds,
            "min_nodes": spec.federation.min_nodes,
            "secure_aggregation": spec.secure_aggregation.enabled,
            "target_epsilon": spec.privacy.target_epsilon if spec.privacy.is_private else "inf",
            "name": self.settings.run_name or None,
            "flower_run": self.flower_run,
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

    def _named_run(self, s: Any) -> Run | None:
        """The latest run of this federation recorded under ``settings.run_name``."""
        runs = s.scalars(
            select(Run).where(Run.federation == self.spec.federation.name).order_by(Run.id)
        ).all()
        named = [r for r in runs if _run_config(r).get("name") == self.settings.run_name]
        return named[-1] if named else None

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
        """Run every round (a resumed run: those left); returns the registered model id."""
        self.flower_run = int(context.run_id)
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
        existing = self._registered_model()
        done = self.completed_rounds
        if done or existing is not None:
            self._recover_audit(done, existing)
        if existing is not None:
            return existing  # registered just before a crash: nothing left to do
        is_marginals = spec.model.kind == "marginals"
        if spec.model.pretrain != "none":
            synopsis = self._synopsis()  # also on resume: the model's metadata names it
        if done:
            initial = self.registry.load_checkpoint(spec.federation.name, self.run_id, done)
        elif is_marginals:
            initial = [
                a.astype(np.float32)
                for a in marginals.initial_state(marginals.domain_sizes(codec_of(spec)))
            ]
        elif spec.model.pretrain != "none":
            initial = rounds.get_arrays(rounds.initial_model(spec, synopsis))
            self.audit.append(
                "model_pretrained",
                ACTOR,
                {
                    "federation": spec.federation.name,
                    "run": self.run_id,
                    "synopsis_model": self.synopsis_model,
                    "fitted_sha256": synopsis.fitted_digest(),
                    "rows": pretraining.PRETRAIN_ROWS,
                    "steps": pretraining.PRETRAIN_STEPS,
                },
            )
        else:
            initial = rounds.get_arrays(rounds.initial_model(spec))
        message_config: dict[str, Scalar] = {
            protocol.SPEC: spec_json(spec),
            protocol.RUN: self.run_id,
            protocol.RUN_KEY: self.run_key,
        }
        layout = [tuple(a.shape) for a in initial]
        strategy = FederationStrategy(
            initial=ndarrays_to_parameters(rounds.pack(initial)),
            min_nodes=spec.federation.min_nodes,
            secure=secure,
            message_config=message_config,
            evaluation_rounds=(
                ([len(marginals.PHASES)] if spec.privacy.evaluation_share > 0 else [])
                if is_marginals
                else spec.federation.evaluation_rounds()
            ),
            server_step=None if is_marginals else functools.partial(rounds.server_step, spec),
            layout=layout,
            combine=functools.partial(_absorb_measurements, spec) if is_marginals else None,
        )
        self._restore(strategy, done)
        if done >= spec.federation.rounds:
            return self._register(initial, strategy, done)
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
            trained_rounds = done
            for server_round in range(done + 1, spec.federation.rounds + 1):
                cfg[Key.CURRENT_ROUND] = server_round
                started = _now()
                try:
                    trained = self._round(
                        grid, legacy, strategy, fit_workflow, server_round, message_config
                    )
                except Exception as exc:
                    self._round_failed(server_round, started, exc)
                    raise
                if not trained:
                    self._record_round(server_round, "skipped", started, strategy)
                    break
                self._record_round(server_round, "completed", started, strategy)
                trained_rounds = server_round
        finally:
            stop.set()
            thread.join()
        if not trained_rounds:
            raise RoundFailed(
                f"no round trained: {self.skipped} (`fedsynth audit events --type "
                "node_invalid` and `--type node_refused_budget` list them)"
            )
        return self._register(global_arrays(legacy, layout), strategy, trained_rounds)

    def _round(
        self,
        grid: Grid,
        legacy: LegacyContext,
        strategy: FederationStrategy,
        fit_workflow: Callable[[Grid, LegacyContext], None],
        server_round: int,
        message_config: dict[str, Scalar],
    ) -> bool:
        """Ask, train, evaluate and checkpoint one round; False if it was skipped (too few
        nodes within budget). Raises if the round fails."""
        spec = self.spec
        accepted = self._ask_budgets(grid, server_round, message_config)
        strategy.eligible = set(accepted)
        if len(accepted) < spec.federation.min_nodes:
            why = self._why_not.get(server_round, [])
            self.skipped = (
                f"round {server_round}: {len(accepted)} node(s) accepted, fewer than "
                f"federation.min_nodes = {spec.federation.min_nodes}"
                + (": " + "; ".join(why) if why else " (no other node answered)")
            )
            flwr_log(WARNING, "%s: %s", spec.federation.name, self.skipped)  # shown by `flwr log`
            self.audit.append(
                "round_skipped",
                ACTOR,
                {
                    "federation": spec.federation.name,
                    "run": self.run_id,
                    "round": server_round,
                    "accepted": sorted(accepted.values()),
                    "reason": self.skipped,
                },
            )
            return False
        fit_workflow(grid, legacy)
        log = strategy.rounds.get(server_round)
        if log is None or not log.aggregated:
            raise RoundFailed(f"round {server_round}: no aggregate was produced")
        default_evaluate_workflow(grid, legacy)
        arrays = global_arrays(legacy, strategy.layout)
        # Checkpoint, then record: a round is done once recorded, and a resumed run
        # starts from the checkpoint of the last round recorded done.
        self.registry.checkpoint(spec.federation.name, self.run_id, server_round, arrays)
        return True

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
                self._why_not.setdefault(server_round, []).append(
                    f"node-{node_id} (failed): its query ended in an error"
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
                # "epsilon" (the budget), or "own-noise epsilon" under split noise, whose
                # cap the node names apart; spent and cap are always the budget's
                measure = str(answer.get(protocol.MEASURE, "epsilon"))
                own = {}
                if measure != "epsilon":
                    limit = float(answer.get(protocol.MEASURE_CAP, cap))
                    own = {"measure": measure, "measure_cap": limit}
                self._turned_away(
                    server_round,
                    institution,
                    "refused",
                    "node_refused_budget",
                    {"spent": spent, "would_reach": after, "cap": cap, **own},
                    detail=f"would reach {measure} {after:.4f}"
                    + (f", above its own-noise cap {own['measure_cap']:g}" if own else ""),
                    epsilon=spent,
                    cap=cap,
                )
            else:
                # Only the kinds of problem and the spec's column names are kept: a node's
                # rows and values stay on the node, even in an error (DESIGN, principle 4)
                declared = [c.name for c in self.spec.schema.columns]
                problems = protocol.decode_problems(answer.get(protocol.PROBLEMS), declared)
                self._turned_away(
                    server_round,
                    institution,
                    "failed",
                    "node_invalid",
                    {"problems": [{"kind": k, "column": c} for k, c in problems]},
                    detail=f"cannot take part: {protocol.describe_problems(problems)}",
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
        self._why_not.setdefault(server_round, []).append(f"{institution} ({status}): {detail}")
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
        """The round, its trained participations and its scores, in one transaction: a
        crash leaves all of them or none (then a resumed run does the round again). A row
        left by an earlier failed attempt at this round is updated, never duplicated."""
        log = strategy.rounds.get(server_round)
        fitted = log.fitted if log else {}
        with self.db.session() as s:
            for institution, metrics in fitted.items():
                s.add(
                    Participation(
                        run_id=self.run_id,
                        round=server_round,
                        node=institution,
                        status="trained",
                        epsilon_spent=_finite(metrics.get(protocol.EPSILON)),
                        epsilon_cap=self._caps.get(institution),
                        delta=float(metrics.get(protocol.DELTA, 0.0)),
                        steps=int(metrics.get(protocol.STEPS, 0)),
                        detail=_participation_detail(metrics),
                    )
                )
            _upsert_round(s, self.run_id, server_round, status, started, len(fitted))
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
                    "resent": sorted(k for k, m in fitted.items() if m.get(protocol.RESENT)),
                    "secure_aggregation": self.spec.secure_aggregation.enabled,
                    "server_learning_rate": (
                        round(log.server_learning_rate, 4)
                        if log and log.server_learning_rate
                        else None
                    ),
                    "spend": {
                        k: _finite(m.get(protocol.EPSILON)) for k, m in sorted(fitted.items())
                    },
                },
            )

    def _round_failed(self, server_round: int, started: datetime, exc: BaseException) -> None:
        """Record a round that produced no model: its row says failed (the checkpoint and
        the model are those of the round before), and the audit chain says why."""
        reason = f"{type(exc).__name__}: {exc}"[:2000]
        with self.db.session() as s:
            _upsert_round(s, self.run_id, server_round, "failed", started, 0)
        self.audit.append(
            "round_failed",
            ACTOR,
            {
                "federation": self.spec.federation.name,
                "run": self.run_id,
                "round": server_round,
                "reason": reason,
            },
        )

    def _restore(self, strategy: FederationStrategy, done: int) -> None:
        """What the records hold of the rounds a resumed run completed before (who trained,
        with which reported spend, and their scores), for the model's metadata."""
        if not done:
            return
        with self.db.session() as s:
            trained = s.scalars(
                select(Participation)
                .where(Participation.run_id == self.run_id)
                .where(Participation.status == "trained")
                .where(Participation.round <= done)
                .order_by(Participation.id)
            ).all()
            reports = s.scalars(
                select(NodeReport)
                .where(NodeReport.run_id == self.run_id)
                .where(NodeReport.round <= done)
                .order_by(NodeReport.id)
            ).all()
        for r in range(1, done + 1):
            strategy.rounds[r] = RoundLog(aggregated=True)
        for p in trained:
            metrics: dict[str, Any] = {
                protocol.DELTA: p.delta or 0.0,
                protocol.STEPS: p.steps or 0,
                protocol.INSTITUTION: p.node,
            }
            if p.epsilon_spent is not None:
                metrics[protocol.EPSILON] = p.epsilon_spent
            strategy.rounds[p.round].fitted[p.node] = metrics
            if p.epsilon_cap is not None:
                self._caps[p.node] = p.epsilon_cap
        for report in reports:
            strategy.rounds[report.round].evaluated[report.node] = json.loads(report.metrics_json)

    def _recover_audit(self, done: int, model_id: str | None) -> None:
        """A crash between a record's commit and its audit event (a round recorded done,
        a model registered) leaves the event out; a resumed run appends it, marked
        ``recovered``, so the chain tells every round once."""
        keys = {"round_completed": "round", "model_registered": "model"}
        logged: dict[str, set[Any]] = {event_type: set() for event_type in keys}
        for event_type, key in keys.items():
            after = 0
            while batch := self.audit.events(event_type=event_type, after_seq=after, limit=1000):
                logged[event_type].update(
                    e.payload.get(key) for e in batch if e.payload.get("run") == self.run_id
                )
                after = batch[-1].seq
        with self.db.session() as s:
            trained = s.scalars(
                select(Participation)
                .where(Participation.run_id == self.run_id)
                .where(Participation.status == "trained")
            ).all()
        base = {"federation": self.spec.federation.name, "run": self.run_id, "recovered": True}
        for r in range(1, done + 1):
            if r not in logged["round_completed"]:
                participants = sorted({p.node for p in trained if p.round == r})
                self.audit.append(
                    "round_completed", ACTOR, {**base, "round": r, "participants": participants}
                )
        if model_id is not None and model_id not in logged["model_registered"]:
            self.audit.append("model_registered", ACTOR, {**base, "model": model_id})

    def _synopsis(self) -> marginals.MarginalModel:
        """The registered synopsis a pre-trained network starts from (verified by the
        registry's signature), checked to be this spec's: the same schema and epsilon."""
        spec = self.spec
        if self.synopsis_model is None:
            raise RoundFailed(
                f"{spec.federation.name}: model.pretrain = {spec.model.pretrain!r} needs "
                "its synopsis measured first (fedsynth.server.app.make_server_app)"
            )
        synopsis = self.registry.load(self.synopsis_model)
        expected = pretraining.synopsis_spec(spec)
        if (
            not isinstance(synopsis, marginals.MarginalModel)
            or synopsis.metadata["schema"] != expected.schema.public_dict()
            or synopsis.metadata["privacy"]["target_epsilon"]
            != (expected.privacy.target_epsilon if expected.privacy.is_private else "inf")
        ):
            raise RoundFailed(
                f"model {self.synopsis_model} is not the synopsis of {spec.federation.name}'s "
                "spec (kind, schema or epsilon differ)"
            )
        self.pretraining = {
            **pretraining.describe(spec, synopsis),
            "synopsis_model": self.synopsis_model,
        }
        return synopsis

    def _registered_model(self) -> str | None:
        """The model version this run registered already, if any."""
        with self.db.session() as s:
            found = s.scalars(
                select(ModelVersionRecord.id).where(ModelVersionRecord.run_id == self.run_id)
            ).first()
        return None if found is None else str(found)

    def _register(self, arrays: list[Any], strategy: FederationStrategy, last_round: int) -> str:
        spec = self.spec
        model: SynthModel
        if spec.model.kind == "marginals":
            measured_by = [len(strategy.rounds[r].fitted) for r in range(1, last_round + 1)]
            if last_round < len(marginals.PHASES):
                raise RoundFailed(
                    f"a marginals model needs all {len(marginals.PHASES)} measurement "
                    f"rounds; only {last_round} completed"
                )
            model = marginals.model_from_state(spec, arrays, measured_by)
        else:
            model = rounds.initial_model(spec)
            rounds.set_arrays(model, arrays)
            if self.pretraining:
                model.metadata["privacy"]["pretraining"] = self.pretraining
        fitted_digest = (
            model.fitted_digest() if isinstance(model, marginals.MarginalModel) else None
        )
        mismatched: list[str] = []
        # Each node's latest report is its total (the ledger composes all its releases).
        node_privacy: dict[str, dict[str, float]] = {}
        participants: set[str] = set()
        quality: dict[str, dict[str, float]] = {}
        for r in sorted(strategy.rounds):
            log = strategy.rounds[r]
            for institution, metrics in log.fitted.items():
                participants.add(institution)
                node_privacy[institution] = {
                    "epsilon": math.inf,
                    "delta": float(metrics.get(protocol.DELTA, 0.0)),
                }
                _take_latest_spend(node_privacy[institution], metrics)
            for institution, metrics in log.evaluated.items():
                if institution in node_privacy:
                    _take_latest_spend(node_privacy[institution], metrics)
                scored = metrics.get(protocol.MODEL_SHA256)
                if scored is not None and scored != fitted_digest:
                    # fitted from the same state by the same code, but not the same model:
                    # its scores are of another model, so they are not this one's quality
                    mismatched.append(institution)
                    continue
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
        model.metadata["training"] = {
            **model.metadata.get("training", {}),  # a marginals fit's own figures
            "rounds": last_round,
            "participants": sorted(participants),
        }
        mean_quality = {
            name: sum(q[name] for q in quality.values() if name in q)
            / max(1, sum(name in q for q in quality.values()))
            for name in rounds.EVALUATION_SCORES
            if any(name in q for q in quality.values())
        }
        model.metadata["quality"] = {
            "nodes": quality,
            "mean": mean_quality,
            **({"scored_another_model": sorted(mismatched)} if mismatched else {}),
        }
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


def _take_latest_spend(report: dict[str, float], metrics: dict[str, Any]) -> None:
    """A node's latest reported epsilon (and own-noise epsilon, with split noise) is its
    total so far: its ledger composes all its releases."""
    for key, name in (
        (protocol.EPSILON, "epsilon"),
        (protocol.OWN_NOISE_EPSILON, "own_noise_epsilon"),
    ):
        if key in metrics:
            report[name] = float(metrics[key])


def _participation_detail(metrics: dict[str, Any]) -> str:
    """What the compliance pages say beside a trained round's spend."""
    notes = ["re-sent its update"] if metrics.get(protocol.RESENT) else []
    own = _finite(metrics.get(protocol.OWN_NOISE_EPSILON))
    if own is not None:
        notes.append(
            f"noise shared under secure aggregation: epsilon {own:.3g} against a server "
            "that sees this node's update"
        )
    return "; ".join(notes)


def _absorb_measurements(
    spec: FederationSpec,
    server_round: int,
    current: list[np.ndarray],
    mean: list[np.ndarray],
    nodes: int,
) -> list[np.ndarray]:
    """A marginals round's aggregate: the nodes' mean (all weigh the same) times their
    number and the public scale they divided by is the sum of their measurements."""
    sums = marginals.from_secagg(mean, nodes, spec.secure_aggregation)
    return [a.astype(np.float32) for a in marginals.absorb(current, server_round, sums)]


def _run_config(run: Run) -> dict[str, Any]:
    try:
        config = json.loads(run.config_json or "{}")
    except json.JSONDecodeError:
        return {}
    return config if isinstance(config, dict) else {}


def _completed_rounds(s: Any, run_id: int) -> int:
    """How many rounds of the run are recorded completed: they must be 1..k, else the
    records do not say where to resume and this raises."""
    done = sorted(
        s.scalars(
            select(RoundRecord.round)
            .where(RoundRecord.run_id == run_id)
            .where(RoundRecord.status == "completed")
        ).all()
    )
    if done != list(range(1, len(done) + 1)):
        raise RunNotResumable(f"run {run_id}: completed rounds {done} are not 1..k")
    return len(done)


def _upsert_round(
    s: Any, run_id: int, server_round: int, status: str, started: datetime, participants: int
) -> None:
    row = s.scalars(
        select(RoundRecord)
        .where(RoundRecord.run_id == run_id)
        .where(RoundRecord.round == server_round)
    ).one_or_none()
    if row is None:
        row = RoundRecord(run_id=run_id, round=server_round)
        s.add(row)
    elif row.status == "completed":
        raise RunNotResumable(f"run {run_id}: round {server_round} is already recorded done")
    row.status = status
    row.started_at = started
    row.finished_at = _now()
    row.participants = participants


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if number != float("inf") else None


def _now() -> datetime:
    return datetime.now(UTC)


def _spec_with_overrides(settings: ServerSettings) -> FederationSpec:
    """The spec file's spec, with the run config's rounds and steps overrides."""
    spec = load_spec(settings.spec_path)
    if not (settings.rounds or settings.steps):
        return spec
    raw = spec.model_dump(mode="python")
    if settings.rounds:
        raw["federation"]["rounds"] = settings.rounds
    if settings.steps:
        raw["training"].update(epochs=None, steps=settings.steps)
    return FederationSpec.model_validate(raw)


def make_server_app(
    overrides: dict[str, Any] | None = None, on_round: Callable[[RoundEvent], None] | None = None
) -> ServerApp:
    """The ServerApp; ``overrides`` stand in for run config keys and ``on_round`` watches
    the rounds (both for the programmatic simulation, where the app runs in-process)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = {**dict(context.run_config), **(overrides or {})}
        if isinstance(grid, HttpGrid):  # the deployment engine: see fedsynth.server.prompt_grid
            grid = PromptGrid(grid)
            prompt_replies()
        settings = ServerSettings.from_run_config(config)
        server = FederationServer(settings, on_round)
        if server.spec.model.pretrain != "none":
            # The synopsis first: a marginals run of the same federation (so the nodes'
            # ledgers compose both), registered like any model; then the network's run
            # starts from weights pre-trained on it (fedsynth.generative.pretraining).
            name = f"{settings.run_name}.synopsis" if settings.run_name else ""
            synopsis = FederationServer(
                replace(settings, run_name=name),
                on_round,
                spec=pretraining.synopsis_spec(server.spec),
            )
            server.synopsis_model = synopsis.run(grid, context)
        server.run(grid, context)

    return app


app = make_server_app()
