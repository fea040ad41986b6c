"""Pre-training on a DP synopsis (model.pretrain = "marginals"): the spec's rules, the
composed accounting against a recomputation, and that pre-training sees the synopsis only."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsynth.generative import pretraining, rounds
from fedsynth.generative.accounting import epsilon_of
from fedsynth.generative.marginals import MarginalModel
from fedsynth.generative.model import SynthModel
from fedsynth.generative.spec import SpecError, parse_spec
from fedsynth.generative.training import train
from tests.factories import small_frame, small_spec_dict


def pretrained_spec(kind: str = "gan", epsilon: float = 1.0, share: float = 0.5, **training):
    raw = small_spec_dict(kind, epsilon, steps=training.pop("steps", 6))
    raw["model"]["pretrain"] = "marginals"
    raw["privacy"]["pretrain_share"] = share
    raw["training"].update(training)
    return parse_spec(raw)


def test_the_accountant_defaults_to_rdp_and_prv_is_refused():
    assert pretrained_spec().privacy.accountant == "rdp"
    raw = small_spec_dict()
    raw["model"]["pretrain"] = "marginals"
    raw["privacy"]["accountant"] = "prv"
    with pytest.raises(SpecError, match="privacy.accountant must be 'rdp' with model.pretrain"):
        parse_spec(raw)


def test_a_marginals_model_is_not_pretrained():
    raw = small_spec_dict("marginals")
    raw["model"]["pretrain"] = "marginals"
    with pytest.raises(SpecError, match="model.pretrain applies to model.kind = 'gan' or 'vae'"):
        parse_spec(raw)


def test_the_synopsis_spec_takes_its_share_with_own_noise_and_no_evaluation():
    spec = pretrained_spec(epsilon=2.0, share=0.25)
    synopsis = pretraining.synopsis_spec(spec)
    assert synopsis.model.kind == "marginals"
    assert synopsis.privacy.target_epsilon == pytest.approx(0.5)
    assert (synopsis.privacy.noise, synopsis.privacy.evaluation_share) == ("own", 0.0)
    assert synopsis.federation.name == spec.federation.name  # the ledgers compose both
    assert synopsis.schema == spec.schema


@pytest.mark.parametrize("kind", ["gan", "vae"])
def test_central_training_composes_synopsis_and_dp_sgd_to_the_target(kind):
    spec = pretrained_spec(kind, epsilon=1.0, steps=4)
    model = train(small_frame(), spec)
    privacy = model.metadata["privacy"]
    history = [tuple(e) for e in privacy["accountant_history"]]
    synopsis = pretraining.synopsis_history(spec)
    assert synopsis and history[: len(synopsis)] == synopsis  # the synopsis' entries first
    assert history[len(synopsis) :] == [
        (privacy["noise_multiplier"], privacy["sample_rate"], privacy["steps"])
    ]
    recomputed = epsilon_of(history, spec.privacy.delta, "rdp")
    assert recomputed == pytest.approx(privacy["epsilon"])
    assert 0.99 <= recomputed <= 1.0
    # the synopsis alone is its share, on its own
    assert epsilon_of(synopsis, spec.privacy.delta, "rdp") == pytest.approx(0.5, rel=1e-3)
    assert privacy["pretraining"]["epsilon"] == pytest.approx(0.5, rel=1e-3)
    # no separate target histogram: its shares are the synopsis' (no cost of their own)
    assert privacy["released"]["target_marginal"]["source"] == "synopsis"
    assert len(model.sample(50, seed=1)) == 50


def test_pretraining_is_a_function_of_the_released_synopsis_alone(tmp_path):
    """A canary row in the table reaches the pre-trained weights only through the noisy
    measurements: pre-training takes the fitted synopsis (no rows), and the synopsis as
    saved to disk (its public artifact) gives bit-identical weights."""
    assert list(inspect.signature(pretraining.pretrained_modules).parameters) == [
        "spec",
        "synopsis",
    ]
    spec = pretrained_spec("vae")
    frame = small_frame()
    frame.loc[0, ["age", "cost"]] = [99, 9876.54321]  # the canary
    synopsis = pretraining.measure_synopsis([frame], spec)
    synopsis.save(tmp_path / "synopsis")
    released = SynthModel.load(tmp_path / "synopsis")
    assert isinstance(released, MarginalModel)
    first = pretraining.pretrained_modules(spec, synopsis)
    second = pretraining.pretrained_modules(spec, released)
    for name in first:
        for (key, a), b in zip(
            first[name].state_dict().items(), second[name].state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), f"{name}.{key}"


@settings(max_examples=25, deadline=None)
@given(
    epsilon=st.floats(0.5, 10.0),
    share=st.floats(0.05, 0.9),
    rows=st.integers(200, 9_000),  # delta 1e-4 needs fewer than 10,000 rows
    rounds_=st.integers(1, 8),
)
def test_a_nodes_composed_plan_never_exceeds_the_target(epsilon, share, rows, rounds_):
    raw = small_spec_dict("gan", epsilon, steps=40)
    raw["model"]["pretrain"] = "marginals"
    raw["privacy"]["pretrain_share"] = share
    raw["federation"]["rounds"] = rounds_
    spec = parse_spec(raw)
    plan = rounds.plan_node(spec, rows)
    releases = len(spec.federation.evaluation_rounds()) * len(rounds.EVALUATION_SCORES)
    history = [
        *pretraining.synopsis_history(spec),
        *plan.release_history(),
        *plan.evaluation_history(releases),
        *plan.round_history() * plan.rounds,
    ]
    assert epsilon_of(history, spec.privacy.delta, "rdp") <= epsilon * (1 + 1e-9)


def test_the_federations_initial_model_is_pretrained_from_the_synopsis():
    spec = pretrained_spec("gan")
    synopsis = pretraining.measure_synopsis([small_frame()], spec)
    fresh, pretrained = rounds.initial_model(spec), rounds.initial_model(spec, synopsis)
    assert rounds.layout(fresh) == rounds.layout(pretrained)  # same arrays travel
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(rounds.get_arrays(fresh), rounds.get_arrays(pretrained), strict=True)
    )
    described = pretrained.metadata["privacy"]["pretraining"]
    assert described["fitted_sha256"] == synopsis.fitted_digest()
    shares = pretrained.metadata["privacy"]["released"]["target_marginal"]["probabilities"]
    assert math.isclose(sum(shares), 1.0) and shares != [0.5, 0.5]
