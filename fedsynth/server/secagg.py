"""Flower's SecAgg+ on the server, through the legacy workflow path.

Why legacy: in flwr 1.41 SecAgg+ exists only as ``SecAggPlusWorkflow`` driving a
``LegacyContext`` (strategy + client manager) and, on the node, ``secaggplus_mod`` around a
handler that answers in the legacy fit format. The rest of fedsynth uses the Message API;
this module keeps the legacy pieces in one place so that they can be replaced when Flower
offers SecAgg+ for the Message API.

Two changes to Flower's behaviour, both failures it would otherwise swallow:

- a halted protocol (too few nodes, a crashed node, failed reconstruction) only logs
  "Secure aggregation halted", keeps the old model and lets the run exit 0: here it raises
  :class:`RoundFailed`;
- Flower unmasks whenever the reconstruction threshold is met; here it refuses to unmask a
  sum of fewer than ``min_nodes`` updates, because with two updates in a sum a node that
  colludes with the server learns the other's (docs/privacy.md).
"""

from __future__ import annotations

from logging import INFO

from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp.grid import Grid
from flwr.supercore import log


class RoundFailed(RuntimeError):
    """A round produced no new global model; the message says why."""


class GuardedSecAggPlusWorkflow(SecAggPlusWorkflow):
    def __init__(self, *, min_nodes: int, **settings) -> None:
        super().__init__(**settings)
        self.min_nodes = min_nodes

    def __call__(self, grid: Grid, context: LegacyContext) -> None:  # type: ignore[override]
        state = WorkflowState()
        stages = (
            self.setup_stage,
            self.share_keys_stage,
            self.collect_masked_vectors_stage,
            self.unmask_stage,
        )
        log(INFO, "Secure aggregation commencing.")
        for stage in stages:
            if not stage(grid, context, state):
                failures = "; ".join(str(f)[:300] for f in state.failures) or "none reported"
                raise RoundFailed(
                    f"secure aggregation halted at {stage.__name__} with "
                    f"{len(state.active_node_ids)} active node(s); node errors: {failures}"
                )
        log(INFO, "Secure aggregation completed.")

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        if len(state.active_node_ids) < self.min_nodes:
            state.failures.append(
                RuntimeError(
                    f"only {len(state.active_node_ids)} node(s) sent masked updates; the sum "
                    f"is not unmasked below federation.min_nodes = {self.min_nodes}"
                )
            )
            return False
        return super().unmask_stage(grid, context, state)
