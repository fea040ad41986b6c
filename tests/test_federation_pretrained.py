"""A pre-trained GAN federation (model.pretrain = "marginals") in Flower's simulation engine:
the synopsis' three measurement rounds under SecAgg+, registered; the network pre-trained
on it by the server; DP-SGD rounds from there; both spends in each node's one ledger."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import tomli_w

from fedsynth.demo.data import prepare_demo_tables
from fedsynth.demo.nodes import dirichlet_split, write_nodes
from fedsynth.demo.simulate import simulate
from fedsynth.generative import pretraining
from fedsynth.generative.accounting import epsilon_of
from fedsynth.generative.marginals import MarginalModel
from fedsynth.generative.spec import load_spec
from fedsynth.generative.table import read_table
from fedsynth.privacy.keys import KeyStore
from fedsynth.privacy.ledger import PrivacyLedger
from fedsynth.server.audit import AuditLog
from fedsynth.server.records import Database, database_url
from fedsynth.server.registry import ModelRegistry
from tests.factories import FEDERATIONS

ROUNDS = 2
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    raw = tomllib.loads((FEDERATIONS / "bank.toml").read_text())
    raw["model"]["pretrain"] = "marginals"
    raw["privacy"].pop("accountant", None)  # RDP by default with pre-training
    spec_path = home / "bank-pretrained.toml"
    spec_path.write_text(tomli_w.dumps(raw))
    tables = prepare_demo_tables(home / "data", names=("bank",))
    parts = dirichlet_split(read_table(tables["bank"]), "default", 3, seed=1)
    nodes = home / "nodes"
    write_nodes("bank", parts, nodes, epsilon_cap=1.5)
    outcome = simulate(spec_path, nodes, 3, home, rounds=ROUNDS, steps=8)
    db = Database(database_url(home))
    registry = ModelRegistry(home / "registry", KeyStore(home / "keys"), db)
    return {
        "home": home,
        "nodes": nodes,
        "outcome": outcome,
        "db": db,
        "registry": registry,
        "spec": load_spec(spec_path),
    }


def test_the_synopsis_is_registered_first_and_the_network_names_it(run):
    outcome, registry = run["outcome"], run["registry"]
    assert outcome.status == "completed" and outcome.model_id == "bank-v2"
    synopsis = registry.load("bank-v1")
    assert isinstance(synopsis, MarginalModel)
    model = registry.load("bank-v2")
    assert model.kind == "gan" and model.metadata["training"]["rounds"] == ROUNDS
    described = model.metadata["privacy"]["pretraining"]
    assert described["synopsis_model"] == "bank-v1"
    assert described["fitted_sha256"] == synopsis.fitted_digest()
    rows = model.sample(300, seed=2)
    assert rows["balance"].between(0, 3000).all()
    events = AuditLog(run["db"]).events(event_type="model_pretrained")
    assert [e.payload["synopsis_model"] for e in events] == ["bank-v1"]


def test_each_ledger_composes_the_synopsis_and_dp_sgd_within_the_target(run):
    spec = run["spec"]
    delta = spec.privacy.delta
    synopsis = pretraining.synopsis_history(spec)
    reported = run["registry"].load("bank-v2").metadata["privacy"]["nodes"]
    for i in range(3):
        ledger = PrivacyLedger(Path(run["nodes"]) / f"node-{i}" / "ledger.json")
        entries = ledger.section("bank")["entries"]
        first, second = sorted({e["run"] for e in entries})  # the synopsis' run, then ours
        measured = [h for e in entries if e["run"] == first for h in e["history"]]
        assert [tuple(h) for h in measured] == synopsis  # the planned synopsis, all of it
        trained = [e["round"] for e in entries if e["run"] == second and e["kind"] == "train"]
        assert trained == list(range(1, ROUNDS + 1))
        history = [h for e in entries for h in e["history"]]
        spent = epsilon_of(history, delta, "rdp")
        assert spent == pytest.approx(ledger.epsilon("bank", delta, "rdp"), rel=1e-9)
        # the planned rounds reach the target; ROUNDS of them (steps overridden) stay within
        assert epsilon_of(synopsis, delta, "rdp") < spent <= spec.privacy.target_epsilon * 1.001
        institution = f"bank-{'abc'[i]}"
        assert reported[institution]["epsilon"] == pytest.approx(spent, rel=1e-6)
