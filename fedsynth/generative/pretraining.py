"""Pre-training a GAN or VAE on rows of a DP marginals synopsis (``model.pretrain``).

At epsilon around 1, DP-SGD alone does not teach a network how a rare class relates to the
other columns: on the bank table (3% defaulters) the GAN's rows gave a classifier a TSTR
ROC AUC of 0.58 and the VAE's 0.57, while the marginals kind, measuring a handful of noisy
histograms with the same budget, gave 0.93 (docs/benchmarks.md). So a network with
``model.pretrain = "marginals"``:

1. spends ``privacy.pretrain_share`` of ``target_epsilon`` on the marginals kind's
   measurements (:func:`synopsis_spec`: the same columns, each node's own noise, no
   evaluation) and fits them: the *synopsis*, a DP release like any other;
2. samples ``PRETRAIN_ROWS`` rows from the fitted synopsis and trains the network on them
   without DP (:func:`pretrained_modules`): anything computed from a DP release alone is
   post-processing and costs nothing more;
3. fine-tunes with DP-SGD on the real rows, its noise calibrated so that the synopsis'
   entries (:func:`synopsis_history`) and DP-SGD's compose to ``target_epsilon`` in one
   RDP history (the synopsis' discrete Gaussian is proven zCDP, which RDP accounts).

The functions of step 2 receive the fitted synopsis only, never a row: a row influences the
pre-trained weights through the noisy measurements and nothing else (a canary test checks
this). Centrally (``fedsynth train``) one party measures its table; in a federation the
three measurement rounds run over the nodes under secure aggregation and the server
pre-trains the initial global model from the registered synopsis (fedsynth.server.app).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn

from fedsynth.generative.codec import codec_of
from fedsynth.generative.marginals import (
    MarginalModel,
    domain_sizes,
    plan_for_spec,
    train_marginals,
)
from fedsynth.generative.model import architecture, build_modules
from fedsynth.generative.sgd import run_steps
from fedsynth.generative.spec import FederationSpec, parse_spec

#: Rows drawn from the synopsis to pre-train on. A fixed number, not the table's size: the
#: row count of a node's table is private, and these rows are free to draw.
PRETRAIN_ROWS = 20_000
#: Optimizer steps of pre-training (at the spec's batch size and learning rates).
PRETRAIN_STEPS = 1_000
Entries = list[tuple[float, float, int]]


def synopsis_spec(spec: FederationSpec) -> FederationSpec:
    """The marginals spec whose measurements make ``spec``'s synopsis: the same federation,
    columns and secure aggregation, ``pretrain_share`` of the budget, each node's own
    noise and no evaluation of its own (the network is what gets evaluated)."""
    raw = spec.model_dump(mode="python")
    raw["model"] = {"kind": "marginals", "default_bins": spec.model.default_bins}
    privacy = spec.privacy
    raw["privacy"].update(
        target_epsilon=(
            privacy.target_epsilon * privacy.pretrain_share if privacy.is_private else math.inf
        ),
        accountant="rdp",
        noise="own",
        evaluation_share=0.0,
    )
    return parse_spec(raw, source=f"{spec.federation.name} synopsis")


def synopsis_history(spec: FederationSpec) -> Entries:
    """The accountant entries of the synopsis' measurements, from the spec alone (every
    node adds the same noise, whatever its row count)."""
    if spec.model.pretrain == "none":
        return []
    synopsis = synopsis_spec(spec)
    return plan_for_spec(synopsis, domain_sizes(codec_of(synopsis))).total_history()


def measure_synopsis(frames: Sequence[pd.DataFrame], spec: FederationSpec) -> MarginalModel:
    """Step 1 on one party (or on frames summed as nodes' measurements are): the DP
    release. This is the only function here that sees rows."""
    return train_marginals(frames, synopsis_spec(spec))


def pretrained_modules(spec: FederationSpec, synopsis: MarginalModel) -> dict[str, nn.Module]:
    """Step 2: the spec's networks trained without DP on rows drawn from ``synopsis``,
    seeded by the spec, in training mode (DP-SGD fine-tunes them next)."""
    seed = spec.training.seed
    torch.manual_seed(seed)
    codec = codec_of(spec)
    modules = build_modules(spec.model.kind, codec, architecture(spec))
    data, levels = codec.encode(synopsis.sample(PRETRAIN_ROWS, seed=seed))
    public = _without_dp(spec)
    run_steps(
        modules,
        codec,
        data,
        levels,
        public,
        noise=0.0,
        sample_rate=1.0 / public.training.steps_per_epoch(PRETRAIN_ROWS),
        steps=PRETRAIN_STEPS,
        target=target_index(spec),
    )
    return modules


def target_index(spec: FederationSpec) -> int | None:
    """The target among the codec's discrete columns, where the networks condition on it
    (a categorical or boolean target without nulls), else None."""
    target = spec.schema.target
    if target is None or not target.is_discrete or target.nullable:
        return None
    return codec_of(spec).discrete_index(target.name)


def target_release(spec: FederationSpec, synopsis: MarginalModel) -> dict[str, Any] | None:
    """The target's shares from the synopsis' fitted one-way marginal: what unconditional
    sampling draws the target from, at no cost beyond the synopsis (it replaces the
    separate ``marginal_share`` histogram of training without pre-training)."""
    index = target_index(spec)
    if index is None:
        return None
    codec = codec_of(spec)
    position = codec.discrete_positions[index]
    shares = synopsis.one_way[position][: codec.discrete[index].n_bins].clip(min=0.0) + 1e-9
    return {
        "column": codec.discrete[index].column.name,
        "probabilities": (shares / shares.sum()).tolist(),
        "noise_multiplier": 0.0,  # no noise of its own: post-processing of the synopsis
        "source": "synopsis",
    }


def describe(spec: FederationSpec, synopsis: MarginalModel) -> dict[str, Any]:
    """What the model's metadata says of its pre-training."""
    privacy = synopsis.metadata["privacy"]
    return {
        "kind": "marginals",
        "share": spec.privacy.pretrain_share,
        "epsilon": privacy["epsilon"],
        "accountant_history": privacy["accountant_history"],
        "edges": synopsis.metadata["architecture"]["edges"],
        "rows": PRETRAIN_ROWS,
        "steps": PRETRAIN_STEPS,
        "fitted_sha256": synopsis.fitted_digest(),
    }


def _without_dp(spec: FederationSpec) -> FederationSpec:
    raw = spec.model_dump(mode="python")
    raw["privacy"]["target_epsilon"] = math.inf
    return parse_spec(raw, source=f"{spec.federation.name} pre-training")
