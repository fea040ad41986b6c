"""The embedded demo: three federations (bank, hospital, retail) of three nodes each.

For each sector: the real demo table is split 80/20 (a fixed holdout for the report), the
80% is dealt to three institution nodes non-IID (``fedsynth.demo.nodes``), and the
federation trains in Flower's simulation engine with DP-SGD and SecAgg+ -- the same
ServerApp and ClientApp a real deployment runs. The registered, signed model is then loaded
from the registry and scored against the holdout. Everything is written under
``FEDSYNTH_HOME``.

The demo's nodes start with empty ledgers on every demo run (their folders are rewritten);
the records and audit log keep every run. Real nodes keep their ledgers for good.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedsynth.demo.data import prepare_demo_tables, split_holdout
from fedsynth.demo.nodes import dirichlet_split, write_nodes
from fedsynth.demo.simulate import simulate
from fedsynth.generative import quality
from fedsynth.generative.spec import load_spec
from fedsynth.generative.table import read_table, validate_table
from fedsynth.privacy.keys import KeyStore
from fedsynth.server.app import RoundEvent
from fedsynth.server.records import Database, database_url
from fedsynth.server.registry import ModelRegistry

SECTORS = ("bank", "hospital", "retail")
FEDERATIONS_DIR = Path(__file__).resolve().parents[2] / "federations"
NODES = 3
#: Each demo node's own cap, above the spec's target so that a full run fits.
DEMO_CAP_FACTOR = 1.5
QUICK_ROUNDS, QUICK_STEPS = 2, 40


@dataclass(frozen=True)
class DemoResult:
    sector: str
    kind: str
    model_id: str
    rounds: int
    node_rows: list[int]
    node_epsilons: dict[str, float | None]
    quality: float
    tstr_auc: float | None
    trtr_auc: float | None


def run_demo(
    home: Path,
    *,
    quick: bool = False,
    sectors: tuple[str, ...] = SECTORS,
    on_round: Callable[[RoundEvent], None] | None = None,
) -> list[DemoResult]:
    if not FEDERATIONS_DIR.is_dir():
        raise FileNotFoundError(
            f"{FEDERATIONS_DIR}: the demo's spec files are not there; run the demo from a "
            "source checkout installed with `pip install -e .` (see README)"
        )
    tables = prepare_demo_tables(home / "data", names=sectors)
    results = []
    for sector in sectors:
        spec_path = FEDERATIONS_DIR / f"{sector}.toml"
        spec = load_spec(spec_path)
        train_raw, holdout_raw = split_holdout(read_table(tables[sector]))
        target = spec.schema.target
        assert target is not None, f"{sector}: demo specs declare a target"
        parts = dirichlet_split(train_raw, target.name, NODES, seed=0)
        nodes_dir = home / "nodes" / sector
        shutil.rmtree(nodes_dir, ignore_errors=True)
        write_nodes(
            sector, parts, nodes_dir, epsilon_cap=spec.privacy.target_epsilon * DEMO_CAP_FACTOR
        )
        outcome = simulate(
            spec_path,
            nodes_dir,
            NODES,
            home,
            rounds=QUICK_ROUNDS if quick else 0,
            steps=QUICK_STEPS if quick else 0,
            on_round=on_round,
        )
        assert outcome.model_id is not None
        db = Database(database_url(home))
        model = ModelRegistry(home / "registry", KeyStore(home / "keys"), db).load(outcome.model_id)
        train_rows = validate_table(train_raw, spec.schema)
        holdout = validate_table(holdout_raw, spec.schema)
        scores = quality.evaluate(
            train_rows, holdout, model.sample(len(train_rows), seed=0), spec.schema
        )
        nodes = model.metadata["privacy"].get("nodes", {})
        results.append(
            DemoResult(
                sector=sector,
                kind=spec.model.kind,
                model_id=outcome.model_id,
                rounds=int(model.metadata["training"]["rounds"]),
                node_rows=[len(p) for p in parts],
                node_epsilons={k: v["epsilon"] for k, v in sorted(nodes.items())},
                quality=scores["quality"],
                tstr_auc=scores["tstr_auc"],
                trtr_auc=scores["trtr_auc"],
            )
        )
    return results
