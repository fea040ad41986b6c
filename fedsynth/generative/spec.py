"""Federation spec files: one TOML file declares the table, the model and the privacy policy.

The keys are documented in docs/spec.md. Loading validates everything with pydantic and
turns any problem into a :class:`SpecError` whose message names the file and the key, for
example ``bank.toml: privacy.target_epsilon: must be greater than 0``.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from fedsynth.generative.schema import Column, Schema


class SpecError(ValueError):
    """A spec file is missing, unreadable or invalid; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FederationSection(_Section):
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    sector: Annotated[str, Field(min_length=1)]
    description: str = ""
    # Federated rounds; training.epochs are spread over them (each node trains
    # epochs / rounds passes over its own rows per round).
    rounds: Annotated[int, Field(ge=1, le=10_000)] = 5
    # Fewest nodes whose updates may form one aggregate; a round with fewer fails.
    min_nodes: Annotated[int, Field(ge=1)] = 3
    # Nodes score the model after every k-th round and after the last; 0: the last only.
    # Each evaluation costs budget (privacy.evaluation_share is spread over them).
    evaluate_every: Annotated[int, Field(ge=0)] = 0
    # Step the server takes along the nodes' averaged update: "auto" (as far as the pooled
    # rows would move one central model in a round, fedsynth.server.strategy.server_step),
    # or a fixed factor (1.0 is plain FedAvg).
    server_learning_rate: Literal["auto"] | Annotated[float, Field(gt=0, le=100)] = "auto"

    def evaluation_rounds(self) -> list[int]:
        every = [
            r
            for r in range(1, self.rounds + 1)
            if self.evaluate_every and r % self.evaluate_every == 0
        ]
        return sorted({*every, self.rounds})


class ModelSection(_Section):
    # gan and vae train with DP-SGD; marginals fits a graphical model to noisy marginals
    # (fedsynth.generative.marginals), the strongest kind at small epsilon
    kind: Literal["gan", "vae", "marginals"]
    # Hidden widths of the generator (GAN) or decoder (VAE); small tables want small nets.
    generator_hidden: list[Annotated[int, Field(ge=4, le=4096)]] = [128, 128]
    # Hidden widths of the discriminator (GAN) or encoder (VAE).
    critic_hidden: list[Annotated[int, Field(ge=4, le=4096)]] = [128, 128]
    latent_dim: Annotated[int, Field(ge=1, le=1024)] = 32
    default_bins: Annotated[int, Field(ge=2, le=200)] = 16
    # GAN and VAE: "marginals" pre-trains the network on rows sampled from a DP synopsis
    # (the marginals kind, measured with privacy.pretrain_share of the budget) before
    # DP-SGD (fedsynth.generative.pretraining); "none" starts from random weights.
    pretrain: Literal["none", "marginals"] = "none"


class PrivacySection(_Section):
    # inf (TOML's float literal) or "inf" trains without differential privacy.
    target_epsilon: float
    delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    accountant: Literal["prv", "rdp"] = "prv"
    # Share of target_epsilon (before composition) spent on a Gaussian histogram of the
    # target column, which unconditional sampling draws the target from; 0 turns it off.
    marginal_share: Annotated[float, Field(ge=0, lt=1)] = 0.1
    # Share of target_epsilon (alone, before composition) spent on the scalar scores a
    # node returns in federated evaluation rounds, each a Gaussian-mechanism release.
    evaluation_share: Annotated[float, Field(ge=0, lt=1)] = 0.1
    # Whose noise protects a marginals node (fedsynth.generative.marginals, docs/privacy.md):
    # "own", each node adds all of it and is protected even if the server sees its update;
    # "shared", the noise is split across federation.min_nodes and only their sum under
    # secure aggregation carries all of it (a sqrt(min_nodes) smaller noise in the model).
    noise: Literal["own", "shared"] = "own"
    # With model.pretrain = "marginals": share of target_epsilon (alone, before
    # composition) spent on the synopsis' measurements; DP-SGD gets the rest.
    pretrain_share: Annotated[float, Field(gt=0, lt=1)] = 0.5

    @field_validator("target_epsilon", mode="before")
    @classmethod
    def _parse_inf(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in {"inf", "infinity"}:
            return math.inf
        return value

    @field_validator("target_epsilon")
    @classmethod
    def _positive(cls, value: float) -> float:
        if math.isnan(value) or value <= 0:
            raise ValueError("must be greater than 0 (or inf for a non-private model)")
        return value

    @property
    def is_private(self) -> bool:
        return math.isfinite(self.target_epsilon)


class TrainingSection(_Section):
    epochs: Annotated[float, Field(gt=0)] | None = None
    steps: Annotated[int, Field(gt=0)] | None = None
    batch_size: Annotated[int, Field(ge=2, le=65536)] = 256
    generator_lr: Annotated[float, Field(gt=0, le=1)] = 2e-4
    critic_lr: Annotated[float, Field(gt=0, le=1)] = 2e-4
    seed: int = 0

    @model_validator(mode="after")
    def _epochs_or_steps(self) -> TrainingSection:
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("set exactly one of training.epochs and training.steps")
        return self

    def steps_per_epoch(self, n_rows: int) -> int:
        """Poisson-sampled batches per epoch; the sample rate is its inverse (as in Opacus)."""
        return max(1, math.ceil(n_rows / self.batch_size))

    def planned_steps(self, n_rows: int) -> int:
        """Optimizer steps over ``n_rows`` rows."""
        if self.steps is not None:
            return self.steps
        assert self.epochs is not None
        return max(1, round(self.epochs * self.steps_per_epoch(n_rows)))


class SecureAggregationSection(_Section):
    """Flower SecAgg+ settings (docs/spec.md explains each choice and docs/privacy.md the
    collusion bound). Flower itself accepts a zero or negative clipping range and even
    share counts that crash clients, so every value is checked here."""

    enabled: bool = True
    # Shares of each node's secrets: 0 means every participant (all-to-all masking);
    # otherwise an odd integer >= 3.
    num_shares: Annotated[int, Field(ge=0)] = 0
    # Share of num_shares needed to reconstruct a secret (Flower rounds it).
    reconstruction_threshold: Annotated[float, Field(gt=0.5, le=1.0)] = 0.67
    # Weights are clipped to [-r, r] before quantisation; a node refuses to send a
    # weight outside it rather than let the aggregate be silently distorted.
    clipping_range: Annotated[float, Field(gt=0, le=1e6)] = 8.0
    quantization_range: Annotated[int, Field(ge=2**10, le=2**28)] = 2**22
    # Largest node weight (its noisy row count); Flower's default (1000) overflows.
    max_weight: Annotated[float, Field(gt=0)] = 1e6

    @property
    def count_scale(self) -> float:
        """Counts per unit of weight when a marginals node sends integer counts: one count
        is one quantisation step of Flower's quantiser, so that it never rounds them."""
        return self.quantization_range / (2 * self.clipping_range)

    def exact_counts_problem(self) -> str | None:
        """Why these settings cannot carry integer counts exactly, or None: the scale must
        be a power of two, so that count / scale and Flower's arithmetic on it are exact."""
        if self.quantization_range > 2**24:
            # Flower quantises float32 weights in float32: 24 bits carry 2^24 steps exactly
            return (
                f"quantization_range = {self.quantization_range} must be at most 2^24 "
                "(16777216) with model.kind = 'marginals': Flower quantises in float32, "
                "whose 24 bits carry no more steps exactly"
            )
        scale = self.count_scale
        if scale >= 1 and math.log2(scale).is_integer():
            return None
        return (
            f"quantization_range / (2 * clipping_range) = {self.quantization_range} / "
            f"{2 * self.clipping_range:g} = {scale:g} must be a power of two >= 1 with "
            "model.kind = 'marginals', so that every count is one exact quantisation step"
        )

    @field_validator("num_shares")
    @classmethod
    def _odd_shares(cls, value: int) -> int:
        if value and (value < 3 or value % 2 == 0):
            raise ValueError(
                "must be 0 (every participant) or an odd integer >= 3: an even number "
                "makes Flower's SecAgg+ clients crash and the round halt"
            )
        return value


class FederationSpec(_Section):
    federation: FederationSection
    columns: Annotated[list[Column], Field(min_length=1)]
    model: ModelSection
    privacy: PrivacySection
    training: TrainingSection
    secure_aggregation: SecureAggregationSection = SecureAggregationSection()

    @model_validator(mode="before")
    @classmethod
    def _rdp_by_default_for_measurements(cls, raw: Any) -> Any:
        """The default accountant is RDP where marginals measurements are made: a
        marginals federation, or a network pre-trained on a marginals synopsis (see
        _rdp_for_marginals and _pretraining_composes_in_rdp)."""
        model, privacy = (
            raw.get(k) if isinstance(raw, dict) else None for k in ("model", "privacy")
        )
        if (
            isinstance(model, dict)
            and (model.get("kind") == "marginals" or model.get("pretrain") == "marginals")
            and isinstance(privacy, dict)
            and "accountant" not in privacy
        ):
            return {**raw, "privacy": {**privacy, "accountant": "rdp"}}
        return raw

    @field_validator("columns")
    @classmethod
    def _valid_schema(cls, columns: list[Column]) -> list[Column]:
        try:
            Schema(columns=columns)  # duplicate names, targets, ...
        except ValidationError as exc:  # reported under 'columns', not the top level
            messages = [e["msg"].removeprefix("Value error, ") for e in exc.errors()]
            raise ValueError("; ".join(messages)) from None
        return columns

    @model_validator(mode="after")
    def _enough_nodes_to_hide_one(self) -> FederationSpec:
        # A sum of two updates, one of them known to a colluding node, reveals the other.
        if self.secure_aggregation.enabled and self.federation.min_nodes < 3:
            raise ValueError(
                "federation.min_nodes must be at least 3 with secure aggregation: with two "
                "updates in a sum, one node colluding with the server learns the other's"
            )
        return self

    @model_validator(mode="after")
    def _rdp_for_marginals(self) -> FederationSpec:
        # The discrete Gaussian's proven bound is zCDP, which RDP accounts exactly; PRV's
        # tighter curve is proven for the continuous Gaussian only.
        if self.model.kind == "marginals" and self.privacy.accountant != "rdp":
            raise ValueError(
                "privacy.accountant must be 'rdp' with model.kind = 'marginals': its "
                "discrete Gaussian noise is proven zCDP, not the PRV accountant's curve"
            )
        return self

    @model_validator(mode="after")
    def _pretraining_composes_in_rdp(self) -> FederationSpec:
        if self.model.pretrain == "none":
            return self
        if self.model.kind == "marginals":
            raise ValueError(
                "model.pretrain applies to model.kind = 'gan' or 'vae': it pre-trains a "
                "network on rows of a marginals synopsis"
            )
        if self.privacy.is_private and self.privacy.accountant != "rdp":
            # the synopsis' discrete Gaussian is proven zCDP (see _rdp_for_marginals), and
            # one history composes it with DP-SGD, so one accountant must hold both
            raise ValueError(
                "privacy.accountant must be 'rdp' with model.pretrain = 'marginals': the "
                "synopsis' discrete Gaussian noise and DP-SGD compose in one RDP history"
            )
        return self

    @model_validator(mode="after")
    def _shared_noise_needs_secure_aggregation(self) -> FederationSpec:
        if self.privacy.noise != "shared":
            return self
        if self.model.kind != "marginals":
            raise ValueError(
                "privacy.noise = 'shared' needs model.kind = 'marginals': DP-SGD updates "
                "carry each node's own noise"
            )
        if not self.secure_aggregation.enabled:
            raise ValueError(
                "privacy.noise = 'shared' needs secure_aggregation.enabled = true: without "
                "it the server sees each node's measurement with a share of the noise only"
            )
        return self

    @model_validator(mode="after")
    def _exact_counts_for_marginals(self) -> FederationSpec:
        secagg = self.secure_aggregation
        # a marginals federation, or the synopsis of a pre-trained network, sums counts
        # (the plain path carries the same weights)
        if self.model.kind == "marginals" or self.model.pretrain == "marginals":
            problem = secagg.exact_counts_problem()
            if problem:
                raise ValueError(f"secure_aggregation: {problem}")
            if not float(secagg.max_weight).is_integer():
                # every node sends max_weight as its FedAvg weight; a fraction would make
                # SecAgg+ scale the counts by round(weight / max_weight * levels) / levels
                raise ValueError(
                    "secure_aggregation.max_weight must be a whole number with marginals "
                    f"measurements, got {secagg.max_weight:g}"
                )
        return self

    @property
    def schema(self) -> Schema:  # type: ignore[override]  # shadows pydantic v1's deprecated .schema()
        return Schema(columns=self.columns)

    def rows_problem(self, n_rows: int) -> str | None:
        """Why a node cannot train this spec on ``n_rows`` rows, or None. A table is too
        small below 2 rows; DP needs delta below 1/rows, or it allows releasing a row."""
        if n_rows < 2:
            return f"need at least 2 rows to train, got {n_rows}"
        delta = self.privacy.delta
        if self.privacy.is_private and delta >= 1.0 / n_rows:
            return (
                f"privacy.delta = {delta:g} must be below 1/rows = {1.0 / n_rows:.3g} "
                f"({n_rows} rows); a larger delta allows releasing a whole row"
            )
        return None


def _location(spec: dict[str, Any], loc: tuple[int | str, ...]) -> str:
    """'columns[3] (balance).max' instead of pydantic's ('columns', 3, 'max')."""
    parts: list[str] = []
    for i, item in enumerate(loc):
        if isinstance(item, int) and i > 0 and loc[i - 1] == "columns":
            name = ""
            columns = spec.get("columns")
            if (
                isinstance(columns, list)
                and item < len(columns)
                and isinstance(columns[item], dict)
            ):
                name = f" ({columns[item].get('name', '?')})"
            parts[-1] = f"{parts[-1]}[{item}]{name}"
        else:
            parts.append(str(item))
    return ".".join(parts) or "(top level)"


def _format(error: ErrorDetails, raw: dict[str, Any]) -> str:
    loc = tuple(p for p in error["loc"] if not str(p).startswith("function-after"))
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        msg = "unknown key (see docs/spec.md for the keys)"
    elif error["type"] == "missing":
        msg = "required key is missing"
    return f"{_location(raw, loc)}: {msg}"


def parse_spec(raw: dict[str, Any], source: str = "spec") -> FederationSpec:
    try:
        return FederationSpec.model_validate(raw)
    except ValidationError as exc:
        lines = [_format(e, raw) for e in exc.errors()]
        raise SpecError(f"{source}: " + "\n  ".join(lines)) from None


def load_spec(path: str | Path) -> FederationSpec:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"{path}: no such spec file") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: invalid TOML: {exc}") from None
    return parse_spec(raw, source=path.name)
