"""Run inside a fork-server child by tests/test_warm_executor.py; imports nothing of fedsynth."""

import json
import sys


def report(path: str) -> None:
    roots = sorted({name.split(".")[0] for name in sys.modules})
    flower = sys.modules.get("flwr.supercore.inflatable.inflatable_utils")
    prompt = bool(getattr(getattr(flower, "pull_objects", None), "fedsynth_prompt", False))
    with open(path, "w") as handle:
        json.dump({"roots": roots, "prompt_pulls": prompt}, handle)
