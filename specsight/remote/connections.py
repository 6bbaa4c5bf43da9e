"""What one client's connections may cost the server (:class:`GuardedH11`, uvicorn's HTTP/1.1
protocol with deadlines and caps):

- a request's headers must arrive within ``header_timeout_s`` (from connecting, or from the
  last answer), and its body within ``body_timeout_s`` of the headers, at an average of at least
  ``body_min_bytes_per_s`` over every ``body_window_s``: slower requests get 408 and are closed;
- connections are counted as they are accepted (:class:`ConnectionGuard`). One client address
  keeps at most ``max_connections_per_address`` connections that have not shown a valid API key,
  and the server at most ``max_connections`` (below the open-file limit). A connection over a
  cap makes room by closing the address's (then the server's) connection that has waited
  longest for a request, never one in the middle of a request: a flood of idle connections
  closes its own oldest, and a health probe or a keyed submit still gets through;
- a log line repeated in a burst (``Too many open files`` at every accept) is written a bounded
  number of times (:class:`RepeatFilter`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import API_KEY_HEADER, ConnectionLimits, ErrorBody

__all__ = [
    "HEADER_TIMEOUT_S",
    "ConnectionGuard",
    "GuardedH11",
    "RepeatFilter",
    "connection_limit",
    "install_log_limits",
]

#: seconds a client has to send a request's headers, from connecting or from the last answer
HEADER_TIMEOUT_S = 10.0
_KEY_HEADER = API_KEY_HEADER.lower().encode("ascii")
log = logging.getLogger("specsight.serve")


class ConnectionGuard:
    """The open connections by client address, and which of them wait for a request (those
    a new connection over a cap may close). Used from the event loop only."""

    def __init__(
        self,
        limits: ConnectionLimits,
        authenticate: Callable[[str | None], str | None] | None = None,
    ):
        self.limits, self.authenticate = limits, authenticate
        self.max_connections = limits.max_connections or connection_limit()
        self._open: dict[GuardedH11, str] = {}  # connection -> client address
        self._unkeyed: dict[str, dict[GuardedH11, None]] = {}  # per address, no valid key yet
        #: connections waiting for a request, longest waiting first: without a key, with one
        self._idle: tuple[dict[GuardedH11, None], dict[GuardedH11, None]] = ({}, {})

    def __len__(self) -> int:
        return len(self._open)

    def admit(self, conn: GuardedH11) -> bool:
        """Count a new connection (waiting for its first request), closing the longest-idle
        other one over a cap; False: no room (every other connection is mid-request)."""
        address = conn.client[0] if conn.client else "?"
        self._open[conn] = address
        unkeyed = self._unkeyed.setdefault(address, {})
        unkeyed[conn] = None
        self._idle[0][conn] = None
        if len(unkeyed) > self.limits.max_connections_per_address:
            same = (c for c in self._idle[0] if self._open[c] == address)
            if not self._make_room(same, conn, "of one address without a key"):
                return False
        if len(self._open) > self.max_connections:
            idle = (c for group in self._idle for c in group)
            if not self._make_room(idle, conn, "in all"):
                return False
        return True

    def _make_room(self, idle: Any, new: GuardedH11, what: str) -> bool:
        """Close the first of ``idle`` (longest waiting first) that is not ``new``; else
        forget ``new`` (the caller closes it) and say False."""
        victim = next((c for c in idle if c is not new), None)
        if victim is None:
            self.forget(new)
            log.warning("no connection to close for a new one over the cap (%s)", what)
            return False
        log.warning("over the connection cap (%s): closing the longest idle one", what)
        self.forget(victim)
        victim.close_idle()
        return True

    def waiting(self, conn: GuardedH11) -> None:
        """``conn`` waits for its next request (it goes to the back of the line)."""
        if conn in self._open:
            idle = self._idle[0 if conn in self._unkeyed.get(self._open[conn], ()) else 1]
            idle.pop(conn, None)
            idle[conn] = None

    def busy(self, conn: GuardedH11, keyed: bool) -> None:
        """A request's headers are in (``keyed``: with a valid API key)."""
        self._idle[0].pop(conn, None)
        self._idle[1].pop(conn, None)
        if keyed and conn in self._open:
            unkeyed = self._unkeyed.get(self._open[conn])
            if unkeyed is not None:
                unkeyed.pop(conn, None)

    def forget(self, conn: GuardedH11) -> None:
        address = self._open.pop(conn, None)
        self._idle[0].pop(conn, None)
        self._idle[1].pop(conn, None)
        unkeyed = self._unkeyed.get(address) if address is not None else None
        if unkeyed is not None:
            unkeyed.pop(conn, None)
            if not unkeyed:
                del self._unkeyed[address]  # type: ignore[arg-type]


class GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with deadlines on a request's headers and body, and its
    connection counted by a :class:`ConnectionGuard` (``guard``, set by ``server_config``)."""

    limits = ConnectionLimits(header_timeout_s=HEADER_TIMEOUT_S)
    guard: ConnectionGuard | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._timer: asyncio.TimerHandle | None = None
        self._phase: str | None = None  # "headers" or "body": what the timer waits for
        self._waiting_on: Any = None
        self._window_bytes, self._window_start, self._body_start = 0, 0.0, 0.0
        super().connection_made(transport)
        if self.guard is not None and not self.guard.admit(self):
            transport.close()  # no room, and nothing to make room with
            return
        self._await_headers()

    # --- the request's headers ---------------------------------------------------------------

    def _await_headers(self) -> None:
        """Start the clock for the next request's headers."""
        self._cancel()
        self._waiting_on, self._phase = self.cycle, "headers"  # a new request makes a new cycle
        self._timer = self.loop.call_later(self.limits.header_timeout_s, self._too_slow)
        if self.guard is not None:
            self.guard.waiting(self)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = None

    def handle_events(self) -> None:
        super().handle_events()
        if self._phase == "headers" and self.cycle is not self._waiting_on:
            self._cancel()  # the request's headers are in
            if self.guard is not None:
                self.guard.busy(self, self._has_valid_key())
            if self.cycle.more_body and not self.cycle.response_complete:
                self._await_body()
        elif self._phase == "body" and not self.cycle.more_body:
            self._cancel()  # the body is in

    def _has_valid_key(self) -> bool:
        authenticate = self.guard.authenticate if self.guard is not None else None
        if authenticate is None:
            return False
        raw = next((v for k, v in self.headers or () if k == _KEY_HEADER), None)
        return authenticate(None if raw is None else raw.decode("latin-1")) is not None

    def _too_slow(self) -> None:
        self._timer = self._phase = None
        if not self.transport.is_closing():
            self.transport.close()

    def close_idle(self) -> None:
        """Closed to make room (the connection waits for a request: nothing is cut off)."""
        self._cancel()
        if not self.transport.is_closing():
            self.transport.close()

    # --- the request's body ------------------------------------------------------------------

    def _await_body(self) -> None:
        self._phase = "body"
        self._body_start = self._window_start = self.loop.time()
        self._window_bytes = 0
        window = min(self.limits.body_window_s, self.limits.body_timeout_s)
        self._timer = self.loop.call_later(window, self._check_body)

    def data_received(self, data: bytes) -> None:
        if self._phase == "body":
            self._window_bytes += len(data)
        super().data_received(data)

    def _check_body(self) -> None:
        """Every window: the body is in, or on its way fast enough and within its deadline."""
        self._timer = None
        cycle = self.cycle
        if self._phase != "body" or not cycle.more_body or cycle.response_complete:
            self._phase = None
            return
        now, limits = self.loop.time(), self.limits
        if now - self._body_start >= limits.body_timeout_s - 1e-3:
            self._body_too_slow(f"the request body took over {limits.body_timeout_s:g} s")
            return
        # a body the app has not read yet (reading paused) is not the client's delay
        rate = self._window_bytes / max(now - self._window_start, 1e-3)
        if rate < limits.body_min_bytes_per_s and not self.flow.read_paused:
            self._body_too_slow(
                f"the request body arrived at {rate:.0f} bytes/s; the server needs at least "
                f"{limits.body_min_bytes_per_s}"
            )
            return
        self._window_bytes, self._window_start = 0, now
        left = limits.body_timeout_s - (now - self._body_start)
        self._timer = self.loop.call_later(min(limits.body_window_s, left), self._check_body)

    def _body_too_slow(self, message: str) -> None:
        """408 (unless an answer has begun), then close: the app's reads end at once."""
        self._phase = None
        cycle = self.cycle
        if not cycle.response_started and not self.transport.is_closing():
            cycle.disconnected = True  # the app's answer, if any, goes nowhere
            hint = "send the whole body at once, right after the headers"
            body = json.dumps(
                ErrorBody(error="body-timeout", message=message, hint=hint).model_dump(mode="json")
            ).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ]
            try:
                out = self.conn.send(h11.Response(status_code=408, headers=headers)) or b""
                out += self.conn.send(h11.Data(data=body)) or b""
                out += self.conn.send(h11.EndOfMessage()) or b""
                self.transport.write(out)
            except h11.LocalProtocolError:
                pass
            cycle.message_event.set()
        self.transport.close()

    # --- between requests ----------------------------------------------------------------------

    def on_response_complete(self) -> None:
        self._cancel()
        if not self.transport.is_closing():
            self._await_headers()  # before a pipelined request starts inside the next call
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        if self.guard is not None:
            self.guard.forget(self)
        super().connection_lost(exc)


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
