"""Marginal-based synthesis in the style of MST: a graphical model fitted to noisy marginals.

At epsilon around 1, methods that measure a few low-order marginals with Gaussian noise and
fit a graphical model to them (MST, AIM; McKenna et al.) beat DP-SGD generators on tables:
the noise goes into a handful of counts instead of every weight of a network.

Every column is discretised by the codec (fedsynth.generative.codec): categories and
booleans as declared, numeric columns into the equal-width bins of their *declared* range,
nulls into one extra cell. No bin edge depends on data. Three measurements, each a sum over
the nodes of a federation (one node when trained centrally):

1. ``one_way``: every column's histogram.
2. ``scores``: for every pair of columns, the L1 distance between the node's pair counts and
   what independence under the released one-way shares predicts. The maximum spanning tree
   of the summed noisy scores picks the pairs worth measuring (MST's selection, with the
   Gaussian mechanism instead of the exponential one so that nodes' scores can be summed).
3. ``two_way``: the histograms of the tree's pairs.

Then, with ``privacy.evaluation_share`` > 0, each node fits the same model from the finished
state and releases noisy sums that score it on its rows (:func:`evaluation_release`).

mbi (private-pgm's estimator) fits a Markov random field to all measurements. The model
stores the fitted one- and two-way marginals of the tree (less the estimator's residue:
cells expected to hold under one row) and samples from them with its own
seeded, numpy-only sampler (mbi's ``synthetic_data`` draws from numpy's global RNG and takes
no conditions); conditions are exact, by message passing over the tree.

Privacy. Counts get discrete Gaussian noise from OpenDP (floating-point Gaussian noise is
attackable, as the private-pgm docs warn), and scores, which are real numbers, are floored to
integers first. Adding or removing one row moves each histogram by 1 in L2 and each pair's
score by at most 2 (one count, plus the expected counts' total mass of one row), so a phase of
``k`` histograms with noise ``sigma`` is the accountant history entry ``(sigma, 1.0, k)``
and the scores are ``(sigma / 2, 1.0, pairs)``: Gaussian mechanisms with sample rate 1, in
the same terms as DP-SGD (fedsynth.generative.accounting). The discrete Gaussian satisfies
the same zCDP bound as the continuous one (Canonne, Kamath, Steinke 2020), which is why this
kind is accounted with the RDP accountant; PRV's tighter bound is proven for the continuous
Gaussian only.

Whose noise. ``privacy.noise`` says which of two threat models a federation takes:

- ``"own"`` (the default): each node adds the full noise to its own measurements, so its
  release is protected by its own noise even if the server and every other node collude.
  The price: a sum over ``m`` nodes carries ``sqrt(m)`` times the noise of one central
  measurement.
- ``"shared"``: the noise is split across the ``federation.min_nodes`` nodes that secure
  aggregation must sum (the server refuses to unmask fewer, fedsynth.server.secagg): each
  adds noise of scale ``sigma / sqrt(min_nodes)``, and the *sum* carries ``sigma``, as one
  central measurement would. A sum of independent discrete Gaussians is not exactly a
  discrete Gaussian; the distributed discrete Gaussian's bound (Kairouz, Liu, Steinke 2021,
  Proposition 14) charges ``(Delta / sigma + sqrt(d) tau)^2 / 2`` zCDP per mechanism with
  ``tau = 10 sum_{k<n} exp(-2 pi^2 s^2 k / (k + 1))`` for per-node scale ``s``, which is
  what the plan's history carries. ``tau`` is computed, not assumed: below 1e-80 at
  epsilon 1 on the sector tables and 1e-11 on bank at epsilon 3, but on a 6-column table at
  epsilon 8 it costs 3.6 % more noise. This protects a node only while its update is hidden
  in the sum: against a server that sees it (colluding with the other nodes of the sum, or
  unmasking fewer nodes than it should) the node is protected by its own share alone,
  whose epsilon (``own_noise_history``) the ledger and the dashboards show beside the
  budget.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedsynth.generative.accounting import epsilon_of
from fedsynth.generative.codec import Codec, codec_of
from fedsynth.generative.model import DEFAULT_CHUNK, SynthModel, check_sample_size
from fedsynth.generative.schema import Schema
from fedsynth.generative.spec import FederationSpec, SecureAggregationSection

KIND = "marginals"
#: Shares of the zCDP budget (rho) of the three measurements. MST splits evenly; the
#: two-way histograms are what the model is made of, so they get most of it here.
SHARES = {"one_way": 0.1, "scores": 0.1, "two_way": 0.8}
#: Round r of a marginals federation measures PHASES[r - 1].
PHASES = tuple(SHARES)
#: Sensitivity of one pair's score to adding or removing a row (see the module docstring).
SCORE_SENSITIVITY = 2
#: Mirror-descent iterations of the fit.
FIT_ITERATIONS = 1500
#: What a node releases when it scores the fitted model (``evaluation_release``), each an
#: integer sum over its rows with this sensitivity (add or remove one row).
EVALUATION_RELEASES = {"rows": 1, "column_shapes": 2, "dcr_mean": 1}
#: A fitted cell expected to hold fewer rows than this is the estimator's residue, not data:
#: the fitted marginals drop it (post-processing; see ``_without_residue``).
RESIDUE_ROWS = 1.0


# ---------------------------------------------------------------------- domain and codes
def domain_sizes(codec: Codec) -> list[int]:
    """Cells per column: its levels or bins, plus one for null where allowed."""
    return [c.block_size for c in codec.columns]


def column_codes(codec: Codec, frame: pd.DataFrame) -> np.ndarray:
    """Each row's cell in each column (rows x columns, int64), null in the last cell."""
    codes = np.empty((len(frame), len(codec.columns)), dtype=np.int64)
    for j, column in enumerate(codec.columns):
        codes[:, j] = column.codes_and_offsets(frame[column.column.name])[0]
    return codes


def all_pairs(n_columns: int) -> list[tuple[int, int]]:
    return list(combinations(range(n_columns), 2))


def histogram(codes: np.ndarray, sizes: Sequence[int], clique: Sequence[int]) -> np.ndarray:
    """Exact counts of ``clique``'s cells (C order over the clique's columns)."""
    shape = [sizes[j] for j in clique]
    if not len(codes):
        return np.zeros(math.prod(shape), dtype=np.int64)
    flat = np.ravel_multi_index([codes[:, j] for j in clique], shape)
    return np.bincount(flat, minlength=math.prod(shape))


# ---------------------------------------------------------------------- noise and budget
@dataclass(frozen=True)
class MeasurementPlan:
    """Noise of each measurement's *sum*, the same for every node of a federation; with
    ``split`` > 1 (shared noise) each node adds ``1 / sqrt(split)`` of it."""

    n_columns: int
    sigma_one_way: float  # per histogram cell
    sigma_scores: float  # per pair score
    sigma_two_way: float  # per histogram cell
    split: int = 1  # nodes the noise is split across (1: each node adds all of it)
    cells: int = 0  # largest vector one mechanism adds noise to (bounds tau's d)
    # noise multiplier of each node's evaluation releases (0: no evaluation); the noise
    # added is this times each release's sensitivity (EVALUATION_RELEASES)
    sigma_evaluation: float = 0.0

    @property
    def n_pairs(self) -> int:
        return self.n_columns * (self.n_columns - 1) // 2

    @property
    def n_edges(self) -> int:
        return max(self.n_columns - 1, 0)

    def history(self, phase: str, *, own_noise: bool = False) -> list[tuple[float, float, int]]:
        """Accountant entries of one phase's sum (see the module docstring). With
        ``own_noise``: the same phase protected by one node's own noise alone, what bounds
        a node whose update the server sees (equal unless the noise is split)."""
        if math.isinf(self.sigma_two_way) or self.sigma_two_way == 0:
            return []
        count = {"one_way": self.n_columns, "scores": self.n_pairs, "two_way": self.n_edges}
        if phase not in count:
            raise ValueError(f"unknown measurement phase {phase!r}")
        if not count[phase]:
            return []
        sensitivity = SCORE_SENSITIVITY if phase == "scores" else 1
        if own_noise:
            multiplier = self.node_sigma(phase) / sensitivity
        else:
            multiplier = distributed_multiplier(
                self.sigmas[phase], sensitivity, self.split, self.cells
            )
        return [(multiplier, 1.0, count[phase])]

    def full_history(self, *, own_noise: bool = False) -> list[tuple[float, float, int]]:
        """The three measurements' entries (see ``history`` for ``own_noise``)."""
        return [e for phase in PHASES for e in self.history(phase, own_noise=own_noise)]

    def evaluation_history(self) -> list[tuple[float, float, int]]:
        """The evaluation's releases (in the clear, so the same under either noise model)."""
        if self.sigma_evaluation <= 0:
            return []
        return [(self.sigma_evaluation, 1.0, len(EVALUATION_RELEASES))]

    def total_history(self, *, own_noise: bool = False) -> list[tuple[float, float, int]]:
        """Everything a node of the federation releases: the measurements and the
        evaluation; this is what the plan calibrates to the target."""
        return [*self.full_history(own_noise=own_noise), *self.evaluation_history()]

    @property
    def sigmas(self) -> dict[str, float]:
        """Each phase's noise in the sum, by phase name."""
        return {
            "one_way": self.sigma_one_way,
            "scores": self.sigma_scores,
            "two_way": self.sigma_two_way,
        }

    def node_sigma(self, phase: str) -> float:
        """The noise one node adds to ``phase``'s measurements."""
        return self.sigmas[phase] / math.sqrt(self.split)

    def sum_std(self, phase: str, nodes: int) -> float:
        """Noise standard deviation of a sum of ``nodes`` nodes' measurements."""
        return self.node_sigma(phase) * math.sqrt(max(nodes, 1))


def distributed_tau(node_sigma: float, nodes: int) -> float:
    """KLS 2021's tau for a sum of ``nodes`` discrete Gaussians of scale ``node_sigma``
    (0 for one node: a single discrete Gaussian needs no correction)."""
    return 10 * sum(
        math.exp(-2 * math.pi**2 * node_sigma**2 * k / (k + 1)) for k in range(1, nodes)
    )


def distributed_multiplier(sigma: float, sensitivity: int, nodes: int, cells: int) -> float:
    """Noise multiplier of the Gaussian mechanism whose RDP bounds a sum of ``nodes``
    discrete Gaussians of scale ``sigma / sqrt(nodes)`` added to a query of L2
    ``sensitivity`` in ``cells`` dimensions: KLS 2021 Proposition 14's third bound,
    ``alpha / 2 * (sensitivity / sigma + sqrt(cells) tau)^2``, which is a Gaussian
    mechanism's RDP curve with multiplier ``1 / (sensitivity / sigma + sqrt(cells) tau)``."""
    if nodes < 1:
        raise ValueError("the noise is split across at least one node")
    if nodes > 1 and cells < 1:
        raise ValueError("split noise needs the measured vector's dimension for tau")
    tau = distributed_tau(sigma / math.sqrt(nodes), nodes)
    return 1.0 / (sensitivity / sigma + math.sqrt(cells) * tau)


def plan_measurements(
    n_columns: int,
    epsilon: float,
    delta: float,
    *,
    split: int = 1,
    cells: int = 0,
    evaluation_share: float = 0.0,
) -> MeasurementPlan:
    """The noise that makes the three measurements (and the evaluation, if any) together
    cost ``epsilon`` (at ``delta``, RDP accountant); no noise for epsilon = inf. ``split``
    > 1 plans noise shared across that many nodes, ``cells`` being the largest vector one
    mechanism measures; ``evaluation_share`` > 0 plans an evaluation that takes that share
    of the zCDP budget (rho), as the measurements take theirs (``SHARES``, of the rest).
    (GAN and VAE spend ``privacy.evaluation_share`` of epsilon on their scores alone; the
    RDP accountant this kind needs cannot certify an epsilon below about 0.2 at delta 1e-5,
    so at epsilon 1 that reading would leave no plan.)"""
    if n_columns < 1:
        raise ValueError("a marginal model needs at least one column")
    if math.isinf(epsilon):
        return MeasurementPlan(n_columns, 0.0, 0.0, 0.0, split, cells)
    share = float(evaluation_share)
    return _plan(n_columns, float(epsilon), float(delta), int(split), int(cells), share)


def plan_for_spec(
    spec: FederationSpec, sizes: Sequence[int], *, central: bool = False
) -> MeasurementPlan:
    """The spec's plan: noise split across ``federation.min_nodes`` when ``privacy.noise``
    is "shared", each node's own otherwise. ``central``: one party measures all the rows
    and adds all the noise, whatever the spec says about splitting it."""
    shared = spec.privacy.noise == "shared" and not central
    return plan_measurements(
        len(sizes),
        spec.privacy.target_epsilon,
        spec.privacy.delta,
        split=spec.federation.min_nodes if shared else 1,
        cells=largest_measurement(sizes),
        evaluation_share=0.0 if central else spec.privacy.evaluation_share,
    )


def largest_measurement(sizes: Sequence[int]) -> int:
    """Cells of the largest vector any one mechanism adds noise to: a pair's histogram,
    a column's, or the pairs' scores."""
    pairs = all_pairs(len(sizes))
    return max([*sizes, len(pairs), *(sizes[i] * sizes[j] for i, j in pairs)])


@functools.lru_cache(maxsize=64)
def _plan(
    n_columns: int, epsilon: float, delta: float, split: int, cells: int, evaluation: float
) -> MeasurementPlan:
    def plan_for(total: float) -> MeasurementPlan:
        # a phase of k Gaussian mechanisms with sensitivity s and noise sigma costs
        # k s^2 / (2 sigma^2) zCDP (tau, if any, is in the history that spent() checks);
        # the evaluation takes its share of the total, the measurements the rest
        rho = (1 - evaluation) * total
        pairs = n_columns * (n_columns - 1) // 2
        one = math.sqrt(n_columns / (2 * SHARES["one_way"] * rho))
        scores = SCORE_SENSITIVITY * math.sqrt(max(pairs, 1) / (2 * SHARES["scores"] * rho))
        two = math.sqrt(max(n_columns - 1, 1) / (2 * SHARES["two_way"] * rho))
        releases = len(EVALUATION_RELEASES)
        scored = math.sqrt(releases / (2 * evaluation * total)) if evaluation > 0 else 0.0
        return MeasurementPlan(n_columns, one, scores, two, split, cells, scored)

    def spent(rho: float) -> float:
        return epsilon_of(plan_for(rho).total_history(), delta, "rdp")

    # rho-zCDP gives epsilon = rho + 2 sqrt(rho log(1/delta)): a bracket for the search
    lo, hi = 1e-9, max(epsilon, 1e-3)
    while spent(hi) <= epsilon:
        lo, hi = hi, hi * 2
    for _ in range(60):  # bisection on log(rho): RDP evaluations cost microseconds
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if spent(mid) <= epsilon else (lo, mid)
        if hi / lo < 1 + 1e-6:
            break
    return plan_for(lo)


def discrete_gaussian(values: np.ndarray, sigma: float, sensitivity: int = 1) -> np.ndarray:
    """``values`` (integers) plus discrete Gaussian noise of scale ``sigma``, from OpenDP.

    Checks OpenDP's own privacy map against the zCDP this module accounts for.
    """
    values = np.asarray(values, dtype=np.int64)
    if sigma == 0:
        return values.copy()
    measurement = _gaussian(float(sigma))
    rho = measurement.map(int(sensitivity))
    expected = sensitivity**2 / (2 * sigma**2)
    if rho > expected * (1 + 1e-9):
        raise RuntimeError(f"OpenDP charges rho={rho} for what is accounted as {expected}")
    return np.asarray(measurement(values.tolist()), dtype=np.int64)


@functools.lru_cache(maxsize=16)
def _gaussian(sigma: float) -> Any:
    import opendp.prelude as dp

    dp.enable_features("contrib")
    return dp.m.make_gaussian(
        dp.vector_domain(dp.atom_domain(T=int)), dp.l2_distance(T=int), scale=sigma
    )


# ---------------------------------------------------------------------- node measurements
def measure_one_way(codes: np.ndarray, sizes: Sequence[int], sigma: float) -> list[np.ndarray]:
    """Each column's noisy histogram (on the node: the only place rows are)."""
    return [discrete_gaussian(histogram(codes, sizes, (j,)), sigma) for j in range(len(sizes))]


def pair_scores(
    codes: np.ndarray, sizes: Sequence[int], shares: Sequence[np.ndarray]
) -> np.ndarray:
    """Floored L1 distance, for every pair, between this node's pair counts and its row
    count times the product of the released one-way ``shares``."""
    n = len(codes)
    scores = []
    for i, j in all_pairs(len(sizes)):
        counts = histogram(codes, sizes, (i, j)).reshape(sizes[i], sizes[j])
        expected = n * np.outer(shares[i], shares[j])
        scores.append(math.floor(float(np.abs(counts - expected).sum())))
    return np.asarray(scores, dtype=np.int64)


def measure_scores(
    codes: np.ndarray, sizes: Sequence[int], shares: Sequence[np.ndarray], sigma: float
) -> np.ndarray:
    return discrete_gaussian(pair_scores(codes, sizes, shares), sigma, SCORE_SENSITIVITY)


def measure_two_way(
    codes: np.ndarray, sizes: Sequence[int], edges: Sequence[tuple[int, int]], sigma: float
) -> list[np.ndarray]:
    return [discrete_gaussian(histogram(codes, sizes, edge), sigma) for edge in edges]


# ---------------------------------------------------------------------- server side
def shares_from(one_way: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Released one-way histograms as shares (negative noisy counts clipped)."""
    out = []
    for counts in one_way:
        positive = np.clip(np.asarray(counts, dtype=np.float64), 0, None) + 1e-9
        out.append(positive / positive.sum())
    return out


def spanning_tree(scores: np.ndarray, n_columns: int) -> list[tuple[int, int]]:
    """The pairs of the maximum spanning tree of the (noisy) scores, each as (i, j), i < j."""
    import networkx as nx

    graph = nx.Graph()
    graph.add_nodes_from(range(n_columns))
    for (i, j), score in zip(all_pairs(n_columns), np.asarray(scores), strict=True):
        graph.add_edge(i, j, weight=float(score))
    tree = nx.maximum_spanning_tree(graph)
    return sorted((min(i, j), max(i, j)) for i, j in tree.edges())


def fit_tree(
    sizes: Sequence[int],
    one_way: Sequence[np.ndarray],
    two_way: Sequence[np.ndarray],
    edges: Sequence[tuple[int, int]],
    *,
    std_one_way: float,
    std_two_way: float,
    iterations: int = FIT_ITERATIONS,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Consistent one- and two-way probabilities of the tree, fitted with mbi to the noisy
    sums (their noise standard deviations weigh them)."""
    mbi = _mbi()
    names = [f"c{j}" for j in range(len(sizes))]
    domain = mbi.Domain(names, list(sizes))
    # a zero std (no DP) would divide by zero in the loss weights: any equal value will do
    one_std, two_std = (max(s, 1.0) for s in (std_one_way, std_two_way))
    measurements = [
        mbi.LinearMeasurement(np.asarray(y, dtype=np.float64), (names[j],), one_std)
        for j, y in enumerate(one_way)
    ] + [
        mbi.LinearMeasurement(np.asarray(y, dtype=np.float64), (names[i], names[j]), two_std)
        for (i, j), y in zip(edges, two_way, strict=True)
    ]
    model = mbi.estimation.MirrorDescent().estimate(domain, measurements, iters=iterations)
    ones = [_counts(model.project((names[j],))) for j in range(len(sizes))]
    pairs = [
        _counts(model.project((names[i], names[j]))).reshape(sizes[i], sizes[j]) for i, j in edges
    ]
    ones = [np.where(c < RESIDUE_ROWS, 0.0, c) for c in ones]
    pairs = [
        _normalised(_without_residue(c, ones[i] > 0, ones[j] > 0))
        for (i, j), c in zip(edges, pairs, strict=True)
    ]
    return [_normalised(c) for c in ones], pairs


def _counts(factor: Any) -> np.ndarray:
    return np.clip(np.asarray(factor.datavector(flatten=True), dtype=np.float64), 0, None)


def _normalised(values: np.ndarray) -> np.ndarray:
    total = values.sum()
    return values / total if total > 0 else np.full(values.shape, 1 / values.size)


def _without_residue(counts: np.ndarray, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """A fitted pair table without the cells expected under ``RESIDUE_ROWS`` rows.

    Mirror descent fits a log-linear model, which never reaches zero: fitted to exact
    counts, retail's empty price bins kept 0.7 rows each, and 40,000 sampled rows then held
    prices of $0.57 and $39.80 that no row had. ``rows`` and ``columns`` say which values
    the one-way marginals kept; a kept value whose row or column would lose all its cells
    keeps them, so that it still has a conditional to sample from."""
    allowed = counts * np.outer(rows, columns)
    kept = np.where(allowed < RESIDUE_ROWS, 0.0, allowed)
    # first from the allowed cells; a kept value whose mass lay only beside dropped values
    # then gets its fitted row, as it was
    for source, row_mass, column_mass in (
        (allowed, allowed.sum(axis=1) > 0, allowed.sum(axis=0) > 0),
        (counts, rows, columns),
    ):
        emptied = row_mass & (kept.sum(axis=1) == 0)
        kept[emptied, :] = source[emptied, :]
        emptied = column_mass & (kept.sum(axis=0) == 0)
        kept[:, emptied] = source[:, emptied]
    return kept


@functools.cache
def _mbi() -> Any:
    """mbi with JAX in float64 (mbi warns that float32 stalls its estimator) and without
    JAX's persistent compilation cache (mbi's many small programs make it a loss)."""
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_enable_compilation_cache", False)
    import mbi

    return mbi


# ---------------------------------------------------------------------- the model
class MarginalModel(SynthModel):
    """A tree of fitted one- and two-way marginals over the codec's cells.

    Same interface as the GAN and VAE (sampling, conditions, artifact, registry); its
    "weights" are the fitted probabilities, post-processing of DP measurements.
    """

    def __init__(
        self,
        schema: Schema,
        codec: Codec,
        one_way: Sequence[np.ndarray],
        edges: Sequence[tuple[int, int]],
        two_way: Sequence[np.ndarray],
        metadata: dict[str, Any],
    ) -> None:
        self.kind = KIND
        self.schema = schema
        self.codec = codec
        self.modules = {}
        self.metadata = metadata
        self.sizes = domain_sizes(codec)
        self.one_way = [np.asarray(p, dtype=np.float64) for p in one_way]
        self.edges = [(int(i), int(j)) for i, j in edges]
        self.two_way = [np.asarray(p, dtype=np.float64) for p in two_way]
        if len(self.one_way) != len(self.sizes) or any(
            p.shape != (s,) for p, s in zip(self.one_way, self.sizes, strict=True)
        ):
            raise ValueError("one-way marginals do not fit the schema's columns")
        for (i, j), p in zip(self.edges, self.two_way, strict=True):
            if p.shape != (self.sizes[i], self.sizes[j]):
                raise ValueError(f"two-way marginal of columns {i} and {j} has shape {p.shape}")
        self._neighbours: dict[int, list[tuple[int, np.ndarray]]] = {
            j: [] for j in range(len(self.sizes))
        }
        for (i, j), p in zip(self.edges, self.two_way, strict=True):
            self._neighbours[i].append((j, p))  # p[x_i, x_j]
            self._neighbours[j].append((i, p.T))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"one_way.{j}": torch.from_numpy(p.copy()) for j, p in enumerate(self.one_way)}
        for (i, j), p in zip(self.edges, self.two_way, strict=True):
            out[f"two_way.{i}.{j}"] = torch.from_numpy(p.copy())
        return out

    def fitted_digest(self) -> str:
        """SHA-256 of the fitted marginals (names, dtypes, shapes, bytes): a node that fits
        the model from the federation's state reports it with its scores, and the server
        checks it against the model it registers."""
        h = hashlib.sha256()
        for name, tensor in sorted(self.tensors().items()):
            values = np.ascontiguousarray(tensor.numpy())
            h.update(f"{name}:{values.dtype.str}{values.shape};".encode())
            h.update(values.tobytes())
        return h.hexdigest()

    @classmethod
    def from_tensors(
        cls, schema: Schema, codec: Codec, tensors: Mapping[str, torch.Tensor], meta: dict
    ) -> MarginalModel:
        n = len(codec.columns)
        edges = [tuple(e) for e in meta["architecture"]["edges"]]
        try:
            one_way = [tensors[f"one_way.{j}"].numpy() for j in range(n)]
            two_way = [tensors[f"two_way.{i}.{j}"].numpy() for i, j in edges]
        except KeyError as exc:
            raise ValueError(f"marginal {exc.args[0]} is missing") from None
        if len(tensors) != n + len(edges):
            raise ValueError("the weights hold marginals the model does not name")
        return cls(schema, codec, one_way, edges, two_way, meta)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ sampling
    def iter_samples(
        self,
        n: int,
        seed: int = 0,
        conditions: Mapping[str, object] | None = None,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> Iterator[pd.DataFrame]:
        """Stream ``n`` rows; equality conditions on categorical/boolean columns are
        exact (the tree is conditioned on them, not filtered)."""
        check_sample_size(n, chunk_size)
        evidence = {
            self.codec.discrete_positions[j]: level
            for j, level in (
                self.codec.condition_level(k, v) for k, v in (conditions or {}).items()
            )
        }
        order, parent, tables = self._conditioned(evidence)
        rng = np.random.default_rng(int(seed))
        remaining = n
        while remaining > 0:
            size = min(chunk_size, remaining)
            remaining -= size
            codes = np.empty((size, len(self.sizes)), dtype=np.int64)
            for j in order:
                cdf = tables[j]
                u = rng.random(size)
                if parent[j] < 0:
                    codes[:, j] = np.searchsorted(cdf, u * cdf[-1], side="right")
                else:
                    rows = cdf[codes[:, parent[j]]]
                    codes[:, j] = (rows < (u * rows[:, -1])[:, None]).sum(axis=1)
                np.minimum(codes[:, j], self.sizes[j] - 1, out=codes[:, j])
            offsets = rng.uniform(-1.0, 1.0, size=(size, len(self.codec.offset_indices)))
            yield self.codec.decode(codes, offsets)

    def _conditioned(
        self, evidence: Mapping[int, int]
    ) -> tuple[list[int], list[int], dict[int, np.ndarray]]:
        """A sampling order (a traversal from each tree's root), each column's parent (-1
        for a root) and its cumulative sampling table given the evidence: a vector for a
        root, a parent-cell x cell matrix otherwise. Upward messages carry the evidence of
        each subtree (belief propagation on a tree), so conditioned draws are exact."""
        p = len(self.sizes)
        parent = [-2] * p
        order: list[int] = []
        for root in [*sorted(evidence), *range(p)]:
            if parent[root] != -2:
                continue
            parent[root] = -1
            frontier = [root]
            while frontier:
                j = frontier.pop()
                order.append(j)
                for k, _ in self._neighbours[j]:
                    if parent[k] == -2:
                        parent[k] = j
                        frontier.append(k)
        likelihood = [np.ones(s) for s in self.sizes]
        for j, level in evidence.items():
            likelihood[j] = np.zeros(self.sizes[j])
            likelihood[j][level] = 1.0
        conditional: dict[int, np.ndarray] = {}
        for j in reversed(order):  # children before parents
            if parent[j] < 0:
                continue
            joint = next(t for k, t in self._neighbours[parent[j]] if k == j)  # [x_parent, x_j]
            given = joint / np.clip(joint.sum(axis=1, keepdims=True), 1e-300, None)
            conditional[j] = given * likelihood[j][None, :]
            likelihood[parent[j]] = likelihood[parent[j]] * conditional[j].sum(axis=1)
        tables: dict[int, np.ndarray] = {}
        for j in order:
            weights = self.one_way[j] * likelihood[j] if parent[j] < 0 else conditional[j]
            if parent[j] < 0 and weights.sum() <= 0:
                name = self.codec.columns[j].column.name
                raise ValueError(f"condition on {name!r}: the model gives it no probability")
            tables[j] = np.cumsum(weights, axis=-1)
        return order, parent, tables


# ---------------------------------------------------------------------- federation state


def state_layout(sizes: Sequence[int]) -> list[tuple[int, ...]]:
    """Shapes of the federation's public state: the summed one-way counts (every column's
    cells in a row), the summed pair scores, and the summed two-way counts (every pair's
    cells; only the tree's pairs are measured). Round r's aggregate fills slot r - 1."""
    pairs = all_pairs(len(sizes))
    return [(sum(sizes),), (len(pairs),), (sum(sizes[i] * sizes[j] for i, j in pairs),)]


def initial_state(sizes: Sequence[int]) -> list[np.ndarray]:
    return [np.zeros(shape, dtype=np.float64) for shape in state_layout(sizes)]


def _pair_offsets(sizes: Sequence[int]) -> dict[tuple[int, int], int]:
    offsets, at = {}, 0
    for i, j in all_pairs(len(sizes)):
        offsets[(i, j)] = at
        at += sizes[i] * sizes[j]
    return offsets


def one_way_of(state: Sequence[np.ndarray], sizes: Sequence[int]) -> list[np.ndarray]:
    return np.split(np.asarray(state[0], dtype=np.float64), np.cumsum(sizes)[:-1])


def edges_of(state: Sequence[np.ndarray], sizes: Sequence[int]) -> list[tuple[int, int]]:
    """The tree the summed scores select (every node and the server compute the same)."""
    return spanning_tree(np.asarray(state[1], dtype=np.float64), len(sizes))


def two_way_of(
    state: Sequence[np.ndarray], sizes: Sequence[int], edges: Sequence[tuple[int, int]]
) -> list[np.ndarray]:
    offsets, flat = _pair_offsets(sizes), np.asarray(state[2], dtype=np.float64)
    return [flat[offsets[e] : offsets[e] + sizes[e[0]] * sizes[e[1]]] for e in edges]


def measure_round(
    server_round: int,
    codes: np.ndarray,
    sizes: Sequence[int],
    state: Sequence[np.ndarray],
    plan: MeasurementPlan,
) -> list[np.ndarray]:
    """One node's noisy measurement for ``server_round``, in the state's layout (zeros
    outside this round's slot), from its own rows and the public state so far."""
    if not 1 <= server_round <= len(PHASES):
        raise ValueError(f"a marginals federation has rounds 1-{len(PHASES)}, not {server_round}")
    out = [np.zeros(shape, dtype=np.float64) for shape in state_layout(sizes)]
    if server_round == 1:
        out[0][:] = np.concatenate(measure_one_way(codes, sizes, plan.node_sigma("one_way")))
    elif server_round == 2:
        shares = shares_from(one_way_of(state, sizes))
        out[1][:] = measure_scores(codes, sizes, shares, plan.node_sigma("scores"))
    else:
        edges, offsets = edges_of(state, sizes), _pair_offsets(sizes)
        for edge, counts in zip(
            edges,
            measure_two_way(codes, sizes, edges, plan.node_sigma("two_way")),
            strict=True,
        ):
            out[2][offsets[edge] : offsets[edge] + counts.size] = counts
    return out


def absorb(
    state: Sequence[np.ndarray], server_round: int, sums: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """The state after ``server_round``: its slot replaced by the nodes' summed measurement."""
    out = [np.array(a, dtype=np.float64, copy=True) for a in state]
    out[server_round - 1] = np.asarray(sums[server_round - 1], dtype=np.float64).copy()
    return out


@dataclass(frozen=True)
class NodeRoundPlan:
    """What a node of a marginals federation plans at ``round`` (the ClientApp uses it
    where a GAN or VAE node uses ``rounds.NodePlan``): it checks the budget of every
    measurement still to come, so it never starts what it could not finish."""

    plan: MeasurementPlan
    round: int
    steps_per_round: int = 0

    @property
    def phase(self) -> str:
        return PHASES[self.round - 1]

    @property
    def noise_multiplier(self) -> float:
        """The noise this node adds (its share, when the noise is split)."""
        return self.plan.node_sigma(self.phase)

    def this_round(self, *, own_noise: bool = False) -> list[tuple[float, float, int]]:
        return self.plan.history(self.phase, own_noise=own_noise)

    def round_history(self, *, own_noise: bool = False) -> list[tuple[float, float, int]]:
        """This round's measurement and every later release, the evaluation included."""
        later = PHASES[self.round - 1 :]
        measured = [e for p in later for e in self.plan.history(p, own_noise=own_noise)]
        return [*measured, *self.plan.evaluation_history()]

    def release_history(self) -> list[tuple[float, float, int]]:
        return []


def to_secagg(measured: Sequence[np.ndarray], secagg: SecureAggregationSection) -> list[np.ndarray]:
    """A node's integer measurement as the float32 weights SecAgg+ sums. One count is one
    quantisation step (``secagg.count_scale``), so Flower's quantiser
    (``flwr.common.secure_aggregation.quantization``) maps every count to an integer exactly
    and its stochastic rounding never rounds: the unmasked sum is exactly the sum of the
    nodes' noisy integers, which split noise needs (the server must learn the sum and
    nothing else of any one node). Checked here by doing Flower's arithmetic; refuses
    (ValueError) a count outside the range, rather than let SecAgg+ clip it."""
    scale, limit = secagg.count_scale, secagg.quantization_range // 2
    out = []
    for counts in measured:
        counts = np.asarray(counts, dtype=np.float64)
        if counts.size and np.abs(counts).max() > limit:
            raise ValueError(
                f"a measurement of {np.abs(counts).max():.0f} exceeds the {limit} counts "
                "secure aggregation carries (secure_aggregation.quantization_range / 2); "
                "raise quantization_range. Not sent"
            )
        weights = (counts / scale).astype(np.float32)
        # Flower's pre-rounding arithmetic, in the float32 it runs in for float32 weights
        clip = secagg.clipping_range
        steps = (np.clip(weights, -clip, clip) + clip) * scale
        if not np.array_equal(steps.astype(np.float64) - secagg.quantization_range / 2, counts):
            raise ValueError(
                "secure aggregation would round these counts: "
                f"{secagg.exact_counts_problem() or 'float error'}. Not sent"
            )
        out.append(weights)
    return out


def from_secagg(
    mean: Sequence[np.ndarray], nodes: int, secagg: SecureAggregationSection
) -> list[np.ndarray]:
    """The nodes' summed integer measurements from SecAgg+'s unmasked mean (every node
    sends the same weight): rounding removes only float error, the sum being integers."""
    return [np.rint(np.asarray(a, dtype=np.float64) * nodes * secagg.count_scale) for a in mean]


# ---------------------------------------------------------------------- evaluation
def evaluation_sums(model: MarginalModel, frame: pd.DataFrame, *, seed: int) -> dict[str, int]:
    """The exact integer sums a node releases when it scores ``model`` on its rows (see
    :func:`evaluation_release`): its row count, n times the released column shapes, and
    the sum of each row's distance to its closest synthetic row, floored."""
    from fedsynth.generative.rounds import EVALUATION_ROWS, release_shapes, row_dcr

    synthetic = model.sample(EVALUATION_ROWS, seed=seed)
    n = len(frame)
    sums = {
        "rows": n,
        "column_shapes": math.floor(n * release_shapes(frame, synthetic, model.schema)),
    }
    distances = row_dcr(frame, synthetic, model.schema)
    if distances is not None:
        sums["dcr_mean"] = math.floor(float(distances.sum()))
    return sums


def evaluation_release(
    model: MarginalModel, frame: pd.DataFrame, plan: MeasurementPlan, *, seed: int
) -> tuple[dict[str, float], list[tuple[float, float, int]]]:
    """The fitted model scored on this node's rows, as integer sums released with OpenDP's
    discrete Gaussian noise, and the accountant entries they cost.

    GAN and VAE nodes release averages, whose sensitivity 1/n they bound with their
    released row counts. A marginals node has released no count of its own in the clear
    (with shared noise its round-1 counts are hidden in the SecAgg+ sum), so it releases
    sums instead, whose sensitivity does not depend on n (``EVALUATION_RELEASES``): its
    row count (1); n times the released column shapes (``rounds.release_shapes`` moves by
    at most 1/n, so n times it by at most 2); and the sum of each row's distance to its
    closest synthetic row (``rounds.row_dcr``, each in [0, 1]: 1). Flooring keeps an
    integer sensitivity. The scores are then ratios of released values, each reported with
    an approximate standard deviation (its noise over the noisy row count); without DP,
    exact values and no entries.
    """
    sums = evaluation_sums(model, frame, seed=seed)
    multiplier = plan.sigma_evaluation
    noisy = dict(sums)
    if multiplier > 0:
        for name, value in sums.items():
            sensitivity = EVALUATION_RELEASES[name]
            noise = multiplier * sensitivity
            noisy[name] = int(discrete_gaussian(np.array([value]), noise, sensitivity)[0])
    rows = max(float(noisy["rows"]), 1.0)
    scores: dict[str, float] = {}
    for name in ("column_shapes", "dcr_mean"):
        if name in noisy:
            scores[name] = float(np.clip(noisy[name] / rows, 0.0, 1.0))
            if multiplier > 0:
                scores[f"{name}_sd"] = multiplier * EVALUATION_RELEASES[name] / rows
    return scores, plan.evaluation_history()


# ---------------------------------------------------------------------- training
def model_from_state(
    spec: FederationSpec,
    state: Sequence[np.ndarray],
    nodes_per_round: Sequence[int],
    *,
    rows: int | None = None,
    started: float | None = None,
    central: bool = False,
) -> MarginalModel:
    """Fit the model to a finished state; ``nodes_per_round`` says how many nodes' noise
    each round's sum carries (it weighs the measurements in the fit); ``central``: one
    party measured all the rows (see ``plan_for_spec``)."""
    started = time.perf_counter() if started is None else started
    privacy = spec.privacy
    codec = codec_of(spec)
    sizes = domain_sizes(codec)
    plan = plan_for_spec(spec, sizes, central=central)
    if min(nodes_per_round) < plan.split:
        raise ValueError(
            f"a round summed {min(nodes_per_round)} node(s), fewer than the "
            f"{plan.split} its noise is split across: its sum is not private as planned"
        )
    edges = edges_of(state, sizes)
    ones, pairs = fit_tree(
        sizes,
        one_way_of(state, sizes),
        two_way_of(state, sizes, edges),
        edges,
        std_one_way=plan.sum_std("one_way", nodes_per_round[0]),
        std_two_way=plan.sum_std("two_way", nodes_per_round[2]),
    )
    history, own = plan.total_history(), plan.total_history(own_noise=True)
    epsilon: float | str = epsilon_of(history, privacy.delta, "rdp") if history else "inf"
    own_epsilon: float | str = epsilon_of(own, privacy.delta, "rdp") if own else "inf"
    metadata = {
        "kind": KIND,
        "federation": {"name": spec.federation.name, "sector": spec.federation.sector},
        "schema": spec.schema.public_dict(),
        "codec": {"default_bins": codec.default_bins},
        "architecture": {"edges": [list(e) for e in edges], "sizes": sizes},
        "privacy": {
            "epsilon": epsilon,
            "delta": privacy.delta if privacy.is_private else 0.0,
            "target_epsilon": privacy.target_epsilon if privacy.is_private else "inf",
            "accountant": "rdp",
            "accountant_history": [[s, q, t] for s, q, t in history],
            "mechanism": (
                f"distributed discrete Gaussian (OpenDP), split across {plan.split} nodes "
                "under secure aggregation"
                if plan.split > 1
                else "discrete Gaussian (OpenDP), per node"
            ),
            "noise": "shared" if plan.split > 1 else "own",
            "noise_split": plan.split,
            # what protects one node whose update the server sees (= epsilon unless split)
            "own_noise_epsilon": own_epsilon,
            "sigma": plan.sigmas,
            "node_sigma": {phase: plan.node_sigma(phase) for phase in PHASES},
            "released": {},
        },
        "training": {
            **({"rows": rows} if rows is not None else {}),
            "nodes": max(nodes_per_round),
            "nodes_per_round": list(nodes_per_round),
            "seed": spec.training.seed,
            "fit_seconds": round(time.perf_counter() - started, 3),
        },
        "versions": _versions(),
    }
    return MarginalModel(spec.schema, codec, ones, edges, pairs, metadata)


def train_marginals(nodes: Sequence[pd.DataFrame], spec: FederationSpec) -> MarginalModel:
    """Fit the spec's marginal model to one or more typed frames, each measured as a node
    measures its own rows (its own noise), the measurements summed as secure aggregation
    sums them: the federation's rounds in one process. One frame: centralised training, in
    which the one party adds all the noise even if the spec would split it across nodes."""
    started = time.perf_counter()
    if not nodes:
        raise ValueError("no rows to measure")
    codec = codec_of(spec)
    sizes = domain_sizes(codec)
    codes = [column_codes(codec, frame) for frame in nodes]
    central = len(nodes) == 1
    plan = plan_for_spec(spec, sizes, central=central)
    if len(nodes) < plan.split:
        raise ValueError(
            f"privacy.noise = 'shared' splits the noise across federation.min_nodes = "
            f"{plan.split} nodes; {len(nodes)} would leave the sum short of it"
        )
    state = initial_state(sizes)
    for server_round in range(1, len(PHASES) + 1):
        measured = [measure_round(server_round, c, sizes, state, plan) for c in codes]
        sums = [np.sum([m[k] for m in measured], axis=0) for k in range(len(state))]
        state = absorb(state, server_round, sums)
    rows = int(sum(len(f) for f in nodes))
    return model_from_state(
        spec, state, [len(nodes)] * 3, rows=rows, started=started, central=central
    )


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    from fedsynth.generative.training import library_versions

    return {**library_versions(), "mbi": version("mbi"), "opendp": version("opendp")}
