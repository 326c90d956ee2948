"""ChunkCache: a bytes-bounded LRU of immutable chunks with single-flight fetches and read-ahead
that never costs the store more than readers take.

Many viewers of one video must cost the store one fetch per chunk: a miss starts one fetch
task, and every request that wants the same chunk while it runs awaits that same task.

Everything that holds memory counts against ``max_bytes``: cached values, fetches in flight
(reserved at their expected size when they start) and read-ahead that has arrived but was not yet
taken by the reader that asked for it. Read-ahead results are pinned (not evictable) until that
reader takes them or gives up, so under cache pressure a prefetched chunk is never evicted and
fetched twice; and read-ahead only starts when its whole size fits in room that holds nothing
pinned or in flight, so many readers cannot overcommit memory with prefetches. A fetch nobody
waits for any more (every reader that wanted it went away, and no read-ahead claim is left) is
cancelled, so an abandoned GET stops costing the store.

Entries are keyed by the chunk's store key, which names an immutable object (a fresh version id
per upload), so nothing ever needs invalidating. Never caches a failed fetch.

Hand-written instead of cachetools (used before): the budget spans three kinds of holdings
(LRU, pinned, in flight) and the LRU's capacity moves with the other two, which cachetools'
fixed-size caches do not model.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Generic, Hashable, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    coalesced: int = 0  # requests that joined a fetch already in flight
    evictions: int = 0
    readahead: int = 0  # read-ahead fetches started
    readahead_skipped: int = 0  # read-ahead not started: no free room
    dropped: int = 0  # fetches cancelled because nobody waited for them any more
    bytes: int = 0  # cached + pinned + in flight


@dataclass
class _Fetch(Generic[T]):
    task: asyncio.Future[T]
    size: int
    waiters: int = 0
    owners: set[Hashable] = field(default_factory=set)  # read-ahead claims not yet taken


class ChunkCache(Generic[T]):
    """Bytes-bounded LRU plus single-flight fetching and owned, pinned read-ahead."""

    def __init__(self, max_bytes: int, sizeof: Callable[[T], int]) -> None:
        self.stats = CacheStats()
        self.max_bytes = max_bytes
        self._sizeof = sizeof
        self._lru: collections.OrderedDict[str, tuple[T, int]] = collections.OrderedDict()
        self._lru_bytes = 0
        self._pinned: dict[str, tuple[T, int, set[Hashable]]] = {}
        self._pinned_bytes = 0
        self._inflight: dict[str, _Fetch[T]] = {}
        self._inflight_bytes = 0

    # ------------------------------------------------------------------ inspection
    def __contains__(self, key: str) -> bool:
        return key in self._lru or key in self._pinned or key in self._inflight

    @property
    def used(self) -> int:
        return self._lru_bytes + self._pinned_bytes + self._inflight_bytes

    @property
    def held(self) -> int:
        """Bytes that cannot be evicted now: pinned read-ahead and fetches in flight."""
        return self._pinned_bytes + self._inflight_bytes

    def _update(self) -> None:
        self.stats.bytes = self.used

    # ------------------------------------------------------------------ reads
    async def get(self, key: str, fetch: Callable[[], Awaitable[T]], *, size: int = 0,
                  owner: Hashable | None = None) -> T:
        """The value for ``key``: from memory, from a fetch already running, or by starting one.
        ``size``: the expected size, reserved while the fetch runs. ``owner``: the reader taking
        its own read-ahead (its claim ends here)."""
        hit = self._lru.get(key)
        if hit is not None:
            self._lru.move_to_end(key)
            self.stats.hits += 1
            return hit[0]
        pinned = self._pinned.get(key)
        if pinned is not None:
            self.stats.hits += 1
            if owner is not None:
                self._take_claim(key, owner)
            return pinned[0]
        entry = self._inflight.get(key)
        if entry is not None:
            self.stats.coalesced += 1
        else:
            self.stats.misses += 1
            entry = self._start(key, fetch, size)
        if owner is not None:
            entry.owners.discard(owner)
        entry.waiters += 1
        try:
            # shield: a cancelled requester must not cancel a fetch other requesters await.
            return await asyncio.shield(entry.task)
        finally:
            entry.waiters -= 1
            self._maybe_drop(key, entry)

    def prefetch(self, key: str, fetch: Callable[[], Awaitable[T]], *, size: int, owner: Hashable) -> bool:
        """Fetch ``key`` in the background for ``owner``, who will take it with ``get`` or give it
        up with ``release``. Starts only when ``size`` fits beside everything pinned or in flight;
        returns whether the value is cached, coming, or now claimed."""
        if key in self._lru:
            return True
        pinned = self._pinned.get(key)
        if pinned is not None:
            pinned[2].add(owner)
            return True
        entry = self._inflight.get(key)
        if entry is not None:
            entry.owners.add(owner)
            return True
        if self.held + size > self.max_bytes:
            self.stats.readahead_skipped += 1
            return False
        self.stats.readahead += 1
        entry = self._start(key, fetch, size)
        entry.owners.add(owner)
        return True

    def release(self, owner: Hashable, keys: list[str]) -> None:
        """``owner`` will not take ``keys`` after all: drop its claims; fetches nobody else
        wants are cancelled, arrived values become ordinary (evictable) cache entries."""
        for key in keys:
            entry = self._inflight.get(key)
            if entry is not None:
                entry.owners.discard(owner)
                self._maybe_drop(key, entry)
            elif key in self._pinned:
                self._take_claim(key, owner)

    # ------------------------------------------------------------------ bookkeeping
    def _start(self, key: str, fetch: Callable[[], Awaitable[T]], size: int) -> _Fetch[T]:
        self._make_room(size)
        task = asyncio.ensure_future(fetch())
        entry: _Fetch[T] = _Fetch(task, size)
        self._inflight[key] = entry
        self._inflight_bytes += size
        self._update()
        # A fetch nobody ends up wanting may fail; that is not worth a warning per chunk.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        task.add_done_callback(lambda t, k=key, e=entry: self._landed(k, e, t))
        return entry

    def _landed(self, key: str, entry: _Fetch[T], task: asyncio.Future[T]) -> None:
        if self._inflight.get(key) is entry:
            del self._inflight[key]
            self._inflight_bytes -= entry.size
        if task.cancelled() or task.exception() is not None:
            self._update()
            return
        value = task.result()
        size = self._sizeof(value)
        if entry.owners:
            self._pinned[key] = (value, size, set(entry.owners))
            self._pinned_bytes += size
        elif size <= self.max_bytes - self.held:
            self._make_room(size)
            self._lru[key] = (value, size)
            self._lru_bytes += size
        self._update()

    def _take_claim(self, key: str, owner: Hashable) -> None:
        value, size, owners = self._pinned[key]
        owners.discard(owner)
        if owners:
            return
        del self._pinned[key]
        self._pinned_bytes -= size
        # Taken: now an ordinary entry, kept if it fits (other readers of the object may want it).
        if size <= self.max_bytes - self.held:
            self._make_room(size)
            self._lru[key] = (value, size)
            self._lru_bytes += size
        self._update()

    def _maybe_drop(self, key: str, entry: _Fetch[T]) -> None:
        if entry.waiters == 0 and not entry.owners and not entry.task.done():
            entry.task.cancel()
            self.stats.dropped += 1

    def _make_room(self, size: int) -> None:
        """Evict least recently used entries until ``size`` more bytes fit in the budget."""
        while self._lru and self.used + size > self.max_bytes:
            _, (_, evicted) = self._lru.popitem(last=False)
            self._lru_bytes -= evicted
            self.stats.evictions += 1

    def discard(self, key: str) -> None:
        hit = self._lru.pop(key, None)
        if hit is not None:
            self._lru_bytes -= hit[1]
        pinned = self._pinned.pop(key, None)
        if pinned is not None:
            self._pinned_bytes -= pinned[1]
        self._update()

    def clear(self) -> None:
        self._lru.clear()
        self._lru_bytes = 0
        self._pinned.clear()
        self._pinned_bytes = 0
        self._update()
