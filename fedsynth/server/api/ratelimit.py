"""Slow down key guessing: a client with too many failed authentications waits.

Hand-written because the need is narrow: count *failed* key checks per client and refuse
that client for a while, whatever route it tries; request-rate limiters (slowapi and the
like) count every request per route instead. Counters live in the server process: with
``fedsynth serve --workers N`` each process counts on its own, so a client gets up to N
times the limit before every process refuses it.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

DEFAULT_FAILURES = 10
DEFAULT_WINDOW_S = 60.0
#: Clients remembered at most; the least recently seen are forgotten first.
MAX_CLIENTS = 10_000


class FailureLimiter:
    """At most ``failures`` failed authentications per client in any ``window_s`` seconds."""

    def __init__(
        self,
        failures: int = DEFAULT_FAILURES,
        window_s: float = DEFAULT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures < 1:
            raise ValueError(f"failures must be >= 1, got {failures}")
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.failures = failures
        self.window_s = window_s
        self._clock = clock
        self._seen: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, client: str) -> int:
        """Whole seconds until ``client`` may try again; 0 when it may now."""
        with self._lock:
            times = self._recent(client)
            if len(times) < self.failures:
                return 0
            return max(1, math.ceil(times[-self.failures] + self.window_s - self._clock()))

    def failed(self, client: str) -> bool:
        """Count one failure; True when this one reaches the limit (the client is now
        refused), so that the caller can record that once rather than every refusal."""
        with self._lock:
            times = self._recent(client)
            times.append(self._clock())
            self._seen.move_to_end(client)
            while len(self._seen) > MAX_CLIENTS:
                self._seen.popitem(last=False)
            return len(times) == self.failures

    def _recent(self, client: str) -> deque[float]:
        times = self._seen.setdefault(client, deque(maxlen=self.failures))
        cutoff = self._clock() - self.window_s
        while times and times[0] <= cutoff:
            times.popleft()
        return times
