"""The Flower ClientApp every institution runs (``flwr run`` loads ``app``).

Three handlers, all opened the same way -- resolve the node's configuration, parse the spec
the server sent, read and validate the node's table against that spec's schema (identifier
columns dropped), open the node's ledger:

- ``query``: will the next round fit this node's cap? The node answers accept or refuse
  and records a refusal in its ledger. This is advisory for the server's planning;
- ``train``: checks the cap again (the node's own check is the one that counts), trains the
  round with DP-SGD, stores the update and records the spend in its ledger *before* the
  update leaves, and replies in Flower's legacy fit format, which SecAgg+ needs (see
  ``secure_aggregation_mod``);
- ``evaluate``: scores the global model on the node's rows and releases only noisy scalars.

A ``marginals`` federation (fedsynth.generative.marginals) uses the same handlers: its
three rounds are measurements instead of DP-SGD steps. ``train`` receives the public state
(the sums so far), measures its own rows with discrete Gaussian noise (all of it, or its
share when the spec splits it), records the spend and replies with the measurement in the
same legacy format, so SecAgg+ sums it; ``evaluate``, after round 3, fits the model from
the finished state and releases noisy sums of its scores (``_score_marginals``).

A round asked again under the same run key (the server's run resumed after a crash, see
``fedsynth.server.app``) is not trained again: the node re-sends what it released the
first time, at no new cost, if it is handed the same global model, and refuses otherwise
(``fedsynth.clients.replay``). The ledger never holds two entries for one round of a run.

A node whose table does not fit the spec (or whose configuration, or the spec it was sent,
cannot be read) takes no part, before any training: its own log and outbox get the full
reason (column, rows, an example value), and the query's ``invalid`` reply tells the server
only the kind of each problem and the name of a column the spec declares
(``protocol.PROBLEMS``). Training and evaluation messages fail with that same short reason
(``NodeInvalid``): nothing of the table leaves the node, not even in an error.

In deployment Flower starts a fresh process for every message, and most messages of a
SecAgg+ round (key setup, share exchange, unmasking) are answered by the mod without
reaching a handler. So torch, Opacus and pandas are imported inside the handlers, not here:
those processes start without them (about 5 s of imports each, measured on this machine).
"""

from __future__ import annotations

import json
import logging
import sys
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import Code, EvaluateRes, FitRes, Scalar, Status, ndarrays_to_parameters
from flwr.common import parameters_to_ndarrays as to_arrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fedsynth.clients.node import (
    DEFAULTS_RECORD,
    NodeConfig,
    NodeConfigError,
    load_rows,
    resolve_context,
)
from fedsynth.clients.outbox import LOCAL_NOTE_RECORD, outbox_mod
from fedsynth.clients.replay import ReleaseStore, ReplayError, check_run_key, digest
from fedsynth.generative.spec import FederationSpec, SpecError, parse_spec
from fedsynth.generative.tablefile import TableError
from fedsynth.privacy import protocol

# Opacus calls logging.basicConfig when imported, which gives the root logger a handler
# with no level; Flower's logger, which has its own console handler, propagates to it, so
# every DEBUG record of the SecAgg+ mod was printed again, unfiltered (hundreds of lines
# per demo run). Flower's own handler still prints what its level lets through.
logging.getLogger("flwr").propagate = False
#: The node's own log (its SuperNode's console, or the simulation's worker): full reasons,
#: rows and values included, never sent anywhere.
log = logging.getLogger("fedsynth.node")

if TYPE_CHECKING:
    import pandas as pd

    from fedsynth.generative import marginals, rounds
    from fedsynth.privacy.ledger import BudgetCheck, PrivacyLedger


class BudgetRefused(RuntimeError):
    """The round would take this node past its own epsilon cap."""


class SecureAggregationRequired(RuntimeError):
    """The server asked for a plain update while the spec requires secure aggregation."""


class NodeInvalid(RuntimeError):
    """This node cannot open the round: its table does not fit the spec, or its
    configuration or the spec cannot be read. ``str()`` is what may leave the node (the
    kinds of problem and the spec's column names, ``problems``); ``local`` is the full
    reason, with rows, values and paths, for the node's own log and outbox only."""

    def __init__(
        self, problems: list[tuple[str, str]], local: str, institution: str | None
    ) -> None:
        self.problems = problems
        self.local = local
        self.institution = institution
        where = f"{institution}: " if institution else ""
        super().__init__(
            f"{where}{protocol.describe_problems(problems)}; the node's own log and outbox "
            "name the rows"
        )


@dataclass
class NodeSession:
    config: NodeConfig
    spec: FederationSpec
    rows: pd.DataFrame
    ledger: PrivacyLedger
    plan: rounds.NodePlan | marginals.NodeRoundPlan
    run: int
    round: int
    run_key: str | None = None  # the server's run across restarts; None: an older server

    @property
    def federation(self) -> str:
        return self.spec.federation.name

    def seed(self, purpose: str) -> int:
        """Deterministic per (spec seed, institution, run, round, purpose)."""
        key = f"{self.spec.training.seed}/{self.config.institution}/{self.round}/{purpose}"
        return zlib.crc32(key.encode())

    def check(
        self,
        planned: Sequence[tuple[float, float, int]],
        own_noise: Sequence[tuple[float, float, int]] = (),
    ) -> BudgetCheck:
        """The budget check; with split noise (privacy.noise = "shared") also the check of
        ``own_noise``, the same releases under this node's own share of the noise alone,
        against its own-noise cap. The first that fails is returned."""
        privacy = self.spec.privacy
        checks = [(planned, self.config.epsilon_cap, False)]
        if privacy.noise == "shared":
            checks.append((own_noise, self.config.own_noise_cap, True))
        budget: BudgetCheck | None = None
        for releases, cap, alone in checks:
            check = self.ledger.check(
                self.federation,
                releases,
                cap=cap,
                delta=privacy.delta,
                accountant=privacy.accountant,
                own_noise=alone,
            )
            if not check.allowed:
                return check
            budget = budget or check
        assert budget is not None
        return budget

    def spend(
        self,
        kind: str,
        history: Sequence[tuple[float, float, int]],
        remember: dict[str, Any] | None = None,
        **detail,
    ) -> float:
        privacy = self.spec.privacy
        return self.ledger.spend(
            self.federation,
            kind,
            history,
            delta=privacy.delta,
            accountant=privacy.accountant,
            run=self.run,
            round=self.round,
            run_key=self.run_key,
            detail=detail,
            remember=remember,
        )

    def released(self, kind: str) -> dict[str, Any] | None:
        """This round's earlier release of ``kind`` under the same run key, if any."""
        if self.run_key is None:
            return None
        return self.ledger.released(self.federation, kind, self.run_key, self.round)

    def epsilon(self) -> float:
        privacy = self.spec.privacy
        return self.ledger.epsilon(self.federation, privacy.delta, privacy.accountant)

    def own_noise_epsilon(self) -> float:
        privacy = self.spec.privacy
        return self.ledger.own_noise_epsilon(self.federation, privacy.delta, privacy.accountant)

    @property
    def releases(self) -> ReleaseStore:
        return ReleaseStore(self.config.ledger_path)

    def refuse(self, kind: str, check: BudgetCheck) -> None:
        self.ledger.refuse(
            self.federation,
            kind,
            check,
            delta=self.spec.privacy.delta,
            accountant=self.spec.privacy.accountant,
            run=self.run,
            round=self.round,
        )

    def plan_own_noise(self) -> list[tuple[float, float, int]]:
        """The rounds still to come under this node's own share of split noise alone
        (none unless a marginals federation splits its noise)."""
        if self.spec.privacy.noise != "shared":
            return []
        from fedsynth.generative import marginals

        assert isinstance(self.plan, marginals.NodeRoundPlan)  # the spec allows no other
        return self.plan.round_history(own_noise=True)

    def released_counts(self) -> list[float] | None:
        counts = self.ledger.recall(self.federation, "counts")
        return None if counts is None else [float(c) for c in counts]

    def pending_release(self) -> list[tuple[float, float, int]]:
        return [] if self.released_counts() is not None else self.plan.release_history()


def open_session(context: Context, config: dict) -> NodeSession:
    """The round's session; a node that cannot open it raises :class:`NodeInvalid`, after
    writing the full reason to its own log and leaving it for its outbox."""
    try:
        return _open_session(context, config)
    except Exception as exc:  # noqa: BLE001 -- every reason is kept local, see NodeInvalid
        raise _invalid(context, config, exc) from None


def _invalid(context: Context, config: dict, exc: Exception) -> NodeInvalid:
    institution: str | None = None
    try:
        institution = resolve_context(context).institution
    except NodeConfigError:
        pass
    declared: set[str] = set()
    try:
        spec = parse_spec(json.loads(str(config[protocol.SPEC])), source="spec sent by the server")
        declared = {c.name for c in spec.schema.columns}
    except (KeyError, ValueError):  # SpecError and JSON errors are ValueErrors
        pass
    local = f"{institution or 'this node'} cannot take part in the round: {exc}"
    log.error("%s", local)
    context.state.config_records[LOCAL_NOTE_RECORD] = ConfigRecord({"detail": local[:20000]})
    return NodeInvalid(_problems(exc, declared), local, institution)


def _problems(exc: Exception, declared: set[str]) -> list[tuple[str, str]]:
    """What the server may learn of ``exc``: the kind of each problem, and the column's
    name only where the spec declares it (a table read without its header would give its
    first row as column names: those stay here)."""
    if isinstance(exc, TableError):
        if not exc.problems:
            return [("unreadable_table", "")]
        return [(p.kind, p.column if p.column in declared else "") for p in exc.problems]
    if isinstance(exc, NodeConfigError):
        return [("node_config", "")]
    training = sys.modules.get("fedsynth.generative.training")  # loaded if it raised
    if training is not None and isinstance(exc, training.TrainingError):
        return [("row_count", "")]  # e.g. spec.rows_problem: the row count stays here
    if isinstance(exc, SpecError | json.JSONDecodeError):
        return [("spec", "")]
    return [("node_error", "")]


def _open_session(context: Context, config: dict) -> NodeSession:
    from fedsynth.privacy.ledger import PrivacyLedger

    node = resolve_context(context)
    text = str(config[protocol.SPEC])
    spec = parse_spec(json.loads(text), source="spec sent by the server")
    rows = load_rows(node, spec)
    ledger = PrivacyLedger(node.ledger_path)
    run = int(config.get(protocol.RUN, 0))
    key = config.get(protocol.RUN_KEY)
    server_round = int(config.get(protocol.ROUND, 0))
    plan: rounds.NodePlan | marginals.NodeRoundPlan
    if spec.model.kind == "marginals":
        plan = _marginal_plan(spec, server_round)
    else:
        plan = _plan(ledger, spec, text, len(rows), run)
    return NodeSession(
        node,
        spec,
        rows,
        ledger,
        plan,
        run,
        server_round,
        None if key is None else check_run_key(key),
    )


def _marginal_plan(spec: FederationSpec, server_round: int) -> marginals.NodeRoundPlan:
    """The same noise on every node, from the spec alone (no row count enters it)."""
    from fedsynth.generative import marginals
    from fedsynth.generative.codec import codec_of

    if not 1 <= server_round <= len(marginals.PHASES):
        raise ValueError(
            f"a marginals federation has rounds 1-{len(marginals.PHASES)}, not {server_round}"
        )
    plan = marginals.plan_for_spec(spec, marginals.domain_sizes(codec_of(spec)))
    return marginals.NodeRoundPlan(plan, server_round)


_PLANS: dict[tuple[str, int], rounds.NodePlan] = {}


def _plan(
    ledger: PrivacyLedger, spec: FederationSpec, text: str, rows: int, run: int
) -> rounds.NodePlan:
    """The run's noise plan, calibrated once (a few seconds of accountant work) and kept
    in memory and in the ledger: in deployment every message is a fresh process."""
    from fedsynth.generative import rounds

    key = (text, rows)
    if key not in _PLANS:
        name = f"plan/run-{run}"
        stored = ledger.recall(spec.federation.name, name)
        if stored is not None and stored["spec"] == text and stored["plan"]["rows"] == rows:
            _PLANS[key] = rounds.NodePlan(**stored["plan"])
        else:
            _PLANS.clear()
            _PLANS[key] = rounds.plan_node(spec, rows)
            ledger.remember(
                spec.federation.name,
                name,
                {"spec": text, "plan": asdict(_PLANS[key])},
                delta=spec.privacy.delta,
            )
    return _PLANS[key]


# ---------------------------------------------------------------------------- query


def query(message: Message, context: Context) -> Message:
    config = message.content.config_records[protocol.CONFIG]
    reply: dict[str, Any] = {}
    try:
        session = open_session(context, dict(config))
    except NodeInvalid as exc:  # the kinds of problem go back, the reason stays here
        reply = {
            protocol.STATUS: protocol.INVALID,
            protocol.PROBLEMS: protocol.encode_problems(exc.problems),
        }
        if exc.institution:
            reply[protocol.INSTITUTION] = exc.institution
        return Message(RecordDict({protocol.CONFIG: ConfigRecord(reply)}), reply_to=message)
    # A round this run already released is re-sent, not trained: it costs nothing more.
    again = session.released("train") is not None
    planned = [] if again else [*session.pending_release(), *session.plan.round_history()]
    own = [] if again else session.plan_own_noise()
    check = session.check(planned, own)
    if not check.allowed:
        session.refuse("train", check)
    # SPENT and CAP are always the budget's; AFTER is what the failing check would reach
    budget = check.measure == "epsilon"
    reply = {
        protocol.STATUS: protocol.ACCEPT if check.allowed else protocol.REFUSE,
        protocol.INSTITUTION: session.config.institution,
        protocol.SPENT: check.spent if budget else session.epsilon(),
        protocol.AFTER: check.after,
        protocol.CAP: check.cap if budget else session.config.epsilon_cap,
        protocol.MEASURE: check.measure,
        protocol.MEASURE_CAP: check.cap,
    }
    return Message(RecordDict({protocol.CONFIG: ConfigRecord(reply)}), reply_to=message)


# ---------------------------------------------------------------------------- train


def train(message: Message, context: Context) -> Message:
    from fedsynth.generative import rounds

    fitins = compat.recorddict_to_fitins(message.content, keep_input=True)
    session = open_session(context, dict(fitins.config))
    spec = session.spec
    # SecAgg+'s collect stage hands the fit on with its own config record still attached.
    secure = RECORD_KEY_CONFIGS in message.content.config_records
    if spec.secure_aggregation.enabled and not secure:
        raise SecureAggregationRequired(
            f"{session.federation}: the spec requires secure aggregation; "
            "this node does not send a plain update"
        )
    if spec.model.kind == "marginals":
        return _measure(message, to_arrays(fitins.parameters), session)
    # The global model in get_arrays' layout: its digest is the registry checkpoint's.
    model = rounds.initial_model(spec)
    start = rounds.unpack(to_arrays(fitins.parameters), rounds.layout(model))
    earlier = session.released("train")
    if earlier is not None:
        return _resend_update(message, session, earlier, digest(start))
    release = session.pending_release()
    check = session.check([*release, *session.plan.round_history()])
    if not check.allowed:
        session.refuse("train", check)
        raise BudgetRefused(
            f"{session.config.institution}: round {session.round} would reach epsilon "
            f"{check.after:.3f}, above this node's cap {check.cap:g} (spent {check.spent:.3f})"
        )
    plan = session.plan
    assert isinstance(plan, rounds.NodePlan)
    rounds.set_arrays(model, start)
    data, levels = rounds.encode(session.rows, spec)
    counts = session.released_counts()
    if counts is None:
        counts = rounds.release_counts(levels, spec, plan, seed=session.seed("counts"))
        # The spend and the counts in one write: counts kept are counts paid for.
        session.spend("release", release, remember={"counts": counts}, what="target counts")
    run = rounds.train_round(model, data, levels, spec, plan, seed=session.seed("train"))
    arrays = rounds.get_arrays(model)
    arrays[-1] = np.asarray(_shares(counts), dtype=np.float32)  # this node's own release
    largest = max(float(np.abs(a).max()) for a in arrays if a.size)
    limit = spec.secure_aggregation.clipping_range
    if spec.secure_aggregation.enabled and largest > limit:
        raise ValueError(
            f"a weight of {largest:.3g} lies outside secure_aggregation.clipping_range "
            f"{limit:g}; SecAgg+ would clip it silently, so this update is not sent"
        )
    stored = _store_release(session, arrays, digest(start))
    epsilon = session.spend(
        "train",
        run.history,
        steps=session.plan.steps_per_round,
        rows_weight=sum(counts),
        **stored,
    )
    return _fit_reply(message, session, arrays, sum(counts), epsilon, resent=False)


def _store_release(session: NodeSession, arrays: list[np.ndarray], start: str) -> dict[str, Any]:
    """Keep the reply's arrays, before the spend is written and the reply leaves: a node
    killed after the spend may have sent them, so the ledger counts them, and a retry
    re-sends these bytes; killed before, the stored file is never sent and the next try
    overwrites it. Returns the digests the ledger entry records (none without a run key)."""
    if session.run_key is None:
        return {}
    saved = session.releases.save(
        session.federation, session.run_key, session.round, "train", arrays
    )
    return {"update_sha256": saved, "input_sha256": start}


def _measure(message: Message, packed: list[np.ndarray], session: NodeSession) -> Message:
    """A round of a marginals federation: this node's noisy measurement of its own rows,
    as weights SecAgg+ sums exactly (``marginals.to_secagg``), spent before it
    leaves; re-sent, not measured again, if this run's round asks again."""
    from fedsynth.generative import marginals, rounds
    from fedsynth.generative.codec import codec_of

    spec, plan = session.spec, session.plan
    assert isinstance(plan, marginals.NodeRoundPlan)
    codec = codec_of(spec)
    sizes = marginals.domain_sizes(codec)
    state = rounds.unpack(packed, marginals.state_layout(sizes))
    earlier = session.released("train")
    if earlier is not None:
        return _resend_update(message, session, earlier, digest(state))
    check = session.check(plan.round_history(), session.plan_own_noise())
    if not check.allowed:
        session.refuse("train", check)
        raise BudgetRefused(
            f"{session.config.institution}: the measurements of rounds {session.round}-"
            f"{len(marginals.PHASES)} would reach {check.measure} {check.after:.3f}, above "
            f"this node's cap {check.cap:g} on it (spent {check.spent:.3f})"
        )
    secagg = spec.secure_aggregation
    measured = marginals.measure_round(
        session.round, marginals.column_codes(codec, session.rows), sizes, state, plan.plan
    )
    arrays = marginals.to_secagg(measured, secagg)
    stored = _store_release(session, arrays, digest(state))
    # Every node the same weight, so the aggregate is the plain mean (the server knows how
    # many nodes replied); the weight says nothing about the node's rows. With split noise
    # the entry also keeps what this node's own share of the noise is worth alone.
    detail: dict[str, Any] = {"phase": plan.phase, "rows_weight": secagg.max_weight, **stored}
    if plan.plan.split > 1:
        detail["own_noise_history"] = plan.this_round(own_noise=True)
    epsilon = session.spend("train", plan.this_round(), **detail)
    return _fit_reply(message, session, arrays, secagg.max_weight, epsilon, resent=False)


def _fit_reply(
    message: Message,
    session: NodeSession,
    arrays: list[np.ndarray],
    rows_weight: float,
    epsilon: float,
    *,
    resent: bool,
) -> Message:
    spec = session.spec
    weight = int(min(max(1.0, round(rows_weight)), spec.secure_aggregation.max_weight))
    metrics: dict[str, Scalar] = {
        protocol.EPSILON: epsilon if spec.privacy.is_private else float("inf"),
        protocol.DELTA: spec.privacy.delta if spec.privacy.is_private else 0.0,
        protocol.STEPS: session.plan.steps_per_round,
        protocol.NOISE: session.plan.noise_multiplier,
        protocol.CLIPPED: max(float(np.abs(a).max()) for a in arrays if a.size),
        protocol.INSTITUTION: session.config.institution,
        protocol.RESENT: int(resent),
    }
    if spec.privacy.noise == "shared":
        metrics[protocol.OWN_NOISE_EPSILON] = session.own_noise_epsilon()
    from fedsynth.generative import rounds

    packed = ndarrays_to_parameters(rounds.pack(arrays))
    fitres = FitRes(Status(Code.OK, "ok"), packed, weight, metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=message)


def _resend_update(
    message: Message, session: NodeSession, earlier: dict[str, Any], start: str
) -> Message:
    """Re-send the update this round already released under this run key: the same bytes,
    no new spend. Refused (nothing sent) if the server hands another global model than
    the one trained from, or if the stored update is gone or altered."""
    where = f"{session.config.institution}: round {session.round} of run {session.run_key}"
    if earlier.get("input_sha256") != start:
        raise ReplayError(
            f"{where} was already trained and released from another global model; "
            "training it again would spend the round twice, so this node refuses"
        )
    assert session.run_key is not None  # released() found an entry under it
    arrays = session.releases.load(
        session.federation, session.run_key, session.round, "train", earlier["update_sha256"]
    )
    return _fit_reply(
        message, session, arrays, float(earlier["rows_weight"]), session.epsilon(), resent=True
    )


def _shares(counts: list[float]) -> list[float]:
    clipped = np.clip(np.asarray(counts, dtype=np.float64), 0.0, None) + 1e-9
    return (clipped / clipped.sum()).tolist()


def secure_aggregation_mod(
    message: Message, context: Context, call_next: ClientAppCallable
) -> Message:
    """Flower's ``secaggplus_mod`` for SecAgg+ stages. A plain fit message (no SecAgg+
    configs) reaches the handler, which sends a plain update only if the spec allows it."""
    if RECORD_KEY_CONFIGS in message.content.config_records:
        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)


# ---------------------------------------------------------------------------- evaluate


def evaluate(message: Message, context: Context) -> Message:
    from fedsynth.generative import rounds

    evalins = compat.recorddict_to_evaluateins(message.content, keep_input=True)
    session = open_session(context, dict(evalins.config))
    metrics: dict[str, Scalar] = {protocol.INSTITUTION: session.config.institution}
    plan = session.plan
    if not isinstance(plan, rounds.NodePlan):
        return _score_marginals(message, evalins, session, metrics)
    model = rounds.initial_model(session.spec)
    arrays = rounds.unpack(to_arrays(evalins.parameters), rounds.layout(model))
    model_digest = digest(arrays)  # in get_arrays' layout, as the registry's checkpoints
    earlier = session.released("evaluate")
    if earlier is not None:
        return _resend_scores(message, session, earlier, model_digest, metrics)
    counts = session.released_counts()
    planned = plan.evaluation_history(len(rounds.EVALUATION_SCORES))
    check = session.check(planned)
    if counts is None or not check.allowed:
        # Nothing released yet to bound sensitivity with, or no budget: no scores.
        if counts is not None:
            session.refuse("evaluate", check)
        return _no_scores(message, metrics)
    rounds.set_arrays(model, arrays)
    scores, history = rounds.evaluation_scores(
        model, session.rows, session.spec, plan, counts, seed=session.seed("evaluate")
    )
    return _send_scores(message, session, metrics, scores, history, input_sha256=model_digest)


def _no_scores(message: Message, metrics: dict[str, Scalar]) -> Message:
    metrics[protocol.STATUS] = protocol.REFUSE
    res = EvaluateRes(Status(Code.OK, "no scores"), 0.0, 0, metrics)
    return Message(compat.evaluateres_to_recorddict(res), reply_to=message)


def _send_scores(
    message: Message,
    session: NodeSession,
    metrics: dict[str, Scalar],
    scores: dict[str, float],
    history: list[tuple[float, float, int]],
    **detail: Any,
) -> Message:
    """Spend the scores' releases, then send them: the ledger entry keeps the values and
    ``detail`` (the digest of what was scored), so that a retry re-sends them."""
    spec = session.spec
    epsilon = session.spend(
        "evaluate",
        history,
        scores=sorted(scores),
        values={k: float(v) for k, v in scores.items()},
        **detail,
    )
    metrics.update(scores)
    metrics[protocol.EPSILON] = epsilon if spec.privacy.is_private else float("inf")
    if spec.privacy.noise == "shared":
        metrics[protocol.OWN_NOISE_EPSILON] = session.own_noise_epsilon()
    metrics[protocol.STATUS] = protocol.ACCEPT
    metrics[protocol.RESENT] = 0
    res = EvaluateRes(Status(Code.OK, "ok"), 1.0 - scores.get("column_shapes", 0.0), 1, metrics)
    return Message(compat.evaluateres_to_recorddict(res), reply_to=message)


def _resend_scores(
    message: Message,
    session: NodeSession,
    earlier: dict[str, Any],
    input_digest: str,
    metrics: dict[str, Scalar],
) -> Message:
    """Scored already in this run and round: the same scores again (no new cost), and only
    for the model (or marginals state) they were computed on."""
    same = earlier.get("input_sha256") == input_digest and "values" in earlier
    if same:
        metrics.update({k: float(v) for k, v in earlier["values"].items()})
        metrics[protocol.EPSILON] = (
            session.epsilon() if session.spec.privacy.is_private else float("inf")
        )
    metrics[protocol.STATUS] = protocol.ACCEPT if same else protocol.REFUSE
    metrics[protocol.RESENT] = int(same)
    loss = 1.0 - float(metrics.get("column_shapes", 0.0)) if same else 0.0
    res = EvaluateRes(Status(Code.OK, "resent" if same else "no scores"), loss, int(same), metrics)
    return Message(compat.evaluateres_to_recorddict(res), reply_to=message)


def _score_marginals(
    message: Message, evalins: Any, session: NodeSession, metrics: dict[str, Scalar]
) -> Message:
    """A marginals federation's evaluation, after its last measurement: fit the model from
    the public state exactly as the server does (``model_from_state``, with the number of
    nodes each round summed), score it on this node's rows and release the noisy sums
    (``marginals.evaluation_release``), spent before they leave."""
    from fedsynth.generative import marginals, rounds
    from fedsynth.generative.codec import codec_of

    spec, plan = session.spec, session.plan
    assert isinstance(plan, marginals.NodeRoundPlan)
    sizes = marginals.domain_sizes(codec_of(spec))
    state = rounds.unpack(to_arrays(evalins.parameters), marginals.state_layout(sizes))
    state_digest = digest(state)
    earlier = session.released("evaluate")
    if earlier is not None:
        return _resend_scores(message, session, earlier, state_digest, metrics)
    planned = plan.plan.evaluation_history()
    check = session.check(planned, planned)
    if not check.allowed or (spec.privacy.is_private and not planned):
        if not check.allowed:
            session.refuse("evaluate", check)
        return _no_scores(message, metrics)
    nodes = [int(n) for n in json.loads(str(evalins.config[protocol.NODES_PER_ROUND]))]
    model = marginals.model_from_state(spec, state, nodes)
    scores, history = marginals.evaluation_release(
        model, session.rows, plan.plan, seed=session.seed("evaluate")
    )
    fitted = model.fitted_digest()
    metrics[protocol.MODEL_SHA256] = fitted
    return _send_scores(
        message,
        session,
        metrics,
        scores,
        history,
        input_sha256=state_digest,
        model_sha256=fitted,
    )


# ---------------------------------------------------------------------------- the app


def make_client_app(
    extra_mods: Sequence[Mod] = (), run_config: dict[str, str] | None = None
) -> ClientApp:
    """The node's ClientApp. ``extra_mods`` sit just inside the outbox log (tests use one
    to inspect every outgoing message); ``run_config`` gives defaults for run config keys
    (the programmatic simulation has no run config). Mods are attached per handler:
    SecAgg+ only to training, where it belongs (on the whole app it breaks evaluation)."""
    defaults: dict[str, Any] = dict(run_config or {})

    def with_defaults(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if defaults:
            context.state.config_records[DEFAULTS_RECORD] = ConfigRecord(defaults)
        return call_next(message, context)

    app = ClientApp()
    outer: list[Mod] = [with_defaults, outbox_mod, *extra_mods]
    app.query(mods=outer)(query)
    app.train(mods=[*outer, secure_aggregation_mod])(train)
    app.evaluate(mods=outer)(evaluate)
    return app


app = make_client_app()
