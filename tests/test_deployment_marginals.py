"""A marginals federation on Flower's deployment engine: the same TLS deployment as
test_deployment.py (SuperLink, three SuperNodes joined with ``node-join``, an intruder),
running the bank table's three measurement rounds."""

from __future__ import annotations

import pytest

from fedsynth.generative import marginals
from fedsynth.privacy.ledger import PrivacyLedger
from tests.factories import FEDERATIONS
from tests.test_deployment import deploy_and_run, registered_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployment-marginals")
    text = (FEDERATIONS / "bank.toml").read_text()
    assert 'kind = "gan"' in text
    spec = root / "bank-marginals.toml"
    spec.write_text(text.replace('kind = "gan"', 'kind = "marginals"'))
    return deploy_and_run(root, spec=str(spec), rounds=len(marginals.PHASES))


def test_the_three_measurements_run_over_tls_and_register_a_marginal_model(deployment):
    status = deployment["flower_status"]
    assert status.startswith("finished:completed"), status
    (run_status, model_id, recorded), model = registered_model(deployment["home"])
    assert run_status == "completed" and model_id == "bank-v1"
    assert [(r.round, r.status, r.participants) for r in recorded] == [
        (r, "completed", 3) for r in (1, 2, 3)
    ]
    assert model is not None and model.kind == "marginals"
    assert len(model.edges) == 3  # a tree over bank's four columns
    assert "Uvicorn running on https://127.0.0.1" in deployment["superlink_log"]
    rows = model.sample(2000, seed=1, conditions={"default": "Yes"})
    assert set(rows["default"].astype(str)) == {"Yes"}
    for node in deployment["nodes"]:
        entries = PrivacyLedger(node / "ledger.json").section("bank")["entries"]
        assert [e.get("phase", e["kind"]) for e in entries] == [*marginals.PHASES, "evaluate"]
        assert entries[-1]["epsilon_after"] <= 1.0
        # each node fitted the registered model from the state and scored it
        assert entries[-1]["model_sha256"] == model.fitted_digest()
    assert sorted(model.metadata["quality"]["nodes"]) == ["bank-a", "bank-b", "bank-c"]
    assert deployment["left_running"] == []
