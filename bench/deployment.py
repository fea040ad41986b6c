"""Deployment-engine round time on loopback: Flower as shipped, then fedsynth's node changes.

Each run is the deployment test's setup (``tests/test_deployment.py``): a SuperLink with TLS
and node authentication, three SuperNodes started by ``fedsynth node join``, one
``flwr run`` of the bank federation (``--rounds`` rounds, default 2, of 8 DP-SGD steps per
node; the last round also evaluates), all on this machine. Round 1 includes each node's
one-off noise calibration and the idle nodes' first poll; round 2 is a round of a run
under way. ``--no-warm --poll-s 0`` nodes are Flower as shipped (a fresh ``flwr-clientapp``
process per message, a fixed 3 s poll); ``--warm`` nodes fork each ClientApp from a server
that loaded torch and Opacus once (``fedsynth.deploy.warm_executor``); node join's default
adds prompt polling while a run is active (``fedsynth.deploy.prompt_supernode``); the last
setup also keeps the SuperLink's state in memory (``deploy server-start --in-memory``). The
setups alternate, so drift of the machine's speed falls on all. One JSON line per run, to
bench/results/deployment.jsonl.

    python bench/deployment.py             # the 4 setups twice, about 15 minutes
    python bench/deployment.py --pairs 1 --rounds 1
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

from tests.test_deployment import STEPS, deploy_and_run  # noqa: E402

RESULTS = REPO / "bench" / "results" / "deployment.jsonl"
#: (name, node-join --warm, --poll-s, SuperLink state in memory): Flower as shipped,
#: then each change added; the last trades the SuperLink's restart for speed.
SETUPS = (
    ("flower as shipped", False, 0.0, False),
    ("warm executor", True, 0.0, False),
    ("warm executor + prompt poll", True, None, False),  # node join's defaults
    ("node join defaults, SuperLink state in memory", True, None, True),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for pair in range(args.pairs):
        for name, warm, poll_s, in_memory in SETUPS:
            with tempfile.TemporaryDirectory(prefix="fedsynth-deploy-bench-") as tmp:
                load_before = os.getloadavg()[0]
                started = time.perf_counter()
                result = deploy_and_run(
                    Path(tmp),
                    warm=warm,
                    poll_s=poll_s,
                    rounds=args.rounds,
                    superlink_in_memory=in_memory,
                )
                row = {
                    "pair": pair,
                    "setup": name,
                    "status": result["flower_status"],
                    "rounds": args.rounds,
                    "steps_per_round": STEPS,
                    **{k: round(v, 1) for k, v in result["timings"].items()},
                    "wall_s": round(time.perf_counter() - started, 1),
                    "load_1min_before": round(load_before, 2),
                    "load_1min_after": round(os.getloadavg()[0], 2),
                }
            print(json.dumps(row), flush=True)
            rows.append(row)
    for name, *_ in SETUPS:
        summary: dict[str, object] = {"setup": name}
        for r in range(1, args.rounds + 1):
            key = f"round_{r}_s"
            times = [row[key] for row in rows if row["setup"] == name and key in row]
            if times:
                summary[f"{key}_median"] = statistics.median(times)
        print(json.dumps(summary), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
