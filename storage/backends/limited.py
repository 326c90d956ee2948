"""LimitedBackend: keeps the gateway within the store's request budget.

At most ``max_concurrency`` store calls in flight and at most ``max_rps`` started per second
(a token bucket: up to one second's worth may start at once after a quiet spell). Calls beyond
either limit wait in one FIFO queue — a burst of viewers or uploads queues fairly, in arrival
order, instead of failing or overrunning the store. ``queue_depth`` is how many wait now
(exported as ``chunkgate_backend_queue_depth``).

Hand-written rather than taken from a library: it is a FIFO queue plus a token bucket, and it
has to count its own waiters for the metric. Must never drop or reorder calls, or hold a slot
for a call that was cancelled.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from storage.backends.base import Backend, Blob, ObjectInfo


class LimitedBackend:
    def __init__(self, inner: Backend, *, max_concurrency: int = 0, max_rps: float = 0.0) -> None:
        if max_concurrency < 0 or max_rps < 0:
            raise ValueError("store limits must not be negative")
        self.inner = inner
        self.name = inner.name
        self.max_concurrency = max_concurrency
        self.max_rps = max_rps
        self.in_flight = 0
        self._waiting = 0
        # asyncio.Lock wakes waiters in arrival order: holding it while waiting for a slot and a
        # token makes the whole admission FIFO, so no caller can overtake another.
        self._admission = asyncio.Lock()
        self._slot_freed = asyncio.Event()
        self._tokens = max(1.0, max_rps)
        self._refilled = time.monotonic()

    def __getattr__(self, name: str) -> Any:  # check(), and anything else a backend offers
        return getattr(self.inner, name)

    @property
    def queue_depth(self) -> int:
        return self._waiting

    async def _take_token(self) -> None:
        if not self.max_rps:
            return
        while True:
            now = time.monotonic()
            self._tokens = min(max(1.0, self.max_rps), self._tokens + (now - self._refilled) * self.max_rps)
            self._refilled = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return
            await asyncio.sleep((1.0 - self._tokens) / self.max_rps)

    async def _take_slot(self) -> None:
        while self.max_concurrency and self.in_flight >= self.max_concurrency:
            self._slot_freed.clear()
            await self._slot_freed.wait()
        self.in_flight += 1

    @asynccontextmanager
    async def _admitted(self) -> AsyncIterator[None]:
        self._waiting += 1
        try:
            async with self._admission:
                await self._take_slot()
                try:
                    await self._take_token()
                except BaseException:
                    self._release()
                    raise
        finally:
            self._waiting -= 1
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        self.in_flight -= 1
        self._slot_freed.set()

    async def put(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        async with self._admitted():
            return await self.inner.put(key, data, if_none_match=if_none_match, if_match=if_match)

    async def get(self, key: str, *, start: int = 0, end: int | None = None, view: bool = False) -> Blob:
        async with self._admitted():
            return await self.inner.get(key, start=start, end=end, view=view)

    async def head(self, key: str) -> ObjectInfo:
        async with self._admitted():
            return await self.inner.head(key)

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        async with self._admitted():
            await self.inner.delete(key, if_match=if_match)

    async def list(self, prefix: str = "", *, start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        # Admitted once, for the request that starts the walk: holding a slot across yields would
        # let a consumer that stops early (and whose generator is closed late) pin it.
        walk = self.inner.list(prefix, start_after=start_after).__aiter__()
        async with self._admitted():
            try:
                first = await walk.__anext__()
            except StopAsyncIteration:
                return
        yield first
        async for info in walk:
            yield info

    async def close(self) -> None:
        await self.inner.close()
