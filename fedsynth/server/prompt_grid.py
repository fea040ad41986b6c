"""A Flower grid that collects the nodes' replies promptly on the deployment engine.

flwr 1.41's ``HttpGrid.send_and_receive`` (the ServerApp talking to a SuperLink) sleeps a
fixed 3 s between pulls for replies, with no setting. A fedsynth round is six such
exchanges (budget query, four SecAgg+ stages, evaluation), so the server idled an average
1.5 s after the last reply of each. :class:`PromptGrid` does the same push-then-pull with
Flower's own ``push_messages``/``pull_messages`` and a shorter pause; everything else is
passed through. Flower has no hook for this, hence a wrapper (docs/deployment.md, "Round
time"). The in-memory grid of the simulation engine already pulls every 0.1 s.

A reply can be listed before all its objects have reached the SuperLink; Flower's pull of
its objects then retries after 1 s, which cost 1.0-1.3 s in four of a traced round's six
exchanges. :func:`prompt_replies` makes that first retry 50 ms
(``fedsynth.deploy.prompt_pulls``, as on the nodes).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp.grid import Grid
from flwr.supercore.run import Run

#: Seconds between pulls for replies: a pull is one small TLS request to the SuperLink
#: (ten a second from the one ServerApp of a run, only while it waits for replies).
PULL_INTERVAL_S = 0.1


def prompt_replies() -> bool:
    """Flower's pulls of reply objects in the ServerApp retry first after 50 ms; False
    (nothing changed) if this flwr's pulls are not the ones it was written for."""
    from flwr.superlink.grid import http_grid

    from fedsynth.deploy import prompt_pulls

    return prompt_pulls.install(http_grid)


class PromptGrid(Grid):
    """``grid`` with replies pulled every ``interval`` seconds instead of every 3."""

    def __init__(self, grid: Grid, interval: float = PULL_INTERVAL_S) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        self._grid = grid
        self._interval = interval

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages`` and pull replies until all came or ``timeout`` s passed (as
        Flower's, which returns what came so far on timeout)."""
        waiting = set(self.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting and (end is None or time.monotonic() < end):
            pulled = list(self.pull_messages(waiting))
            replies += pulled
            waiting -= {m.metadata.reply_to_message_id for m in pulled}
            if waiting:
                time.sleep(self._interval)
        return replies
