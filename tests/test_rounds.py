"""One node's round without Flower: plan, arrays, release, local training, scores; and the
demo's non-IID split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedsynth.demo.nodes import dirichlet_split
from fedsynth.generative import rounds
from fedsynth.generative.accounting import epsilon_of
from fedsynth.generative.spec import SpecError, parse_spec
from tests.factories import small_frame, small_spec_dict


def _spec(epsilon: float = 1.0, steps: int = 12, rounds_: int = 3):
    raw = small_spec_dict(epsilon=epsilon, steps=steps)
    raw["federation"]["rounds"] = rounds_
    return parse_spec(raw)


def test_the_plan_spends_exactly_the_target_over_all_rounds_and_releases():
    spec = _spec()
    plan = rounds.plan_node(spec, 900)
    assert plan.steps_per_round == 4 and plan.rounds == 3
    history = [
        *plan.release_history(),
        *plan.round_history() * plan.rounds,
        *plan.evaluation_history(len(rounds.EVALUATION_SCORES)),  # the last round only
    ]
    epsilon = epsilon_of(history, spec.privacy.delta)
    assert epsilon == pytest.approx(1.0, rel=0.01) and epsilon <= 1.0
    assert plan.noise_multiplier > 0 and plan.marginal_sigma > 0 and plan.evaluation_sigma > 0


def test_without_dp_the_plan_adds_no_noise_and_no_history():
    plan = rounds.plan_node(_spec(epsilon=float("inf")), 900)
    assert plan.noise_multiplier == 0 and plan.release_history() == []


def test_arrays_round_trip_and_a_wrong_shape_names_the_tensor():
    spec = _spec()
    model = rounds.initial_model(spec)
    arrays = rounds.get_arrays(model)
    assert arrays[-1].tolist() == [0.5, 0.5]  # target shares before any release
    other = rounds.initial_model(spec)
    changed = [a + 1.0 for a in arrays[:-1]] + [np.array([0.25, 0.75], dtype=np.float32)]
    rounds.set_arrays(other, changed)
    for a, b in zip(rounds.get_arrays(other)[:-1], changed[:-1], strict=True):
        np.testing.assert_array_equal(a, b)
    assert rounds.shares_of(other) == pytest.approx([0.25, 0.75])
    broken = list(arrays)
    broken[0] = np.zeros((1, 1), dtype=np.float32)
    with pytest.raises(ValueError, match=r"generator\..*expected shape"):
        rounds.set_arrays(other, broken)
    with pytest.raises(ValueError, match="expected"):
        rounds.set_arrays(other, arrays[:-2])


def test_messages_carry_the_arrays_as_one_vector_and_unpack_checks_its_size():
    model = rounds.initial_model(_spec())
    arrays = rounds.get_arrays(model)
    packed = rounds.pack(arrays)
    assert len(packed) == 1 and packed[0].dtype == np.float32
    assert packed[0].size == sum(a.size for a in arrays) and len(arrays) > 10
    for a, b in zip(rounds.unpack(packed, rounds.layout(model)), arrays, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="expected the packed model"):
        rounds.unpack(arrays, rounds.layout(model))  # the unpacked list is refused
    with pytest.raises(ValueError, match="expected the packed model"):
        rounds.unpack([packed[0][:-1]], rounds.layout(model))


def test_a_round_trains_the_global_model_with_dp_and_reports_its_history():
    spec = _spec()
    frame = small_frame(400, seed=1)
    plan = rounds.plan_node(spec, len(frame))
    model = rounds.initial_model(spec)
    before = [a.copy() for a in rounds.get_arrays(model)]
    data, levels = rounds.encode(frame, spec)
    run = rounds.train_round(model, data, levels, spec, plan, seed=1)
    assert run.history == [(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)]
    after = rounds.get_arrays(model)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert len(model.sample(20, seed=0)) == 20


def test_counts_are_noisy_with_dp_and_exact_without():
    spec = _spec()
    frame = small_frame(300, seed=2)
    _, levels = rounds.encode(frame, spec)
    exact = frame["outcome"].value_counts().reindex(["good", "bad"]).tolist()
    plain = rounds.release_counts(
        levels,
        _spec(epsilon=float("inf")),
        rounds.plan_node(_spec(epsilon=float("inf")), 300),
        seed=0,
    )
    assert plain == exact
    noisy = rounds.release_counts(levels, spec, rounds.plan_node(spec, 300), seed=0)
    assert noisy != exact and len(noisy) == 2
    assert noisy == rounds.release_counts(levels, spec, rounds.plan_node(spec, 300), seed=0)


def test_evaluation_scores_are_bounded_and_carry_their_noise_and_cost():
    spec = _spec()
    frame = small_frame(500, seed=3)
    plan = rounds.plan_node(spec, len(frame))
    counts = [250.0, 250.0]
    scores, history = rounds.evaluation_scores(
        rounds.initial_model(spec), frame, spec, plan, counts, seed=0
    )
    assert set(scores) == {
        "column_shapes",
        "column_shapes_sd",
        "tstr_auc",
        "tstr_auc_sd",
        "dcr_mean",
        "dcr_mean_sd",
    }
    assert all(0.0 <= scores[k] <= 1.0 for k in rounds.EVALUATION_SCORES)
    assert scores["column_shapes_sd"] == pytest.approx(
        plan.evaluation_sigma / rounds.public_lower_bound(counts, plan)
    )
    assert history == [(plan.evaluation_sigma, 1.0, 3)]


def test_released_column_shapes_move_by_at_most_one_over_n_even_with_rare_values():
    """The sensitivity the evaluation noise is scaled to (1/n) holds for the released
    column shapes, nulls and all, on a table whose nullable column is almost all null;
    SDMetrics' score, which divides by the non-null count, moves 10 times as far there
    (the bound the GAN and VAE evaluations used to assume, and did not have)."""
    from fedsynth.generative.quality import column_shapes

    schema = parse_spec(small_spec_dict("gan")).schema
    rng = np.random.default_rng(0)
    real = small_frame(400)
    real.loc[real.index[6:], "cost"] = None  # 6 of 400 costs known
    real.loc[real.index[3:], "smoker"] = None  # 3 of 400 smoker flags known
    synthetic = small_frame(500, seed=1)
    worst, worst_sdmetrics = 0.0, 0.0
    base = rounds.release_shapes(real, synthetic, schema)
    base_sdmetrics = column_shapes(real, synthetic, schema)[0]
    for i in [*range(8), *rng.choice(len(real), 30, replace=False)]:
        fewer = real.drop(real.index[i])  # remove one row of n
        moved = abs(rounds.release_shapes(fewer, synthetic, schema) - base)
        worst = max(worst, moved * (len(real) - 1))
        moved = abs(column_shapes(fewer, synthetic, schema)[0] - base_sdmetrics)
        worst_sdmetrics = max(worst_sdmetrics, moved * (len(real) - 1))
    assert 0 < worst <= 1.0 + 1e-9  # in units of 1/(n - 1)
    assert worst_sdmetrics > 10


def test_dirichlet_split_is_deterministic_disjoint_and_skewed():
    frame = pd.DataFrame({"y": ["a"] * 900 + ["b"] * 100, "x": range(1000)})
    parts = dirichlet_split(frame, "y", 3, seed=0)
    again = dirichlet_split(frame, "y", 3, seed=0)
    assert all(p.equals(q) for p, q in zip(parts, again, strict=True))
    xs = sorted(x for p in parts for x in p["x"])
    assert xs == list(range(1000))
    shares = [(p["y"] == "b").mean() for p in parts]
    assert max(shares) - min(shares) > 0.05  # label skew
    assert all((p["y"] == "b").any() for p in parts)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda r: r["federation"].update(min_nodes=2), "min_nodes must be at least 3"),
        (lambda r: r.setdefault("secure_aggregation", {}).update(num_shares=4), "odd integer"),
        (
            lambda r: r.setdefault("secure_aggregation", {}).update(clipping_range=0),
            "greater than 0",
        ),
        (lambda r: r["federation"].update(rounds=0), "federation.rounds"),
    ],
)
def test_federation_settings_are_validated(change, message):
    raw = small_spec_dict()
    change(raw)
    with pytest.raises(SpecError, match=message):
        parse_spec(raw)


def test_plain_aggregation_allows_fewer_nodes():
    raw = small_spec_dict()
    raw["federation"]["min_nodes"] = 1
    raw["secure_aggregation"] = {"enabled": False}
    assert parse_spec(raw).federation.min_nodes == 1


def test_evaluation_rounds_are_every_kth_and_always_the_last():
    raw = small_spec_dict()
    raw["federation"].update(rounds=7, evaluate_every=3)
    assert parse_spec(raw).federation.evaluation_rounds() == [3, 6, 7]
    raw["federation"]["evaluate_every"] = 0
    assert parse_spec(raw).federation.evaluation_rounds() == [7]


def _epochs_spec(**federation):
    raw = small_spec_dict()
    raw["training"] = {"epochs": 20, "batch_size": 512, "seed": 0}
    raw["federation"].update(rounds=5, **federation)
    return parse_spec(raw)


def test_the_server_steps_as_far_as_the_pooled_rows_would_in_a_round():
    spec = _epochs_spec()
    # The bank table's three non-IID nodes: 5,755, 582 and 1,663 rows take 48, 8 and 16
    # steps a round; the pooled 8,000 rows would take 20 * 16 / 5 = 64.
    updates = [(5755.0, 48), (582.0, 8), (1663.0, 16)]
    mean_steps = (5755 * 48 + 582 * 8 + 1663 * 16) / 8000
    assert rounds.server_step(spec, updates) == pytest.approx(64 / mean_steps)
    # Nodes smaller than a batch take as many steps as the pooled rows would: FedAvg.
    assert rounds.server_step(spec, [(100.0, 4)] * 3) == 1.0
    # Never further than the steps the nodes took together (3 x 4), whatever the weights.
    assert rounds.server_step(spec, [(5000.0, 4)] * 3) == pytest.approx(3.0)
    # One node holding everything: plain FedAvg, never a shorter step.
    assert rounds.server_step(spec, [(8000.0, 64)]) == 1.0
    assert rounds.server_step(spec, [(0.0, 0)]) == 1.0
    fixed = _epochs_spec(server_learning_rate=1.0)
    assert rounds.server_step(fixed, updates) == 1.0


@pytest.mark.parametrize("value", [0, -1, "fast", 1000])
def test_a_bad_server_learning_rate_is_named(value):
    raw = small_spec_dict()
    raw["federation"]["server_learning_rate"] = value
    with pytest.raises(SpecError, match="federation.server_learning_rate"):
        parse_spec(raw)


def test_step_along_extrapolates_the_weights_and_keeps_the_pooled_shares():
    current = [np.zeros(2, dtype=np.float32), np.array([0.5, 0.5], dtype=np.float32)]
    average = [np.array([1.0, -2.0], dtype=np.float32), np.array([0.9, 0.1], dtype=np.float32)]
    stepped = rounds.step_along(current, average, 1.5)
    assert stepped[0].tolist() == [1.5, -3.0] and stepped[0].dtype == np.float32
    assert stepped[1].tolist() == pytest.approx([0.9, 0.1])
    assert rounds.step_along(current, average, 1.0)[0].tolist() == [1.0, -2.0]
    with pytest.raises(ValueError, match="expected 2 arrays"):
        rounds.step_along(current, average[:1], 1.0)
