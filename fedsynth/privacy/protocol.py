"""What crosses the wire between the server and a node, and nothing else.

The server (``fedsynth.server``) and the nodes (``fedsynth.clients``) never import each
other; they agree on these keys. Every message from the server carries the federation spec
(as JSON) so that a node checks its table and plans its noise from the same declaration;
every reply from a node carries only DP releases and budget figures:

- ``query`` (before each round): the node answers whether the round fits its cap
  (``accept`` or ``refuse``), with its epsilon spent, what it would reach, and its cap;
- ``train``: the model arrays (masked under SecAgg+), the noisy row count as FedAvg weight,
  and metrics ``epsilon``/``delta``/``steps``/``institution`` (and ``own-noise-epsilon``
  when a marginals federation splits its noise);
- ``evaluate``: noisy scores (``fedsynth.generative.rounds.evaluation_scores``).
"""

from __future__ import annotations

from typing import Any

CONFIG = "fedsynth"  # ConfigRecord name in query messages

SPEC = "spec-json"
RUN = "run-id"
#: The server's run across restarts (32 hex digits): a node's ledger keys its releases by
#: it, so a round asked again after a restart is re-sent, not spent twice.
RUN_KEY = "run-key"
#: In evaluation messages: how many nodes each round's aggregate summed (JSON list).
NODES_PER_ROUND = "nodes-per-round"
ROUND = "round"
ACTION = "action"
BUDGET = "budget"

STATUS = "status"
ACCEPT = "accept"
REFUSE = "refuse"
INVALID = "invalid"  # the node's table or configuration does not fit the spec
INSTITUTION = "institution"
SPENT = "epsilon-spent"
AFTER = "epsilon-after"
CAP = "epsilon-cap"
#: What a refusal's ``epsilon-after`` measures: "epsilon" (the budget, the default) or
#: "own-noise epsilon" (the node's own share of split noise alone), and the cap it broke;
#: ``epsilon-spent`` and ``epsilon-cap`` are always the budget's.
MEASURE = "measure"
MEASURE_CAP = "measure-cap"
DETAIL = "detail"

EPSILON = "epsilon"
#: With split noise (privacy.noise = "shared"): the node's epsilon under its own share of
#: the noise alone, what protects it from a server that sees its update.
OWN_NOISE_EPSILON = "own-noise-epsilon"
DELTA = "delta"
STEPS = "steps"
NOISE = "noise-multiplier"
CLIPPED = "max-abs-weight"
#: A marginals node's evaluation: the digest of the model it fitted from the state and
#: scored (the server checks it against the model it registers).
MODEL_SHA256 = "model-sha256"
RESENT = "resent"  # 1: the node re-sent what it released earlier in this run and round


def secagg_settings(spec_secagg: Any, min_nodes: int) -> dict[str, Any]:
    """Keyword arguments for Flower's SecAggPlusWorkflow, checked (Flower accepts a zero or
    negative clipping range and even share counts that crash clients)."""
    if spec_secagg.clipping_range <= 0:
        raise ValueError("secure_aggregation.clipping_range must be > 0")
    shares: int | float = spec_secagg.num_shares or 1.0  # 1.0: every participant
    if isinstance(shares, int) and (shares < 3 or shares % 2 == 0):
        raise ValueError("secure_aggregation.num_shares must be 0 or an odd integer >= 3")
    if min_nodes < 3:
        raise ValueError("secure aggregation needs federation.min_nodes >= 3")
    return {
        "num_shares": shares,
        "reconstruction_threshold": float(spec_secagg.reconstruction_threshold),
        "clipping_range": float(spec_secagg.clipping_range),
        "quantization_range": int(spec_secagg.quantization_range),
        "max_weight": float(spec_secagg.max_weight),
    }
