"""A marginals federation in Flower's simulation engine: three measurement rounds under
SecAgg+, the same nodes, ledgers, records and registry as a GAN federation.

One run for the module: the bank table over four nodes, node 3 capped below the cost of the
measurements (so it refuses), node 0's table carrying a canary row. The noise is split
across the three nodes SecAgg+ must sum (``privacy.noise = "shared"``); each node's own
noise is what tests/test_marginals.py checks for the default.
"""

from __future__ import annotations

import json
import math

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from fedsynth.clients.replay import ReleaseStore
from fedsynth.demo.simulate import simulate
from fedsynth.generative import marginals
from fedsynth.generative.accounting import epsilon_of
from fedsynth.generative.codec import codec_of
from fedsynth.generative.spec import load_spec
from fedsynth.generative.table import load_table
from fedsynth.privacy.keys import KeyStore
from fedsynth.privacy.ledger import PrivacyLedger
from fedsynth.server.api.keys import KeyStore as ApiKeys
from fedsynth.server.audit import AuditLog
from fedsynth.server.records import Database, Participation, Run, database_url
from fedsynth.server.registry import ModelRegistry
from tests.dashboard_server import dashboards, logged_in
from tests.factories import FEDERATIONS
from tests.test_federation import bank_nodes, make_canary_mod


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    spec_path = home / "bank-marginals.toml"
    text = (FEDERATIONS / "bank.toml").read_text()
    assert 'kind = "gan"' in text
    assert "\n[privacy]\n" in text
    text = text.replace('kind = "gan"', 'kind = "marginals"')
    spec_path.write_text(text.replace("\n[privacy]\n", '\n[privacy]\nnoise = "shared"\n'))
    # node 3's cap (1.5) covers the budget (1.0) but not its own share of the noise alone
    # (1.76): by default the own-noise cap is the cap, so it refuses before measuring
    nodes = bank_nodes(home, last_cap=1.5)
    canary_log = home / "canary.jsonl"
    outcome = simulate(spec_path, nodes, 4, home, extra_mods=[make_canary_mod(canary_log)])
    db = Database(database_url(home))
    return {
        "home": home,
        "nodes": nodes,
        "outcome": outcome,
        "db": db,
        "canary": canary_log,
        "spec": load_spec(spec_path),
    }


def test_the_run_registers_a_marginal_model_that_samples_with_conditions(run):
    outcome, db = run["outcome"], run["db"]
    assert outcome.status == "completed" and outcome.model_id == "bank-v1"
    registry = ModelRegistry(run["home"] / "registry", KeyStore(run["home"] / "keys"), db)
    model = registry.load(outcome.model_id)
    assert model.kind == "marginals" and model.metadata["training"]["rounds"] == 3
    assert sorted(model.metadata["privacy"]["nodes"]) == ["bank-a", "bank-b", "bank-c"]
    assert model.metadata["training"]["nodes_per_round"] == [3, 3, 3]
    rows = model.sample(3000, seed=4, conditions={"student": "Yes"})
    assert len(rows) == 3000 and set(rows["student"].astype(str)) == {"Yes"}
    # the fitted tree keeps the table's strongest dependence: students earn far less. (Its
    # score is about 30 noise deviations above any other pair's, so the noise, which is never
    # seeded, cannot drop it; default-balance is only about 2 deviations above default-income
    # at epsilon 1 and its edge was missed in 1 of 30 runs.)
    assert (1, 3) in model.edges  # columns: default, student, balance, income
    rows = model.sample(20_000, seed=5)
    student = rows["student"].astype(str) == "Yes"
    assert rows.loc[~student, "income"].mean() > rows.loc[student, "income"].mean() + 10_000


def test_each_ledger_holds_the_measurements_and_the_evaluation_and_equals_a_recomputation(
    run,
):
    spec = run["spec"]
    plan = marginals.plan_for_spec(spec, marginals.domain_sizes(codec_of(spec)))
    assert plan.split == spec.federation.min_nodes == 3
    delta = spec.privacy.delta
    for i in range(3):
        ledger = PrivacyLedger(run["nodes"] / f"node-{i}" / "ledger.json")
        entries = ledger.section("bank")["entries"]
        assert [(e["kind"], e["round"], e.get("phase")) for e in entries] == [
            *(("train", r, phase) for r, phase in enumerate(marginals.PHASES, start=1)),
            ("evaluate", 3, None),
        ]
        measured = [tuple(h) for e in entries[:3] for h in e["history"]]
        assert measured == plan.full_history()
        evaluated = [tuple(h) for h in entries[3]["history"]]
        assert evaluated == plan.evaluation_history() and evaluated
        # the evaluation takes privacy.evaluation_share of the zCDP budget: three releases
        # with noise multiplier m cost 3 / (2 m^2), the measurements k / (2 sigma^2) each
        ((m, _, k),) = evaluated
        rho = {"evaluation": k / (2 * m**2)}
        rho["measured"] = sum(t / (2 * s**2) for s, _, t in measured)
        share = rho["evaluation"] / (rho["evaluation"] + rho["measured"])
        assert share == pytest.approx(spec.privacy.evaluation_share, rel=1e-6)
        recomputed = epsilon_of([*measured, *evaluated], delta, "rdp")
        assert recomputed == pytest.approx(entries[-1]["epsilon_after"], rel=1e-9)
        assert 0.995 * spec.privacy.target_epsilon <= recomputed <= spec.privacy.target_epsilon
        # beside the budget, what the node's own share of the noise is worth alone: each
        # node adds 1/sqrt(3) of the measurements' noise, so against a server that sees its
        # update it has about 3 times their zCDP; the evaluation is in the clear either way
        own = [tuple(h) for e in entries[:3] for h in e["own_noise_history"]]
        assert own == plan.full_history(own_noise=True)
        assert [s for s, _, _ in own] == [
            pytest.approx(s / math.sqrt(3), rel=1e-9) for s, _, _ in measured
        ]
        own_epsilon = epsilon_of([*own, *evaluated], delta, "rdp")
        assert own_epsilon == pytest.approx(ledger.own_noise_epsilon("bank", delta, "rdp"))
        assert own_epsilon > 1.5 * recomputed


def test_each_node_scored_the_registered_model_and_the_registry_holds_the_scores(run):
    """The evaluation after round 3: every node fitted the same model from the state as the
    server registered (same digest), and released noisy sums whose ratios are its scores."""
    home = run["home"]
    registry = ModelRegistry(home / "registry", KeyStore(home / "keys"), run["db"])
    model = registry.load(run["outcome"].model_id)
    quality = model.metadata["quality"]
    assert sorted(quality["nodes"]) == ["bank-a", "bank-b", "bank-c"]
    assert "scored_another_model" not in quality
    for scores in quality["nodes"].values():
        # a faithful model: column shapes near 1, each with the deviation of its noise
        assert 0.8 < scores["column_shapes"] <= 1.0 and 0 < scores["column_shapes_sd"] < 0.05
        assert 0.0 <= scores["dcr_mean"] < 0.2 and 0 < scores["dcr_mean_sd"] < 0.05
    for i in range(3):
        ledger = PrivacyLedger(run["nodes"] / f"node-{i}" / "ledger.json")
        (evaluation,) = [e for e in ledger.section("bank")["entries"] if e["kind"] == "evaluate"]
        assert evaluation["model_sha256"] == model.fitted_digest()


def test_each_node_added_its_share_of_the_noise_and_the_model_says_so(run):
    """A node's stored release minus the exact histogram of its own table is its noise:
    about sigma / sqrt(3) per cell, not sigma. The registry and the records say whose noise
    protects what."""
    spec, home = run["spec"], run["home"]
    codec = codec_of(spec)
    sizes = marginals.domain_sizes(codec)
    plan = marginals.plan_for_spec(spec, sizes)
    ledger_path = run["nodes"] / "node-1" / "ledger.json"
    (entry,) = [
        e
        for e in PrivacyLedger(ledger_path).section("bank")["entries"]
        if e["round"] == 3 and e["kind"] == "train"
    ]
    arrays = ReleaseStore(ledger_path).load(
        "bank", entry["run_key"], 3, "train", entry["update_sha256"]
    )
    measured = np.asarray(arrays[2], dtype=np.float64) * spec.secure_aggregation.count_scale
    rows = load_table(run["nodes"] / "node-1" / "data.csv", spec.schema)
    codes = marginals.column_codes(codec, rows)
    registry = ModelRegistry(home / "registry", KeyStore(home / "keys"), run["db"])
    model = registry.load(run["outcome"].model_id)
    exact = np.zeros_like(measured)
    offsets = marginals._pair_offsets(sizes)
    for edge in model.edges:
        counts = marginals.histogram(codes, sizes, edge)
        exact[offsets[edge] : offsets[edge] + counts.size] = counts
    cells = np.concatenate(
        [np.arange(offsets[e], offsets[e] + sizes[e[0]] * sizes[e[1]]) for e in model.edges]
    )
    noise = (measured - exact)[cells]
    assert len(cells) >= 200
    share = plan.node_sigma("two_way")
    assert share == pytest.approx(plan.sigma_two_way / math.sqrt(3))
    # 200+ cells estimate the spread within about 5 %; sigma itself is 73 % larger
    assert 0.8 * share < float(noise.std()) < 1.2 * share
    privacy = model.metadata["privacy"]
    assert privacy["noise"] == "shared" and privacy["noise_split"] == 3
    assert privacy["own_noise_epsilon"] > 1.5 * spec.privacy.target_epsilon
    assert all(
        n["own_noise_epsilon"] == pytest.approx(privacy["own_noise_epsilon"], rel=1e-9)
        for n in privacy["nodes"].values()
    )
    with run["db"].session() as s:
        trained = s.scalars(select(Participation).where(Participation.status == "trained")).all()
    assert trained and all("against a server that sees" in p.detail for p in trained)


def test_the_node_capped_below_its_own_noise_epsilon_refused_before_measuring(run):
    ledger = PrivacyLedger(run["nodes"] / "node-3" / "ledger.json")
    section = ledger.section("bank")
    assert section["entries"] == [] and section["refusals"]
    assert {r["measure"] for r in section["refusals"]} == {"own-noise epsilon"}
    # round 1 plans all three measurements, later rounds only those still to come
    assert 1.7 < section["refusals"][0]["would_reach"] < 1.85
    assert all(r["would_reach"] > r["cap"] == 1.5 for r in section["refusals"])
    events = AuditLog(run["db"]).events(event_type="node_refused_budget")
    assert {e.actor for e in events} == {"bank-d"}
    assert {e.payload["measure"] for e in events} == {"own-noise epsilon"}
    assert {(e.payload["cap"], e.payload["measure_cap"]) for e in events} == {(1.5, 1.5)}
    with run["db"].session() as s:
        refused = s.scalars(select(Participation).where(Participation.status == "refused")).all()
    assert {p.round for p in refused} == {1, 2, 3}
    assert all("above its own-noise cap 1.5" in p.detail for p in refused)
    # the budget's figures stay on the record: nothing spent, cap 1.5
    assert {(p.epsilon_spent, p.epsilon_cap) for p in refused} == {(0.0, 1.5)}


def test_the_state_holds_exactly_the_sum_of_the_unmasked_measurements(run):
    """What SecAgg+ unmasked (the checkpointed state) against what each node measured (its
    stored release, before masking): one count is one quantisation step, so the sum is
    exact, which split noise relies on. A node keeps only its last round's release (earlier
    ones are pruned), so round 3 is compared."""
    spec, db, home = run["spec"], run["db"], run["home"]
    scale = spec.secure_aggregation.count_scale
    registry = ModelRegistry(home / "registry", KeyStore(home / "keys"), db)
    with db.session() as s:
        run_id = s.scalars(select(Run.id)).one()
    state = registry.load_checkpoint("bank", run_id, 3)
    unmasked = []
    for i in range(3):
        ledger_path = run["nodes"] / f"node-{i}" / "ledger.json"
        (entry,) = [
            e
            for e in PrivacyLedger(ledger_path).section("bank")["entries"]
            if e["round"] == 3 and e["kind"] == "train"
        ]
        arrays = ReleaseStore(ledger_path).load(
            "bank", entry["run_key"], 3, "train", entry["update_sha256"]
        )
        counts = np.asarray(arrays[2], dtype=np.float64) * scale
        assert np.array_equal(counts, np.rint(counts))  # integers, as measured
        unmasked.append(counts)
    total = np.sum(unmasked, axis=0)
    assert np.abs(total).max() > 100  # real counts, not an empty slot
    assert np.array_equal(np.asarray(state[2], dtype=np.float64), total)


def test_no_canary_value_left_a_node_and_no_update_was_plain(run):
    lines = [json.loads(line) for line in run["canary"].read_text().splitlines()]
    assert {line["type"] for line in lines} == {"query", "train", "evaluate"}
    assert [line for line in lines if line["leaks"]] == []
    outbox = (run["nodes"] / "node-0" / "outbox.jsonl").read_text().splitlines()
    trains = [json.loads(line) for line in outbox if '"train"' in line]
    assert trains and all("secaggplus_configs" in t["content"]["configs"] for t in trains)
    assert all(not any(t["content"]["arrays"].values()) for t in trains)


def test_the_api_and_dashboards_show_whose_noise_protects_each_node(run):
    """The API's model detail, the analyst's model page and the compliance officer's node
    page all say that the noise was split, and what a node's share alone is worth."""
    home, db = run["home"], run["db"]
    token = ApiKeys(db).create("admin")[1]
    with dashboards(home) as url:
        detail = httpx.get(
            f"{url}/v1/models/{run['outcome'].model_id}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        ).json()
        browser = logged_in(url, token)
        model = browser.get(f"/dashboards/analyst/models/{run['outcome'].model_id}")
        node = browser.get("/dashboards/compliance/nodes/bank/bank-a")
    assert detail["noise"]["kind"] == "shared" and detail["noise"]["split"] == 3
    assert detail["noise"]["own_noise_epsilon"] == pytest.approx(1.7579, abs=1e-3)
    assert model.status_code == 200 and node.status_code == 200
    assert "split across 3 nodes under SecAgg+; ε 1.76 for a node whose update" in model.text
    assert "if its update is seen" in model.text
    assert node.text.count("against a server that sees this node&#39;s update") == 3
