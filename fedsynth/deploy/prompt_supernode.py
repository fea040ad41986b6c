"""``flower-supernode`` that asks for the next message promptly while a run is active.

flwr 1.41's SuperNode loop (``flwr/supernode/start_client_internal.py``) pushes a reply,
asks the SuperLink for the next message at once, finds none (the server is still waiting
for the other nodes) and sleeps a fixed 3 s. Every message exchange of a round therefore
costs at least 3 s, six exchanges a round here, whatever the ClientApp does: node replies
come 3.5-3.7 s apart on loopback (docs/deployment.md, "Round time"). The interval is not a
setting in 1.41, so this module is run instead of the ``flower-supernode`` script: it
replaces that sleep, and only while the node is busy. For :data:`BUSY_WINDOW_S` after
the last message it received, the node asks again after 50 ms, then after twice as long
each time, up to ``poll_s`` (a command-line option): about six requests in the first two
seconds after a reply, then one every ``poll_s``. After that window it is idle and falls
back to Flower's 3 s, so an idle federation costs the SuperLink what it costs with stock
Flower.

While busy, the same loop's 0.5 s waits for the ClientApp's reply to appear in the node's
own state (``_push_messages``) become 50 ms: a local check, not a request. And the node's
object pulls retry after 50 ms instead of 1 s (``fedsynth.deploy.prompt_pulls``).

What is patched, and why it is safe to patch: the module's ``time`` global (the loop's
only use of it is ``time.sleep``; every other attribute is the real module's), its
``_pull_and_store_message`` (wrapped, unchanged, to note when a message arrived) and its
``pull_objects`` (see ``prompt_pulls``).
:func:`install` checks that the loop still reads as described before touching anything,
and leaves Flower as it is otherwise.

    python -m fedsynth.deploy.prompt_supernode --poll-s 0.5 <flower-supernode arguments>
"""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Callable
from typing import Any

from fedsynth.deploy import prompt_pulls

#: Seconds after the last received message during which the node polls promptly.
BUSY_WINDOW_S = 60.0
#: The fixed idle sleep of flwr 1.41's SuperNode loop.
FLOWER_IDLE_SLEEP_S = 3
#: Shortest poll interval accepted: below it the SuperLink gets flooded for little gain.
MIN_POLL_S = 0.05
#: The first wait after an empty poll while busy; each further one doubles, up to poll_s.
FIRST_POLL_S = 0.05
#: flwr 1.41's wait, in the same loop, for the ClientApp's reply (and its objects) to
#: appear in the node's own state; a local check, so while busy it runs at LOCAL_WAIT_S.
FLOWER_LOCAL_WAIT_S = 0.5
LOCAL_WAIT_S = 0.05


class PromptPoll:
    """Stands in for the ``time`` module inside Flower's SuperNode loop."""

    def __init__(
        self,
        poll_s: float,
        busy_window_s: float = BUSY_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not MIN_POLL_S <= poll_s <= FLOWER_IDLE_SLEEP_S:
            raise ValueError(f"poll_s must be between {MIN_POLL_S} and {FLOWER_IDLE_SLEEP_S} s")
        self.poll_s = poll_s
        self.busy_window_s = busy_window_s
        self._clock = clock
        self._sleep = sleep
        self.last_message = -float("inf")
        self.empty_polls = 0  # polls that found nothing since the last message

    def received(self) -> None:
        self.last_message = self._clock()
        self.empty_polls = 0

    def sleep(self, seconds: float) -> None:
        busy = self._clock() - self.last_message < self.busy_window_s
        if seconds == FLOWER_IDLE_SLEEP_S and busy:
            # Soon after a reply the next message is often a fraction of a second away
            # (the other nodes' replies to a light SecAgg+ stage): ask again after 50 ms,
            # then twice as long each time, up to poll_s.
            seconds = min(self.poll_s, FIRST_POLL_S * 2**self.empty_polls)
            self.empty_polls += 1
        elif seconds == FLOWER_LOCAL_WAIT_S and busy:
            seconds = LOCAL_WAIT_S
        self._sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def install(poll_s: float) -> PromptPoll | None:
    """Patch Flower's SuperNode loop (see the module docstring); None if its code no
    longer matches what this was written against, and then nothing is patched."""
    from flwr.supernode import start_client_internal as loop

    source = inspect.getsource(loop.start_client_internal)
    push_source = inspect.getsource(loop._push_messages)
    if (
        f"time.sleep({FLOWER_IDLE_SLEEP_S})" not in source
        or f"time.sleep({FLOWER_LOCAL_WAIT_S})" not in push_source
        or not hasattr(loop, "_pull_and_store_message")
        or not prompt_pulls.install(loop)
    ):
        return None
    poll = PromptPoll(poll_s)
    pull = loop._pull_and_store_message

    def pull_and_note(*args: Any, **kwargs: Any) -> int | None:
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            poll.received()
        return run_id

    loop._pull_and_store_message = pull_and_note
    loop.time = poll  # type: ignore[assignment]
    return poll


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] != "--poll-s":
        raise SystemExit("usage: python -m fedsynth.deploy.prompt_supernode --poll-s S ARGS...")
    from flwr.supercore import log
    from flwr.supernode.cli.flower_supernode import flower_supernode

    poll_s = float(argv[1])
    if install(poll_s) is None:
        log(30, "fedsynth: this flwr's SuperNode loop is not the one expected; polling as is")
    else:
        log(
            20,
            "fedsynth: polling from %g s up to every %g s for %g s after each message",
            FIRST_POLL_S,
            poll_s,
            BUSY_WINDOW_S,
        )
    sys.argv = ["flower-supernode", *argv[2:]]
    flower_supernode()


if __name__ == "__main__":
    main(sys.argv[1:])
