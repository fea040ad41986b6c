"""Table <-> tensor codec whose every parameter comes from the declared schema.

Why not CTGAN's mode-specific normalisation: its Gaussian mixtures are fitted to the raw
column, a data statistic that would have to be released privately and paid for. Here each
numeric column is cut into equal-width bins over its *declared* range (optionally on a log
scale) and encoded as a one-hot bin plus the position inside the bin in [-1, 1]. That keeps
CTGAN's main benefit (multi-modal columns become a classification problem plus a small
regression) at zero privacy cost. Integer columns with few values get one exact bin per value.

Layout of an encoded row, column by column in schema order:
- discrete column (categorical, boolean): a softmax block over its levels (+1 slot for null);
- numeric column: a softmax block over its bins (+1 slot for null), then, unless the bins are
  exact integers, one tanh offset.

The conditional vector used for conditional generation has one one-hot block per discrete
column (no null slot); an all-zero block means "no condition on this column".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from fedsynth.generative.schema import Column, ColumnType, Schema

if TYPE_CHECKING:
    from fedsynth.generative.spec import FederationSpec

_NS_PER_S = 1_000_000_000


@dataclass(frozen=True)
class ColumnCodec:
    """Encoding of one column: a softmax block and maybe a tanh offset."""

    column: Column
    n_bins: int  # levels for discrete columns, bins for numeric ones
    exact: bool  # numeric column with one bin per integer value: no offset
    start: int  # first index of the softmax block in the encoded row

    @property
    def nullable(self) -> bool:
        return self.column.nullable

    @property
    def block_size(self) -> int:
        return self.n_bins + int(self.nullable)

    @property
    def has_offset(self) -> bool:
        return self.column.is_numeric and not self.exact

    @property
    def offset_index(self) -> int:
        return self.start + self.block_size

    @property
    def width(self) -> int:
        return self.block_size + int(self.has_offset)

    # numeric transform -------------------------------------------------------------
    def _forward(self, x: np.ndarray) -> np.ndarray:
        low, _ = self.column.bounds
        return np.log1p(x - low) if self.column.scale == "log" else x

    def _inverse(self, v: np.ndarray) -> np.ndarray:
        low, _ = self.column.bounds
        return np.expm1(v) + low if self.column.scale == "log" else v

    @cached_property
    def _range(self) -> tuple[float, float]:
        low, high = self.column.bounds
        t_low, t_high = self._forward(np.array([low, high], dtype=np.float64))
        return float(t_low), float(t_high)

    # encode --------------------------------------------------------------------------
    def codes_and_offsets(self, series: pd.Series) -> tuple[np.ndarray, np.ndarray | None]:
        """Softmax index per row (null -> last slot) and offset in [-1, 1] (numeric)."""
        if self.column.is_discrete:
            codes = _discrete_codes(series, self.column)
            return np.where(codes < 0, self.n_bins, codes), None
        values = _numeric_values(series, self.column)
        null = np.isnan(values)
        low, high = self.column.bounds
        values = np.clip(np.where(null, low, values), low, high)
        if self.exact:
            bins = np.rint(values - low).astype(np.int64)
            return np.where(null, self.n_bins, bins), None
        t_low, t_high = self._range
        position = (self._forward(values) - t_low) / (t_high - t_low) * self.n_bins
        bins = np.clip(np.floor(position), 0, self.n_bins - 1)
        offsets = np.clip((position - bins) * 2.0 - 1.0, -1.0, 1.0)
        offsets = np.where(null, 0.0, offsets)
        return np.where(null, self.n_bins, bins.astype(np.int64)), offsets

    # decode --------------------------------------------------------------------------
    def decode(self, codes: np.ndarray, offsets: np.ndarray | None) -> pd.Series:
        null = codes >= self.n_bins
        name = self.column.name
        if self.column.is_discrete:
            if self.column.type is ColumnType.BOOLEAN:
                out = pd.array(codes == 1, dtype="boolean")
                out[null] = pd.NA
                return pd.Series(out, name=name)
            cat = pd.Categorical.from_codes(
                np.where(null, -1, codes), categories=pd.Index(self.column.levels)
            )
            return pd.Series(cat, name=name)
        low, high = self.column.bounds
        if self.exact:
            values = low + codes.astype(np.float64)
        else:
            t_low, t_high = self._range
            position = codes + (np.asarray(offsets, dtype=np.float64) + 1.0) / 2.0
            values = self._inverse(t_low + position / self.n_bins * (t_high - t_low))
        values = np.clip(values, low, high)
        if self.column.type is ColumnType.INTEGER:
            out = pd.array(np.rint(values).astype(np.int64), dtype="Int64")
            out[null] = pd.NA
            return pd.Series(out, name=name)
        if self.column.type is ColumnType.DATETIME:
            stamps = np.rint(values).astype(np.int64) * _NS_PER_S
            series = pd.Series(stamps.astype("datetime64[ns]"), name=name)
            return series.mask(null)
        return pd.Series(np.where(null, np.nan, values), name=name)


def _discrete_codes(series: pd.Series, column: Column) -> np.ndarray:
    """Level index per row, -1 for null. Expects the typed frame's dtypes."""
    if column.type is ColumnType.BOOLEAN:
        values = series.astype("boolean")
        return np.where(values.isna(), -1, values.fillna(False).astype(bool)).astype(np.int64)
    if (
        isinstance(series.dtype, pd.CategoricalDtype)
        and list(series.cat.categories) == column.levels
    ):
        return series.cat.codes.to_numpy(dtype=np.int64)
    cat = pd.Categorical(series.astype("string"), categories=column.levels)
    unknown = series.notna().to_numpy() & (cat.codes < 0)
    if unknown.any():
        raise ValueError(
            f"column {column.name!r}: value {series[unknown].iloc[0]!r} is not a declared category"
        )
    return cat.codes.astype(np.int64)


def _numeric_values(series: pd.Series, column: Column) -> np.ndarray:
    if column.type is ColumnType.DATETIME:
        stamps = pd.to_datetime(series)
        seconds = stamps.to_numpy(dtype="datetime64[ns]").astype(np.int64) / _NS_PER_S
        return np.where(stamps.isna().to_numpy(), np.nan, seconds)
    return series.to_numpy(dtype=np.float64, na_value=np.nan)


class Codec:
    """Encodes typed frames to float tensors and decodes generator output back.

    >>> from fedsynth.generative.schema import Schema
    >>> schema = Schema(columns=[{"name": "x", "type": "float", "min": 0, "max": 1}])
    >>> Codec(schema, default_bins=4).width   # 4 bins + 1 offset
    5
    """

    def __init__(self, schema: Schema, default_bins: int = 16) -> None:
        self.schema = schema
        self.default_bins = default_bins
        columns: list[ColumnCodec] = []
        start = 0
        for column in schema.modelled:
            if column.is_discrete:
                n_bins, exact = len(column.levels), False
            else:
                bins = column.bins or default_bins
                low, high = column.bounds
                span = high - low
                exact = (
                    column.type is ColumnType.INTEGER
                    and column.scale == "linear"
                    and float(low).is_integer()
                    and span + 1 <= max(bins, 2)
                )
                n_bins = int(span) + 1 if exact else bins
            codec = ColumnCodec(column=column, n_bins=n_bins, exact=exact, start=start)
            columns.append(codec)
            start += codec.width
        self.columns: tuple[ColumnCodec, ...] = tuple(columns)
        self.width = start
        discrete = [c for c in self.columns if c.column.is_discrete]
        self.discrete: tuple[ColumnCodec, ...] = tuple(discrete)
        #: position in ``columns`` of each discrete column (the conditional vector's blocks)
        self.discrete_positions = tuple(
            i for i, c in enumerate(self.columns) if c.column.is_discrete
        )
        self.cond_offsets = np.cumsum([0] + [c.n_bins for c in discrete])
        self.cond_width = int(self.cond_offsets[-1])

    @cached_property
    def softmax_spans(self) -> list[tuple[int, int]]:
        return [(c.start, c.block_size) for c in self.columns]

    @cached_property
    def offset_indices(self) -> list[int]:
        return [c.offset_index for c in self.columns if c.has_offset]

    def encode(self, frame: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoded rows (n x width, float32) and discrete level codes (n x n_discrete).

        The codes (null = -1) are what conditional vectors are built from.
        """
        n = len(frame)
        data = np.zeros((n, self.width), dtype=np.float32)
        rows = np.arange(n)
        levels = np.full((n, len(self.discrete)), -1, dtype=np.int64)
        d = 0
        for codec in self.columns:
            codes, offsets = codec.codes_and_offsets(frame[codec.column.name])
            data[rows, codec.start + codes] = 1.0
            if offsets is not None:
                data[:, codec.offset_index] = offsets
            if codec.column.is_discrete:
                levels[:, d] = np.where(codes >= codec.n_bins, -1, codes)
                d += 1
        return torch.from_numpy(data), torch.from_numpy(levels)

    def decode(self, codes: np.ndarray, offsets: np.ndarray) -> pd.DataFrame:
        """Typed frame from per-column softmax indices (n x n_columns) and offsets.

        ``offsets`` is n x len(offset_indices), in column order.
        """
        series = []
        k = 0
        for j, codec in enumerate(self.columns):
            off = None
            if codec.has_offset:
                off = offsets[:, k]
                k += 1
            series.append(codec.decode(codes[:, j], off))
        return pd.concat(series, axis=1)

    def empty_frame(self) -> pd.DataFrame:
        """A typed frame with no rows (the shape of zero synthetic rows)."""
        return self.decode(
            np.zeros((0, len(self.columns)), dtype=np.int64),
            np.zeros((0, len(self.offset_indices))),
        )

    def condition_vector(self, conditions: Mapping[str, object] | None, n: int) -> torch.Tensor:
        """Conditional vector for equality conditions on discrete columns.

        Raises ``ValueError`` naming the column or value that the schema does not allow.
        """
        cond = torch.zeros(n, self.cond_width)
        for name, value in (conditions or {}).items():
            j, level = self.condition_level(name, value)
            cond[:, int(self.cond_offsets[j]) + level] = 1.0
        return cond

    def discrete_index(self, name: str) -> int:
        """Position of a discrete column among the conditional vector's blocks."""
        for j, codec in enumerate(self.discrete):
            if codec.column.name == name:
                return j
        raise KeyError(f"{name!r} is not a categorical or boolean column")

    def condition_level(self, name: str, value: object) -> tuple[int, int]:
        """(index among discrete columns, level index) for one equality condition."""
        for j, codec in enumerate(self.discrete):
            if codec.column.name != name:
                continue
            levels = codec.column.levels
            key = _normalise_level(value, codec.column)
            if key not in levels:
                raise ValueError(
                    f"condition on {name!r}: {value!r} is not a declared category "
                    f"(allowed: {levels})"
                )
            return j, levels.index(key)
        known = [c.column.name for c in self.discrete]
        if any(c.name == name for c in self.schema.modelled):
            raise ValueError(
                f"condition on {name!r}: only categorical and boolean columns can be "
                f"conditioned on ({known})"
            )
        raise ValueError(f"condition on unknown column {name!r} (conditionable: {known})")


def codec_of(spec: FederationSpec) -> Codec:
    """The codec a federation spec declares: its schema, cut with its model's bins."""
    return Codec(spec.schema, default_bins=spec.model.default_bins)


def _normalise_level(value: object, column: Column) -> str:
    if column.type is ColumnType.BOOLEAN:
        text = str(value).strip().lower()
        return {"1": "true", "yes": "true", "0": "false", "no": "false"}.get(text, text)
    return str(value)
