"""A home with recorded budgets and two registered models, served with the dashboards.

Shared by the HTTP and the browser tests of the dashboards: a real uvicorn server over the
app the CLI builds (``fedsynth.cli._api``: the API with the dashboards mounted).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedsynth.cli import _api
from fedsynth.generative.training import train
from fedsynth.privacy.keys import KeyStore as SigningKeys
from fedsynth.server.api.keys import KeyStore
from fedsynth.server.records import Database, database_url
from fedsynth.server.registry import ModelRegistry
from tests.factories import clinic_records, small_frame, small_spec
from tests.http import serving

#: What clinic_records makes the nodes report: their latest epsilon and cap.
LATEST_EPSILON = {"north": 0.82, "west": 0.95}
CAP = 1.0
PRIVACY = {"north": {"epsilon": 0.8, "delta": 1e-4}, "south": {"epsilon": 0.9, "delta": 1e-4}}


def populate(home: Path) -> dict[str, str]:
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
            quality={"column_shapes": 0.81, "dcr_mean": 0.2},
        )
    keys = KeyStore(db)
    tokens = {role: keys.create(role)[1] for role in ("analyst", "compliance", "admin")}
    tokens["clinic-analyst"] = keys.create("analyst", ["clinic"])[1]
    db.dispose()
    return tokens


@contextmanager
def dashboards(home: Path, **settings: int) -> Iterator[str]:
    """Serve the API and dashboards over ``home``; yields the base URL."""
    with serving(_api(home, **settings)) as url:
        yield url
