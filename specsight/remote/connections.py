"""What one client's connections may cost the server: request headers must arrive within a
time limit (slow-header connections are closed, not held forever), concurrent connections stay
below the open-file limit (so the health endpoints keep answering), and a log line repeated in a
burst (``Too many open files`` at every accept) is written a bounded number of times.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = [
    "HEADER_TIMEOUT_S",
    "GuardedH11",
    "RepeatFilter",
    "connection_limit",
    "install_log_limits",
]

#: seconds a client has to send a request's headers, from connecting or from the last answer
HEADER_TIMEOUT_S = 10.0


class GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a time limit on receiving each request's headers."""

    header_timeout_s = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        """Start the clock for the next request's headers."""
        self._disarm()
        self._waiting_on = self.cycle  # a new request makes a new cycle
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def handle_events(self) -> None:
        super().handle_events()
        if getattr(self, "_header_timer", None) is not None and self.cycle is not self._waiting_on:
            self._disarm()  # the request's headers are in

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


class RepeatFilter(logging.Filter):
    """Lets each distinct message through at most ``burst`` times per ``window_s`` seconds,
    then notes how many were left out when the window ends."""

    def __init__(self, burst: int = 10, window_s: float = 60.0):
        super().__init__()
        self.burst, self.window_s = burst, window_s
        self._seen: dict[str, list[float]] = {}  # message -> [window start, count]

    def filter(self, record: logging.LogRecord) -> bool:
        key = f"{record.name}:{record.levelno}:{record.getMessage()[:200]}"
        now = time.monotonic()
        entry = self._seen.get(key)
        if entry is None or now - entry[0] > self.window_s:
            left_out = 0 if entry is None else int(entry[1]) - self.burst
            if left_out > 0:
                record.msg = f"{record.msg} (and {left_out} more like it left out)"
            if len(self._seen) > 1000:
                self._seen.clear()
            self._seen[key] = [now, 1]
            return True
        entry[1] += 1
        return entry[1] <= self.burst


def connection_limit(reserve: int = 64) -> int:
    """Concurrent connections the server takes: its open-file limit less ``reserve`` (the
    database, model files, logs), so that accepting never runs out of descriptors."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 10_000
    return max(8, int(soft) - reserve)


def install_log_limits(*names: str, **kwargs: Any) -> RepeatFilter:
    """Put one :class:`RepeatFilter` on the named loggers (and their handlers' records)."""
    limiter = RepeatFilter(**kwargs)
    for name in names:
        logging.getLogger(name).addFilter(limiter)
    return limiter
