"""Imported once by a node's fork server (``fedsynth.deploy.warm_executor``): Flower's
object pulls become prompt in every ClientApp forked from it (``prompt_pulls.py``).

This file sits outside the ``fedsynth`` package's import path on purpose. A fork server
can only preload modules by name, and importing ``fedsynth.deploy.prompt_pulls`` would put
the installed ``fedsynth`` package into every child's ``sys.modules``; Flower's
``load_app`` would then import the ClientApp from that package instead of from the FAB the
SuperLink sent. So the executor puts this folder on the fork server's ``PYTHONPATH`` and
this module loads ``prompt_pulls.py`` by its file, under a private name.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "_fedsynth_prompt_pulls", Path(__file__).resolve().parents[1] / "prompt_pulls.py"
)
assert _spec is not None and _spec.loader is not None
prompt_pulls = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prompt_pulls)

#: Whether Flower's pulls were made prompt (False: this flwr's pull_objects differs).
INSTALLED = prompt_pulls.install()
