"""Demo tables: real public data sets prepared as plain CSV files for the demo federations."""

from fedsynth.demo.data import (
    DEMO_TABLES,
    DemoDataError,
    load_raw,
    prepare_demo_tables,
    split_holdout,
)

__all__ = ["DEMO_TABLES", "DemoDataError", "load_raw", "prepare_demo_tables", "split_holdout"]
