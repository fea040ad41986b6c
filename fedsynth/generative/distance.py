"""Privacy proxy (:func:`dcr`): distance to closest record. For each synthetic row, the Gower-style
distance to the nearest real training row and to the nearest real holdout row. Synthetic rows
that are systematically closer to the training rows than to equally many unseen holdout rows
indicate memorisation; ``dcr_share_closer_to_train`` is about 0.5 without it and 1.0 for copies.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.neighbors import NearestNeighbors

from fedsynth.generative.schema import ColumnType, Schema
from fedsynth.generative.typed import _cap, _codes, _columns, _numbers, _threads

__all__ = ["dcr"]


def _gower_embedding(frames: list[pd.DataFrame], schema: Schema) -> list[np.ndarray]:
    """Embed rows so that the L1 (manhattan) distance between two embedded rows equals the
    sum over columns of the Gower column distances:

    * numeric/datetime: v = (x - min) / (max - min), x clipped to the declared bounds, so the
      column distance |v_a - v_b| is at most 1. A column without nulls embeds as (v,); one with
      nulls as (v/2, -v/2) with null -> (1/2, 1/2): then value-value costs |v_a - v_b|,
      null-null 0 and null-value exactly (1 - v)/2 + (1 + v)/2 = 1.
    * categorical/boolean: one-hot over the levels (plus a null slot) scaled by 1/2, so equal
      costs 0 and different (null included) costs 1/2 + 1/2 = 1.

    Hand-written because no permissive library offers a vectorised Gower distance;
    this turns it into scikit-learn's exact manhattan nearest-neighbour search.
    """
    blocks: list[list[np.ndarray]] = [[] for _ in frames]
    for col in schema.modelled:
        if col.is_numeric:
            low, high = col.bounds
            scale = 1e9 if col.type is ColumnType.DATETIME else 1.0  # ns -> epoch seconds
            values = [
                np.clip((_numbers(f[col.name], col) / scale - low) / (high - low), 0.0, 1.0)
                for f in frames
            ]
            if any(np.isnan(v).any() for v in values):
                for block, v in zip(blocks, values, strict=True):
                    null = np.isnan(v)
                    half = np.where(null, 0.5, v / 2)
                    block.append(np.column_stack([half, np.where(null, 0.5, -v / 2)]))
            else:
                for block, v in zip(blocks, values, strict=True):
                    block.append(v[:, None])
        else:
            k = len(col.levels)
            codes = [_codes(f[col.name], col) for f in frames]
            width = k + 1 if any((c == k).any() for c in codes) else k
            for block, c in zip(blocks, codes, strict=True):
                onehot = np.zeros((c.size, width))
                onehot[np.arange(c.size), c] = 0.5
                block.append(onehot)
    return [np.hstack(block) if block else np.zeros((0, 0)) for block in blocks]


def _nearest(reference: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """L1 distance from each query row to its nearest reference row (inf if no reference)."""
    if reference.shape[0] == 0:
        return np.full(queries.shape[0], np.inf)
    model = NearestNeighbors(n_neighbors=1, metric="manhattan", algorithm="brute")
    distances, _ = model.fit(reference).kneighbors(queries)
    return distances[:, 0]


def dcr(
    train_real: pd.DataFrame,
    holdout_real: pd.DataFrame,
    synthetic: pd.DataFrame,
    schema: Schema,
    max_rows: int = 2000,
    seed: int = 0,
    *,
    n_threads: int | None = 1,
) -> dict[str, Any]:
    """Distance to closest record, a memorisation (privacy) proxy.

    Distance between two rows: the mean over modelled columns of the Gower column distance --
    numeric/datetime |a - b| / (declared max - min), values clipped to the declared bounds so
    it is at most 1; categorical/boolean 0 if equal else 1; null-null 0, null-value 1. It lies
    in [0, 1]. Nearest rows are found exactly (scikit-learn, manhattan metric on the embedding
    of :func:`_gower_embedding`).

    At most ``max_rows`` synthetic rows (seeded sample) are measured. Returns

    * ``dcr_synth_train``: median distance from a synthetic row to its closest training row
      (all training rows);
    * ``dcr_holdout``: median distance to the closest holdout row (all holdout rows);
    * ``dcr_share_closer_to_train``: share of synthetic rows strictly closer to the training
      rows than to the holdout rows, ties counting one half, where the larger of the two real
      sets is first subsampled (seeded) to the size of the smaller so that both are equally
      dense. About 0.5 means no memorisation; 1.0 means copies of training rows.

    plus the row counts used. The two medians use sets of different sizes when train and
    holdout differ in size; compare them with that in mind.
    """
    frames = [
        _columns(train_real, schema, "train_real"),
        _columns(holdout_real, schema, "holdout_real"),
        _columns(synthetic, schema, "synthetic"),
    ]
    rng = np.random.default_rng(seed)
    frames[2] = _cap(frames[2], max_rows, rng)
    train, holdout, synth = _gower_embedding(frames, schema)
    p = len(schema.modelled)
    n_train, n_holdout = len(train), len(holdout)
    result: dict[str, Any] = {
        "dcr_synth_train": None,
        "dcr_holdout": None,
        "dcr_share_closer_to_train": None,
        "n_synthetic": len(synth),
        "n_train": n_train,
        "n_holdout": n_holdout,
        "n_matched": min(n_train, n_holdout),
    }
    if len(synth) == 0:
        return result

    # The size-matched comparison: a seeded subset of the larger set. The training distances
    # to all rows are the minimum over that subset and the rest, so no row is searched twice.
    matched = min(n_train, n_holdout)
    with _threads(n_threads):
        if n_train > matched:
            pick = np.zeros(n_train, dtype=bool)
            pick[rng.choice(n_train, size=matched, replace=False)] = True
            d_train_matched = _nearest(train[pick], synth)
            d_train = np.minimum(d_train_matched, _nearest(train[~pick], synth))
        else:
            d_train = d_train_matched = _nearest(train, synth)
        if n_holdout > matched:
            pick = rng.choice(n_holdout, size=matched, replace=False)
            d_holdout_matched = _nearest(holdout[pick], synth)
            rest = np.setdiff1d(np.arange(n_holdout), pick)
            d_holdout = np.minimum(d_holdout_matched, _nearest(holdout[rest], synth))
        else:
            d_holdout = d_holdout_matched = _nearest(holdout, synth)

    d_train, d_holdout = d_train / p, d_holdout / p
    d_train_matched, d_holdout_matched = d_train_matched / p, d_holdout_matched / p
    if n_train:
        result["dcr_synth_train"] = float(np.median(d_train))
    if n_holdout:
        result["dcr_holdout"] = float(np.median(d_holdout))
    if matched:
        # Distances are sums of multiples of 1/2 and of rounded floats: compare with a
        # tolerance so that exact ties (common with discrete columns) count as ties.
        tie = np.isclose(d_train_matched, d_holdout_matched, rtol=0.0, atol=1e-12)
        closer = (d_train_matched < d_holdout_matched) & ~tie
        result["dcr_share_closer_to_train"] = float(np.mean(closer + 0.5 * tie))
    return result
