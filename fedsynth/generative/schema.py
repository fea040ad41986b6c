"""The declared schema of a table: columns, types, bounds, categories, roles.

Everything the codec needs to turn rows into tensors comes from here, so it is public
knowledge agreed by the federation and costs no privacy budget. Nothing in this module
looks at data.
"""

from __future__ import annotations

import datetime as dt
import math
from enum import StrEnum
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ColumnType(StrEnum):
    INTEGER = "integer"
    FLOAT = "float"
    CATEGORICAL = "categorical"
    BOOLEAN = "boolean"
    DATETIME = "datetime"


class Role(StrEnum):
    FEATURE = "feature"
    TARGET = "target"
    IDENTIFIER = "identifier"  # PII or keys: dropped before training, never modelled


NUMERIC_TYPES = frozenset({ColumnType.INTEGER, ColumnType.FLOAT, ColumnType.DATETIME})
DISCRETE_TYPES = frozenset({ColumnType.CATEGORICAL, ColumnType.BOOLEAN})

Bound = float | int | dt.datetime | dt.date | str


def _to_epoch_seconds(value: Bound, key: str) -> float:
    """Datetime bounds are stored as seconds since the Unix epoch (UTC, naive)."""
    if isinstance(value, dt.datetime):
        stamp = value
    elif isinstance(value, dt.date):
        stamp = dt.datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            stamp = dt.datetime.fromisoformat(value)
        except ValueError as exc:
            raise ValueError(f"{key}: {value!r} is not an ISO 8601 date or datetime") from exc
    else:
        raise ValueError(f"{key}: a datetime column needs an ISO 8601 date, got {value!r}")
    if stamp.tzinfo is not None:
        stamp = stamp.astimezone(dt.UTC).replace(tzinfo=None)
    return (stamp - dt.datetime(1970, 1, 1)).total_seconds()


class Column(BaseModel):
    """One column of the table, as a data dictionary would state it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, Field(min_length=1)]
    type: ColumnType
    role: Role = Role.FEATURE
    nullable: bool = False
    min: Bound | None = None
    max: Bound | None = None
    categories: list[str] | None = None
    scale: Literal["linear", "log"] = "linear"
    bins: Annotated[int, Field(ge=2, le=200)] | None = None
    format: str | None = None
    description: str = ""

    @model_validator(mode="after")
    def _check_by_type(self) -> Column:
        if self.role is Role.IDENTIFIER:
            return self  # never modelled: only its presence is checked
        if self.type in NUMERIC_TYPES:
            if self.min is None or self.max is None:
                raise ValueError(
                    "min and max are required for integer, float and datetime columns "
                    "(the codec is built from declared bounds, never from the data)"
                )
            if self.categories is not None:
                raise ValueError("categories is only allowed for categorical columns")
            low, high = self.bounds
            if not high > low:
                raise ValueError(f"max ({self.max}) must be greater than min ({self.min})")
        else:
            if self.min is not None or self.max is not None or self.bins is not None:
                raise ValueError("min, max and bins are only allowed for numeric columns")
            if self.scale != "linear":
                raise ValueError("scale is only allowed for numeric columns")
        if self.type is ColumnType.CATEGORICAL:
            if not self.categories:
                raise ValueError("categories must list at least one category")
            duplicated = sorted({c for c in self.categories if self.categories.count(c) > 1})
            if duplicated:
                raise ValueError(f"categories are listed twice: {duplicated}")
        elif self.categories is not None:
            raise ValueError("categories is only allowed for categorical columns")
        return self

    @property
    def is_numeric(self) -> bool:
        return self.type in NUMERIC_TYPES

    @property
    def is_discrete(self) -> bool:
        return self.type in DISCRETE_TYPES

    @property
    def bounds(self) -> tuple[float, float]:
        """Declared (min, max) as floats; datetimes as epoch seconds."""
        if self.min is None or self.max is None:
            raise ValueError(f"column {self.name!r} declares no bounds")
        if self.type is ColumnType.DATETIME:
            return _to_epoch_seconds(self.min, "min"), _to_epoch_seconds(self.max, "max")
        if not isinstance(self.min, int | float) or not isinstance(self.max, int | float):
            raise ValueError(f"column {self.name!r}: min and max must be numbers")
        if not (math.isfinite(self.min) and math.isfinite(self.max)):
            raise ValueError(f"column {self.name!r}: min and max must be finite")
        return float(self.min), float(self.max)

    @property
    def levels(self) -> list[str]:
        """Category labels of a discrete column, in declared order."""
        if self.type is ColumnType.BOOLEAN:
            return ["false", "true"]
        return list(self.categories or [])


class Schema(BaseModel):
    """An ordered list of columns with at most one target."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    columns: Annotated[list[Column], Field(min_length=1)]

    @model_validator(mode="after")
    def _check_columns(self) -> Schema:
        names = [c.name for c in self.columns]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            where = ", ".join(f"columns[{i}]" for i, n in enumerate(names) if n in duplicated)
            raise ValueError(f"duplicate column names: {duplicated} (at {where})")
        targets = [c.name for c in self.columns if c.role is Role.TARGET]
        if len(targets) > 1:
            raise ValueError(f"at most one column may have role 'target', found {targets}")
        if not self.modelled:
            raise ValueError("at least one column must have role 'feature' or 'target'")
        return self

    @cached_property
    def modelled(self) -> tuple[Column, ...]:
        """Columns the model learns: everything but identifiers, in declared order."""
        return tuple(c for c in self.columns if c.role is not Role.IDENTIFIER)

    @cached_property
    def identifiers(self) -> tuple[Column, ...]:
        return tuple(c for c in self.columns if c.role is Role.IDENTIFIER)

    @property
    def target(self) -> Column | None:
        return next((c for c in self.columns if c.role is Role.TARGET), None)

    def column(self, name: str) -> Column:
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(f"no column named {name!r}; columns are {[c.name for c in self.columns]}")

    def public_dict(self) -> dict[str, Any]:
        """JSON-safe form, stored with models (it is public: no data in it)."""
        return self.model_dump(mode="json", exclude_defaults=True)
