"""Flower's object pulls on a node retry after 50 ms instead of 1 s.

A message's arrays travel as separate objects. When one arrives, flwr 1.41's SuperNode
stores the message first (its executor may now start the ClientApp) and then pulls the
objects from the SuperLink; the ClientApp in turn pulls them from the SuperNode. A pull that
asks before an object is there is retried with exponential backoff starting at
``PULL_INITIAL_BACKOFF``, 1 s, a constant with no setting (``pull_objects`` in
``flwr/supercore/inflatable/inflatable_utils.py``). In a traced loopback round the
ClientApp's pull of the global model took 3.2-3.5 s, the 1 s and 2 s retries, for objects
the SuperNode had within about a second; the SuperNode's own pull took 1.3-2.1 s
(docs/deployment.md, "Round time").

:func:`install` wraps ``pull_objects`` so that its first retry comes after
:data:`INITIAL_BACKOFF_S`; later retries still double up to Flower's cap, and the number of
tries and the time limit are Flower's. Nothing else changes. It is applied in the SuperNode
(``fedsynth.deploy.prompt_supernode``), in the ServerApp's pulls of replies
(``fedsynth.server.prompt_grid``) and, through ``forkserver/fedsynth_fork_preload.py``, in
every ClientApp the node's warm executor forks.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from types import ModuleType
from typing import Any

#: First retry of a pull whose object is not there yet (Flower's: 1 s).
INITIAL_BACKOFF_S = 0.05


def prompt(pull_objects: Callable[..., Any]) -> Callable[..., Any]:
    """``pull_objects`` with its first retry after :data:`INITIAL_BACKOFF_S` at most."""
    if getattr(pull_objects, "fedsynth_prompt", False):
        return pull_objects

    @functools.wraps(pull_objects)
    def pull(*args: Any, **kwargs: Any) -> Any:
        initial = kwargs.get("initial_backoff")
        if initial is None or initial > INITIAL_BACKOFF_S:
            kwargs["initial_backoff"] = INITIAL_BACKOFF_S
        return pull_objects(*args, **kwargs)

    pull.fedsynth_prompt = True  # type: ignore[attr-defined]
    return pull


def install(*modules: ModuleType) -> bool:
    """Wrap ``pull_objects`` in Flower's inflatable utilities (used by the ClientApp's
    pulls) and in each of ``modules`` that imported it by name; False, and nothing
    patched, if this flwr's ``pull_objects`` has no ``initial_backoff`` parameter."""
    from flwr.supercore.inflatable import inflatable_utils

    targets = [inflatable_utils, *modules]
    pulls = [getattr(m, "pull_objects", None) for m in targets]
    if not all(p and "initial_backoff" in inspect.signature(p).parameters for p in pulls):
        return False
    for module in targets:
        module.pull_objects = prompt(module.pull_objects)  # type: ignore[attr-defined]
    return True
