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

A node that cannot take part (its table does not fit the spec, its configuration is wrong,
the spec cannot be read) answers the query ``invalid`` with its institution and
``problems``: the kind of each problem and, where the spec declares it, the column's name.
Never a value, a row number, a path or a message text: those stay in the node's own log
and outbox (DESIGN.md, principle 4: not even an error carries data off a node).
"""

from __future__ import annotations

import json
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
#: In an ``invalid`` reply: JSON list of {"kind": ..., "column": ...} (see :data:`PROBLEM_KINDS`).
PROBLEMS = "problems"

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


#: What an ``invalid`` reply may say about a problem, as the coordinator reads it. The
#: first eight are a table's (``fedsynth.generative.table.Problem.kind``).
PROBLEM_KINDS: dict[str, str] = {
    "missing_column": "a column the spec declares is missing from the table",
    "extra_column": "the table has a column the spec does not declare",
    "duplicate_column": "a column appears more than once in the table",
    "wrong_type": "values of the wrong type",
    "below_min": "values below the declared min",
    "above_max": "values above the declared max",
    "unknown_category": "values outside the declared categories",
    "null": "nulls in a column that is not nullable",
    "unreadable_table": "the table cannot be read",
    "row_count": "the spec cannot train on this table's number of rows (e.g. under 2, or "
    "privacy.delta not below 1/rows)",
    "node_config": "the node's configuration is invalid",
    "spec": "the spec sent by the server cannot be read",
    "node_error": "the node could not open the round",
}
#: At most this many problems travel in one reply (the node's log has them all).
MAX_PROBLEMS = 32
_MAX_COLUMN_CHARS = 200


def encode_problems(problems: Any) -> str:
    """The ``problems`` value of an ``invalid`` reply: ``(kind, column)`` pairs, in order,
    without repeats; ``column`` "" when the problem names none."""
    seen = list(dict.fromkeys((str(k), str(c)) for k, c in problems))[:MAX_PROBLEMS]
    return json.dumps([{"kind": k, "column": c} for k, c in seen])


def decode_problems(raw: Any, declared: Any = None) -> list[tuple[str, str]]:
    """What the coordinator keeps of an ``invalid`` reply's ``problems``: known kinds only
    (anything else reads as ``node_error``), and a column name only where the spec
    declares it (``declared``: the schema's column names; None keeps names as sent). A
    node's own check already sends no other name; this keeps the coordinator's records
    clean of whatever a node of another version might send."""
    try:
        items = json.loads(str(raw)) if raw is not None else []
    except ValueError:
        items = []
    if not isinstance(items, list) or not items:
        return [("node_error", "")]
    names = None if declared is None else {str(n) for n in declared}
    out: list[tuple[str, str]] = []
    for item in items[:MAX_PROBLEMS]:
        kind = str(item.get("kind", "")) if isinstance(item, dict) else ""
        column = str(item.get("column", "")) if isinstance(item, dict) else ""
        if kind not in PROBLEM_KINDS:
            kind, column = "node_error", ""
        if (names is not None and column not in names) or len(column) > _MAX_COLUMN_CHARS:
            column = ""
        out.append((kind, column))
    return list(dict.fromkeys(out))


def describe_problems(problems: Any) -> str:
    """One line for the coordinator: "values above the declared max in column 'cost'; ..."."""
    parts = []
    for kind, column in problems:
        text = PROBLEM_KINDS.get(kind, PROBLEM_KINDS["node_error"])
        parts.append(f"{text} (column {column!r})" if column else text)
    return "; ".join(parts) or PROBLEM_KINDS["node_error"]


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
