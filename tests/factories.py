"""Test data factories: a small spec with every column type, a frame for it, the records
of a finished run, and a home with those records, two registered models and API keys."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from fedsynth.generative.spec import FederationSpec, parse_spec
from fedsynth.generative.training import train
from fedsynth.privacy.keys import KeyStore as SigningKeys
from fedsynth.server.api.keys import KeyStore
from fedsynth.server.records import (
    Database,
    Federation,
    NodeReport,
    Participation,
    Run,
    database_url,
    utcnow,
)
from fedsynth.server.registry import ModelRegistry

REPO = Path(__file__).resolve().parents[1]
FEDERATIONS = REPO / "federations"


def small_spec_dict(kind: str = "gan", epsilon: float = 1.0, steps: int = 6) -> dict:
    """A spec with every column type, nulls and an identifier."""
    return {
        "federation": {"name": "clinic", "sector": "hospital"},
        "columns": [
            {"name": "patient", "type": "categorical", "role": "identifier"},
            {"name": "ward", "type": "categorical", "categories": ["a", "b", "c", "rare"]},
            {"name": "smoker", "type": "boolean", "nullable": True},
            {"name": "age", "type": "integer", "min": 0, "max": 100},
            {"name": "visits", "type": "integer", "min": 0, "max": 5},
            {
                "name": "cost",
                "type": "float",
                "min": 0.0,
                "max": 10000.0,
                "scale": "log",
                "nullable": True,
            },
            {
                "name": "admitted",
                "type": "datetime",
                "min": "2020-01-01",
                "max": "2021-01-01",
                "format": "%Y-%m-%d",
            },
            {
                "name": "outcome",
                "type": "categorical",
                "role": "target",
                "categories": ["good", "bad"],
            },
        ],
        "model": {
            "kind": kind,
            "generator_hidden": [32, 32],
            "critic_hidden": [32],
            "latent_dim": 8,
        },
        "privacy": {"target_epsilon": epsilon, "delta": 1e-4},
        "training": {"steps": steps, "batch_size": 64, "seed": 0},
    }


def small_spec(kind: str = "gan", epsilon: float = 1.0, steps: int = 6) -> FederationSpec:
    return parse_spec(small_spec_dict(kind, epsilon, steps))


def small_frame(n: int = 600, seed: int = 0) -> pd.DataFrame:
    """A typed frame for ``small_spec`` (identifier already dropped)."""
    rng = np.random.default_rng(seed)
    ward = rng.choice(["a", "b", "c", "rare"], size=n, p=[0.5, 0.3, 0.19, 0.01])
    age = rng.integers(0, 101, size=n)
    cost = np.exp(rng.normal(5, 1.5, size=n)).clip(0, 10000)
    cost[rng.random(n) < 0.1] = np.nan
    smoker = pd.array(rng.random(n) < 0.3, dtype="boolean")
    smoker[rng.random(n) < 0.05] = pd.NA
    days = rng.integers(0, 366, size=n)
    return pd.DataFrame(
        {
            "ward": pd.Categorical(ward, categories=["a", "b", "c", "rare"]),
            "smoker": smoker,
            "age": pd.array(age, dtype="Int64"),
            "visits": pd.array(rng.integers(0, 6, size=n), dtype="Int64"),
            "cost": cost,
            "admitted": pd.Timestamp("2020-01-01") + pd.to_timedelta(days, unit="D"),
            "outcome": pd.Categorical(
                np.where(age > 60, "bad", "good"), categories=["good", "bad"]
            ),
        }
    )


def clinic_records(db: Database) -> None:
    """A finished two-round run of the clinic federation, as the server records it."""
    with db.session() as s:
        s.add(Federation(name="clinic", sector="hospital", spec_json="{}", created_at=utcnow()))
        run = Run(
            federation="clinic",
            started_at=utcnow(),
            status="completed",
            secure_aggregation=True,
            rounds_planned=2,
            min_nodes=3,
            config_json="{}",
        )
        s.add(run)
        s.flush()
        for r, eps in ((1, 0.5), (2, 0.8)):
            s.add(
                Participation(
                    run_id=run.id,
                    round=r,
                    node="north",
                    status="trained",
                    epsilon_spent=eps,
                    epsilon_cap=1.0,
                    delta=1e-4,
                    steps=10,
                    detail="",
                )
            )
            s.add(
                Participation(
                    run_id=run.id,
                    round=r,
                    node="west",
                    status="refused",
                    epsilon_spent=0.95,
                    epsilon_cap=1.0,
                    detail="would reach 1.2",
                )
            )
        s.add(
            NodeReport(
                run_id=run.id,
                round=2,
                node="north",
                metrics_json=json.dumps({"column_shapes": 0.8, "epsilon": 0.82}),
            )
        )


#: Node privacy that ``populate`` registers its models with.
PRIVACY = {"north": {"epsilon": 0.8, "delta": 1e-4}, "south": {"epsilon": 0.9, "delta": 1e-4}}


def populate(home: Path, quality: dict[str, float] | None = None) -> dict[str, str]:
    """Records of a finished clinic run, models clinic-v1 and bank-v1, one key per role
    (and a clinic-only analyst key); returns the keys by role."""
    db = Database(database_url(home))
    clinic_records(db)
    registry = ModelRegistry(home / "registry", SigningKeys(home / "keys"), db)
    model = train(small_frame(300), small_spec("gan", steps=5))
    for federation, sector in (("clinic", "hospital"), ("bank", "bank")):
        registry.register(
            model,
            federation=federation,
            sector=sector,
            run_id=None,
            round=2,
            node_privacy=PRIVACY,
            participants=["north", "south"],
            quality=quality,
        )
    keys = KeyStore(db)
    tokens = {role: keys.create(role)[1] for role in ("analyst", "compliance", "admin")}
    tokens["clinic-analyst"] = keys.create("analyst", ["clinic"])[1]
    db.dispose()
    return tokens
