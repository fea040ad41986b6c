"""The node's privacy ledger: the authority on what this node has spent, kept on its disk.

One JSON file per node, one section per federation: every DP release the node made (its
Gaussian-mechanism count histogram, each round's DP-SGD steps, each evaluation score) as
accountant history entries ``(noise multiplier, sample rate, steps)`` -- the same record
Opacus' accountants keep -- plus the refusals. Epsilon is always recomputed from the whole
history, never summed, so composition is exact for the chosen accountant.

Flower's own Opacus example builds a fresh PrivacyEngine every round and so reports one
round's epsilon; this ledger composes all of them, across rounds and runs.

Writes are atomic (temporary file, fsync, rename, fsync of the folder) under an exclusive
file lock, so a crash leaves either the old or the new ledger, never half of one, and two
processes of the same node never interleave. A round is recorded as spent *before* its
update leaves the node: if the node dies after sending, the ledger over-counts, never
under-counts.

A retried round is not a second release. Each entry made for a server's run carries that
run's key (``run_key``: a random id the server keeps across restarts of the same run) and
its round; :meth:`PrivacyLedger.spend` refuses a second entry of the same kind for the same
key and round (:class:`DuplicateRelease`), and :meth:`PrivacyLedger.released` finds the
first, so that a node asked again re-sends what it already released (post-processing:
no new cost) instead of spending twice.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedsynth.files import atomic_write
from fedsynth.generative.accounting import epsilon_of

FORMAT = "fedsynth-ledger/1"
Entry = tuple[float, float, int]


class LedgerError(ValueError):
    """The ledger file is unreadable or not a fedsynth ledger; nothing was changed."""


class DuplicateRelease(LedgerError):
    """An entry of this kind was already recorded for this run key and round; nothing was
    changed (re-send what was released, see :meth:`PrivacyLedger.released`)."""


@dataclass(frozen=True)
class BudgetCheck:
    allowed: bool
    spent: float  # epsilon so far
    after: float  # epsilon if the work is done
    cap: float
    #: what was checked: "epsilon" (the budget) or "own-noise epsilon" (a node's own share
    #: of split noise alone, see :meth:`PrivacyLedger.own_noise_epsilon`)
    measure: str = "epsilon"

    @property
    def remaining(self) -> float:
        return max(0.0, self.cap - self.spent)


class PrivacyLedger:
    """``PrivacyLedger(path)``; every method reads the file fresh (another process may have
    written it) and every change is written before the method returns."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # ------------------------------------------------------------------ reading
    def history(self, federation: str, *, own_noise: bool = False) -> list[Entry]:
        """Every entry's accountant history; with ``own_noise``, each entry's
        ``own_noise_history`` where it keeps one (see :meth:`own_noise_epsilon`)."""
        return _history(self._read()["federations"].get(federation, {}), own_noise=own_noise)

    def epsilon(self, federation: str, delta: float, accountant: str = "prv") -> float:
        return epsilon_of(self.history(federation), delta, accountant)

    def own_noise_epsilon(self, federation: str, delta: float, accountant: str = "prv") -> float:
        """Epsilon of this node's releases protected by its own noise alone: what a server
        that saw its updates could learn. Equal to :meth:`epsilon` unless a federation split
        its noise across nodes under secure aggregation (``privacy.noise = "shared"``),
        whose entries keep ``own_noise_history`` beside the ``history`` the cap governs."""
        return epsilon_of(self.history(federation, own_noise=True), delta, accountant)

    def section(self, federation: str) -> dict[str, Any]:
        """The federation's raw record: entries, refusals, runs, released counts."""
        return dict(self._read()["federations"].get(federation, {}))

    def released(
        self, federation: str, kind: str, run_key: str, round: int
    ) -> dict[str, Any] | None:
        """The entry of ``kind`` recorded for ``run_key`` and ``round``, or None."""
        entries = self._read()["federations"].get(federation, {}).get("entries", [])
        return next((dict(e) for e in entries if _same_release(e, kind, run_key, round)), None)

    def federations(self) -> list[str]:
        return sorted(self._read()["federations"])

    def check(
        self,
        federation: str,
        planned: Sequence[Entry],
        *,
        cap: float,
        delta: float,
        accountant: str = "prv",
        own_noise: bool = False,
    ) -> BudgetCheck:
        """Would ``planned`` releases keep this node within ``cap``? With ``own_noise``,
        ``planned`` and the ledger are read as protected by the node's own noise alone."""
        history = self.history(federation, own_noise=own_noise)
        spent = epsilon_of(history, delta, accountant)
        after = epsilon_of([*history, *planned], delta, accountant) if planned else spent
        allowed = after <= cap * (1 + 1e-9) or math.isinf(cap)
        return BudgetCheck(
            allowed, spent, after, cap, "own-noise epsilon" if own_noise else "epsilon"
        )

    # ------------------------------------------------------------------ writing
    def spend(
        self,
        federation: str,
        kind: str,
        history: Sequence[Entry],
        *,
        delta: float,
        accountant: str = "prv",
        run: int | None = None,
        round: int | None = None,
        run_key: str | None = None,
        detail: dict[str, Any] | None = None,
        remember: dict[str, Any] | None = None,
    ) -> float:
        """Record releases the node is about to make; returns epsilon after them.

        With ``run_key`` (and ``round``), a second entry of ``kind`` for the same key and
        round raises :class:`DuplicateRelease`. ``remember`` maps names to released values
        kept (as :meth:`remember` does) in the same write as the entry: both or neither.
        """
        with self._locked() as data:
            section = self._section(data, federation, delta, accountant)
            if run_key is not None:
                if round is None:
                    raise ValueError("a spend with a run_key needs its round")
                if any(_same_release(e, kind, run_key, round) for e in section["entries"]):
                    raise DuplicateRelease(
                        f"{self.path}: federation {federation!r} already recorded a {kind!r} "
                        f"release for run {run_key} round {round}; it is not spent twice"
                    )
            entry = {
                "time": _now(),
                "kind": kind,
                "run": run,
                "round": round,
                **({"run_key": run_key} if run_key is not None else {}),
                "history": [[float(s), float(q), int(t)] for s, q, t in history],
                **(detail or {}),
            }
            section["entries"].append(entry)
            if remember:
                section.setdefault("released", {}).update(remember)
            entry["epsilon_after"] = epsilon_of(_history(section), delta, accountant)
            if "own_noise_history" in entry:
                entry["own_noise_epsilon_after"] = epsilon_of(
                    _history(section, own_noise=True), delta, accountant
                )
            return float(entry["epsilon_after"])

    def refuse(
        self,
        federation: str,
        kind: str,
        check: BudgetCheck,
        *,
        delta: float,
        accountant: str = "prv",
        run: int | None = None,
        round: int | None = None,
    ) -> None:
        with self._locked() as data:
            section = self._section(data, federation, delta, accountant)
            section["refusals"].append(
                {
                    "time": _now(),
                    "kind": kind,
                    "run": run,
                    "round": round,
                    "spent": check.spent,
                    "would_reach": check.after,
                    "cap": check.cap,
                    **({"measure": check.measure} if check.measure != "epsilon" else {}),
                }
            )

    def remember(self, federation: str, key: str, value: Any, *, delta: float) -> None:
        """Keep a value already released (such as the noisy counts) for re-sending."""
        with self._locked() as data:
            self._section(data, federation, delta, "prv").setdefault("released", {})[key] = value

    def recall(self, federation: str, key: str) -> Any:
        return self.section(federation).get("released", {}).get(key)

    # ------------------------------------------------------------------ file
    def _section(
        self, data: dict[str, Any], federation: str, delta: float, accountant: str
    ) -> dict[str, Any]:
        section = data["federations"].setdefault(
            federation,
            {"delta": delta, "accountant": accountant, "entries": [], "refusals": []},
        )
        if section["delta"] != delta:
            raise LedgerError(
                f"{self.path}: federation {federation!r} was accounted at delta "
                f"{section['delta']:g}, not {delta:g}; a spec change of delta needs a new "
                "federation name"
            )
        return section

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"format": FORMAT, "federations": {}}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LedgerError(f"{self.path}: unreadable ledger ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise LedgerError(f"{self.path}: not a {FORMAT} file")
        return data

    @contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(self.path.with_suffix(".lock"), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self._read()
            yield data
            atomic_write(self.path, json.dumps(data, indent=1).encode())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            os.close(lock)


def _history(section: dict[str, Any], *, own_noise: bool = False) -> list[Entry]:
    key = "own_noise_history" if own_noise else "history"
    return [
        (float(s), float(q), int(t))
        for item in section.get("entries", [])
        for s, q, t in item.get(key, item["history"])
    ]


def _same_release(entry: dict[str, Any], kind: str, run_key: str, round: int) -> bool:
    return (
        entry.get("kind") == kind
        and entry.get("run_key") == run_key
        and entry.get("round") == round
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
