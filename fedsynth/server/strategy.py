"""Weighted FedAvg over every trainable weight, restricted to the nodes that accepted,
then a server step along the average (``fedsynth.generative.rounds.server_step``).

The strategy trains only the nodes that said the round fits their budget (the server asks
first, ``fedsynth.privacy.protocol``), refuses an aggregate of fewer than ``min_nodes``
updates, and with secure aggregation checks that what it was handed is the single
unmasked sum (Flower's SecAgg+ workflow gives every result the same aggregate): it never
holds an individual update. It keeps what nodes reported (epsilon, steps, scores) per round
for the server's records.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateIns,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from fedsynth.generative import rounds
from fedsynth.privacy import protocol
from fedsynth.server.secagg import RoundFailed

Combine = Callable[[int, list[np.ndarray], list[np.ndarray], int], list[np.ndarray]]


@dataclass
class RoundLog:
    fitted: dict[str, dict[str, Any]] = field(default_factory=dict)  # institution -> metrics
    failures: list[str] = field(default_factory=list)
    evaluated: dict[str, dict[str, Any]] = field(default_factory=dict)
    aggregated: bool = False
    server_learning_rate: float | None = None  # the factor the server stepped by


class FederationStrategy(FedAvg):
    def __init__(
        self,
        *,
        initial: Parameters,
        min_nodes: int,
        secure: bool,
        message_config: dict[str, Scalar],
        evaluation_rounds: list[int] | None = None,
        server_step: Callable[[list[tuple[float, int]]], float] | None = None,
        layout: list[tuple[int, ...]] | None = None,
        combine: Combine | None = None,
    ) -> None:
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=1.0,
            min_fit_clients=min_nodes,
            min_evaluate_clients=1,
            min_available_clients=min_nodes,
            initial_parameters=initial,
            accept_failures=True,
        )
        self.min_nodes = min_nodes
        self.secure = secure
        self.message_config = message_config
        self.evaluation_rounds = set(evaluation_rounds or [])
        self.eligible: set[int] = set()
        self.rounds: dict[int, RoundLog] = {}
        # The global model the round's nodes start from (configure_fit hands it over), and
        # how far to step from it along their average (rounds.server_step); None: FedAvg.
        self.current = initial
        self.server_step = server_step
        # The arrays' shapes inside the packed vector messages carry (rounds.pack); the
        # server step treats the last one, the target shares, apart.
        self.layout = layout
        # Instead of FedAvg's result: (round, current arrays, mean of the nodes' arrays,
        # number of nodes) -> the next global arrays (a marginals federation's state).
        self.combine = combine

    def _config(self, server_round: int) -> dict[str, Scalar]:
        return {**self.message_config, protocol.ROUND: server_round}

    def _eligible(self, client_manager: ClientManager) -> list[ClientProxy]:
        return [c for c in client_manager.all().values() if c.node_id in self.eligible]

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        self.rounds[server_round] = RoundLog()
        self.current = parameters
        clients = self._eligible(client_manager)
        if len(clients) < self.min_nodes:
            return []
        return [(c, FitIns(parameters, self._config(server_round))) for c in clients]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        log = self.rounds.setdefault(server_round, RoundLog())
        log.failures = [str(f)[:500] for f in failures]
        for _, res in results:
            metrics = dict(res.metrics)
            log.fitted[str(metrics.get(protocol.INSTITUTION, "?"))] = metrics
        if len(results) < self.min_nodes:
            raise RoundFailed(
                f"round {server_round}: {len(results)} update(s) arrived, fewer than "
                f"federation.min_nodes = {self.min_nodes}; failures: {log.failures}"
            )
        if self.secure:
            first = results[0][1].parameters
            if any(res.parameters.tensors != first.tensors for _, res in results):
                raise RoundFailed("secure aggregation handed the strategy individual updates")
            aggregate = first  # every result carries the same unmasked weighted average
        else:
            averaged, _ = super().aggregate_fit(server_round, results, failures)
            if averaged is None:
                raise RoundFailed(f"round {server_round}: FedAvg produced no aggregate")
            aggregate = averaged
        if self.combine is not None or self.server_step is not None:
            if self.layout is None:
                raise ValueError("a server step or combination needs the arrays' layout")
            current, average = (
                rounds.unpack(parameters_to_ndarrays(p), self.layout)
                for p in (self.current, aggregate)
            )
            if self.combine is not None:
                moved = self.combine(server_round, current, average, len(results))
            else:
                assert self.server_step is not None
                factor = self.server_step(
                    [
                        (float(res.num_examples), int(res.metrics.get(protocol.STEPS, 0)))
                        for _, res in results
                    ]
                )
                log.server_learning_rate = factor
                moved = rounds.step_along(current, average, factor)
            aggregate = ndarrays_to_parameters(rounds.pack(moved))
        log.aggregated = True
        return aggregate, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        if server_round not in self.evaluation_rounds:
            return []  # each evaluation costs the nodes budget: only the planned rounds
        clients = self._eligible(client_manager)
        # how many nodes each round summed: a marginals node fits the model from the state
        # with it (the measurements' noise grows with the nodes in each sum)
        summed = [len(self.rounds[r].fitted) for r in sorted(self.rounds) if r <= server_round]
        config = {**self._config(server_round), protocol.NODES_PER_ROUND: json.dumps(summed)}
        return [(c, EvaluateIns(parameters, config)) for c in clients]

    def aggregate_evaluate(
        self, server_round: int, results: list, failures: list
    ) -> tuple[float | None, dict[str, Scalar]]:
        log = self.rounds.setdefault(server_round, RoundLog())
        for _, res in results:
            metrics = dict(res.metrics)
            log.evaluated[str(metrics.get(protocol.INSTITUTION, "?"))] = metrics
        losses = [res.loss for _, res in results if res.num_examples]
        return (sum(losses) / len(losses) if losses else None), {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None  # the server holds no data: evaluation happens on the nodes
