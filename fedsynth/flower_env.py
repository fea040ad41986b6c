"""The environment fedsynth sets for the Flower processes it starts.

A module of its own that imports nothing, so that the simulation engine
(``fedsynth.demo.simulate``, which imports torch through the apps) and the deployment
launchers (``fedsynth.deploy.launch``, which must not) read one list.
"""

from __future__ import annotations

#: Set for every Flower process fedsynth starts, simulated or deployed.
FLOWER_ENV: dict[str, str] = {
    # Flower would otherwise install the app's dependencies (``uv sync``) at each run,
    # pulling a CUDA build of torch over the pinned CPU one.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # Flower would otherwise send usage telemetry to flower.ai.
    "FLWR_TELEMETRY_ENABLED": "0",
    # Flower would otherwise ask the network for a newer release at start.
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}

#: :data:`FLOWER_ENV` and what Ray, on which the simulation engine runs virtual nodes, needs.
SIMULATION_ENV: dict[str, str] = {
    **FLOWER_ENV,
    # Ray would otherwise fold the same line logged by several virtual nodes into one
    # "[repeated Nx across cluster]" line, hiding which nodes logged it.
    "RAY_DEDUP_LOGS": "0",
    # Ray would otherwise send usage statistics to Anyscale.
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray's coming default (it leaves CUDA_VISIBLE_DEVICES alone for actors that ask for no
    # GPU, as fedsynth's virtual nodes do); without it Ray prints a FutureWarning per run.
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}
