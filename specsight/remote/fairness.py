"""How API keys share the intake (the threads that check and compile submitted specs): a key
holds at most ``slots_per_key`` of the ``slots`` at once (one of two by default, so another
key's submit always finds a slot free), and a free slot goes to the waiting key served longest
ago, not to the oldest submit, so a key that sends many large specs delays only its own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import anyio

from .protocol import IntakeLimits

__all__ = ["FairIntake", "IntakeBusy"]

T = TypeVar("T")


class IntakeBusy(Exception):
    """No room to wait for an intake slot: ``per_key`` tells whether the key's own share of
    the waiting room (429) or the whole room (503) is full."""

    def __init__(self, message: str, *, per_key: bool):
        self.per_key = per_key
        super().__init__(message)


class FairIntake:
    """Intake slots shared fairly between keys (used from the event loop only)."""

    def __init__(self, limits: IntakeLimits | None = None):
        self.limits = limits or IntakeLimits()
        self.threads = anyio.CapacityLimiter(self.limits.slots)
        self._running: dict[str, int] = {}
        #: keys with waiting submits, each key's in arrival order
        self._queues: dict[str, deque[anyio.Event]] = {}
        #: when each running or waiting key last got a slot (a count of slots given)
        self._last: dict[str, int] = {}
        self._given = 0
        self._busy = 0
        self._waiting = 0

    @property
    def busy(self) -> int:
        return self._busy

    @property
    def waiting(self) -> int:
        return self._waiting

    async def run(self, key: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in an intake thread, once ``key`` has its turn for a slot."""
        await self._acquire(key)
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self.threads)
        finally:
            self._release(key)

    def _free_for(self, key: str) -> bool:
        return (
            self._busy < self.limits.slots and self._running.get(key, 0) < self.limits.slots_per_key
        )

    async def _acquire(self, key: str) -> None:
        if self._free_for(key) and key not in self._queues:
            self._take(key)
            return
        queue = self._queues.get(key)
        if queue is not None and len(queue) >= self.limits.waiting_per_key:
            raise IntakeBusy(
                f"{len(queue)} of this key's submits are waiting to be checked; submit again "
                "when one is answered",
                per_key=True,
            )
        if self._waiting >= self.limits.waiting:
            raise IntakeBusy(
                "the server is checking many submitted specs; submit again shortly",
                per_key=False,
            )
        event = anyio.Event()
        self._queues.setdefault(key, deque()).append(event)
        self._waiting += 1
        try:
            await event.wait()
        except BaseException:  # cancelled while waiting
            if event.is_set():  # granted meanwhile: hand the slot on
                self._release(key)
            else:
                self._forget(key, event)
            raise

    def _take(self, key: str) -> None:
        self._busy += 1
        self._running[key] = self._running.get(key, 0) + 1
        self._given += 1
        self._last[key] = self._given

    def _release(self, key: str) -> None:
        self._busy -= 1
        left = self._running[key] - 1
        if left:
            self._running[key] = left
        else:
            del self._running[key]
            if key not in self._queues:
                del self._last[key]  # nothing of this key left: its next submit starts afresh
        self._dispatch()

    def _forget(self, key: str, event: anyio.Event) -> None:
        queue = self._queues[key]
        queue.remove(event)
        self._waiting -= 1
        if not queue:
            del self._queues[key]
            if key not in self._running:
                self._last.pop(key, None)

    def _dispatch(self) -> None:
        """Give free slots to the waiting keys, the one served longest ago first."""
        while self._busy < self.limits.slots:
            ready = [k for k in self._queues if self._free_for(k)]
            if not ready:
                return
            key = min(ready, key=lambda k: self._last.get(k, 0))
            queue = self._queues[key]
            event = queue.popleft()
            if not queue:
                del self._queues[key]
            self._waiting -= 1
            self._take(key)
            event.set()
