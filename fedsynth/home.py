"""``FEDSYNTH_HOME``: the one folder holding all state (database, registry, keys, node data)."""

from __future__ import annotations

import os
from pathlib import Path


def fedsynth_home() -> Path:
    """``$FEDSYNTH_HOME``, default ``~/.fedsynth``."""
    return Path(os.environ.get("FEDSYNTH_HOME") or Path.home() / ".fedsynth").expanduser()
