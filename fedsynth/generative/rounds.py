"""One node's share of federated training, without Flower: plan, release, train, score.

The federation exchanges a flat list of arrays: every trainable tensor of the model (all
modules, in ``state_dict`` order) followed by the target-column shares, carried in
messages as one vector (:func:`pack`). Each node fills the
last array with its own Gaussian-mechanism release of its target counts (made once, at its
first round, and re-sent unchanged after: re-sending a release costs nothing), so the
weighted average the server computes is the pooled share over the participants.

Everything a node sends is DP: the weights come from DP-SGD (critic or whole VAE; the GAN
generator is post-processing), the shares and the FedAvg weight (the noisy row count) from
the histogram release, and evaluation scores from a Gaussian mechanism with sensitivity
bounded as described in :func:`evaluation_scores`. All costs enter one accountant history
(``(sigma, 1.0, 1)`` per Gaussian release), which the node's ledger keeps
(``fedsynth.privacy.ledger``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedsynth.generative import pretraining
from fedsynth.generative.accounting import calibrate_noise, release_noise
from fedsynth.generative.codec import codec_of
from fedsynth.generative.distance import _gower_embedding, _nearest
from fedsynth.generative.marginals import MarginalModel
from fedsynth.generative.model import SynthModel, architecture, build_modules
from fedsynth.generative.schema import Schema
from fedsynth.generative.sgd import StepsRun, known_notices, run_steps
from fedsynth.generative.spec import FederationSpec
from fedsynth.generative.training import check_rows, library_versions
from fedsynth.generative.typed import _codes, _columns, _numbers, _threads
from fedsynth.generative.utility import synthetic_auc

#: Scalars a node may release per evaluation round (the plan budgets for all of them).
EVALUATION_SCORES = ("column_shapes", "tstr_auc", "dcr_mean")
#: Synthetic rows drawn for one evaluation.
EVALUATION_ROWS = 2000
#: Lower bounds on private counts are taken this many noise deviations below the release.
COUNT_MARGIN = 3.0


@dataclass(frozen=True)
class NodePlan:
    """What a node fixes before its first round, from its row count and the spec alone."""

    rows: int
    rounds: int
    sample_rate: float
    steps_per_round: int
    noise_multiplier: float  # DP-SGD
    marginal_sigma: float  # the target-count histogram (or the row count)
    evaluation_sigma: float  # each evaluation scalar

    def round_history(self) -> list[tuple[float, float, int]]:
        return [(self.noise_multiplier, self.sample_rate, self.steps_per_round)]

    def evaluation_history(self, releases: int) -> list[tuple[float, float, int]]:
        return [(self.evaluation_sigma, 1.0, releases)] if releases else []

    def release_history(self) -> list[tuple[float, float, int]]:
        return [(self.marginal_sigma, 1.0, 1)] if self.marginal_sigma > 0 else []


def plan_node(spec: FederationSpec, rows: int) -> NodePlan:
    """Noise calibrated once, so that the synopsis (with ``model.pretrain``), the release,
    every evaluation and all planned rounds together reach the spec's target epsilon (each
    round does the same number of steps)."""
    check_rows(rows, spec)
    privacy, training, rounds = spec.privacy, spec.training, spec.federation.rounds
    steps_per_epoch = training.steps_per_epoch(rows)
    per_round = max(1, math.ceil(training.planned_steps(rows) / rounds))
    if not privacy.is_private:
        return NodePlan(rows, rounds, 1.0 / steps_per_epoch, per_round, 0.0, 0.0, 0.0)
    eps = privacy.target_epsilon
    budget = functools.partial(
        release_noise, epsilon=eps, delta=privacy.delta, accountant=privacy.accountant
    )
    marginal_sigma = budget(share=max(privacy.marginal_share, 0.01), releases=1)
    evaluation_sigma = 0.0
    # a pre-trained network's synopsis was measured first, in its own rounds
    prior = [*pretraining.synopsis_history(spec), (marginal_sigma, 1.0, 1)]
    if privacy.evaluation_share > 0:
        releases = len(spec.federation.evaluation_rounds()) * len(EVALUATION_SCORES)
        evaluation_sigma = budget(share=privacy.evaluation_share, releases=releases)
        prior.append((evaluation_sigma, 1.0, releases))
    noise = calibrate_noise(
        target_epsilon=eps,
        delta=privacy.delta,
        sample_rate=1.0 / steps_per_epoch,
        steps=rounds * per_round,
        accountant=privacy.accountant,
        prior=prior,
    )
    return NodePlan(
        rows, rounds, 1.0 / steps_per_epoch, per_round, noise, marginal_sigma, evaluation_sigma
    )


# ---------------------------------------------------------------------------- the model


def target_column(spec: FederationSpec) -> str | None:
    """The column whose shares are released, or None (then a single row count is)."""
    target = spec.schema.target
    if target is None or not target.is_discrete or target.nullable:
        return None
    return target.name


def initial_model(spec: FederationSpec, synopsis: MarginalModel | None = None) -> SynthModel:
    """The round-0 global model: weights drawn from the spec's seed, no data involved; or,
    given the federation's ``synopsis`` (``model.pretrain``), the networks pre-trained on
    its rows and the target's shares from it (post-processing of that DP release)."""
    torch.manual_seed(spec.training.seed)
    codec = codec_of(spec)
    target = target_column(spec)
    k = codec.discrete[codec.discrete_index(target)].n_bins if target else 1
    shares = [1.0 / k] * k
    privacy: dict[str, Any] = {}
    if synopsis is None:
        modules = build_modules(spec.model.kind, codec, architecture(spec))
    else:
        modules = pretraining.pretrained_modules(spec, synopsis)
        release = pretraining.target_release(spec, synopsis)
        shares = release["probabilities"] if release else shares
        privacy["pretraining"] = pretraining.describe(spec, synopsis)
    return SynthModel(
        spec.model.kind, spec.schema, codec, modules, federated_metadata(spec, shares, privacy)
    )


def federated_metadata(
    spec: FederationSpec, shares: list[float], privacy: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Model metadata of a federated model; the server adds the per-node privacy report."""
    target = target_column(spec)
    released = {}
    if target is not None:
        released["target_marginal"] = {"column": target, "probabilities": list(shares)}
    return {
        "kind": spec.model.kind,
        "federation": {"name": spec.federation.name, "sector": spec.federation.sector},
        "schema": spec.schema.public_dict(),
        "codec": {"default_bins": spec.model.default_bins},
        "architecture": architecture(spec),
        "privacy": {
            "epsilon": "inf" if not spec.privacy.is_private else None,
            "delta": spec.privacy.delta if spec.privacy.is_private else 0.0,
            "accountant": spec.privacy.accountant,
            "released": released,
            **(privacy or {}),
        },
        "versions": library_versions(),
    }


def get_arrays(model: SynthModel) -> list[np.ndarray]:
    """Model weights (all modules, state_dict order) then the target shares."""
    arrays = [
        value.detach().cpu().numpy().astype(np.float32, copy=True)
        for module in model.modules.values()
        for value in module.state_dict().values()
    ]
    return [*arrays, np.asarray(shares_of(model), dtype=np.float32)]


def set_arrays(model: SynthModel, arrays: list[np.ndarray]) -> None:
    """Load weights and shares from :func:`get_arrays`' layout; shapes must match."""
    expected = sum(len(m.state_dict()) for m in model.modules.values()) + 1
    if len(arrays) != expected:
        raise ValueError(f"expected {expected} arrays for this model, got {len(arrays)}")
    it = iter(arrays)
    for name, module in model.modules.items():
        state = module.state_dict()
        loaded = {}
        for key, value in state.items():
            array = next(it)
            if tuple(array.shape) != tuple(value.shape):
                raise ValueError(
                    f"{name}.{key}: expected shape {tuple(value.shape)}, got {array.shape}"
                )
            loaded[key] = torch.from_numpy(np.array(array, dtype=np.float32))
        module.load_state_dict(loaded)
    shares = np.asarray(next(it), dtype=np.float64).clip(min=0.0)
    release = model.metadata["privacy"]["released"].get("target_marginal")
    if release is not None:
        release["probabilities"] = (shares / max(shares.sum(), 1e-12)).tolist()


def layout(model: SynthModel) -> list[tuple[int, ...]]:
    """The shapes of :func:`get_arrays`' list for this model (what :func:`unpack` needs)."""
    return [tuple(a.shape) for a in get_arrays(model)]


def pack(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """:func:`get_arrays`' list as one float32 vector, the form messages carry.

    Flower sends each array of a message as its own object, one request each: on
    loopback a SuperNode took 2-2.8 s to pull the 35 arrays of the bank GAN from the
    SuperLink and its ClientApp as long again from the SuperNode, per message
    (docs/deployment.md, "Round time"). One vector is one object. Element-wise steps
    (FedAvg, SecAgg+'s clipping and quantisation, the server step) are unchanged by it.
    """
    return [np.concatenate([np.asarray(a, dtype=np.float32).ravel() for a in arrays])]


def unpack(packed: list[np.ndarray], shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """:func:`pack`'s vector back into arrays of ``shapes`` (see :func:`layout`)."""
    sizes = [math.prod(s) for s in shapes]
    if len(packed) != 1 or packed[0].ndim != 1 or packed[0].size != sum(sizes):
        got = [tuple(a.shape) for a in packed]
        raise ValueError(
            f"expected the packed model, one vector of {sum(sizes)} values; got arrays {got}"
        )
    parts = np.split(np.asarray(packed[0], dtype=np.float32), np.cumsum(sizes)[:-1])
    return [part.reshape(shape) for part, shape in zip(parts, shapes, strict=True)]


def shares_of(model: SynthModel) -> list[float]:
    release = model.metadata["privacy"]["released"].get("target_marginal")
    return list(release["probabilities"]) if release else [1.0]


def server_step(spec: FederationSpec, updates: list[tuple[float, int]]) -> float:
    """How far the server moves along the nodes' weighted-average update in a round.

    ``updates`` holds each participant's FedAvg weight (its noisy row count) and its DP-SGD
    steps that round. Plain FedAvg (factor 1) moves the global model as far as the
    weighted-average node moved: about ``sum(w * steps) / sum(w)`` Adam steps, while one
    model trained on the pooled rows takes ``planned_steps(pooled rows) / rounds`` steps a
    round (each Adam step moves the weights about one learning rate, whatever the batch).
    With the bank table over three non-IID nodes that is 38.4 against 64 steps, and
    federated quality fell 0.055 below central (bench/federation.py, mean of 3 seeds;
    0.001 above with "auto"). "auto" scales the average update by
    that ratio (never below 1, never above the nodes' summed steps): an extrapolating
    server learning rate in the sense of Reddi et al., "Adaptive Federated Optimization"
    (ICLR 2021), with the factor set by step counts as FedNova (Wang et al., NeurIPS 2020)
    normalises by them. It uses only what the server already holds (weights, reported
    steps) and keeps no state across rounds, so a resumed run is unchanged.
    """
    chosen = spec.federation.server_learning_rate
    if chosen != "auto":
        return float(chosen)
    total = sum(w for w, _ in updates)
    mean_steps = sum(w * t for w, t in updates) / total if total > 0 else 0.0
    if mean_steps <= 0:
        return 1.0
    pooled = spec.training.planned_steps(round(total)) / spec.federation.rounds
    return max(1.0, min(pooled, sum(t for _, t in updates)) / mean_steps)


def step_along(
    current: list[np.ndarray], average: list[np.ndarray], factor: float
) -> list[np.ndarray]:
    """``current + factor * (average - current)`` for every weight; the target shares (the
    last array, :func:`get_arrays`) are the nodes' pooled release and are taken as averaged."""
    if len(current) != len(average):
        raise ValueError(f"expected {len(current)} arrays, got {len(average)}")
    stepped = [
        (c + factor * (a - c)).astype(np.float32, copy=False)
        for c, a in zip(current[:-1], average[:-1], strict=True)
    ]
    return [*stepped, average[-1]]


# ---------------------------------------------------------------------------- one node


def encode(frame: pd.DataFrame, spec: FederationSpec) -> tuple[torch.Tensor, torch.Tensor]:
    codec = codec_of(spec)
    return codec.encode(frame)


def release_counts(
    levels: torch.Tensor, spec: FederationSpec, plan: NodePlan, seed: int
) -> list[float]:
    """Gaussian-mechanism counts of the target's categories (or the row count alone).

    L2 sensitivity 1: one row moves one count by one. Without DP the exact counts.
    """
    codec = codec_of(spec)
    target = target_column(spec)
    if target is None:
        counts = torch.tensor([float(levels.shape[0])], dtype=torch.float64)
    else:
        j = codec.discrete_index(target)
        counts = torch.bincount(levels[:, j], minlength=codec.discrete[j].n_bins).double()
    if plan.marginal_sigma > 0:
        rng = torch.Generator().manual_seed(seed)
        counts = counts + torch.randn(counts.shape, dtype=torch.float64, generator=rng) * (
            plan.marginal_sigma
        )
    return counts.tolist()


def public_lower_bound(counts: list[float], plan: NodePlan) -> float:
    """A count that the true total exceeds except with probability ~0.1% (3 sigma)."""
    spread = COUNT_MARGIN * plan.marginal_sigma * math.sqrt(len(counts))
    return max(1.0, sum(counts) - spread)


def train_round(
    model: SynthModel,
    data: torch.Tensor,
    levels: torch.Tensor,
    spec: FederationSpec,
    plan: NodePlan,
    *,
    seed: int,
) -> StepsRun:
    """The round's local DP-SGD steps on the global model (updated in place)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see training.train: small MLPs run faster on one thread
    torch.manual_seed(seed)
    target = target_column(spec)
    try:
        for module in model.modules.values():
            module.train()
        with known_notices():
            run = run_steps(
                model.modules,
                model.codec,
                data,
                levels,
                spec,
                noise=plan.noise_multiplier,
                sample_rate=plan.sample_rate,
                steps=plan.steps_per_round,
                target=model.codec.discrete_index(target) if target else None,
            )
    finally:
        torch.set_num_threads(threads)
        for module in model.modules.values():
            module.eval()
    model.generator = (
        model.modules["generator"] if model.kind == "gan" else model.modules["vae"].decoder  # type: ignore[assignment]
    )
    return run


def row_dcr(real: pd.DataFrame, synthetic: pd.DataFrame, schema: Schema) -> np.ndarray | None:
    """Each real row's Gower distance (in [0, 1], over the declared bounds) to its closest
    synthetic row; None for a schema with no modelled column. A row's distance depends on
    that row and the synthetic sample only, so a sum over rows moves by at most 1 when a
    row is added or removed."""
    real_emb, synth_emb = _gower_embedding(
        [_columns(real, schema, "node rows"), _columns(synthetic, schema, "synthetic")], schema
    )
    if not real_emb.shape[1]:
        return None
    return np.clip(_nearest(synth_emb, real_emb) / len(schema.modelled), 0.0, 1.0)


def release_shapes(real: pd.DataFrame, synthetic: pd.DataFrame, schema: Schema) -> float:
    """Column shapes as a node releases them: mean over columns of 1 - KS (numeric and
    datetime) or 1 - TV (categorical and boolean), with null counted as a value and each
    distribution taken over all rows. Adding or removing one of n rows then moves every
    column's distance, and so the mean, by at most 1/n.

    Not :func:`fedsynth.generative.quality.column_shapes` (SDMetrics' score), which drops
    nulls and divides by the non-null count: one row can move it by 1/n_nonnull, which no
    public figure bounds (the node releases its target counts, not its columns' null
    counts), and a column with no non-null value turns NaN and drops out of the mean. On a
    column without nulls the two agree."""
    real = _columns(real, schema, "node rows")
    synthetic = _columns(synthetic, schema, "synthetic")
    scores = []
    for col in schema.modelled:
        if col.is_numeric:
            # null at +inf: F(x) = share of rows <= x, over all rows, nulls never counted
            r, s = (np.sort(_numbers(f[col.name], col)) for f in (real, synthetic))
            points = np.concatenate([r[~np.isnan(r)], s[~np.isnan(s)]])
            if not points.size:
                scores.append(1.0)  # both all null: the same distribution
                continue
            cdf_r = np.searchsorted(r, points, side="right") / len(r)
            cdf_s = np.searchsorted(s, points, side="right") / len(s)
            scores.append(1.0 - float(np.abs(cdf_r - cdf_s).max()))
        else:
            k = len(col.levels) + 1  # the levels and null
            r_counts, s_counts = (
                np.bincount(_codes(f[col.name], col), minlength=k) for f in (real, synthetic)
            )
            distance = 0.5 * np.abs(r_counts / len(real) - s_counts / len(synthetic)).sum()
            scores.append(1.0 - float(distance))
    return float(np.mean(scores))


def evaluation_scores(
    model: SynthModel,
    frame: pd.DataFrame,
    spec: FederationSpec,
    plan: NodePlan,
    counts: list[float],
    *,
    seed: int,
) -> tuple[dict[str, float], list[tuple[float, float, int]]]:
    """The global model scored on this node's rows, each score a Gaussian release.

    Every score is an average over the node's rows of a per-row quantity in [0, 1] (or
    a statistic whose change when one row is added or removed is bounded the same way), so
    its sensitivity is 1/n; n is private, so a public lower bound from the node's released
    counts stands in for it (:func:`public_lower_bound`):

    - ``column_shapes``: mean over columns of 1 - KS or 1 - TV distance between the
      node's rows and a synthetic sample, with null counted as a value and every
      distribution over all n rows (:func:`release_shapes`), so each distance moves by at
      most 1/n;
    - ``tstr_auc``: ROC AUC on the node's rows of a classifier fitted on synthetic rows
      (binary target only); it moves by at most 1 / min(positives, negatives);
    - ``dcr_mean``: mean over the node's rows of the Gower distance (in [0, 1]) to the
      closest synthetic row; low values mean synthetic rows sit on real ones.

    Returns the noisy scores, each with ``<name>_sd``, the standard deviation of its noise
    (computed from public values only, so free to release), and the accountant entries they
    cost. Without DP, the exact scores and no entries.
    """
    with _threads(1):  # OpenMP/BLAS threads spin against each other on a busy node
        synthetic = model.sample(EVALUATION_ROWS, seed=seed)
        schema = spec.schema
        real = _columns(frame, schema, "node rows")
        exact: dict[str, tuple[float, float]] = {}  # score -> (value, sensitivity)
        n_public = public_lower_bound(counts, plan)
        exact["column_shapes"] = (release_shapes(real, synthetic, schema), 1.0 / n_public)
        auc = synthetic_auc(synthetic, real, schema, seed=seed)
        if auc is not None and len(counts) == 2:
            smaller = min(counts) - COUNT_MARGIN * plan.marginal_sigma
            exact["tstr_auc"] = (auc, 1.0 / max(1.0, smaller))
        distances = row_dcr(real, synthetic, schema)
        if distances is not None:
            exact["dcr_mean"] = (float(distances.mean()), 1.0 / n_public)
        if plan.evaluation_sigma <= 0:
            return {k: v for k, (v, _) in exact.items()}, []
        rng = np.random.default_rng(seed)
        noisy: dict[str, float] = {}
        for name, (value, sens) in exact.items():
            sd = plan.evaluation_sigma * sens
            noisy[name] = float(np.clip(value + rng.normal() * sd, 0.0, 1.0))
            noisy[f"{name}_sd"] = float(sd)
        return noisy, plan.evaluation_history(len(exact))
