"""ChunkCache: a bytes-bounded LRU of immutable chunks with single-flight fetches, read-ahead that
never costs the store more than readers take, and loans to the responses sending from a chunk.

Many viewers of one video must cost the store one fetch per chunk: a miss starts one fetch
task, and every request that wants the same chunk while it runs awaits that same task.

Everything that holds chunk memory counts against ``max_bytes``: cached values, fetches in flight
(reserved at their expected size when they start), read-ahead that has arrived but was not yet
taken by the reader that asked for it, and chunks lent to a response that is sending from them
(``borrow``). Lent and read-ahead values are held (not evictable) until given back. A fetch starts
only when its size fits beside everything held (after evicting LRU entries), or when nothing is
held at all (so a chunk larger than the budget can still be read); otherwise the reader waits,
first come first served. A reader that has to wait gives up its own read-ahead claims first, so
readers can never hold the whole budget in claims while each waits for the next.

A loan whose holder is stalled (a client that stopped reading) is marked idle by its holder; when a
reader waits for room, chunks whose every loan is idle and that nobody claims are reclaimed: their
loans lose the value (``Loan.value`` becomes None) and the holder must borrow again before it sends
on (and wait for room like anyone else: it is a slow client). So clients that never read cannot pin
chunk memory beyond the budget, nor keep fast readers waiting.

Read-ahead only starts when its whole size fits in room that holds nothing pinned or in flight. A
fetch nobody waits for any more (every reader that wanted it went away, and no read-ahead claim is
left) is cancelled, so an abandoned GET stops costing the store.

Entries are keyed by the chunk's store key, which names an immutable object (a fresh version id
per upload), so nothing ever needs invalidating. Never caches a failed fetch.

Hand-written instead of cachetools (used before): the budget spans several kinds of holdings
(LRU, held, in flight) and the LRU's capacity moves with the others, which cachetools'
fixed-size caches do not model.
"""

from __future__ import annotations

import asyncio
import functools
import collections
import contextlib
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
    waits: int = 0  # fetches that had to wait for room in the budget
    reclaimed: int = 0  # lent chunks taken back from idle (stalled) borrowers
    bytes: int = 0  # cached + held + in flight


@dataclass
class _Fetch(Generic[T]):
    task: asyncio.Future[T]
    size: int
    waiters: int = 0
    owners: set[Hashable] = field(default_factory=set)  # read-ahead claims not yet taken


@dataclass(eq=False)
class _Held(Generic[T]):
    """A value that may not be evicted: claimed by read-ahead owners or lent to borrowers."""

    key: str
    value: T
    size: int
    owners: set[Hashable] = field(default_factory=set)
    loans: set["Loan[T]"] = field(default_factory=set)

    @property
    def unused(self) -> bool:
        return not self.owners and not self.loans

    @property
    def reclaimable(self) -> bool:
        return not self.owners and bool(self.loans) and all(loan.idle for loan in self.loans)


class Loan(Generic[T]):
    """A borrower's hold on one cached value. ``value`` is None once given back or reclaimed."""

    __slots__ = ("value", "idle", "_cache", "_entry")

    def __init__(self, cache: "ChunkCache[T]", entry: _Held[T]) -> None:
        self.value: T | None = entry.value
        self.idle = False
        self._cache = cache
        self._entry: _Held[T] | None = entry

    @property
    def reclaimed(self) -> bool:
        return self.value is None

    def set_idle(self, idle: bool) -> None:
        """Idle: the holder is not using the value now (nothing of it is in a send buffer), so
        the cache may take it back for a reader that waits for room."""
        if self.idle == idle:
            return
        self.idle = idle
        if idle and self._entry is not None:
            self._cache._wake()

    def release(self) -> None:
        """Give the value back (idempotent)."""
        entry, self._entry, self.value = self._entry, None, None
        if entry is not None:
            self._cache._give_back(entry, self)


class ChunkCache(Generic[T]):
    """Bytes-bounded LRU plus single-flight fetching, owned read-ahead and counted loans."""

    def __init__(self, max_bytes: int, sizeof: Callable[[T], int]) -> None:
        self.stats = CacheStats()
        self.max_bytes = max_bytes
        self._sizeof = sizeof
        self._lru: collections.OrderedDict[str, tuple[T, int]] = collections.OrderedDict()
        self._lru_bytes = 0
        self._held: dict[str, _Held[T]] = {}
        self._held_bytes = 0  # every live _Held entry, also one no longer in _held (discarded)
        self._inflight: dict[str, _Fetch[T]] = {}
        self._inflight_bytes = 0
        self._queue: collections.deque[asyncio.Future[None]] = collections.deque()  # readers waiting for room

    # ------------------------------------------------------------------ inspection
    def __contains__(self, key: str) -> bool:
        return key in self._lru or key in self._held or key in self._inflight

    @property
    def used(self) -> int:
        return self._lru_bytes + self._held_bytes + self._inflight_bytes

    @property
    def held(self) -> int:
        """Bytes that cannot be evicted now: read-ahead, loans and fetches in flight."""
        return self._held_bytes + self._inflight_bytes

    @property
    def waiting(self) -> int:
        """Readers waiting for room in the budget."""
        return len(self._queue)

    def _update(self) -> None:
        self.stats.bytes = self.used

    # ------------------------------------------------------------------ reads
    async def get(self, key: str, fetch: Callable[[], Awaitable[T]], *, size: int = 0,
                  owner: Hashable | None = None) -> T:
        """The value for ``key``: from memory, from a fetch already running, or by starting one
        (once it fits in the budget). ``size``: the expected size, reserved while the fetch runs.
        ``owner``: the reader taking its own read-ahead (its claim ends here)."""
        while True:
            entry = await self._find_or_start(key, fetch, size, owner)
            if not isinstance(entry, _Fetch):
                return entry
            if owner is not None:
                entry.owners.discard(owner)
            entry.waiters += 1
            try:
                # shield: a cancelled requester must not cancel a fetch other requesters await.
                return await asyncio.shield(entry.task)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if entry.task.cancelled() and task is not None and not task.cancelling():
                    continue  # the fetch was dropped, not us: look again
                raise
            finally:
                entry.waiters -= 1
                self._maybe_drop(key, entry)

    async def _find_or_start(self, key: str, fetch: Callable[[], Awaitable[T]], size: int,
                             owner: Hashable | None) -> "T | _Fetch[T]":
        """The value if it is in memory, else the fetch to join (started here if need be)."""
        while True:
            hit = self._lru.get(key)
            if hit is not None:
                self._lru.move_to_end(key)
                self.stats.hits += 1
                return hit[0]
            held = self._held.get(key)
            if held is not None:
                self.stats.hits += 1
                if owner is not None:
                    self._take_claim(held, owner)
                return held.value
            entry = self._inflight.get(key)
            if entry is not None:
                self.stats.coalesced += 1
                return entry
            if not self._queue and self._admit(size):
                self.stats.misses += 1
                return self._start(key, fetch, size)
            if owner is not None:
                self._drop_claims(owner)
            if await self._wait_for_room(key, size):
                self.stats.misses += 1
                return self._start(key, fetch, size)
            # the key arrived (or is coming) while we waited: look again

    async def borrow(self, key: str, fetch: Callable[[], Awaitable[T]], *, size: int = 0,
                     owner: Hashable | None = None) -> Loan[T]:
        """Like ``get``, but the value stays counted (and is never evicted) until the returned
        loan is released, or reclaimed while idle."""
        value = await self.get(key, fetch, size=size, owner=owner)
        held = self._held.get(key)
        if held is None or held.value is not value:
            lru = self._lru.pop(key, None)
            if lru is not None and lru[0] is value:
                self._lru_bytes -= lru[1]
            elif lru is not None:  # another value under the key (never for immutable chunks)
                self._lru[key] = lru
            held = _Held(key, value, self._sizeof(value))
            self._held_bytes += held.size
            if key not in self._held:
                self._held[key] = held
        loan: Loan[T] = Loan(self, held)
        held.loans.add(loan)
        self._update()
        return loan

    def prefetch(self, key: str, fetch: Callable[[], Awaitable[T]], *, size: int, owner: Hashable) -> bool:
        """Fetch ``key`` in the background for ``owner``, who will take it with ``get`` or give it
        up with ``release``. Starts only when ``size`` fits beside everything held or in flight
        and nobody waits for room; returns whether the value is cached, coming, or now claimed."""
        if key in self._lru:
            return True
        held = self._held.get(key)
        if held is not None:
            held.owners.add(owner)
            return True
        entry = self._inflight.get(key)
        if entry is not None:
            entry.owners.add(owner)
            return True
        if self._queue or self.held + size > self.max_bytes:
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
            else:
                held = self._held.get(key)
                if held is not None:
                    self._take_claim(held, owner)

    # ------------------------------------------------------------------ room in the budget
    def _admit(self, size: int) -> bool:
        """Whether a fetch of ``size`` may start now: it fits beside everything held (evicting
        LRU entries, then reclaiming idle loans), or nothing is held at all."""
        if self.held + size > self.max_bytes:
            self._reclaim(self.held + size - self.max_bytes)
        if self.held + size <= self.max_bytes or self.held == 0:
            self._make_room(size)
            return True
        return False

    async def _wait_for_room(self, key: str, size: int) -> bool:
        """Queue for room, first come first served. True: admitted (the caller starts its fetch
        at once, before anything else runs). False: ``key`` is cached or coming meanwhile."""
        self.stats.waits += 1
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._queue.append(waiter)
        try:
            while True:
                if self._queue[0] is waiter and self._admit(size):
                    return True
                await waiter
                if key in self:
                    return False
                if self._queue[0] is waiter and self._admit(size):
                    return True
                fresh: asyncio.Future[None] = loop.create_future()
                self._queue[self._queue.index(waiter)] = fresh  # keep our place in the queue
                waiter = fresh
        finally:
            with contextlib.suppress(ValueError):
                self._queue.remove(waiter)
            self._wake()

    def _wake(self) -> None:
        """Room or idleness changed: every waiter looks again (the first may now fit)."""
        for waiter in self._queue:
            if not waiter.done():
                waiter.set_result(None)

    def _reclaim(self, need: int) -> None:
        """Take back chunks lent only to idle borrowers until ``need`` bytes are free."""
        freed = 0
        for key, held in list(self._held.items()):
            if freed >= need:
                break
            if held.reclaimable:
                del self._held[key]
                self._held_bytes -= held.size
                freed += held.size
                self.stats.reclaimed += 1
                for loan in held.loans:
                    loan.value, loan._entry = None, None
                held.loans.clear()
        if freed:
            self._update()

    def _drop_claims(self, owner: Hashable) -> None:
        for key, entry in list(self._inflight.items()):
            if owner in entry.owners:
                entry.owners.discard(owner)
                self._maybe_drop(key, entry)
        for held in list(self._held.values()):
            if owner in held.owners:
                self._take_claim(held, owner)

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
        task.add_done_callback(functools.partial(self._landed, key, entry))
        return entry

    def _landed(self, key: str, entry: _Fetch[T], task: asyncio.Future[T]) -> None:
        if self._inflight.get(key) is entry:
            del self._inflight[key]
            self._inflight_bytes -= entry.size
        try:
            if task.cancelled() or task.exception() is not None:
                return
            value = task.result()
            size = self._sizeof(value)
            if entry.owners:
                self._held[key] = _Held(key, value, size, set(entry.owners))
                self._held_bytes += size
            else:
                self._keep(key, value, size)
        finally:
            self._update()
            # Later, not now: the readers awaiting this fetch resume first and take their loans,
            # so a waiter admitted now cannot evict the value they are about to hold.
            asyncio.get_running_loop().call_soon(self._wake)

    def _keep(self, key: str, value: T, size: int) -> None:
        """An ordinary (evictable) entry, if it fits beside what is held."""
        if size <= self.max_bytes - self.held and key not in self._lru:
            self._make_room(size)
            self._lru[key] = (value, size)
            self._lru_bytes += size

    def _take_claim(self, held: _Held[T], owner: Hashable) -> None:
        held.owners.discard(owner)
        self._settle(held)

    def _give_back(self, held: _Held[T], loan: Loan[T]) -> None:
        held.loans.discard(loan)
        self._settle(held)

    def _settle(self, held: _Held[T]) -> None:
        """A held value nobody claims or borrows any more: kept as an ordinary entry if it fits
        (other readers of the object may want it), else dropped."""
        if not held.unused:
            return
        current = self._held.get(held.key) is held
        if current:
            del self._held[held.key]
        self._held_bytes -= held.size
        if current:
            self._keep(held.key, held.value, held.size)
        self._update()
        self._wake()

    def _maybe_drop(self, key: str, entry: _Fetch[T]) -> None:
        if entry.waiters == 0 and not entry.owners and not entry.task.done():
            entry.task.cancel()
            self.stats.dropped += 1
            # Gone at once, not when the cancellation lands: nobody may join a dying fetch.
            if self._inflight.get(key) is entry:
                del self._inflight[key]
                self._inflight_bytes -= entry.size
                self._update()
                self._wake()

    def _make_room(self, size: int) -> None:
        """Evict least recently used entries until ``size`` more bytes fit in the budget."""
        while self._lru and self.used + size > self.max_bytes:
            _, (_, evicted) = self._lru.popitem(last=False)
            self._lru_bytes -= evicted
            self.stats.evictions += 1

    def discard(self, key: str) -> None:
        """Forget ``key``: the next read fetches it again. A value still lent stays counted
        until its loans are given back, but is no longer handed out."""
        hit = self._lru.pop(key, None)
        if hit is not None:
            self._lru_bytes -= hit[1]
        held = self._held.pop(key, None)
        if held is not None:
            held.owners.clear()
            if not held.loans:
                self._held_bytes -= held.size
        self._update()

    def discard_prefix(self, prefix: str) -> None:
        """Forget every key that starts with ``prefix`` (a chunk's or a version's store key: the
        cache keys of its bytes and blocks, ``storage.reads.cache_key``)."""
        for key in [k for k in (*self._lru, *self._held) if k.startswith(prefix)]:
            self.discard(key)

    def clear(self) -> None:
        self._lru.clear()
        self._lru_bytes = 0
        for key in list(self._held):
            self.discard(key)
        self._update()
