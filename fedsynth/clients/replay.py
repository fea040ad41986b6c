"""What a node already released in a round, kept so that a retried round re-sends it.

Why: the server may ask for the same round twice -- its process was killed and the run
resumed from its last checkpoint, or the round failed because another node died and the
operator resumed the run. Training again would be a second DP release of that round, with
fresh noise and a second cost in the ledger. Re-sending the very update already released
(and already in the ledger) is post-processing: it costs nothing. So the ``train``
handler stores the update it is about to send here *before* it records the spend, and a
node asked again for the same run key and round re-sends those bytes, provided the global
model it is handed is the one it trained from (same digest). Handed another model, it
refuses: training again would spend the round twice, and the old update would not fit.

One file per release, ``<ledger>.releases/<federation>/<run key>/round-<r>-<kind>.safetensors``
beside the node's ledger, in a safe format (no pickle); the ledger entry holds its SHA-256,
and a file that does not match is not sent. Nothing here leaves the node except through
the handlers, and only what already left it once.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from fedsynth.files import atomic_write

#: A run key is a random 128-bit id in hex (``uuid4().hex``); checked because it names a
#: folder on the node's disk and comes over the wire.
RUN_KEY = re.compile(r"^[0-9a-f]{32}$")
_ROUND_FILE = re.compile(r"^round-(\d+)-")


class ReplayError(RuntimeError):
    """A round was already released and cannot be re-sent as it was; nothing was sent."""


def check_run_key(value: object) -> str:
    """``value`` if it is a run key, else ``ValueError`` naming it."""
    if not isinstance(value, str) or not RUN_KEY.match(value):
        raise ValueError(f"run key {value!r}: expected 32 lowercase hex digits")
    return value


def digest(arrays: Sequence[np.ndarray]) -> str:
    """SHA-256 over each array's dtype, shape and bytes, in order."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class ReleaseStore:
    """The releases of one node, in a folder beside its ledger file."""

    def __init__(self, ledger_path: Path) -> None:
        self.root = ledger_path.with_name(ledger_path.name + ".releases")

    def path(self, federation: str, run_key: str, round: int, kind: str) -> Path:
        return self.root / federation / check_run_key(run_key) / f"round-{int(round)}-{kind}"

    def save(
        self, federation: str, run_key: str, round: int, kind: str, arrays: Sequence[np.ndarray]
    ) -> str:
        """Store ``arrays`` durably; returns their :func:`digest`.

        Files of earlier rounds of the same run are removed: the server asks for round
        ``r`` only once every earlier round is recorded done, and a resumed run never asks
        for a round recorded done again (``fedsynth.server.app``).
        """
        path = self.path(federation, run_key, round, kind).with_suffix(".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{i:04d}": np.ascontiguousarray(a) for i, a in enumerate(arrays)}
        atomic_write(path, save(tensors))
        for old in path.parent.glob(f"round-*-{kind}.safetensors"):
            m = _ROUND_FILE.match(old.name)
            if m and int(m.group(1)) < round:
                old.unlink(missing_ok=True)
        return digest(arrays)

    def load(
        self, federation: str, run_key: str, round: int, kind: str, sha256: str
    ) -> list[np.ndarray]:
        """The arrays stored for this release, if their digest is ``sha256``."""
        path = self.path(federation, run_key, round, kind).with_suffix(".safetensors")
        try:
            tensors = load(path.read_bytes())
        except (OSError, SafetensorError) as exc:
            raise ReplayError(f"{path}: the stored release is unreadable ({exc})") from None
        arrays = [tensors[k] for k in sorted(tensors, key=int)]
        if digest(arrays) != sha256:
            raise ReplayError(f"{path}: the stored release does not match the ledger's digest")
        return arrays
