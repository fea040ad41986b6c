"""Utility benchmark: our DP GAN and VAE against public synthesizers, in one run.

For each table (bank = ISLR Default, loans, hospital, retail), a fixed 80/20 split
(``split_holdout``, seed 0); every method trains on the 80%, samples as many rows, and is
scored by the same code (fedsynth.generative.quality): QualityReport-equivalent quality,
TSTR vs TRTR ROC AUC on the 20%, and median distance to closest record.

Ours: fedsynth-gan and fedsynth-vae at epsilon 1, 3 and inf (model sizes and training from
the table's spec, kind overridden); fedsynth-marginals (fedsynth.generative.marginals) at
epsilon 1, 3 and inf (no noise: what the tree itself can reach), centralised and over 3
nodes (``-3nodes``: the 80% split non-IID by a Dirichlet(1) split of the target, each node
measuring its own rows with its own noise, the noisy measurements summed in process as
secure aggregation sums them; ``-3nodes-shared``: the same with the noise split across the
3 nodes, ``privacy.noise = "shared"``; numeric columns in AIM's 20 bins). Baselines (run in
their own venv, bench/baselines/, because of their licences and pinned Opacus): sdv-ctgan
and sdv-tvae (non-private), smartnoise-dpctgan and smartnoise-aim at epsilon 1 and 3, all
with our delta.

Prints one JSON line per (dataset, method, epsilon), writes them to
bench/results/utility.jsonl and the table in docs/benchmarks.md. Also measures, in the
same run, our DP training throughput against the same model without DP.

    python bench/utility.py --quick          # bank, ours only (< 5 minutes)
    python bench/utility.py                  # everything (baselines venv built if missing)
    python bench/utility.py --datasets retail --methods smartnoise-aim   # one method's rows
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from fedsynth.demo.data import prepare_demo_tables, split_holdout
from fedsynth.demo.nodes import dirichlet_split
from fedsynth.generative import quality
from fedsynth.generative.marginals import train_marginals
from fedsynth.generative.model import SynthModel
from fedsynth.generative.schema import Schema
from fedsynth.generative.spec import FederationSpec, load_spec, parse_spec
from fedsynth.generative.table import read_table, validate_table
from fedsynth.generative.training import train
from fedsynth.home import fedsynth_home

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "utility.jsonl"
DOC = REPO / "docs" / "benchmarks.md"
BASELINE_VENV = REPO / "bench" / ".venv-baselines"
DATASETS = ("bank", "loans", "hospital", "retail")
OURS = ("fedsynth-gan", "fedsynth-vae")
#: The same kinds pre-trained on a DP marginals synopsis (model.pretrain = "marginals").
PRETRAINED = ("fedsynth-gan-pretrained", "fedsynth-vae-pretrained")
MARGINALS = ("fedsynth-marginals", "fedsynth-marginals-3nodes", "fedsynth-marginals-3nodes-shared")
BASELINES = {
    "sdv-ctgan": ("inf",),
    "sdv-tvae": ("inf",),
    "smartnoise-dpctgan": (1.0, 3.0),
    "smartnoise-aim": (1.0, 3.0),
}
AIM_BINS = 20  # run_baseline.py's --bins default
SAMPLE_ROWS_FOR_SPEED = 200_000  # every method: one timed draw, 2 torch threads, after warm-up
METRICS = (
    "quality",
    "column_shapes",
    "column_pair_trends",
    "tstr_auc",
    "trtr_auc",
    "dcr_synth_train",
    "dcr_holdout",
)


#: Learning rates used when a table's spec is written for the other kind (measured on bank).
KIND_LEARNING_RATES = {"gan": (5e-4, 5e-4), "vae": (2e-3, 2e-3)}


def spec_for(
    dataset: str,
    kind: str,
    epsilon: float,
    *,
    shared: bool = False,
    pretrain: bool = False,
    seed: int = 0,
) -> FederationSpec:
    """The table's spec with ``kind``; ``shared``: marginals noise split across 3 nodes;
    ``pretrain``: a GAN or VAE pre-trained on a marginals synopsis (RDP accountant)."""
    raw = load_spec(REPO / "federations" / f"{dataset}.toml").model_dump(mode="python")
    raw["training"]["seed"] = seed
    if pretrain:
        raw["model"]["pretrain"], raw["privacy"]["accountant"] = "marginals", "rdp"
    else:
        raw["model"]["pretrain"] = "none"
        if raw["privacy"]["accountant"] == "rdp" and kind != "marginals":
            raw["privacy"]["accountant"] = "prv"
    if shared:
        raw["privacy"]["noise"], raw["federation"]["min_nodes"] = "shared", 3
    if kind == "marginals":
        raw["model"]["kind"], raw["privacy"]["accountant"] = kind, "rdp"
        # The same cut of numeric columns as the AIM baseline (run_baseline.py --bins,
        # 20 equal-width bins of the declared range), so that the two marginal methods
        # compare on one discretisation; columns that declare their own bins keep them.
        raw["model"]["default_bins"] = AIM_BINS
    elif raw["model"]["kind"] != kind:
        raw["model"]["kind"] = kind
        raw["training"]["generator_lr"], raw["training"]["critic_lr"] = KIND_LEARNING_RATES[kind]
    raw["privacy"]["target_epsilon"] = epsilon
    return parse_spec(raw, source=f"{dataset} ({kind}, epsilon {epsilon})")


def sampling_speed(model: SynthModel) -> float:
    """Rows/s of sample() (generation + decode to a typed frame), timed exactly as the
    baselines are: one draw after a warm-up, with 2 torch threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model.sample(10_000, seed=0)
        start = time.perf_counter()
        model.sample(SAMPLE_ROWS_FOR_SPEED, seed=1)
        return SAMPLE_ROWS_FOR_SPEED / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def run_ours(dataset: str, method: str, epsilon: float, tables: dict, repeat: int = 0) -> dict:
    """One training and one sample; repeats differ in the spec's seed (which seeds the
    initial weights, the batches and DP-SGD's noise) and in the synopsis' noise."""
    kind = method.removeprefix("fedsynth-").removesuffix("-pretrained")
    spec = spec_for(dataset, kind, epsilon, pretrain=method in PRETRAINED, seed=repeat)
    train_rows, holdout = (validate_table(t, spec.schema) for t in tables[dataset])
    model = train(train_rows, spec)
    fit_s = model.metadata["training"]["fit_seconds"]
    synthetic = model.sample(len(train_rows), seed=1)
    scores = quality.evaluate(train_rows, holdout, synthetic, spec.schema)
    steps, batch = model.metadata["training"]["steps"], spec.training.batch_size
    return {
        **scores,
        "fit_s": fit_s,
        "sample_rows_per_s": sampling_speed(model),
        "train_rows_per_s": steps * batch / model.metadata["training"]["loop_seconds"],
        "epsilon_spent": model.metadata["privacy"]["epsilon"],
    }


def run_marginals(dataset: str, method: str, epsilon: float, tables: dict, repeat: int = 0) -> dict:
    """One fit and one sample; repeats differ in the noise and in the sampling seed, since
    the quality of one sample moves with a handful of rows at the edge of a column's range
    (SDMetrics cuts numeric columns at each frame's own minimum and maximum)."""
    spec = spec_for(dataset, "marginals", epsilon, shared=method.endswith("-shared"))
    train_rows, holdout = (validate_table(t, spec.schema) for t in tables[dataset])
    nodes = [train_rows]
    if "-3nodes" in method:
        assert spec.schema.target is not None
        nodes = dirichlet_split(train_rows, spec.schema.target.name, 3, alpha=1.0, seed=0)
    model = train_marginals(nodes, spec)
    synthetic = model.sample(len(train_rows), seed=1 + repeat)
    scores = quality.evaluate(train_rows, holdout, synthetic, spec.schema)
    return {
        **scores,
        "fit_s": model.metadata["training"]["fit_seconds"],
        "sample_rows_per_s": sampling_speed(model),
        "epsilon_spent": model.metadata["privacy"]["epsilon"],
        "nodes": len(nodes),
    }


def ensure_baseline_venv() -> Path:
    python = BASELINE_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run(["bash", str(REPO / "bench" / "baselines" / "setup_venv.sh")], check=True)
    return python


def columns_json(spec: FederationSpec) -> dict:
    cols = []
    for c in spec.schema.modelled:
        entry: dict = {"name": c.name, "type": c.type.value, "nullable": c.nullable}
        if c.type.value == "categorical":
            entry["categories"] = c.levels
        if c.is_numeric:
            entry["min"], entry["max"] = (
                (str(c.min), str(c.max)) if c.type.value == "datetime" else (c.min, c.max)
            )
        cols.append(entry)
    return {"columns": cols}


def run_baseline(dataset: str, method: str, epsilon: float | str, tables: dict) -> dict:
    python = ensure_baseline_venv()
    spec = load_spec(REPO / "federations" / f"{dataset}.toml")
    train_raw, holdout_raw = tables[dataset]
    train_rows, holdout = (validate_table(t, spec.schema) for t in (train_raw, holdout_raw))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        csv_cols = [c.name for c in spec.schema.modelled]
        train_raw[csv_cols].to_csv(tmp / "train.csv", index=False)
        (tmp / "columns.json").write_text(json.dumps(columns_json(spec)))
        cmd = [
            str(python),
            str(REPO / "bench" / "baselines" / "run_baseline.py"),
            "--method",
            method,
            "--epsilon",
            str(epsilon),
            "--train",
            str(tmp / "train.csv"),
            "--columns",
            str(tmp / "columns.json"),
            "--n",
            str(len(train_rows)),
            "--seed",
            "1",
            "--out",
            str(tmp / "synth.csv"),
            "--timing",
            str(tmp / "t.json"),
            "--delta",
            str(spec.privacy.delta),
            "--speed-rows",
            str(SAMPLE_ROWS_FOR_SPEED),
        ]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        timing = json.loads((tmp / "t.json").read_text())
        released = Schema(columns=list(spec.schema.modelled))  # synthetic rows: no identifiers
        synthetic = validate_table(read_table(tmp / "synth.csv"), released)
    scores = quality.evaluate(train_rows, holdout, synthetic, spec.schema)
    return {**scores, "fit_s": timing["fit_s"], "sample_rows_per_s": timing["speed_rows_per_s"]}


def mean_of(runs: list[dict]) -> dict:
    """One run as it is; several (``--repeats``): each number's mean, plus the runs'
    count and the standard deviation of their quality (DP noise differs between runs, and
    so does the marginals rows' sampling seed)."""
    if len(runs) == 1:
        return runs[0]
    out = dict(runs[0])
    for key, value in runs[0].items():
        values = [r.get(key) for r in runs]
        if isinstance(value, int | float) and all(isinstance(v, int | float) for v in values):
            out[key] = statistics.fmean(values)  # type: ignore[arg-type]
    out["runs"] = len(runs)
    for metric in ("quality", "tstr_auc"):
        values = [r[metric] for r in runs]
        out[f"{metric}_sd"] = statistics.stdev(values)
        out[f"{metric}_se"] = statistics.stdev(values) / math.sqrt(len(values))
        out[f"{metric}_runs"] = values
    return out


def write_doc(rows: list[dict]) -> None:
    def fmt(v: object) -> str:
        if v is None:
            return "-"
        return (
            f"{v:.3f}"
            if isinstance(v, float) and v < 100
            else (f"{v:,.0f}" if isinstance(v, float) else str(v))
        )

    head = [
        "dataset",
        "method",
        "epsilon",
        *METRICS,
        "fit_s",
        "sample_rows_per_s",
        "runs",
        "quality_sd",
        "tstr_auc_sd",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k)) for k in head) + " |")
    table = "\n".join(lines)
    start, end = "<!-- utility:start -->", "<!-- utility:end -->"
    text = DOC.read_text() if DOC.exists() else f"# Benchmarks\n\n{start}\n{end}\n"
    if start not in text:
        text += f"\n{start}\n{end}\n"
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    DOC.write_text(f"{before}{start}\n{table}\n{end}{after}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="bank only, ours only")
    parser.add_argument("--datasets", nargs="*", default=None)
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument(
        "--methods",
        nargs="*",
        default=None,
        choices=(*OURS, *PRETRAINED, *MARGINALS, *BASELINES),
        help="run only these methods; their rows replace the same rows in the results",
    )
    parser.add_argument(
        "--epsilons",
        nargs="*",
        default=None,
        choices=("1", "3", "inf"),
        help="run only these privacy budgets (a long baseline can be run one budget at a time)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run each job this many times; the row holds the means (and quality's sd)",
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    warnings.filterwarnings("ignore")
    datasets = ("bank",) if args.quick else tuple(args.datasets or DATASETS)
    with_baselines = not (args.quick or args.no_baselines)
    home = fedsynth_home()
    paths = prepare_demo_tables(home / "data", names=datasets)
    tables = {d: split_holdout(read_table(paths[d])) for d in datasets}

    rows: list[dict] = []
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    partial = RESULTS.with_name(f"utility-{'-'.join(datasets)}.jsonl.tmp")
    partial.write_text("")
    for dataset in datasets:
        jobs = [(m, e) for m in OURS for e in (1.0, 3.0, math.inf)]
        jobs += [(m, e) for m in PRETRAINED for e in (1.0, 3.0)]
        jobs += [(m, e) for m in MARGINALS for e in (1.0, 3.0, math.inf)]
        if with_baselines:
            jobs += [(m, e) for m, eps in BASELINES.items() for e in eps]
        if args.methods:
            jobs = [(m, e) for m, e in jobs if m in args.methods]
        if args.epsilons:
            wanted = {float(e) for e in args.epsilons}
            jobs = [(m, e) for m, e in jobs if float(e) in wanted]
        for method, epsilon in jobs:
            eps_label = "inf" if epsilon in (math.inf, "inf") else float(epsilon)
            started = time.perf_counter()
            runs = []
            for repeat in range(args.repeats):
                try:
                    if method in (*OURS, *PRETRAINED):
                        runs.append(run_ours(dataset, method, float(epsilon), tables, repeat))
                    elif method in MARGINALS:
                        runs.append(run_marginals(dataset, method, float(epsilon), tables, repeat))
                    else:
                        runs.append(run_baseline(dataset, method, epsilon, tables))
                except Exception as exc:  # one failed method must not lose the others' rows
                    runs = [{"error": f"{type(exc).__name__}: {exc}"}]
                    break
            result = mean_of(runs)
            row = {
                "dataset": dataset,
                "method": method,
                "epsilon": eps_label,
                **{k: result.get(k) for k in (*METRICS, "fit_s", "sample_rows_per_s")},
                **{k: v for k, v in result.items() if k not in METRICS},
                "wall_s": round(time.perf_counter() - started, 1),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
            with partial.open("a") as handle:
                handle.write(json.dumps(row) + "\n")

    # DP training throughput vs the same model without DP, from the same run.
    for dataset in datasets:
        for method in OURS:
            speed = {
                r["epsilon"]: r.get("train_rows_per_s")
                for r in rows
                if r["dataset"] == dataset and r["method"] == method
            }
            if speed.get(1.0) and speed.get("inf"):
                summary = {
                    "dataset": dataset,
                    "method": method,
                    "dp_train_rows_per_s": round(speed[1.0]),
                    "plain_train_rows_per_s": round(speed["inf"]),
                    "dp_over_plain": round(speed[1.0] / speed["inf"], 3),
                }
                print(json.dumps(summary), flush=True)

    # Merge: each row run now replaces the old row for its (dataset, method, epsilon); the rest
    # stay. Sorted by table, then in the order the jobs run.
    def key(r: dict) -> tuple:
        return r["dataset"], r["method"], str(r["epsilon"])

    order = [*OURS, *PRETRAINED, *MARGINALS, *BASELINES]
    kept = []
    if RESULTS.exists():
        ran = {key(r) for r in rows}
        kept = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
        kept = [r for r in kept if key(r) not in ran]
    merged = sorted(
        kept + rows,
        key=lambda r: (
            DATASETS.index(r["dataset"]),
            order.index(r["method"]),
            math.inf if r["epsilon"] == "inf" else r["epsilon"],
        ),
    )
    RESULTS.write_text("".join(json.dumps(r) + "\n" for r in merged))
    partial.unlink()
    write_doc(merged)
    print(f"wrote {RESULTS.relative_to(REPO)} and {DOC.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()
