"""ChunkCache: a bytes-bounded LRU of immutable chunks with single-flight fetches.

Many viewers of one video must cost the store one fetch per chunk: a miss starts one fetch
task, and every request that wants the same chunk while it runs awaits that same task. The
fetch is shielded, so a viewer that disconnects does not cancel a fetch others wait on.

Entries are keyed by the chunk's store key, which names an immutable object (a fresh version id
per upload), so nothing ever needs invalidating. Never caches a failed fetch.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable, Generic, TypeVar

from cachetools import LRUCache

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    coalesced: int = 0  # requests that joined a fetch already in flight
    evictions: int = 0
    readahead: int = 0
    bytes: int = 0


class _EvictionCountingLRU(LRUCache):  # type: ignore[type-arg]
    def __init__(self, maxsize: int, getsizeof: Callable[[object], int], stats: CacheStats) -> None:
        super().__init__(maxsize=maxsize, getsizeof=getsizeof)
        self._stats = stats

    def popitem(self):  # type: ignore[no-untyped-def]
        item = super().popitem()
        self._stats.evictions += 1
        return item


class ChunkCache(Generic[T]):
    """LRU bounded by the summed ``sizeof`` of its values, plus single-flight fetching."""

    def __init__(self, max_bytes: int, sizeof: Callable[[T], int]) -> None:
        self.stats = CacheStats()
        self.max_bytes = max_bytes
        self._sizeof = sizeof
        self._lru: LRUCache = _EvictionCountingLRU(max(1, max_bytes), sizeof, self.stats)  # type: ignore[arg-type]
        self._inflight: dict[str, asyncio.Future[T]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._lru or key in self._inflight

    async def get(self, key: str, fetch: Callable[[], Awaitable[T]]) -> T:
        """The value for ``key``: from memory, from a fetch already running, or by starting one."""
        value = self._lru.get(key)
        if value is not None:
            self.stats.hits += 1
            return value
        task = self._inflight.get(key)
        if task is not None:
            self.stats.coalesced += 1
        else:
            self.stats.misses += 1
            task = asyncio.ensure_future(self._fetch(key, fetch))
            self._inflight[key] = task
        # shield: a cancelled requester must not cancel a fetch other requesters await.
        return await asyncio.shield(task)

    def prefetch(self, key: str, fetch: Callable[[], Awaitable[T]]) -> None:
        """Start fetching ``key`` in the background unless it is cached or already coming."""
        if key in self._lru or key in self._inflight:
            return
        self.stats.readahead += 1
        task = asyncio.ensure_future(self._fetch(key, fetch))
        self._inflight[key] = task
        # A read-ahead nobody ends up wanting may fail; that is not worth a warning per chunk.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _fetch(self, key: str, fetch: Callable[[], Awaitable[T]]) -> T:
        try:
            value = await fetch()
            if self._sizeof(value) <= self.max_bytes:
                self._lru[key] = value
            self.stats.bytes = int(self._lru.currsize)
            return value
        finally:
            self._inflight.pop(key, None)

    def discard(self, key: str) -> None:
        self._lru.pop(key, None)
        self.stats.bytes = int(self._lru.currsize)

    def clear(self) -> None:
        self._lru.clear()
        self.stats.bytes = 0
