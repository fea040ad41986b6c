"""The node's handlers called directly (no Flower runtime): every refusal path and what a
plain update holds. The full SecAgg+ path runs in tests/test_federation.py."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import EvaluateIns, FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.task_identity import TaskIdentity

from fedsynth.clients import app as node_app
from fedsynth.generative import rounds
from fedsynth.generative.spec import parse_spec
from fedsynth.privacy import protocol
from fedsynth.privacy.ledger import PrivacyLedger
from fedsynth.server.app import spec_json
from fedsynth.server.secagg import RoundFailed
from fedsynth.server.strategy import FederationStrategy
from tests.factories import small_frame, small_spec_dict


@pytest.fixture(autouse=True)
def task_identity():
    """Flower stamps messages with the identity of the running task, which a Flower
    process sets; here the test stands in for the server."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _spec(secure: bool = True, epsilon: float = 1.0):
    raw = small_spec_dict(epsilon=epsilon, steps=4)
    raw["federation"]["rounds"] = 2
    if not secure:
        raw["secure_aggregation"] = {"enabled": False}
        raw["federation"]["min_nodes"] = 1
    return parse_spec(raw)


def _node(tmp_path, cap: float = 5.0, rows=None):
    frame = small_frame(400, seed=4) if rows is None else rows
    frame.insert(0, "patient", [f"p{i}" for i in range(len(frame))])
    data = tmp_path / "data.csv"
    frame.to_csv(data, index=False, date_format="%Y-%m-%d")
    config = {
        "institution": "clinic-a",
        "data-path": str(data),
        "ledger-path": str(tmp_path / "ledger.json"),
        "outbox-path": str(tmp_path / "outbox.jsonl"),
        "epsilon-cap": cap,
    }
    return Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={})


def _config(spec, round_=1) -> dict:
    return {protocol.SPEC: spec_json(spec), protocol.RUN: 1, protocol.ROUND: round_}


def _query(context, spec):
    content = RecordDict({protocol.CONFIG: ConfigRecord(_config(spec))})
    reply = node_app.query(Message(content, dst_node_id=7, message_type="query"), context)
    return dict(reply.content.config_records[protocol.CONFIG])


def _fit(context, spec, round_=1):
    arrays = rounds.pack(rounds.get_arrays(rounds.initial_model(spec)))
    fitins = FitIns(ndarrays_to_parameters(arrays), _config(spec, round_))
    message = Message(
        compat.fitins_to_recorddict(fitins, True), dst_node_id=7, message_type="train"
    )
    reply = node_app.train(message, context)
    return compat.recorddict_to_fitres(reply.content, keep_input=True)


def test_query_accepts_within_the_cap_and_reports_the_budget(tmp_path):
    answer = _query(_node(tmp_path), _spec())
    assert answer[protocol.STATUS] == protocol.ACCEPT
    assert answer[protocol.SPENT] == 0.0 and 0 < answer[protocol.AFTER] < 1.0
    assert answer[protocol.CAP] == 5.0 and answer[protocol.INSTITUTION] == "clinic-a"


def test_query_refuses_past_the_cap_and_the_ledger_keeps_the_refusal(tmp_path):
    answer = _query(_node(tmp_path, cap=0.01), _spec())
    assert answer[protocol.STATUS] == protocol.REFUSE and answer[protocol.AFTER] > 0.01
    refusals = PrivacyLedger(tmp_path / "ledger.json").section("clinic")["refusals"]
    assert len(refusals) == 1 and refusals[0]["cap"] == 0.01


def test_a_table_that_does_not_fit_tells_the_server_the_column_and_the_node_the_rows(
    tmp_path, caplog
):
    frame = small_frame(50, seed=1)
    frame["ward"] = frame["ward"].astype(str).replace({"a": "zzz"})
    context = _node(tmp_path, rows=frame)
    with caplog.at_level("ERROR", logger="fedsynth.node"):
        answer = _query(context, _spec())
    assert answer[protocol.STATUS] == protocol.INVALID
    assert answer[protocol.INSTITUTION] == "clinic-a"
    problems = protocol.decode_problems(answer[protocol.PROBLEMS])
    assert problems == [("unknown_category", "ward")]
    assert "zzz" not in repr(answer) and "row" not in repr(answer)
    # the node's own log and its outbox note hold the rows and the value
    local = [r.getMessage() for r in caplog.records if r.name == "fedsynth.node"]
    assert len(local) == 1 and "column 'ward'" in local[0] and "'zzz'" in local[0]
    note = context.state.config_records[node_app.LOCAL_NOTE_RECORD]["detail"]
    assert note == local[0] and "at rows" in note


def test_a_header_name_the_spec_does_not_declare_stays_on_the_node(tmp_path):
    """A table read without its header takes its first row for column names: the server
    learns only that the table has undeclared columns, not their names."""
    frame = small_frame(50, seed=1).rename(columns={"age": "Jane Doe 1961"})
    answer = _query(_node(tmp_path, rows=frame), _spec())
    problems = protocol.decode_problems(answer[protocol.PROBLEMS])
    assert ("missing_column", "age") in problems and ("extra_column", "") in problems
    assert "Jane" not in repr(answer)


def test_train_on_a_table_that_does_not_fit_fails_without_its_values(tmp_path):
    frame = small_frame(50, seed=1)
    frame.loc[3, "cost"] = 98765.4321
    context = _node(tmp_path, rows=frame)
    with pytest.raises(node_app.NodeInvalid) as info:
        _fit(context, _spec(secure=False))
    text = str(info.value)
    assert "above the declared max (column 'cost')" in text and "clinic-a" in text
    assert "98765" not in text and "row 4" not in text
    assert "98765.4321" in info.value.local and "row 4" in info.value.local
    assert not (tmp_path / "ledger.json").exists()  # nothing opened, nothing spent


def test_train_refuses_a_plain_update_when_the_spec_requires_secure_aggregation(tmp_path):
    context = _node(tmp_path)
    with pytest.raises(node_app.SecureAggregationRequired):
        _fit(context, _spec(secure=True))
    assert PrivacyLedger(tmp_path / "ledger.json").history("clinic") == []  # nothing spent


def test_train_refuses_past_the_cap_even_if_the_server_asks(tmp_path):
    with pytest.raises(node_app.BudgetRefused, match="above this node's cap 0.01"):
        _fit(_node(tmp_path, cap=0.01), _spec(secure=False))
    assert PrivacyLedger(tmp_path / "ledger.json").history("clinic") == []


def test_a_plain_update_is_dp_weights_noisy_shares_and_a_noisy_weight(tmp_path):
    context = _node(tmp_path)
    spec = _spec(secure=False)
    res = _fit(context, spec)
    plan = rounds.plan_node(spec, 400)
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    kinds = [e["kind"] for e in ledger.section("clinic")["entries"]]
    assert kinds == ["release", "train"]
    assert res.metrics[protocol.EPSILON] == pytest.approx(ledger.epsilon("clinic", 1e-4))
    counts = ledger.recall("clinic", "counts")
    assert res.num_examples == round(sum(counts)) and res.num_examples != 400  # noisy
    layout = rounds.layout(rounds.initial_model(spec))
    arrays = rounds.unpack(parameters_to_ndarrays(res.parameters), layout)  # one vector
    assert arrays[-1] == pytest.approx(np.array(counts) / sum(counts), abs=1e-6)
    assert res.metrics[protocol.STEPS] == plan.steps_per_round
    # a second round re-sends the same release and spends only its steps
    _fit(context, spec, round_=2)
    kinds = [e["kind"] for e in ledger.section("clinic")["entries"]]
    assert kinds == ["release", "train", "train"]


def test_evaluate_needs_a_release_first_then_returns_noisy_scores(tmp_path):
    context = _node(tmp_path)
    spec = _spec(secure=False)
    arrays = rounds.pack(rounds.get_arrays(rounds.initial_model(spec)))
    evalins = EvaluateIns(ndarrays_to_parameters(arrays), _config(spec))
    message = Message(
        compat.evaluateins_to_recorddict(evalins, True), dst_node_id=7, message_type="evaluate"
    )
    first = compat.recorddict_to_evaluateres(node_app.evaluate(message, context).content)
    assert first.metrics[protocol.STATUS] == protocol.REFUSE and first.num_examples == 0
    _fit(context, spec)
    message = Message(
        compat.evaluateins_to_recorddict(evalins, True), dst_node_id=7, message_type="evaluate"
    )
    scored = compat.recorddict_to_evaluateres(node_app.evaluate(message, context).content)
    assert scored.metrics[protocol.STATUS] == protocol.ACCEPT
    assert 0 <= scored.metrics["column_shapes"] <= 1 and scored.metrics["column_shapes_sd"] > 0
    entries = PrivacyLedger(tmp_path / "ledger.json").section("clinic")["entries"]
    assert entries[-1]["kind"] == "evaluate"


class _Proxy:
    def __init__(self, node_id: int) -> None:
        self.node_id = node_id


def _result(arrays, institution: str):
    from flwr.common import Code, FitRes, Status

    metrics = {protocol.INSTITUTION: institution, protocol.EPSILON: 0.5}
    return FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(arrays), 100, metrics)


def test_strategy_refuses_individual_updates_under_secure_aggregation_and_small_sums():
    ones = [np.ones(3, dtype=np.float32)]
    strategy = FederationStrategy(
        initial=ndarrays_to_parameters(ones), min_nodes=3, secure=True, message_config={}
    )
    same = ndarrays_to_parameters(ones)
    results = [(_Proxy(i), _result(ones, f"n{i}")) for i in range(3)]
    for _, res in results:
        res.parameters = same  # what SecAgg+ hands over: one sum for all
    aggregate, _ = strategy.aggregate_fit(1, results, [])
    assert parameters_to_ndarrays(aggregate)[0].tolist() == [1.0, 1.0, 1.0]
    individual = [
        (_Proxy(i), _result([np.full(3, i, dtype=np.float32)], f"n{i}")) for i in range(3)
    ]
    with pytest.raises(RoundFailed, match="individual updates"):
        strategy.aggregate_fit(2, individual, [])
    with pytest.raises(RoundFailed, match="fewer than federation.min_nodes = 3"):
        strategy.aggregate_fit(3, results[:2], [])


def test_strategy_steps_from_the_round_start_model_along_the_weighted_average():
    weights = [(300.0, 6), (100.0, 2)]
    seen = []

    def step(updates):
        seen.append(updates)
        return 2.0

    start = [np.zeros(2, dtype=np.float32), np.array([0.5, 0.5], dtype=np.float32)]
    layout = [(2,), (2,)]
    strategy = FederationStrategy(
        initial=ndarrays_to_parameters(rounds.pack(start)),
        min_nodes=2,
        secure=False,
        message_config={},
        server_step=step,
        layout=layout,
    )
    # The round starts from another model than the initial one (a later round).
    current = [np.ones(2, dtype=np.float32), np.array([0.5, 0.5], dtype=np.float32)]
    strategy.configure_fit(3, ndarrays_to_parameters(rounds.pack(current)), _NoClients())
    results = []
    for i, (rows, steps) in enumerate(weights):
        update = [np.full(2, 1.0 + (i + 1), np.float32), np.array([i, 1 - i], np.float32)]
        res = _result(rounds.pack(update), f"n{i}")
        res.num_examples, res.metrics[protocol.STEPS] = int(rows), steps
        results.append((_Proxy(i), res))
    aggregate, _ = strategy.aggregate_fit(3, results, [])
    weights_out, shares = rounds.unpack(parameters_to_ndarrays(aggregate), layout)
    average = (300 * 2.0 + 100 * 3.0) / 400  # 2.25: FedAvg of the weights
    assert weights_out.tolist() == pytest.approx([1.0 + 2.0 * (average - 1.0)] * 2)
    assert shares.tolist() == pytest.approx([0.25, 0.75])  # the pooled shares, not stepped
    assert seen == [[(300.0, 6), (100.0, 2)]]
    assert strategy.rounds[3].server_learning_rate == 2.0


class _NoClients:
    def all(self):
        return {}
