"""Plotly figures for the dashboards, returned as plain JSON-ready dicts.

The server builds each figure with plotly's Python API and the page hands it to the
plotly.js that the same package ships (served locally, never from a CDN). Nothing here sees
a real row: budgets are what nodes reported, distributions come from a synthetic sample.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from fedsynth.generative.schema import Column, ColumnType
from fedsynth.server.api.budgets import BudgetHistory

#: A node whose spend passes this share of its cap is flagged.
NEAR_CAP = 0.8
#: Scores a node may report after an evaluation round (noisy DP releases).
SCORES = {"column_shapes": "column shapes", "tstr_auc": "TSTR ROC AUC", "dcr_mean": "mean DCR"}
_LAYOUT: dict[str, Any] = {
    "margin": {"l": 56, "r": 16, "t": 48, "b": 24},
    "font": {"family": "system-ui, sans-serif", "size": 13},
    "legend": {"orientation": "h", "yanchor": "top", "y": -0.28},
    "template": "plotly_white",
}


def near_cap(spent: float | None, cap: float | None) -> bool:
    """Whether a node has spent at least :data:`NEAR_CAP` of its cap (the flag in the
    budget table and in the chart's legend)."""
    return spent is not None and cap is not None and cap > 0 and spent >= NEAR_CAP * cap


@dataclass(frozen=True)
class SpendPoint:
    run: int
    round: int
    epsilon: float

    @property
    def label(self) -> str:
        return f"run {self.run} · round {self.round}"


def spend_series(history: BudgetHistory) -> list[SpendPoint]:
    """The epsilon a node reported after each (run, round), oldest first.

    A trained or refused round carries the spend the node reported; an evaluation after the
    round can only add to it (its release is charged too), so the larger value is kept.
    """
    points: dict[tuple[int, int], float] = {}
    for r in history.rounds:
        if r.epsilon_spent is not None and math.isfinite(r.epsilon_spent):
            key = (r.run, r.round)
            points[key] = max(points.get(key, 0.0), r.epsilon_spent)
    for report in history.evaluations:
        epsilon = report.get("epsilon")
        if isinstance(epsilon, int | float) and math.isfinite(epsilon):
            key = (int(report["run"]), int(report["round"]))
            points[key] = max(points.get(key, 0.0), float(epsilon))
    # Spend only grows: a later point never shows less than an earlier one.
    out, highest = [], 0.0
    for (run, rnd), epsilon in sorted(points.items()):
        highest = max(highest, epsilon)
        out.append(SpendPoint(run, rnd, highest))
    return out


def burndown(
    federation: str,
    histories: Mapping[str, BudgetHistory],
    caps: Mapping[str, float | None],
) -> dict[str, Any]:
    """Epsilon per node over rounds, one trace per node, each cap as a dashed line."""
    fig = go.Figure()
    labels: list[str] = []
    for node, history in sorted(histories.items()):
        series = spend_series(history)
        for p in series:
            if p.label not in labels:
                labels.append(p.label)
        cap = caps.get(node)
        near = bool(series) and near_cap(series[-1].epsilon, cap)
        fig.add_trace(
            go.Scatter(
                x=[p.label for p in series],
                y=[p.epsilon for p in series],
                mode="lines+markers",
                name=f"{node} (past {NEAR_CAP:.0%} of cap)" if near else node,
                meta={"node": node, "near_cap": near},
                line={"dash": "solid", "width": 3 if near else 2},
                hovertemplate=f"{node}<br>%{{x}}<br>ε = %{{y:.3f}}<extra></extra>",
            )
        )
    for cap in sorted({c for c in caps.values() if c is not None}):
        owners = ", ".join(sorted(n for n, c in caps.items() if c == cap))
        fig.add_hline(
            y=cap,
            line={"dash": "dash", "color": "#b42318", "width": 1.5},
            annotation_text=f"cap {cap:g} ({owners})",
            annotation_position="top left",
        )
    fig.update_layout(
        **_LAYOUT,
        title=f"{federation}: privacy spent per node",
        xaxis={"title": "round", "type": "category", "categoryarray": labels},
        yaxis={"title": "ε spent", "rangemode": "tozero"},
    )
    return _plain(fig)


def column_distribution(column: Column, values: pd.Series) -> dict[str, Any]:
    """Histogram of a numeric or datetime column, bar chart of a discrete one."""
    fig = go.Figure()
    nulls = int(values.isna().sum())
    present = values.dropna()
    if column.type in (ColumnType.CATEGORICAL, ColumnType.BOOLEAN):
        counts = present.astype(str).str.lower() if column.type is ColumnType.BOOLEAN else present
        shares = counts.value_counts(normalize=False).reindex(column.levels, fill_value=0)
        x, y = list(shares.index.astype(str)), [int(v) for v in shares.to_numpy()]
        if nulls:
            x, y = [*x, "(null)"], [*y, nulls]
        fig.add_trace(go.Bar(x=x, y=y, name=column.name, marker={"color": "#1d4ed8"}))
    else:
        if column.type is ColumnType.DATETIME:
            present = pd.to_datetime(present)
        fig.add_trace(
            go.Histogram(
                x=present.tolist(), nbinsx=40, name=column.name, marker={"color": "#1d4ed8"}
            )
        )
    null_note = f" · {nulls / max(1, len(values)):.1%} null" if nulls else ""
    fig.update_layout(
        **{**_LAYOUT, "margin": {"l": 48, "r": 8, "t": 40, "b": 40}},
        title=f"{column.name} ({column.type.value}){null_note}",
        showlegend=False,
        yaxis={"title": "rows"},
        bargap=0.05,
    )
    return _plain(fig)


def correlation_heatmap(frame: pd.DataFrame, columns: Sequence[Column]) -> dict[str, Any] | None:
    """Pearson correlation of the numeric, datetime and boolean columns of a synthetic
    sample; None when fewer than two such columns exist."""
    numeric: dict[str, np.ndarray] = {}
    for column in columns:
        if column.name not in frame:
            continue
        values = frame[column.name]
        if column.type is ColumnType.DATETIME:
            seconds = pd.to_datetime(values).astype("int64").astype(float)
            numeric[column.name] = np.where(values.isna(), np.nan, seconds)
        elif column.type is ColumnType.BOOLEAN:
            numeric[column.name] = values.astype("float64").to_numpy()
        elif column.is_numeric:
            numeric[column.name] = pd.to_numeric(values).astype("float64").to_numpy()
    if len(numeric) < 2:
        return None
    corr = pd.DataFrame(numeric).corr(method="pearson").round(3)
    names = list(corr.columns)
    z = [[None if math.isnan(v) else float(v) for v in row] for row in corr.to_numpy()]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=names,
            y=names,
            zmin=-1,
            zmax=1,
            colorscale="RdBu",
            reversescale=True,
            texttemplate="%{z:.2f}",
            hovertemplate="%{y} × %{x}: %{z:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        **_LAYOUT, title="Correlation (synthetic sample)", yaxis={"autorange": "reversed"}
    )
    return _plain(fig)


def spend_per_round(histories: Mapping[str, BudgetHistory], run: int | None) -> dict[str, Any]:
    """Training curve of privacy: epsilon each node reported after each round of ``run``."""
    fig = go.Figure()
    for node, history in sorted(histories.items()):
        series = [p for p in spend_series(history) if run is None or p.run == run]
        fig.add_trace(
            go.Scatter(
                x=[p.round for p in series],
                y=[p.epsilon for p in series],
                mode="lines+markers",
                name=node,
            )
        )
    fig.update_layout(
        **_LAYOUT,
        title="ε spent per node after each round",
        xaxis={"title": "round", "dtick": 1},
        yaxis={"title": "ε", "rangemode": "tozero"},
    )
    return _plain(fig)


def scores_per_round(histories: Mapping[str, BudgetHistory], run: int | None) -> dict[str, Any]:
    """Training curve of quality: the noisy scores nodes reported after evaluation rounds."""
    fig = go.Figure()
    for node, history in sorted(histories.items()):
        reports = [e for e in history.evaluations if run is None or e.get("run") == run]
        for score, title in SCORES.items():
            points = [(int(e["round"]), e[score]) for e in reports if score in e]
            if not points:
                continue
            fig.add_trace(
                go.Scatter(
                    x=[r for r, _ in points],
                    y=[float(v) for _, v in points],
                    mode="lines+markers",
                    name=f"{node}: {title}",
                )
            )
    fig.update_layout(
        **_LAYOUT,
        title="Node-reported scores after evaluation rounds",
        xaxis={"title": "round", "dtick": 1},
        yaxis={"title": "score"},
    )
    return _plain(fig)


def _plain(fig: go.Figure) -> dict[str, Any]:
    """The figure as JSON-ready dicts and lists (plotly's encoder handles numpy values)."""
    return dict(json.loads(fig.to_json()))
