"""Split a sector's table across institution nodes, as three real institutions would hold it.

Non-IID and deterministic: for each category of the target column, the rows are shared
among nodes in proportions drawn from a Dirichlet(``alpha``) distribution with a fixed seed,
so one node holds most defaulters, another most negative tests. Each node gets a folder
with its own table, ledger and ``node.toml`` -- the same keys a real node passes to
``flower-supernode --node-config`` (see ``fedsynth.clients.node``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

NODE_FILE = "node.toml"


def dirichlet_split(
    frame: pd.DataFrame, column: str, nodes: int, *, alpha: float = 1.0, seed: int = 0
) -> list[pd.DataFrame]:
    """``nodes`` disjoint parts of ``frame``, label-skewed on ``column``; each part gets at
    least one row of every category that has ``nodes`` rows or more."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(nodes)]
    labels = frame[column].astype("string").fillna("<null>")
    for category in sorted(labels.unique()):
        index = np.flatnonzero((labels == category).to_numpy())
        index = index[rng.permutation(index.size)]
        shares = rng.dirichlet(np.full(nodes, alpha))
        counts = np.floor(shares * index.size).astype(int)
        if index.size >= nodes:
            counts = np.maximum(counts, 1)
        while counts.sum() > index.size:
            counts[np.argmax(counts)] -= 1
        counts[np.argmax(shares)] += index.size - counts.sum()
        for node, chunk in enumerate(np.split(index, np.cumsum(counts)[:-1])):
            parts[node].extend(chunk.tolist())
    return [frame.iloc[sorted(p)].reset_index(drop=True) for p in parts]


def write_nodes(
    sector: str,
    parts: list[pd.DataFrame],
    directory: Path,
    *,
    epsilon_cap: float,
) -> list[Path]:
    """One folder per node under ``directory``: ``data.csv``, ``node.toml``; returns them."""
    folders = []
    for i, part in enumerate(parts):
        folder = directory / f"node-{i}"
        folder.mkdir(parents=True, exist_ok=True)
        data = folder / "data.csv"
        part.to_csv(data, index=False)
        (folder / NODE_FILE).write_text(
            f'institution = "{sector}-{chr(ord("a") + i)}"\n'
            f'data-path = "{data}"\n'
            f'ledger-path = "{folder / "ledger.json"}"\n'
            f'outbox-path = "{folder / "outbox.jsonl"}"\n'
            f"epsilon-cap = {epsilon_cap!r}\n",
            encoding="utf-8",
        )
        folders.append(folder)
    return folders
