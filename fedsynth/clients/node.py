"""A node's own configuration: which table, which ledger, which cap, under which name.

Deployment: ``flower-supernode --node-config "institution='...' data-path='...'
ledger-path='...' epsilon-cap=3.0"`` (``fedsynth node join`` writes this). Simulation: every
virtual node reads ``<nodes-dir>/node-<partition-id>/node.toml`` with the same keys, so the
demo's nodes are configured exactly as real ones are.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsynth.generative.spec import FederationSpec

if TYPE_CHECKING:  # pandas is imported by load_rows, when a handler needs the table
    import pandas as pd

KEYS = ("institution", "data-path", "ledger-path", "epsilon-cap", "outbox-path", "own-noise-cap")


class NodeConfigError(ValueError):
    """The node's configuration is missing or invalid; the message names the key."""


@dataclass(frozen=True)
class NodeConfig:
    institution: str
    data_path: Path
    ledger_path: Path
    epsilon_cap: float
    outbox_path: Path
    #: Largest epsilon this node accepts under its own share of split noise alone
    #: (privacy.noise = "shared": what a server that sees its update could learn);
    #: ``epsilon-cap`` unless set, so that by default no server can learn more than the cap.
    own_noise_cap: float

    @classmethod
    def from_mapping(cls, raw: dict[str, Any], source: str) -> NodeConfig:
        unknown = sorted(set(raw) - set(KEYS) - {"partition-id", "num-partitions"})
        if unknown:
            raise NodeConfigError(f"{source}: unknown key(s) {unknown}; known: {list(KEYS)}")
        for key in ("institution", "data-path", "ledger-path", "epsilon-cap"):
            if key not in raw:
                raise NodeConfigError(f"{source}: required key {key!r} is missing")
        try:
            cap = float(raw["epsilon-cap"])
        except (TypeError, ValueError):
            raise NodeConfigError(
                f"{source}: epsilon-cap must be a number, got {raw['epsilon-cap']!r}"
            ) from None
        if math.isnan(cap) or cap <= 0:
            raise NodeConfigError(f"{source}: epsilon-cap must be > 0, got {cap}")
        try:
            own_cap = float(raw.get("own-noise-cap", cap))
        except (TypeError, ValueError):
            raise NodeConfigError(
                f"{source}: own-noise-cap must be a number, got {raw['own-noise-cap']!r}"
            ) from None
        if math.isnan(own_cap) or own_cap < cap:
            raise NodeConfigError(
                f"{source}: own-noise-cap must be at least epsilon-cap ({cap:g}), got {own_cap}"
            )
        institution = str(raw["institution"]).strip()
        if not institution:
            raise NodeConfigError(f"{source}: institution must not be empty")
        ledger = Path(str(raw["ledger-path"])).expanduser()
        outbox = raw.get("outbox-path") or ledger.with_name("outbox.jsonl")
        return cls(
            institution,
            Path(str(raw["data-path"])).expanduser(),
            ledger,
            cap,
            Path(str(outbox)).expanduser(),
            own_cap,
        )


def resolve(node_config: dict[str, Any], run_config: dict[str, Any]) -> NodeConfig:
    """The node's settings from Flower's node config, or, for a virtual node in
    simulation, from ``<nodes-dir>/node-<partition-id>/node.toml``."""
    if "data-path" in node_config:
        return NodeConfig.from_mapping(dict(node_config), "node config")
    nodes_dir = run_config.get("nodes-dir")
    if "partition-id" not in node_config or not nodes_dir:
        raise NodeConfigError(
            "node config: set institution, data-path, ledger-path and epsilon-cap "
            "(flower-supernode --node-config, or fedsynth node join)"
        )
    path = Path(str(nodes_dir)) / f"node-{int(node_config['partition-id'])}" / "node.toml"
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NodeConfigError(f"{path}: no such node configuration") from None
    except tomllib.TOMLDecodeError as exc:
        raise NodeConfigError(f"{path}: invalid TOML: {exc}") from None
    return NodeConfig.from_mapping(raw, str(path))


#: Where a ClientApp keeps run-config defaults (Flower forbids changing ``run_config``).
DEFAULTS_RECORD = "fedsynth-run-config-defaults"


def resolve_context(context: Any) -> NodeConfig:
    """:func:`resolve` with the app's run-config defaults (see ``make_client_app``)."""
    defaults = context.state.config_records.get(DEFAULTS_RECORD, {})
    return resolve(dict(context.node_config), {**dict(defaults), **dict(context.run_config)})


_TABLES: dict[tuple[str, float, str], pd.DataFrame] = {}


def load_rows(config: NodeConfig, spec: FederationSpec) -> pd.DataFrame:
    """The node's table, validated against the spec's schema, identifiers dropped.

    Cached per process by (path, modification time, federation): a simulation's node runs
    many messages in one worker. A table that does not fit raises ``TableError``, which
    names the column and rows; nothing is trained.
    """
    path = config.data_path
    key = (str(path), path.stat().st_mtime if path.exists() else -1.0, spec.federation.name)
    if key not in _TABLES:
        from fedsynth.generative.table import load_table

        frame = load_table(path, spec.schema)  # streamed: checked block by block
        _TABLES.clear()  # one table per worker at a time: bounded memory
        _TABLES[key] = frame
    return _TABLES[key]
