"""A trained generative model: sampling, and the on-disk artifact.

Artifact = a directory with ``weights.safetensors`` (tensors only: no code runs on load)
and ``model.json`` (schema, codec settings, architecture, privacy report, versions).
Only weights, the public schema and DP-released figures are stored: no row, no per-category
frequency, no data-derived statistic. ``model.json`` carries SHA-256 digests of the weights
and of itself, so a damaged file is refused at load; protection against deliberate
tampering is the registry's signature (``fedsynth.server``), not this checksum.

Sampling is post-processing of a DP model: it costs no privacy budget.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedsynth.generative.codec import Codec
from fedsynth.generative.networks import VAE, Critic, Generator
from fedsynth.generative.schema import Schema
from fedsynth.generative.spec import FederationSpec

FORMAT = "fedsynth-model/1"
WEIGHTS_FILE = "weights.safetensors"
METADATA_FILE = "model.json"
DEFAULT_CHUNK = 16_384


class ModelFileError(ValueError):
    """A model artifact is missing, damaged, or not a fedsynth model."""


def architecture(spec: FederationSpec) -> dict[str, Any]:
    """The network sizes a model is built with (stored in its artifact)."""
    return {
        "latent_dim": spec.model.latent_dim,
        "generator_hidden": list(spec.model.generator_hidden),
        "critic_hidden": list(spec.model.critic_hidden),
    }


def build_modules(kind: str, codec: Codec, arch: dict[str, Any]) -> dict[str, torch.nn.Module]:
    """The trainable modules of a model kind, freshly initialised."""
    if kind == "gan":
        return {
            "generator": Generator(
                arch["latent_dim"], codec.cond_width, arch["generator_hidden"], codec.width
            ),
            "critic": Critic(codec.width + codec.cond_width, arch["critic_hidden"]),
        }
    if kind == "vae":
        return {
            "vae": VAE(
                codec.width,
                codec.cond_width,
                arch["critic_hidden"],
                arch["generator_hidden"],
                arch["latent_dim"],
            )
        }
    raise ValueError(f"model kind must be 'gan' or 'vae', got {kind!r}")


class SynthModel:
    """Generator + codec + metadata. Build with the trainer or :meth:`load`."""

    def __init__(
        self,
        kind: str,
        schema: Schema,
        codec: Codec,
        modules: dict[str, torch.nn.Module],
        metadata: dict[str, Any],
    ) -> None:
        self.kind = kind
        self.schema = schema
        self.codec = codec
        self.modules = modules
        self.metadata = metadata
        self.generator: Generator = (
            modules["generator"] if kind == "gan" else modules["vae"].decoder  # type: ignore[assignment]
        )
        self.generator.eval()

    # ------------------------------------------------------------------ sampling
    @property
    def epsilon(self) -> float:
        return float(self.metadata["privacy"]["epsilon"])

    def sample(
        self,
        n: int,
        seed: int = 0,
        conditions: Mapping[str, object] | None = None,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> pd.DataFrame:
        """``n`` synthetic rows as a typed frame; identical for identical arguments."""
        chunks = list(self.iter_samples(n, seed, conditions, chunk_size))
        if not chunks:
            return self.codec.empty_frame()
        return pd.concat(chunks, ignore_index=True)

    def iter_samples(
        self,
        n: int,
        seed: int = 0,
        conditions: Mapping[str, object] | None = None,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> Iterator[pd.DataFrame]:
        """Stream ``n`` rows in chunks of ``chunk_size`` with constant memory.

        Equality conditions on categorical/boolean columns steer the generator through
        its conditional vector and are then enforced on the output, so every row matches
        and rare categories cost no more than common ones (no rejection sampling).
        """
        check_sample_size(n, chunk_size)
        forced = [self.codec.condition_level(k, v) for k, v in (conditions or {}).items()]
        cond_row = self.codec.condition_vector(conditions, 1)
        marginal = self._target_marginal(conditions or {})
        rng = torch.Generator().manual_seed(int(seed))
        remaining = n
        while remaining > 0:
            size = min(chunk_size, remaining)
            remaining -= size
            cond = cond_row.expand(size, -1)
            drawn = None
            if marginal is not None:  # target drawn from its DP-released frequencies
                j, probabilities = marginal
                drawn = (j, torch.multinomial(probabilities, size, replacement=True, generator=rng))
                cond = cond.clone()
                cond[torch.arange(size), int(self.codec.cond_offsets[j]) + drawn[1]] = 1.0
            yield self._sample_chunk(size, rng, cond, forced, drawn)

    def _target_marginal(self, conditions: Mapping[str, object]) -> tuple[int, torch.Tensor] | None:
        release = self.metadata["privacy"].get("released", {}).get("target_marginal")
        if not release or release["column"] in conditions:
            return None
        return self.codec.discrete_index(release["column"]), torch.tensor(
            release["probabilities"], dtype=torch.float64
        )

    @torch.inference_mode()
    def _sample_chunk(
        self,
        n: int,
        rng: torch.Generator,
        cond: torch.Tensor,
        forced: list[tuple[int, int]],
        drawn: tuple[int, torch.Tensor] | None = None,
    ) -> pd.DataFrame:
        z = torch.randn(n, self.generator.latent_dim, generator=rng)
        raw = self.generator.generate(z, cond)
        # An exact draw from each block's softmax by inverse CDF: one uniform per block.
        # (Gumbel-max needs one random number per logit; torch's seeded exponential
        # sampler made that as slow as the whole network, measured here.)
        columns = self.codec.columns
        uniform = torch.rand(n, len(columns), generator=rng)
        codes = np.empty((n, len(columns)), dtype=np.int64)
        for j, c in enumerate(columns):
            logits = raw[:, c.start : c.start + c.block_size]
            weights = torch.exp(logits - logits.amax(dim=1, keepdim=True)).cumsum_(dim=1)
            threshold = uniform[:, j : j + 1] * weights[:, -1:]
            codes[:, j] = (weights < threshold).sum(dim=1).clamp_(max=c.block_size - 1).numpy()
        offsets = torch.tanh(raw[:, self.codec.offset_indices]).numpy()
        positions = self.codec.discrete_positions
        for d, level in forced:
            codes[:, positions[d]] = level
        if drawn is not None:
            codes[:, positions[drawn[0]]] = drawn[1].numpy()
        return self.codec.decode(codes, offsets)

    # ------------------------------------------------------------------ artifact
    def tensors(self) -> dict[str, torch.Tensor]:
        """What ``weights.safetensors`` holds: every module's state, by module name."""
        return {
            f"{name}.{key}": value.detach().contiguous().clone()
            for name, module in self.modules.items()
            for key, value in module.state_dict().items()
        }

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = directory / WEIGHTS_FILE
        tmp = weights.with_suffix(".tmp")
        save_file(self.tensors(), str(tmp))
        tmp.replace(weights)
        meta = dict(self.metadata, format=FORMAT, weights_sha256=_sha256(weights.read_bytes()))
        meta.pop("metadata_sha256", None)
        meta["metadata_sha256"] = _sha256(_canonical(meta))
        _atomic_write(directory / METADATA_FILE, json.dumps(meta, indent=2).encode())
        self.metadata = meta
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> SynthModel:
        directory = Path(directory)
        meta_path, weights_path = directory / METADATA_FILE, directory / WEIGHTS_FILE
        for path in (meta_path, weights_path):
            if not path.is_file():
                raise ModelFileError(f"{path}: missing (is {directory} a fedsynth model?)")
        try:
            meta = json.loads(meta_path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelFileError(f"{meta_path}: damaged, not valid JSON ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ModelFileError(f"{meta_path}: not a {FORMAT} artifact")
        claimed = meta.pop("metadata_sha256", None)
        if claimed != _sha256(_canonical(meta)):
            raise ModelFileError(f"{meta_path}: checksum mismatch, the file was altered")
        meta["metadata_sha256"] = claimed
        blob = weights_path.read_bytes()
        if _sha256(blob) != meta.get("weights_sha256"):
            raise ModelFileError(f"{weights_path}: checksum mismatch, the file was altered")
        try:
            tensors = load_file(str(weights_path))
        except SafetensorError as exc:
            raise ModelFileError(f"{weights_path}: not a valid safetensors file ({exc})") from None
        schema = Schema.model_validate(meta["schema"])
        codec = Codec(schema, default_bins=int(meta["codec"]["default_bins"]))
        if meta["kind"] == "marginals":
            from fedsynth.generative.marginals import MarginalModel

            try:
                return MarginalModel.from_tensors(schema, codec, tensors, meta)
            except ValueError as exc:
                raise ModelFileError(f"{weights_path}: does not fit the model ({exc})") from None
        modules = build_modules(meta["kind"], codec, meta["architecture"])
        for name, module in modules.items():
            prefix = f"{name}."
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            try:
                module.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise ModelFileError(
                    f"{weights_path}: weights do not fit the model ({exc})"
                ) from None
        return cls(meta["kind"], schema, codec, modules, meta)


def check_sample_size(n: int, chunk_size: int) -> None:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), default=_json_default).encode()


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
