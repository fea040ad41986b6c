"""The model registry: every global model version and checkpoint, signed and encrypted.

Why: the API samples only from models the coordinator registered (design principle 5), and
weights on disk should be useless to whoever copies the disk. A version is a directory
``root/<federation>/v<version>/`` holding

- ``<file>.enc`` for each file of the model artifact, AES-256-GCM encrypted with the
  associated data ``"<id>/<file>"`` (a ciphertext moved to another name or version fails);
- ``manifest.json``: who, what and how private (node epsilons, participants, quality) and
  the SHA-256 of every plaintext file; plaintext, and it holds nothing secret;
- ``manifest.sig``: the Ed25519 signature of the exact bytes of ``manifest.json``.

:meth:`ModelRegistry.load` returns a model only if the signature verifies, the manifest
names the requested id, every file decrypts and every digest matches: one flipped byte
anywhere is refused with :class:`RegistryError`. A version appears whole or not at all: it
is written to a staging directory and renamed into place, then recorded in the database; if
a write fails (disk full, read-only registry, database error) the version's files are
removed and :class:`RegistryError` names the path or database and the operating system's
reason. Checkpoints of the global weights per round use the same format under
``root/<federation>/checkpoints/run<id>/round<r>/``.

The registry writes no audit events: the caller does, so that it can name the actor.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from fedsynth.files import fsync_directory
from fedsynth.generative.model import ModelFileError, SynthModel
from fedsynth.privacy.keys import DecryptionError, KeyStore, SignatureError
from fedsynth.server.records import Database, Federation, ModelVersionRecord, Run

MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
CHECKPOINT_FILE = "weights.safetensors"
CHECKPOINTS_DIR = "checkpoints"
REGISTER_ATTEMPTS = 5

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_VERSION_DIR = re.compile(r"^v(\d+)$")
_ROUND_DIR = re.compile(r"^round(\d+)$")
_REGISTER_LOCK = threading.Lock()


class _VersionTaken(Exception):
    """Another writer renamed its version into the same place first."""


class RegistryError(ValueError):
    """A model version or checkpoint is unknown, missing, unsigned, altered or undecryptable,
    or could not be written (the message names the path and the reason)."""


@dataclass(frozen=True)
class ModelVersion:
    id: str
    federation: str
    version: int
    kind: str
    sector: str
    round: int
    epsilon: float | None
    delta: float
    path: Path
    created_at: datetime


class ModelRegistry:
    """Model versions under ``root``, indexed in ``db``, signed and encrypted with ``keys``."""

    def __init__(self, root: Path, keys: KeyStore, db: Database) -> None:
        self.root = Path(root)
        self.keys = keys
        self.db = db

    # ------------------------------------------------------------------ models
    def register(
        self,
        model: SynthModel,
        *,
        federation: str,
        sector: str,
        run_id: int | None,
        round: int,
        node_privacy: Mapping[str, Mapping[str, float | None]],
        participants: Sequence[str],
        quality: Mapping[str, float] | None = None,
    ) -> ModelVersion:
        """Store ``model`` as the next version of ``federation`` and return its record.

        ``node_privacy`` maps each contributing node to the ``epsilon`` and ``delta`` it
        reported; the version's epsilon and delta are the largest (the weakest guarantee).
        Creates the federation's database row (with an empty spec) if there is none yet.
        """
        _check_name(federation, "federation")
        if not isinstance(round, int) or round < 0:
            raise ValueError(f"round must be an integer >= 0, got {round!r}")
        privacy = _check_node_privacy(node_privacy)
        epsilons = [p["epsilon"] for p in privacy.values()]
        deltas = [p["delta"] for p in privacy.values()]
        epsilon = max(epsilons) if epsilons else None
        delta = max(deltas) if deltas else float(model.metadata.get("privacy", {}).get("delta", 0))
        self._check_records(federation, sector, run_id)
        with tempfile.TemporaryDirectory(prefix="fedsynth-register-") as plain:
            model.save(plain)
            files = {p.name: p.read_bytes() for p in sorted(Path(plain).iterdir()) if p.is_file()}
        with _REGISTER_LOCK:
            for attempt in range(REGISTER_ATTEMPTS):
                version = self._next_version(federation)
                model_id = f"{federation}-v{version}"
                created_at = datetime.now(UTC)
                manifest = {
                    "id": model_id,
                    "federation": federation,
                    "sector": sector,
                    "version": version,
                    "round": round,
                    "run_id": run_id,
                    "kind": model.kind,
                    "created_at": created_at.isoformat(),
                    "node_privacy": privacy,
                    "participants": [str(p) for p in participants],
                    "quality": dict(quality) if quality is not None else None,
                    "epsilon": epsilon,
                    "delta": delta,
                }
                final = self.root / federation / f"v{version}"
                try:
                    manifest_text = self._publish(final, model_id, manifest, files)
                except _VersionTaken:
                    continue  # another process took this version number first
                record = ModelVersionRecord(
                    id=model_id,
                    federation=federation,
                    version=version,
                    run_id=run_id,
                    round=round,
                    kind=model.kind,
                    sector=sector,
                    epsilon=epsilon,
                    delta=delta,
                    created_at=created_at,
                    path=final.relative_to(self.root).as_posix(),
                    metadata_json=manifest_text,
                )
                try:
                    with self.db.session() as session:
                        # Created with the version, so a failed registration leaves no row.
                        row = session.get(Federation, federation)
                        if row is None:
                            session.add(Federation(name=federation, sector=sector, spec_json="{}"))
                            session.flush()
                        elif row.sector != sector:  # created by another process just now
                            raise RegistryError(
                                f"federation {federation}: sector is {row.sector!r} in the "
                                f"database, not {sector!r}"
                            )
                        session.add(record)
                except IntegrityError:  # a version number, or the federation, taken just now
                    shutil.rmtree(final, ignore_errors=True)
                    if attempt == REGISTER_ATTEMPTS - 1:
                        raise
                    continue
                except SQLAlchemyError as exc:  # e.g. the database's disk is full
                    shutil.rmtree(final, ignore_errors=True)
                    raise RegistryError(
                        f"model {model_id}: cannot record the version in {self.db!r} "
                        f"({_db_reason(exc)}); its files were removed, nothing was registered"
                    ) from exc
                except BaseException:
                    shutil.rmtree(final, ignore_errors=True)
                    raise
                return self._version(record)
        raise RegistryError(
            f"federation {federation}: no free version number after {REGISTER_ATTEMPTS} tries"
        )

    def load(self, model_id: str) -> SynthModel:
        """The model ``model_id``, only if its signature, ciphertexts and digests all hold."""
        record = self.get(model_id)
        label = f"model {model_id}"
        _, files = self._read_verified(record.path, model_id, label)
        with tempfile.TemporaryDirectory(prefix="fedsynth-load-") as plain:
            for name, data in files.items():
                (Path(plain) / name).write_bytes(data)
            try:
                return SynthModel.load(plain)
            except ModelFileError as exc:
                raise RegistryError(
                    f"{label}: signed artifact is not a valid model ({exc})"
                ) from None

    def get(self, model_id: str) -> ModelVersion:
        with self.db.session() as session:
            record = session.get(ModelVersionRecord, model_id)
        if record is None:
            raise RegistryError(f"model {model_id}: not in the registry")
        return self._version(record)

    def list(self) -> builtins.list[ModelVersion]:
        """All versions, newest first."""
        query = select(ModelVersionRecord).order_by(
            ModelVersionRecord.created_at.desc(), ModelVersionRecord.version.desc()
        )
        with self.db.session() as session:
            return [self._version(r) for r in session.execute(query).scalars()]

    def manifest(self, model_id: str) -> dict[str, Any]:
        """The signed manifest of ``model_id`` (verified; files are not decrypted)."""
        record = self.get(model_id)
        directory = record.path
        data = _read(directory / MANIFEST_FILE, f"model {model_id}")
        signature = _read(directory / SIGNATURE_FILE, f"model {model_id}")
        return self._parse_manifest(data, signature, model_id, f"model {model_id}")

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(
        self, federation: str, run_id: int, round: int, arrays: Sequence[np.ndarray]
    ) -> Path:
        """Store the global weights after ``round``; a second call for a round replaces it."""
        _check_name(federation, "federation")
        for name, value in (("run_id", run_id), ("round", round)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        tensors = {f"{i:04d}": np.ascontiguousarray(a) for i, a in enumerate(arrays)}
        checkpoint_id = _checkpoint_id(federation, run_id, round)
        manifest: dict[str, Any] = {
            "id": checkpoint_id,
            "federation": federation,
            "run_id": run_id,
            "round": round,
            "kind": "checkpoint",
            "created_at": datetime.now(UTC).isoformat(),
        }
        final = self._checkpoint_dir(federation, run_id) / f"round{round}"
        self._publish(final, checkpoint_id, manifest, {CHECKPOINT_FILE: save_arrays(tensors)})
        return final

    def latest_checkpoint(
        self, federation: str, run_id: int
    ) -> tuple[int, builtins.list[np.ndarray]] | None:
        """The newest round checkpointed for this run and its weights, or None."""
        _check_name(federation, "federation")
        directory = self._checkpoint_dir(federation, run_id)
        rounds = [
            int(m.group(1))
            for p in (directory.iterdir() if directory.is_dir() else ())
            if p.is_dir() and (m := _ROUND_DIR.match(p.name))
        ]
        if not rounds:
            return None
        latest = max(rounds)
        return latest, self.load_checkpoint(federation, run_id, latest)

    def load_checkpoint(
        self, federation: str, run_id: int, round: int
    ) -> builtins.list[np.ndarray]:
        """The weights checkpointed after ``round`` of this run, verified and decrypted."""
        _check_name(federation, "federation")
        directory = self._checkpoint_dir(federation, run_id)
        checkpoint_id = _checkpoint_id(federation, run_id, round)
        label = f"checkpoint {checkpoint_id}"
        _, files = self._read_verified(directory / f"round{round}", checkpoint_id, label)
        try:
            tensors = load_arrays(files[CHECKPOINT_FILE])
        except (KeyError, SafetensorError) as exc:
            raise RegistryError(f"{label}: no readable {CHECKPOINT_FILE} ({exc})") from None
        keys = sorted(tensors, key=int)
        if keys != [f"{i:04d}" for i in range(len(keys))]:
            raise RegistryError(f"{label}: tensor names are not 0000, 0001, ... in order")
        return [tensors[k] for k in keys]

    # ------------------------------------------------------------------ internals
    def _checkpoint_dir(self, federation: str, run_id: int) -> Path:
        return self.root / federation / CHECKPOINTS_DIR / f"run{run_id}"

    def _version(self, record: ModelVersionRecord) -> ModelVersion:
        return ModelVersion(
            id=record.id,
            federation=record.federation,
            version=record.version,
            kind=record.kind,
            sector=record.sector,
            round=record.round,
            epsilon=record.epsilon,
            delta=record.delta,
            path=self.root / record.path,
            created_at=record.created_at,
        )

    def _check_records(self, federation: str, sector: str, run_id: int | None) -> None:
        """Refuse a sector that contradicts the federation's row, or an unknown run (reads
        only: nothing is written before the version's files are in place)."""
        with self.db.session() as session:
            row = session.get(Federation, federation)
            if row is not None and row.sector != sector:
                raise RegistryError(
                    f"federation {federation}: sector is {row.sector!r} in the database, "
                    f"not {sector!r}"
                )
            if run_id is not None:
                run = session.get(Run, run_id)
                if run is None or run.federation != federation:
                    raise RegistryError(f"run {run_id}: no such run of federation {federation}")

    def _next_version(self, federation: str) -> int:
        with self.db.session() as session:
            recorded = session.scalar(
                select(func.max(ModelVersionRecord.version)).where(
                    ModelVersionRecord.federation == federation
                )
            )
        directory = self.root / federation
        on_disk = [
            int(m.group(1))
            for p in (directory.iterdir() if directory.is_dir() else ())
            if (m := _VERSION_DIR.match(p.name))
        ]
        # A crash between renaming a version into place and recording it leaves a
        # directory without a row: never hand out its number again.
        return 1 + max([recorded or 0, *on_disk])

    def _publish(
        self, final: Path, item_id: str, manifest: dict[str, Any], files: Mapping[str, bytes]
    ) -> str:
        """Encrypt, sign and rename into ``final``; return the manifest text.

        Raises _VersionTaken if ``final`` exists, unless it is a checkpoint (replaced), and
        RegistryError naming the path if a write fails; then nothing new is left under
        ``final.parent`` (a replaced checkpoint is put back).
        """
        checkpoint = manifest["kind"] == "checkpoint"
        label = f"{'checkpoint' if checkpoint else 'model'} {item_id}"
        manifest = dict(manifest, files={n: _sha256(d) for n, d in sorted(files.items())})
        manifest_bytes = _canonical(manifest)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".staging-{final.name}-", dir=final.parent))
        except OSError as exc:
            raise _unwritable(label, exc, final.parent) from exc
        path, published = staging, False
        try:
            for name, data in files.items():
                aad = f"{item_id}/{name}".encode()
                path = staging / f"{name}.enc"
                _write(path, self.keys.encrypt(data, aad))
            path = staging / MANIFEST_FILE
            _write(path, manifest_bytes)
            path = staging / SIGNATURE_FILE
            _write(path, self.keys.sign(manifest_bytes))
            path = final
            fsync_directory(staging)
            if checkpoint and final.exists():
                old = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=final.parent))
                os.replace(final, old)
                try:
                    os.replace(staging, final)
                except OSError:
                    os.replace(old, final)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                try:
                    os.rename(staging, final)
                except OSError as exc:
                    if final.exists():
                        raise _VersionTaken(str(final)) from exc
                    raise
            published = True
            fsync_directory(final.parent)
        except OSError as exc:
            if published and not checkpoint:
                shutil.rmtree(final, ignore_errors=True)
            # A failed write names the staging file: say where it was going instead.
            where = final / path.name if path.parent == staging else path
            raise _unwritable(label, exc, where) from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return manifest_bytes.decode("utf-8")

    def _read_verified(
        self, directory: Path, item_id: str, label: str
    ) -> tuple[dict[str, Any], dict[str, bytes]]:
        data = _read(directory / MANIFEST_FILE, label)
        signature = _read(directory / SIGNATURE_FILE, label)
        manifest = self._parse_manifest(data, signature, item_id, label)
        digests = manifest.get("files")
        if not isinstance(digests, dict):
            raise RegistryError(f"{label}: manifest lists no files")
        files: dict[str, bytes] = {}
        for name, digest in digests.items():
            if not isinstance(name, str) or not _NAME.match(name) or name in {".", ".."}:
                raise RegistryError(f"{label}: manifest names an invalid file {name!r}")
            path = directory / f"{name}.enc"
            try:
                plain = self.keys.decrypt(_read(path, label), f"{item_id}/{name}".encode())
            except DecryptionError as exc:
                raise RegistryError(f"{label}: {path}: {exc}") from None
            if _sha256(plain) != digest:
                raise RegistryError(f"{label}: {path}: content does not match the manifest")
            files[name] = plain
        return manifest, files

    def _parse_manifest(
        self, data: bytes, signature: bytes, item_id: str, label: str
    ) -> dict[str, Any]:
        try:
            self.keys.verify(data, signature)
        except SignatureError:
            raise RegistryError(
                f"{label}: signature does not verify (signed by another key or altered)"
            ) from None
        manifest = json.loads(data.decode("utf-8"))
        if not isinstance(manifest, dict) or manifest.get("id") != item_id:
            found = manifest.get("id") if isinstance(manifest, dict) else None
            raise RegistryError(f"{label}: the signed manifest is for {found!r}, not {item_id!r}")
        return manifest


def _checkpoint_id(federation: str, run_id: int, round: int) -> str:
    return f"{federation}/run{run_id}/round{round}"


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name) or name in {".", ".."}:
        raise ValueError(
            f"{what} name {name!r} must use only letters, digits, '_', '.' and '-' "
            "(and not be '.' or '..')"
        )


def _check_node_privacy(
    node_privacy: Mapping[str, Mapping[str, float | None]],
) -> dict[str, dict[str, float]]:
    checked: dict[str, dict[str, float]] = {}
    for node, report in node_privacy.items():
        values: dict[str, float] = {}
        for key in ("epsilon", "delta"):
            value = report.get(key) if isinstance(report, Mapping) else None
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"node_privacy[{node!r}][{key!r}] must be a number, got {value!r}")
            values[key] = float(value)
        if math.isnan(values["epsilon"]) or values["epsilon"] < 0:
            raise ValueError(f"node_privacy[{node!r}]['epsilon'] must be >= 0 (inf: no DP)")
        if not 0 <= values["delta"] < 1:
            raise ValueError(f"node_privacy[{node!r}]['delta'] must be in [0, 1)")
        # with split noise (marginals, privacy.noise = "shared"): the node's epsilon under
        # its own share of the noise alone, beside the budget epsilon
        own = report.get("own_noise_epsilon") if isinstance(report, Mapping) else None
        if own is not None:
            if isinstance(own, bool) or not isinstance(own, int | float) or not own >= 0:
                raise ValueError(
                    f"node_privacy[{node!r}]['own_noise_epsilon'] must be a number >= 0"
                )
            values["own_noise_epsilon"] = float(own)
        checked[str(node)] = values
    return checked


def _canonical(value: Any) -> bytes:
    return json.dumps(
        _json_safe(value, "manifest"),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    ).encode("utf-8")


def _json_safe(value: Any, where: str) -> Any:
    """Infinities as "inf"/"-inf" (as in model.json); NaN refused, naming the key."""
    if isinstance(value, float) and not math.isfinite(value):
        if math.isnan(value):
            raise ValueError(f"{where} is NaN")
        return "inf" if value > 0 else "-inf"
    if isinstance(value, Mapping):
        return {k: _json_safe(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(path: Path, label: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise RegistryError(f"{label}: {path} is missing") from None
    except OSError as exc:
        raise RegistryError(f"{label}: cannot read {path} ({exc.strerror})") from None


def _unwritable(label: str, exc: OSError, where: Path) -> RegistryError:
    """The error for a failed registry write: the path, the OS's reason, the likely cause."""
    reason = exc.strerror or type(exc).__name__
    return RegistryError(
        f"{label}: cannot write {where} ({reason}, errno {exc.errno}): is the disk full or "
        "the registry read-only? Nothing was stored"
    )


def _db_reason(exc: SQLAlchemyError) -> str:
    """The database driver's message without SQLAlchemy's statement and parameters."""
    orig = getattr(exc, "orig", None)
    return str(orig) if orig is not None else type(exc).__name__


def _write(path: Path, data: bytes) -> None:
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
