"""Privacy benchmark: membership-inference attacks on our released synthetic rows.

Threat model and attacks: fedsynth.privacy.attacks (distance to closest record, as in
GAN-Leaks / Stadler et al.; DOMIAS density ratio, van Breugel et al. 2023). The attacker holds
the synthetic rows and a reference sample of real non-member rows; it scores target rows,
half members (training rows) and half non-members (real rows never trained on).

Rows of each table (bank = ISLR Default, hospital = covid_testing):

* members: the utility benchmark's 80% training split (``split_holdout``, seed 0), so the
  models attacked here are trained exactly as in bench/utility.py (its ``spec_for``);
* the 20% holdout is halved (``split_holdout``, seed 1): non-member targets, and the
  attacker's reference sample (never a target, never trained on);
* targets: every non-member target and as many members drawn at random (seed 0).

Models: fedsynth-gan and fedsynth-vae at epsilon 1, 3 and inf, trained on all members and
sampled as many rows as there are members (seed 1), as in the utility benchmark.

Control, so that the reader sees the attacks have power: an "overfit" VAE, trained without DP
on 100 random members only, full batch, learning rate 1e-2, for 1000 steps, and its twin with
the same recipe under DP-SGD at epsilon 1; 2000 synthetic rows each; targets those 100
members and 100 random non-member targets.

Prints one JSON line per (dataset, method, epsilon, attack): ROC AUC and TPR at 1% FPR
(null for the controls: too few non-members to estimate it), each with its 95% percentile
bootstrap interval (1000 stratified resamples of the targets),
n_targets, and what (epsilon, delta)-DP allows any attack (largest AUC; largest TPR at 1%
FPR); writes bench/results/privacy.jsonl (rows of the tables and seed run now replace their
old rows). ``--seed s`` repeats everything with other random choices: the holdout halving
(seed 1 + s), the member targets and control rows, the training seed (spec seed + s) and the
sampling seed (1 + s); the 80/20 member split stays that of the utility benchmark.

    python bench/privacy.py --quick          # bank only (about 10 minutes on 2 busy cores)
    python bench/privacy.py                  # bank and hospital (about 25 minutes)
    python bench/privacy.py --seed 1         # the same again with other random choices
    python bench/privacy.py --table          # the results as a Markdown table
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from utility import spec_for  # bench/utility.py: the same model settings as the utility bench

from fedsynth.demo.data import prepare_demo_tables, split_holdout
from fedsynth.generative.spec import FederationSpec, parse_spec
from fedsynth.generative.table import read_table, validate_table
from fedsynth.generative.training import train
from fedsynth.home import fedsynth_home
from fedsynth.privacy.attacks import LOW_FPR, dp_auc_bound, membership_inference

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "privacy.jsonl"
DATASETS = ("bank", "hospital")
OURS = ("fedsynth-gan", "fedsynth-vae")
EPSILONS = (1.0, 3.0, math.inf)
N_RESAMPLES = 1000
#: The overfit control: few members, full-batch steps, a high learning rate, no DP.
OVERFIT = {"members": 100, "steps": 1000, "lr": 1e-2, "synthetic_rows": 2000}


def with_seed(spec: FederationSpec, seed: int) -> FederationSpec:
    raw = spec.model_dump(mode="python")
    raw["training"]["seed"] += seed
    return parse_spec(raw, source=f"{spec.federation.name} (training seed +{seed})")


def overfit_spec(dataset: str, epsilon: float) -> FederationSpec:
    """The VAE of the table's spec, trained to memorise: full batch, 1e-2, many steps."""
    raw = spec_for(dataset, "vae", epsilon).model_dump(mode="python")
    raw["training"].update(
        epochs=None,
        steps=OVERFIT["steps"],
        batch_size=OVERFIT["members"],
        generator_lr=OVERFIT["lr"],
        critic_lr=OVERFIT["lr"],
    )
    return parse_spec(raw, source=f"{dataset} (overfit vae, epsilon {epsilon})")


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def pick(frame: pd.DataFrame, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """``n`` rows drawn at random (file order is not random: hospital is sorted by pan_day)."""
    return frame.iloc[np.sort(rng.choice(len(frame), size=n, replace=False))]


def attack(
    dataset: str,
    method: str,
    spec: FederationSpec,
    members: pd.DataFrame,
    member_targets: pd.DataFrame,
    nonmember_targets: pd.DataFrame,
    reference: pd.DataFrame,
    synthetic_rows: int,
    seed: int,
) -> list[dict]:
    started = time.perf_counter()
    spec = with_seed(spec, seed)
    schema = spec.schema
    typed = [validate_table(t, schema) for t in (members, member_targets)]
    nonmembers, ref = (validate_table(t, schema) for t in (nonmember_targets, reference))
    model = train(typed[0], spec)
    synthetic = model.sample(synthetic_rows, seed=1 + seed)
    results = membership_inference(
        typed[1], nonmembers, synthetic, ref, schema, n_resamples=N_RESAMPLES, seed=0
    )
    epsilon, delta = spec.privacy.target_epsilon, spec.privacy.delta
    rows = []
    for name, result in results.items():
        rows.append(
            {
                "dataset": dataset,
                "method": method,
                "epsilon": "inf" if math.isinf(epsilon) else epsilon,
                "attack": name,
                "seed": seed,
                "auc": round(result.auc, 4),
                "ci_low": round(result.ci_low, 4),
                "ci_high": round(result.ci_high, 4),
                "tpr_at_1pct_fpr": rounded(result.tpr_at_low_fpr),
                "tpr_ci_low": rounded(result.tpr_ci_low),
                "tpr_ci_high": rounded(result.tpr_ci_high),
                "n_targets": result.n_targets,
                "n_members_trained": len(members),
                "n_synthetic": synthetic_rows,
                "n_reference": len(reference),
                "dp_auc_bound": round(dp_auc_bound(epsilon, delta), 4),
                "dp_tpr_bound": round(min(1.0, math.exp(epsilon) * LOW_FPR + delta), 4),
                "epsilon_spent": model.metadata["privacy"]["epsilon"],
                "fit_s": model.metadata["training"]["fit_seconds"],
                "wall_s": round(time.perf_counter() - started, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def run_dataset(dataset: str, table: pd.DataFrame, seed: int) -> list[dict]:
    members, holdout = split_holdout(table)
    nonmember_targets, reference = split_holdout(holdout, frac=0.5, seed=1 + seed)
    rng = np.random.default_rng(seed)
    member_targets = pick(members, len(nonmember_targets), rng)
    rows = []
    for method in OURS:
        for eps in EPSILONS:
            spec = spec_for(dataset, method.removeprefix("fedsynth-"), eps)
            rows += attack(
                dataset,
                method,
                spec,
                members,
                member_targets,
                nonmember_targets,
                reference,
                len(members),
                seed,
            )
    few = pick(members, OVERFIT["members"], rng)
    few_out = pick(nonmember_targets, OVERFIT["members"], rng)
    for eps in (math.inf, 1.0):
        spec = overfit_spec(dataset, eps)
        rows += attack(
            dataset,
            "overfit-vae",
            spec,
            few,
            few,
            few_out,
            reference,
            OVERFIT["synthetic_rows"],
            seed,
        )
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table of the seed-0 rows, with each AUC's range over every seed run."""

    def interval(value: float | None, low: float | None, high: float | None) -> str:
        return "-" if value is None else f"{value:.3f} [{low:.3f}, {high:.3f}]"

    key = ("dataset", "method", "epsilon", "attack")
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        "| dataset | model | epsilon | attack | AUC [95% CI], seed 0 | AUC over seeds "
        f"{', '.join(map(str, seeds))} | TPR at 1% FPR [95% CI] | DP limit: AUC / TPR "
        "| targets | members trained on |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["seed"] != 0:
            continue
        aucs = [q["auc"] for q in rows if all(q[k] == r[k] for k in key)]
        lines.append(
            f"| {r['dataset']} | {r['method']} | {r['epsilon']} | {r['attack']} "
            f"| {interval(r['auc'], r['ci_low'], r['ci_high'])} "
            f"| {min(aucs):.3f} - {max(aucs):.3f} "
            f"| {interval(r['tpr_at_1pct_fpr'], r['tpr_ci_low'], r['tpr_ci_high'])} "
            f"| {r['dp_auc_bound']:.3f} / {r['dp_tpr_bound']:.3f} "
            f"| {r['n_targets']} | {r['n_members_trained']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="bank only")
    parser.add_argument("--datasets", nargs="*", choices=DATASETS, default=None)
    parser.add_argument("--seed", type=int, default=0, help="repeat with other random choices")
    parser.add_argument(
        "--table", action="store_true", help=f"print {RESULTS.name} as Markdown, run nothing"
    )
    args = parser.parse_args()
    if args.table:
        print(table([json.loads(line) for line in RESULTS.read_text().splitlines() if line]))
        return
    warnings.filterwarnings("ignore")
    datasets = ("bank",) if args.quick else tuple(args.datasets or DATASETS)
    paths = prepare_demo_tables(fedsynth_home() / "data", names=datasets)
    rows: list[dict] = []
    for dataset in datasets:
        rows += run_dataset(dataset, read_table(paths[dataset]), args.seed)

    done = {(d, args.seed) for d in datasets}
    kept = []
    if RESULTS.exists():
        kept = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
        kept = [r for r in kept if (r["dataset"], r["seed"]) not in done]
    merged = sorted(kept + rows, key=lambda r: (r["seed"], DATASETS.index(r["dataset"])))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("".join(json.dumps(r) + "\n" for r in merged))
    print(f"wrote {RESULTS.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()
