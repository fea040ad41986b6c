"""Training a GAN or VAE on one table: plan the noise, (pre-train,) run DP-SGD, describe.

- Noise is calibrated once, before training, so that everything released -- the target
  column's histogram or the synopsis a pre-trained network learns from, then the planned
  DP-SGD steps -- reaches the spec's target epsilon at its delta with the chosen
  accountant (PRV by default, RDP with pre-training).
- The steps themselves, and what each one keeps private, are in fedsynth.generative.sgd;
  pre-training on a DP synopsis in fedsynth.generative.pretraining.
"""

from __future__ import annotations

import platform
import time
from typing import Any

import opacus
import pandas as pd
import torch

import fedsynth
from fedsynth.generative import pretraining
from fedsynth.generative.accounting import calibrate_noise, epsilon_of, histogram_noise
from fedsynth.generative.codec import Codec, codec_of
from fedsynth.generative.model import SynthModel, architecture, build_modules
from fedsynth.generative.sgd import (
    ProgressFn,
    TrainingError,
    known_notices,
    private_module_name,
    run_steps,
)
from fedsynth.generative.spec import FederationSpec


def train(
    frame: pd.DataFrame,
    spec: FederationSpec,
    *,
    progress: ProgressFn | None = None,
    grad_sample_mode: str = "ghost",
) -> SynthModel:
    """Train the spec's model on a typed frame (see ``table.validate_table``)."""
    threads = torch.get_num_threads()
    # Small MLPs on batches of a few hundred rows: OpenMP synchronisation costs more than
    # a second thread gains (measured 52 ms vs 4 ms per step on 2 busy cores).
    torch.set_num_threads(1)
    try:
        with known_notices():
            return _train(frame, spec, progress, grad_sample_mode)
    finally:
        torch.set_num_threads(threads)


def _train(
    frame: pd.DataFrame, spec: FederationSpec, progress: ProgressFn | None, grad_sample_mode: str
) -> SynthModel:
    started = time.perf_counter()
    schema, training, privacy = spec.schema, spec.training, spec.privacy
    n_rows = len(frame)
    check_rows(n_rows, spec)
    torch.manual_seed(training.seed)
    codec = codec_of(spec)
    data, levels = codec.encode(frame)
    steps = training.planned_steps(n_rows)
    sample_rate = 1.0 / training.steps_per_epoch(n_rows)
    arch = architecture(spec)
    pretrained: dict[str, Any] | None = None
    if spec.model.pretrain == "marginals":
        synopsis = pretraining.measure_synopsis([frame], spec)
        modules = pretraining.pretrained_modules(spec, synopsis)
        marginal = pretraining.target_release(spec, synopsis)
        prior = pretraining.synopsis_history(spec)
        pretrained = pretraining.describe(spec, synopsis)
    else:
        modules = build_modules(spec.model.kind, codec, arch)
        marginal, prior = release_target_marginal(codec, levels, spec)
    noise = 0.0
    if privacy.is_private:
        noise = calibrate_noise(
            target_epsilon=privacy.target_epsilon,
            delta=privacy.delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=privacy.accountant,
            prior=prior,
        )
    run = run_steps(
        modules,
        codec,
        data,
        levels,
        spec,
        noise=noise,
        sample_rate=sample_rate,
        steps=steps,
        target=codec.discrete_index(marginal["column"]) if marginal else None,
        grad_sample_mode=grad_sample_mode,
        progress=progress,
        prior=prior,
    )
    epsilon: float | str = "inf"
    history: list[list[float]] = []
    if privacy.is_private:
        history = [[float(s), float(q), int(t)] for s, q, t in [*prior, *run.history]]
        epsilon = epsilon_of(history, privacy.delta, privacy.accountant)
    metadata = {
        "kind": spec.model.kind,
        "federation": {"name": spec.federation.name, "sector": spec.federation.sector},
        "schema": schema.public_dict(),
        "codec": {"default_bins": codec.default_bins},
        "architecture": arch,
        "privacy": {
            "epsilon": epsilon,
            "delta": privacy.delta if privacy.is_private else 0.0,
            "target_epsilon": privacy.target_epsilon if privacy.is_private else "inf",
            "noise_multiplier": noise,
            "sample_rate": sample_rate,
            "steps": steps,
            "max_grad_norm": privacy.max_grad_norm,
            "accountant": privacy.accountant,
            "accountant_history": history,
            "grad_sample_mode": grad_sample_mode if privacy.is_private else None,
            "private_module": private_module_name(spec.model.kind),
            "released": {"target_marginal": marginal} if marginal else {},
            **({"pretraining": pretrained} if pretrained else {}),
        },
        "training": {
            "rows": n_rows,
            "steps": steps,
            "epochs": run.epochs,
            "batch_size": training.batch_size,
            "seed": training.seed,
            "fit_seconds": round(time.perf_counter() - started, 3),
            "loop_seconds": round(run.loop_seconds, 3),  # SGD steps only, no calibration
            "public_losses": run.public_losses,
        },
        "versions": library_versions(),
    }
    for module in modules.values():
        module.eval()
    return SynthModel(spec.model.kind, schema, codec, modules, metadata)


def check_rows(n_rows: int, spec: FederationSpec) -> None:
    """Refuse tables too small to train on, or for which delta would allow a whole row."""
    problem = spec.rows_problem(n_rows)
    if problem is not None:
        raise TrainingError(problem)


def library_versions() -> dict[str, str]:
    return {
        "fedsynth": fedsynth.__version__,
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "python": platform.python_version(),
    }


def release_target_marginal(
    codec: Codec, levels: torch.Tensor, spec: FederationSpec
) -> tuple[dict[str, Any] | None, list[tuple[float, float, int]]]:
    """Category frequencies of the target column, released with the Gaussian mechanism.

    Unconditional sampling draws each row's target category from these frequencies and
    generates the rest of the row conditioned on it, so a rare class keeps its share and
    its relationship with the other columns (the generator's own unconditional mode tends
    to drop rare classes). The release costs budget: its (sigma, 1.0, 1) entry opens the
    accountant history and DP-SGD noise is calibrated for the composition. Returns
    (release, history prefix); (None, []) when there is no discrete, non-null target or
    ``privacy.marginal_share`` is 0. Without DP (epsilon = inf) the exact shares are kept.
    """
    privacy, target = spec.privacy, spec.schema.target
    if target is None or not target.is_discrete or target.nullable or privacy.marginal_share == 0:
        return None, []
    j = codec.discrete_index(target.name)
    counts = torch.bincount(levels[:, j], minlength=codec.discrete[j].n_bins).double()
    sigma = 0.0
    if privacy.is_private:
        sigma = histogram_noise(
            epsilon=privacy.target_epsilon * privacy.marginal_share,
            delta=privacy.delta,
            accountant=privacy.accountant,
        )
        counts = counts + torch.randn(counts.shape, dtype=torch.float64) * sigma
    counts = counts.clamp(min=0.0) + 1e-9
    release = {
        "column": target.name,
        "probabilities": (counts / counts.sum()).tolist(),
        "noise_multiplier": sigma,
    }
    return release, ([(sigma, 1.0, 1)] if privacy.is_private else [])
