"""Deployment-engine round time on loopback: the nodes' warm executor against Flower's own.

Each run is the deployment test's setup (``tests/test_deployment.py``): a SuperLink with TLS
and node authentication, three SuperNodes started by ``fedsynth node join``, one
``flwr run`` of the bank federation (one round, 8 DP-SGD steps per node), all on this
machine. ``--no-warm`` nodes use Flower's executor (a fresh ``flwr-clientapp`` process per
message); ``--warm`` nodes fork each ClientApp from a server that loaded torch and Opacus
once (``fedsynth.deploy.warm_executor``). The two alternate, so drift of the machine's speed
falls on both. One JSON line per run, to bench/results/deployment.jsonl.

    python bench/deployment.py             # 2 pairs, about 10 minutes on 2 cores
    python bench/deployment.py --pairs 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the deployment helpers live with the test that uses them

from tests.test_deployment import ROUNDS, STEPS, deploy_and_run  # noqa: E402

RESULTS = REPO / "bench" / "results" / "deployment.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for pair in range(args.pairs):
        for warm in (False, True):
            with tempfile.TemporaryDirectory(prefix="fedsynth-deploy-bench-") as tmp:
                load_before = os.getloadavg()[0]
                started = time.perf_counter()
                result = deploy_and_run(Path(tmp), warm=warm)
                row = {
                    "pair": pair,
                    "executor": "warm fork server" if warm else "flower subprocess",
                    "status": result["flower_status"],
                    "rounds": ROUNDS,
                    "steps": STEPS,
                    **{k: round(v, 1) for k, v in result["timings"].items()},
                    "wall_s": round(time.perf_counter() - started, 1),
                    "load_1min_before": round(load_before, 2),
                    "load_1min_after": round(os.getloadavg()[0], 2),
                }
            print(json.dumps(row), flush=True)
            rows.append(row)
    for executor in ("flower subprocess", "warm fork server"):
        rounds = [r["round_1_s"] for r in rows if r["executor"] == executor and "round_1_s" in r]
        if rounds:
            summary = {"executor": executor, "round_1_s_median": statistics.median(rounds)}
            print(json.dumps(summary), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
