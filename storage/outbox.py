"""The outbox: delivers the post-finish / post-delete events that commits recorded in the store,
at least once, in commit order per key, whichever gateway is alive to do it.

How an event gets into the store is ``storage.manifests`` (``ManifestStore.commit``): a commit
that announces first writes a *pointer* ``o/<13 hex digits of ms time>-<event id>`` holding
``{"key", "event", "replaces"}`` (``replaces``: the ETag of the record the commit conditionally
replaces, or null), then makes its conditional write of the key's record with the event appended
to the record's events (carrying forward the undelivered events of the record it replaces). So an
event exists iff its commit landed, and a key's events are in commit order. The events themselves
are built by ``storage.objects.ObjectStore.announcement`` (post-finish) and ``ObjectStore.delete``
(post-delete); pointers only say *which keys* to look at, so nobody scans every manifest.

What this module does with them: every ``interval`` (and at once for a key that was just
committed, ``kick``) it lists ``o/``, groups pointers by key, and per key, holding the key's
*delivery lease* (the store's leases, so one gateway at a time delivers a key's events and a dead
gateway's lease expires and is taken over), reads the record, delivers its events in list order
and removes each one, right after its delivery was acknowledged, with a conditional rewrite of the
events list (``ManifestStore.set_events``). A crash therefore redelivers at most the event in
flight, with the same id. A failed delivery gives the lease back and retries that key later,
exponentially backed off with full jitter. A pointer is deleted once its event is no longer in
the record *and* the record is no longer the one it replaces (its commit then either landed and
was delivered, or can never land); a pointer whose commit neither landed nor can be ruled out (a
crash between pointer and commit, a lost conditional write) is dropped with a warning after
``horizon``. Tombstones (a DELETE's record) are never removed here: gc removes them once old,
without events, and with no upload that may still commit over the key (``storage.manifests``).
That matters for the pointers too: judged against "no record", a delivered create's pointer
would look like a create still in flight.

The delivery lease is its own lock name (``delivery_lock``), not the key's write lock: a slow or
hanging application must never make PUTs of that key wait.

Must never: import aiohttp or ``gateway`` (delivery is the ``deliver`` callable it is given);
build events (the commit side does); remove an event before ``deliver`` said it was delivered;
deliver a key's events out of list order, or two events of one key at once from this process;
delete a pointer whose commit may still land; hold a delivery lease while it waits out a backoff;
remove a record (a tombstone goes through gc only).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, Awaitable, Callable, Mapping, Sequence

from storage import keys
from storage.backends.base import Backend, NotFound
from storage.locks import LeaseLost, LockTimeout
from storage.manifests import CommitResult, Current, ManifestStore, Outcome

log = logging.getLogger("chunkgate.outbox")

_POINTER_NAME = re.compile(r"^" + re.escape(keys.OUTBOX_PREFIX) + r"([0-9a-f]{13})-([0-9A-Za-z_-]{1,128})$")

Event = Mapping[str, Any]
Deliver = Callable[[Event], Awaitable[bool]]  # True when the application acknowledged it (2xx)


# ------------------------------------------------------------------------------ pure parts
@dataclass(frozen=True, slots=True)
class Pointer:
    store_key: str
    written: float  # unix seconds, from the name
    event_id: str
    key: str
    replaces: str | None


def parse_pointer_name(store_key: str) -> tuple[float, str] | None:
    """(written, event id) from ``o/<13 hex>-<id>``, or None for a name that is not a pointer."""
    m = _POINTER_NAME.match(store_key)
    return (int(m.group(1), 16) / 1000.0, m.group(2)) if m else None


def parse_pointer(store_key: str, data: bytes) -> Pointer | None:
    named = parse_pointer_name(store_key)
    if named is None:
        return None
    try:
        doc = json.loads(data)
        key, event, replaces = doc["key"], doc["event"], doc.get("replaces")
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(key, str) or event != named[1] or not (replaces is None or isinstance(replaces, str)):
        return None
    return Pointer(store_key, named[0], named[1], key, replaces)


class Verdict(str, Enum):
    KEEP = "keep"  # its event is pending, or its commit may still land
    DONE = "done"  # delivered, or its commit can never land: delete it
    EXPIRED = "expired"  # undecidable for longer than the horizon: delete it, with a warning


def judge_pointer(pointer: Pointer, *, pending: set[str], record_etag: str | None, now: float, horizon: float) -> Verdict:
    """What to do with ``pointer`` given its key's record as read now (``pending``: the ids in
    its events list; ``record_etag``: None when there is no record)."""
    if pointer.event_id in pending:
        return Verdict.KEEP
    if record_etag != pointer.replaces:
        # The record moved on from the one this commit conditionally replaces: either the commit
        # landed and its event has since been delivered, or another commit won and this one's
        # condition can never hold again (every record write has a fresh rev, so an ETag never
        # comes back).
        return Verdict.DONE
    # Still the record it would replace: the commit is in flight, or it failed (crash, lost
    # conditional write) without a trace. Only time tells these apart.
    return Verdict.EXPIRED if now - pointer.written > horizon else Verdict.KEEP


def backoff_delay(attempt: int, *, base: float = 0.5, cap: float = 60.0, rand: Callable[[], float] = random.random) -> float:
    """Seconds before retry number ``attempt`` (1 = the first): exponential, capped, with full
    jitter (uniform in [0, min(cap, base * 2^(attempt-1))]), so that gateways retrying an
    application that comes back do not all arrive at once. ``rand`` returns [0, 1)."""
    return float(min(cap, base * (2 ** min(max(0, attempt - 1), 62))) * rand())


def delivery_lock(key: str) -> str:
    """The lock name of a key's deliveries. A leading '/' is never part of an object key, so it
    cannot collide with any key's write lock, and it reads plainly in /admin/locks."""
    return f"/outbox/{key}"


def event_time(event: Event) -> float | None:
    """The event's own ``time`` (RFC 3339) as unix seconds, when it parses."""
    try:
        return datetime.fromisoformat(str(event.get("time", "")).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# ------------------------------------------------------------------------------ the processor
@dataclass
class OutboxOptions:
    interval: float = 5.0  # seconds between passes over o/ (kicks deliver a fresh commit at once)
    takeover_after: float = 5.0  # a pointer this old is picked up by any gateway's pass
    horizon: float = 3600.0  # an undecidable pointer is dropped after this long
    retry_base: float = 0.5
    retry_cap: float = 60.0
    concurrency: int = 8  # keys delivered at once


@dataclass
class OutboxStats:
    """Plain counters; ``gateway.metrics`` exports them."""

    delivered: int = 0
    failed_attempts: int = 0
    pointers_done: int = 0
    pointers_expired: int = 0
    passes: int = 0


@dataclass
class _KeyState:
    attempts: int = 0
    retry_at: float = 0.0
    timer: asyncio.TimerHandle | None = None
    pending: dict[str, float] = field(default_factory=dict)  # event id -> when it was recorded


class Outbox:
    """``records`` is the store's ``ManifestStore`` (``ObjectStore.manifests``); ``locks`` its
    ``Locker`` (store leases when several gateways share the store)."""

    def __init__(self, backend: Backend, records: ManifestStore, locks: Any, deliver: Deliver, *,
                 options: OutboxOptions | None = None, clock: Callable[[], float] = time.time,
                 owner: str = "outbox") -> None:
        self.backend = backend
        self.records = records
        self.locks = locks
        self.deliver = deliver
        self.options = options or OutboxOptions()
        self.stats = OutboxStats()
        self._clock = clock
        self._owner = owner
        self._keys: dict[str, _KeyState] = {}
        self._busy: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()  # kicked while busy: look at the record once more
        self._pointers: dict[str, Pointer | None] = {}  # store key -> parsed (pointers never change)
        self._limit = asyncio.Semaphore(max(1, self.options.concurrency))
        self._loop_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closed = False

    # -------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        """Stop; an event whose delivery is cut off here stays in its record (redelivered later)."""
        self._closed = True
        tasks = [t for t in [self._loop_task, *self._busy.values()] if t is not None]
        for state in self._keys.values():
            if state.timer is not None:
                state.timer.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def kick(self, key: str) -> None:
        """A commit of ``key`` just landed: deliver its events now (unless this key is backing
        off after a failed delivery; its retry is already scheduled)."""
        if self._closed:
            return
        state = self._keys.get(key)
        if state is not None and state.retry_at > self._clock():
            return
        self._start(key, ())

    # -------------------------------------------------------------------------- what metrics read
    def oldest_age(self) -> float:
        """Seconds since the oldest event known to be undelivered was recorded; 0 when none is."""
        times = [t for state in self._keys.values() for t in state.pending.values()]
        return max(0.0, self._clock() - min(times)) if times else 0.0

    def pending(self) -> int:
        return sum(len(state.pending) for state in self._keys.values())

    # -------------------------------------------------------------------------- passes
    async def _run(self) -> None:
        while not self._closed:
            try:
                await self.run_pass()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the store is down, say: try again next time
                log.warning("outbox pass failed: %s", exc)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.options.interval)
            except asyncio.TimeoutError:
                pass

    async def run_pass(self, *, wait: bool = True) -> None:
        """List the pointers, and deliver for every key whose oldest pointer has waited at least
        ``takeover_after`` (younger ones are their committing gateway's, which was kicked)."""
        by_key = await self._list()
        now = self._clock()
        for key in [k for k, st in self._keys.items() if k not in by_key and k not in self._busy and st.timer is None]:
            self._succeeded(key)  # no pointer left: nothing of this key is pending any more
        started = []
        for key, pointers in by_key.items():
            if key in self._busy or now - pointers[0].written < self.options.takeover_after:
                continue
            state = self._keys.get(key)
            if state is not None and state.retry_at > now:
                continue
            started.append(self._start(key, pointers))
        self.stats.passes += 1
        if wait and started:
            await asyncio.gather(*started, return_exceptions=True)

    async def _list(self) -> dict[str, list[Pointer]]:
        seen: set[str] = set()
        by_key: dict[str, list[Pointer]] = {}
        async for info in self.backend.list(keys.OUTBOX_PREFIX):
            seen.add(info.key)
            if info.key not in self._pointers:
                self._pointers[info.key] = await self._read_pointer(info.key)
            pointer = self._pointers[info.key]
            if pointer is not None:
                by_key.setdefault(pointer.key, []).append(pointer)
        for gone in set(self._pointers) - seen:
            del self._pointers[gone]
        for pointers in by_key.values():
            pointers.sort(key=lambda p: p.store_key)
        return by_key

    async def _read_pointer(self, store_key: str) -> Pointer | None:
        try:
            blob = await self.backend.get(store_key)
        except NotFound:
            return None
        pointer = parse_pointer(store_key, blob.data)
        if pointer is None:
            log.warning("ignoring %s: not an outbox pointer", store_key)
        return pointer

    # -------------------------------------------------------------------------- one key
    def _start(self, key: str, pointers: Sequence[Pointer]) -> asyncio.Task[None]:
        running = self._busy.get(key)
        if running is not None:
            # A commit landed while this key's drain runs: it may have read the record before
            # that commit, so it looks once more when it ends (else the event waits for a pass).
            if not pointers:
                self._again.add(key)
            return running
        task = asyncio.ensure_future(self._drain(key, pointers))
        self._busy[key] = task
        task.add_done_callback(functools.partial(self._drained, key))
        return task

    def _drained(self, key: str, task: asyncio.Task[None]) -> None:
        if self._busy.get(key) is task:
            del self._busy[key]
        if key in self._again:
            self._again.discard(key)
            self.kick(key)

    async def _drain(self, key: str, pointers: Sequence[Pointer]) -> None:
        async with self._limit:
            try:
                # timeout=0: when another gateway holds this key's deliveries, it is on them.
                async with self.locks.hold(delivery_lock(key), owner=self._owner, timeout=0) as lease:
                    record = await self._deliver_all(key, pointers, lease)
                    if pointers:
                        await self._sweep(key, pointers, record)
            except LockTimeout:
                return
            except LeaseLost as exc:
                log.warning("delivering events of %r stopped: %s", key, exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the store failed: retry later like a failed delivery
                log.warning("delivering events of %r failed: %s", key, exc)
                self._retry_later(key)

    async def _deliver_all(self, key: str, pointers: Sequence[Pointer], lease: Any) -> Current | None:
        """Deliver the record's events head first, removing each once acknowledged. Returns the
        record as last read (for judging pointers)."""
        recorded = {p.event_id: p.written for p in pointers}
        delivered: set[str] = set()  # acknowledged in this drain, maybe not yet removed
        budget = 8  # rewrites lost to concurrent commits before leaving the rest to the next pass
        record = await self.records.read(key)
        while True:
            events = list(record.events) if record is not None else []
            self._note_pending(key, events, recorded)
            if not events:
                self._succeeded(key)
                return record
            if budget <= 0:
                return record
            head = events[0]
            if str(head.get("id")) not in delivered:
                lease.renew()
                if not await self._deliver_renewing(head, lease):
                    self.stats.failed_attempts += 1
                    self._retry_later(key)
                    return record
                self.stats.delivered += 1
                delivered.add(str(head.get("id")))
            else:
                budget -= 1  # the rewrite below lost to a concurrent commit, which carried it forward
            lease.check()
            assert record is not None
            record = await self._rewritten(key, await self.records.set_events(record, events[1:]))

    async def _rewritten(self, key: str, result: CommitResult) -> Current | None:
        """The record after a rewrite of its events: as written, as read back after losing to a
        concurrent commit, or read again when the outcome is unknown."""
        if result.outcome is Outcome.COMMITTED:
            return result.current
        if result.outcome is Outcome.LOST and result.current is not None:
            return result.current
        return await self.records.read(key)

    async def _deliver_renewing(self, event: Event, lease: Any) -> bool:
        """``deliver``, keeping the lease renewed however long the application takes."""
        every = max(0.05, float(getattr(self.locks, "stale_after", 30.0)) / 3)

        async def renew() -> None:
            while True:
                await asyncio.sleep(every)
                lease.renew()

        renewer = asyncio.ensure_future(renew())
        try:
            return bool(await self.deliver(event))
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)

    async def _sweep(self, key: str, pointers: Sequence[Pointer], record: Current | None) -> None:
        pending = {str(e.get("id")) for e in record.events} if record is not None else set()
        etag = record.etag if record is not None else None
        now = self._clock()
        for pointer in pointers:
            verdict = judge_pointer(pointer, pending=pending, record_etag=etag, now=now, horizon=self.options.horizon)
            if verdict is Verdict.KEEP:
                continue
            if verdict is Verdict.EXPIRED:
                log.warning("dropping outbox pointer %s of %r: its commit neither landed nor failed visibly "
                            "within %.0f s (a crash between pointer and commit, or a lost conditional write)",
                            pointer.store_key, key, self.options.horizon)
                self.stats.pointers_expired += 1
            else:
                self.stats.pointers_done += 1
            await self.backend.delete(pointer.store_key)
            self._pointers.pop(pointer.store_key, None)

    # -------------------------------------------------------------------------- bookkeeping
    def _state(self, key: str) -> _KeyState:
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _KeyState()
        return state

    def _note_pending(self, key: str, events: Sequence[Event], recorded: Mapping[str, float]) -> None:
        state = self._state(key)
        now = self._clock()
        state.pending = {
            str(e.get("id")): state.pending.get(str(e.get("id"))) or recorded.get(str(e.get("id"))) or event_time(e) or now
            for e in events
        }

    def _succeeded(self, key: str) -> None:
        state = self._keys.get(key)
        if state is not None:
            if state.timer is not None:
                state.timer.cancel()
            self._keys.pop(key, None)

    def _retry_later(self, key: str) -> None:
        if self._closed:
            return
        state = self._state(key)
        state.attempts += 1
        delay = backoff_delay(state.attempts, base=self.options.retry_base, cap=self.options.retry_cap)
        state.retry_at = self._clock() + delay
        if state.timer is not None:
            state.timer.cancel()
        state.timer = asyncio.get_running_loop().call_later(delay, self._retry_now, key)

    def _retry_now(self, key: str) -> None:
        state = self._keys.get(key)
        if state is not None:
            state.timer = None
            state.retry_at = 0.0
        if not self._closed:
            self._start(key, ())
