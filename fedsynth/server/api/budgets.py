"""Privacy budgets as the server mirrors them: what each node reported, per round.

The node's own ledger is the authority (``fedsynth.privacy.ledger``); these views only read
the participations and evaluation reports the server recorded, for the API and dashboards.
"""

from __future__ import annotations

import json
import math
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict
from sqlalchemy import select
from sqlalchemy.orm import Session

from fedsynth.server.records import Database, NodeReport, Participation, Run

R = TypeVar("R", Participation, NodeReport)


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Budget(_Out):
    federation: str
    node: str
    epsilon_spent: float | None
    delta: float | None
    epsilon_cap: float | None
    epsilon_remaining: float | None
    rounds_trained: int
    refusals: int


class BudgetList(_Out):
    budgets: list[Budget]


class BudgetRound(_Out):
    run: int
    round: int
    status: str
    epsilon_spent: float | None
    epsilon_cap: float | None
    steps: int | None
    detail: str


class BudgetHistory(_Out):
    federation: str
    node: str
    rounds: list[BudgetRound]
    evaluations: list[dict[str, Any]]


def budgets(db: Database) -> list[Budget]:
    """Per federation and node: the latest epsilon it reported (training or evaluation),
    its latest cap, rounds trained and refusals."""
    out: dict[tuple[str, str], Budget] = {}
    with db.session() as s:
        for federation, p in _participations(s):
            b = out.setdefault(
                (federation, p.node),
                Budget(
                    federation=federation,
                    node=p.node,
                    epsilon_spent=None,
                    delta=None,
                    epsilon_cap=None,
                    epsilon_remaining=None,
                    rounds_trained=0,
                    refusals=0,
                ),
            )
            if p.status == "trained":
                b.rounds_trained += 1
                b.epsilon_spent = p.epsilon_spent
                b.delta = p.delta
            elif p.status == "refused":
                b.refusals += 1
                b.epsilon_spent = (
                    p.epsilon_spent if p.epsilon_spent is not None else b.epsilon_spent
                )
            if p.epsilon_cap is not None:
                b.epsilon_cap = p.epsilon_cap
        for federation, r in _reports(s):
            epsilon = json.loads(r.metrics_json).get("epsilon")
            seen = out.get((federation, r.node))
            if seen is not None and isinstance(epsilon, int | float) and math.isfinite(epsilon):
                seen.epsilon_spent = max(seen.epsilon_spent or 0.0, float(epsilon))
    for b in out.values():
        if b.epsilon_cap is not None and b.epsilon_spent is not None:
            b.epsilon_remaining = max(0.0, b.epsilon_cap - b.epsilon_spent)
    return sorted(out.values(), key=lambda b: (b.federation, b.node))


def history(db: Database, federation: str, node: str) -> BudgetHistory | None:
    """One node's answers to every round of ``federation``, and its evaluation reports;
    None when the server never heard of it."""
    return histories(db, federation, node).get(node)


def histories(db: Database, federation: str, node: str | None = None) -> dict[str, BudgetHistory]:
    """Every node's history in ``federation`` (or only ``node``'s), in two queries."""
    rounds: dict[str, list[BudgetRound]] = {}
    evaluations: dict[str, list[dict[str, Any]]] = {}
    with db.session() as s:
        for _, p in _participations(s, federation, node):
            rounds.setdefault(p.node, []).append(
                BudgetRound(
                    run=p.run_id,
                    round=p.round,
                    status=p.status,
                    epsilon_spent=p.epsilon_spent,
                    epsilon_cap=p.epsilon_cap,
                    steps=p.steps,
                    detail=p.detail or "",
                )
            )
        for _, r in _reports(s, federation, node):
            evaluations.setdefault(r.node, []).append(
                {"run": r.run_id, "round": r.round, **json.loads(r.metrics_json)}
            )
    return {
        name: BudgetHistory(
            federation=federation,
            node=name,
            rounds=rounds.get(name, []),
            evaluations=evaluations.get(name, []),
        )
        for name in sorted({*rounds, *evaluations})
    }


def _participations(
    s: Session, federation: str | None = None, node: str | None = None
) -> list[tuple[str, Participation]]:
    return _rows(s, Participation, federation, node)


def _reports(
    s: Session, federation: str | None = None, node: str | None = None
) -> list[tuple[str, NodeReport]]:
    return _rows(s, NodeReport, federation, node)


def _rows(
    s: Session, table: type[R], federation: str | None, node: str | None
) -> list[tuple[str, R]]:
    """(federation, row) of a per-node, per-run table, oldest first."""
    query = select(Run.federation, table).join(Run, table.run_id == Run.id)
    if federation is not None:
        query = query.where(Run.federation == federation)
    if node is not None:
        query = query.where(table.node == node)
    return [(f, row) for f, row in s.execute(query.order_by(table.id)).all()]
