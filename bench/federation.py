"""Federation benchmark: round cost of SecAgg+, bytes per node, federated vs central quality.

All in Flower's simulation engine on this machine, one JSON line per measurement, written
to bench/results/federation.jsonl and the table in docs/benchmarks.md:

- ``round``: wall time of a round (query, DP-SGD steps, aggregation, evaluation, records)
  with and without SecAgg+ at 3 and 10 nodes (bank table split non-IID, the second round
  of two, so start-up is not counted), and the bytes node 0 sent in that round (its outbox);
- ``scale``: 100 virtual nodes completing one SecAgg+ round;
- ``quality``: the bank federation (3 non-IID nodes, the spec's full training) against the
  same model trained centrally on the pooled rows, both at the spec's epsilon, scored on
  the same 20% holdout, for each of several training seeds and their mean; and the same
  federation with plain FedAvg (``federation.server_learning_rate = 1``) as the baseline.

    python bench/federation.py --quick     # rounds only, 3 nodes (a few minutes)
    python bench/federation.py --quality-only   # federated vs central, 3 seeds (~15 min)
    python bench/federation.py             # everything (about half an hour on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
from sqlalchemy import select

from fedsynth.demo.data import prepare_demo_tables, split_holdout
from fedsynth.demo.nodes import dirichlet_split, write_nodes
from fedsynth.demo.simulate import simulate
from fedsynth.generative import quality
from fedsynth.generative.spec import load_spec
from fedsynth.generative.table import read_table, validate_table
from fedsynth.generative.training import train
from fedsynth.home import fedsynth_home
from fedsynth.privacy.keys import KeyStore
from fedsynth.server.records import Database, RoundRecord, database_url
from fedsynth.server.registry import ModelRegistry

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "federation.jsonl"
DOC = REPO / "docs" / "benchmarks.md"
BANK = REPO / "federations" / "bank.toml"
ROUND_STEPS = 20  # DP-SGD steps per node per round in the round-time runs


def spec_variant(directory: Path, *, secure: bool) -> Path:
    raw = tomllib.loads(BANK.read_text())
    raw.setdefault("secure_aggregation", {})["enabled"] = secure
    if not secure:
        raw["federation"]["min_nodes"] = 1
    path = directory / f"bank-{'secagg' if secure else 'plain'}.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def nodes_for(train_raw, n: int, directory: Path, alpha: float = 1.0) -> Path:
    parts = dirichlet_split(train_raw, "default", n, alpha=alpha, seed=0)
    write_nodes("bank", parts, directory, epsilon_cap=10)
    return directory


def round_figures(home: Path, nodes_dir: Path, run_id: int, last_round: int) -> dict[str, Any]:
    with Database(database_url(home)).session() as s:
        record = s.scalars(
            select(RoundRecord).where(RoundRecord.run_id == run_id, RoundRecord.round == last_round)
        ).one()
        seconds = (record.finished_at - record.started_at).total_seconds()
    outbox = [json.loads(line) for line in (nodes_dir / "node-0" / "outbox.jsonl").open()]
    sent = sum(e["bytes"] for e in outbox if e["round"] == str(last_round))
    return {"round_s": round(seconds, 2), "node0_bytes_sent": sent}


def bench_rounds(train_raw, work: Path, node_counts: list[int]) -> list[dict[str, Any]]:
    rows = []
    for n in node_counts:
        for secure in (True, False):
            case = work / f"round-{n}-{secure}"
            nodes = nodes_for(train_raw, n, case / "nodes")
            started = time.perf_counter()
            outcome = simulate(
                spec_variant(case, secure=secure), nodes, n, case, rounds=2, steps=2 * ROUND_STEPS
            )
            row = {
                "bench": "round",
                "nodes": n,
                "secure_aggregation": secure,
                "steps_per_round": ROUND_STEPS,
                **round_figures(case, nodes, outcome.run_id, 2),
                "run_s": round(time.perf_counter() - started, 1),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def bench_scale(train_raw, work: Path, n: int) -> dict[str, Any]:
    case = work / f"scale-{n}"
    nodes = nodes_for(train_raw, n, case / "nodes", alpha=100.0)  # about 80 rows each
    started = time.perf_counter()
    outcome = simulate(spec_variant(case, secure=True), nodes, n, case, rounds=1, steps=4)
    row = {
        "bench": "scale",
        "nodes": n,
        "secure_aggregation": True,
        "status": outcome.status,
        **round_figures(case, nodes, outcome.run_id, 1),
        "run_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(row), flush=True)
    return row


FEDERATED = "federated-3-non-iid"
FEDAVG = "federated-3-non-iid-plain-fedavg"


def spec_with(directory: Path, *, seed: int, server_learning_rate: float | None = None) -> Path:
    """The bank spec with another training seed (and server step, if given)."""
    raw = tomllib.loads(BANK.read_text())
    raw["training"]["seed"] = seed
    name = f"bank-seed{seed}"
    if server_learning_rate is not None:
        raw["federation"]["server_learning_rate"] = server_learning_rate
        name += f"-slr{server_learning_rate:g}"
    path = directory / f"{name}.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def bench_quality(train_raw, holdout_raw, work: Path, seeds: list[int]) -> list[dict[str, Any]]:
    """Central and federated bank models for each training seed (the seed draws the initial
    weights, batches and noise); quality moves by a few hundredths between seeds, so one
    pair of runs cannot show a 0.02 gap."""
    rows = []
    for seed in seeds:
        spec_path = spec_with(work, seed=seed)
        spec = load_spec(spec_path)
        train_rows = validate_table(train_raw, spec.schema)
        holdout = validate_table(holdout_raw, spec.schema)
        started = time.perf_counter()
        central = train(train_rows, spec)
        models = [("central", central, time.perf_counter() - started)]
        # The spec's server step ("auto") and plain FedAvg (factor 1), same nodes and seed.
        for name, path in (
            (FEDERATED, spec_path),
            (FEDAVG, spec_with(work, seed=seed, server_learning_rate=1.0)),
        ):
            case = work / f"quality-{seed}-{name}"
            nodes = nodes_for(train_raw, 3, case / "nodes")
            started = time.perf_counter()
            outcome = simulate(path, nodes, 3, case)
            seconds = time.perf_counter() - started
            assert outcome.model_id is not None
            registry = ModelRegistry(
                case / "registry", KeyStore(case / "keys"), Database(database_url(case))
            )
            models.append((name, registry.load(outcome.model_id), seconds))
        for name, model, seconds in models:
            scores = quality.evaluate(
                train_rows, holdout, model.sample(len(train_rows), seed=0), spec.schema
            )
            row = {
                "bench": "quality",
                "dataset": "bank",
                "kind": spec.model.kind,
                "setting": name,
                "seed": seed,
                "epsilon": model.epsilon,
                "quality": scores["quality"],
                "tstr_auc": scores["tstr_auc"],
                "trtr_auc": scores["trtr_auc"],
                "wall_s": round(seconds, 1),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    for name in ("central", FEDERATED, FEDAVG):
        mine = [r for r in rows if r["bench"] == "quality" and r["setting"] == name]
        summary = {
            "bench": "quality-mean",
            "dataset": "bank",
            "setting": name,
            "seeds": len(mine),
            "epsilon": max(r["epsilon"] for r in mine),
            "quality": round(sum(r["quality"] for r in mine) / len(mine), 4),
            "tstr_auc": round(sum(r["tstr_auc"] for r in mine) / len(mine), 4),
        }
        print(json.dumps(summary), flush=True)
        rows.append(summary)
    return rows


def write_doc(rows: list[dict[str, Any]]) -> None:
    lines = ["| bench | setting | figure |", "| --- | --- | --- |"]
    for r in rows:
        if r["bench"] == "round":
            setting = f"{r['nodes']} nodes, {'SecAgg+' if r['secure_aggregation'] else 'plain'}"
            figure = f"round {r['round_s']} s; node 0 sent {r['node0_bytes_sent']:,} bytes"
        elif r["bench"] == "scale":
            setting = f"{r['nodes']} virtual nodes, SecAgg+"
            figure = f"{r['status']}; round {r['round_s']} s"
        elif r["bench"] == "quality":
            setting = f"bank, {r['setting']}, seed {r['seed']}, epsilon {r['epsilon']:.2f}"
            figure = (
                f"quality {r['quality']:.3f}, TSTR AUC {r['tstr_auc']:.3f} "
                f"(TRTR {r['trtr_auc']:.3f}), {r['wall_s']} s"
            )
        else:
            setting = f"bank, {r['setting']}, mean of {r['seeds']} seeds"
            figure = f"quality {r['quality']:.3f}, TSTR AUC {r['tstr_auc']:.3f}"
        lines.append(f"| {r['bench']} | {setting} | {figure} |")
    text = DOC.read_text()
    start, end = "<!-- federation:start -->", "<!-- federation:end -->"
    block = f"{start}\n" + "\n".join(lines) + f"\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text += f"\n## Federation (bench/federation.py)\n\n{block}\n"
    DOC.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="round times at 3 nodes only")
    parser.add_argument(
        "--quality-only",
        action="store_true",
        help="only federated vs central quality; its rows replace those in the results",
    )
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    args = parser.parse_args()
    table = prepare_demo_tables(fedsynth_home() / "data", names=("bank",))["bank"]
    train_raw, holdout_raw = split_holdout(read_table(table))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedsynth-bench-") as tmp:
        work = Path(tmp)
        if args.quality_only:
            kept = [json.loads(line) for line in RESULTS.read_text().splitlines() if line]
            rows += [r for r in kept if not r["bench"].startswith("quality")]
        else:
            rows += bench_rounds(train_raw, work, [3] if args.quick else [3, 10])
            if not args.quick:
                rows.append(bench_scale(train_raw, work, 100))
        if not args.quick:
            rows += bench_quality(train_raw, holdout_raw, work, args.seeds)
    if not args.quick:  # a smoke run prints its figures and records nothing
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text("".join(json.dumps(r) + "\n" for r in rows))
        write_doc(rows)


if __name__ == "__main__":
    main()
