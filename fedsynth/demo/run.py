"""The embedded demo: prepare the real demo tables, train one DP model per sector, report.

At this stage of the project each sector's model is trained centrally, on one node's
table (the 80% training split); the federated run over three nodes replaces this step
when the Flower server and clients land. Everything is written under ``FEDSYNTH_HOME``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedsynth.demo.data import prepare_demo_tables, split_holdout
from fedsynth.generative import quality
from fedsynth.generative.spec import FederationSpec, load_spec, parse_spec
from fedsynth.generative.table import read_table, validate_table
from fedsynth.generative.training import Progress, train

SECTORS = ("bank", "hospital", "retail")
FEDERATIONS_DIR = Path(__file__).resolve().parents[2] / "federations"


def fedsynth_home() -> Path:
    """All state lives here: ``$FEDSYNTH_HOME``, default ``~/.fedsynth``."""
    return Path(os.environ.get("FEDSYNTH_HOME") or Path.home() / ".fedsynth").expanduser()


@dataclass(frozen=True)
class DemoResult:
    sector: str
    kind: str
    rows: int
    epsilon: float | str
    quality: float
    tstr_auc: float | None
    trtr_auc: float | None
    fit_seconds: float
    model_dir: Path


def quick_spec(spec: FederationSpec) -> FederationSpec:
    """A few hundred steps: enough to show the whole path, not to reach full quality."""
    raw = spec.model_dump(mode="python")
    raw["training"]["epochs"] = None
    raw["training"]["steps"] = 60
    return parse_spec(raw, source=f"{spec.federation.name} (quick)")


def _bind(
    on_progress: Callable[[str, Progress], None] | None, sector: str
) -> Callable[[Progress], None] | None:
    if on_progress is None:
        return None
    return lambda p: on_progress(sector, p)


def run_demo(
    home: Path,
    *,
    quick: bool = False,
    sectors: tuple[str, ...] = SECTORS,
    on_progress: Callable[[str, Progress], None] | None = None,
) -> list[DemoResult]:
    if not FEDERATIONS_DIR.is_dir():
        raise FileNotFoundError(
            f"{FEDERATIONS_DIR}: the demo's spec files are not there; run the demo from a "
            "source checkout installed with `pip install -e .` (see README)"
        )
    tables = prepare_demo_tables(home / "data", names=sectors)
    results = []
    for sector in sectors:
        spec = load_spec(FEDERATIONS_DIR / f"{sector}.toml")
        if quick:
            spec = quick_spec(spec)
        train_raw, holdout_raw = split_holdout(read_table(tables[sector]))
        train_rows = validate_table(train_raw, spec.schema)
        holdout = validate_table(holdout_raw, spec.schema)
        model = train(train_rows, spec, progress=_bind(on_progress, sector))
        model_dir = model.save(home / "models" / sector)
        scores = quality.evaluate(
            train_rows, holdout, model.sample(len(train_rows), seed=0), spec.schema
        )
        results.append(
            DemoResult(
                sector=sector,
                kind=spec.model.kind,
                rows=len(train_rows),
                epsilon=model.metadata["privacy"]["epsilon"],
                quality=scores["quality"],
                tstr_auc=scores["tstr_auc"],
                trtr_auc=scores["trtr_auc"],
                fit_seconds=model.metadata["training"]["fit_seconds"],
                model_dir=model_dir,
            )
        )
    return results
