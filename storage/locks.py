"""Per-key async locks with leases: FIFO-fair, fenced, stale-clearable, bounded in memory.

Every write to an object key (manifest commit, delete, repair, a tus upload) runs under that
key's lock. A holder gets a ``Lease`` that records its owner, a fencing token and when it was last
renewed. Long holders renew; a lease not renewed for ``stale_after`` seconds is *stale*, and the
next waiter clears it and takes the lock, after which the stale lease's ``check()``/``renew()``
raise ``LeaseLost`` -- so a holder that froze (a stalled upload, a hung task) cannot commit over
the work of the one that replaced it. Waiters queue strictly first come, first served, give up
after a timeout, and may ask the holder to let go (``release_requested``).

This module is hand-written on asyncio primitives (one future per waiter in a deque per key)
because no library offers FIFO fairness together with fencing tokens and stale-lease clearing;
``asyncio.Lock`` has none of the three guarantees we need.

``LockManager`` is the in-process implementation of the small ``Locker`` protocol (and of
``LockAdmin``, the operators' view); ``storage.leases.StoreLockManager`` implements both over
lease records in the store, reusing ``Lease`` and this module's per-key waiters.

Must never: let two leases of one key be current at once; lose a wake-up (a waiter that
leaves -- by timeout or cancellation, even just after being granted -- always passes the lock
on); keep an entry for a key nobody holds or waits for; hand out a token that is not larger
than every earlier token; import aiohttp, prometheus_client or ``gateway`` (statistics are
plain counters here, and an adapter in the gateway exports them).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger("chunkgate.locks")

# A renewal can land exactly at a recheck instant; never re-arm a timer with a zero delay, or a
# clock that does not move (a test's fake clock) would spin the event loop.
_MIN_RECHECK_SECONDS = 0.001

_HELD = "held"
_RELEASED = "released"
_LOST = "lost"


class LockTimeout(Exception):
    """Waited ``waited`` seconds for the lock of ``key`` without getting it."""

    def __init__(self, key: str, waited: float) -> None:
        super().__init__(f"timed out after {waited:.3f}s waiting for the lock of {key!r}")
        self.key = key
        self.waited = waited


class LeaseLost(Exception):
    """The lease (``key``, ``token``) is no longer current: it was cleared as stale, or released.

    Whoever holds such a lease must not commit anything under it."""

    def __init__(self, key: str, token: int, reason: str = "is no longer current") -> None:
        super().__init__(f"the lease of {key!r} with token {token} {reason}")
        self.key = key
        self.token = token


class _LeaseHome(Protocol):
    """What a ``Lease`` needs from the locker that issued it."""

    def _now(self) -> float: ...

    async def _release(self, lease: Lease) -> None: ...


class _LiveState(Protocol):
    def active(self) -> int: ...

    def waiting(self) -> int: ...

    def oldest_age(self) -> float: ...


@dataclass(eq=False)
class Lease:
    """One holder's claim on one key. Identity matters: two leases are never equal.

    ``token`` is larger than every token issued before it for the same key (a store can fence
    writes on it); ``acquired_at``/``renewed_at`` are values of the issuing locker's clock."""

    key: str
    owner: str
    token: int
    acquired_at: float
    renewed_at: float
    release_requested: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        # Not dataclass fields: ``dataclasses.asdict``/``replace`` must neither copy the locker
        # nor let a copy of a lease share or reset its state.
        self._home: _LeaseHome | None = None
        self._state = _HELD
        self._lost_reason = ""

    @property
    def valid(self) -> bool:
        """True while this lease is the key's current one."""
        return self._state == _HELD

    def check(self) -> None:
        """Fencing check: raise ``LeaseLost`` unless this lease is still current.

        Call it right before every commit, with no ``await`` between it and the conditional
        write, so a holder that was cleared as stale learns it before it writes."""
        if self._state != _HELD:
            raise LeaseLost(self.key, self.token, self._lost_reason or "is no longer current")

    def renew(self) -> None:
        """Push the stale deadline out to ``now + stale_after``; raise ``LeaseLost`` if this
        lease is no longer current (renewing cannot resurrect a cleared lease)."""
        self.check()
        if self._home is not None:
            self.renewed_at = self._home._now()

    async def release(self) -> None:
        """Give the lock to the next waiter. Idempotent; releasing a lost lease is a no-op (it
        must never release the lock of whoever holds the key now)."""
        if self._state != _HELD or self._home is None:
            return
        await self._home._release(self)


@dataclass
class LockStats:
    """Plain counters of one locker; ``gateway.metrics`` exports them.

    ``active()``, ``waiting()`` and ``oldest_age()`` are computed from the locker's live state at
    call time (they are gauges, not counters)."""

    acquisitions: int = 0
    timeouts: int = 0
    stale_cleared: int = 0
    release_requests: int = 0
    wait_seconds_sum: float = 0.0

    def __post_init__(self) -> None:
        # Not a field, so ``dataclasses.asdict(stats)`` stays plain numbers.
        self._live: _LiveState | None = None

    def active(self) -> int:
        return self._live.active() if self._live is not None else 0

    def waiting(self) -> int:
        return self._live.waiting() if self._live is not None else 0

    def oldest_age(self) -> float:
        return self._live.oldest_age() if self._live is not None else 0.0


@runtime_checkable
class Locker(Protocol):
    """Per-key leases, the tusd "locker" idea: what writers depend on (the object layer, tus
    uploads, the hook outbox), so the in-process manager and the store-backed one swap freely.
    ``request_release`` asks the current holder to let go (a tus PATCH stops at a chunk boundary
    and keeps what it received); the lease is what the holder renews, checks and releases."""

    stale_after: float  # seconds: a lease its holder does not renew this long is stale

    async def acquire(
        self, key: str, *, owner: str, timeout: float | None = None, request_release: bool = False
    ) -> Lease:
        """Wait (FIFO) for the lock of ``key`` and return its lease. Raises ``LockTimeout``."""
        ...

    def hold(
        self, key: str, *, owner: str, timeout: float | None = None, request_release: bool = False
    ) -> AbstractAsyncContextManager[Lease]:
        """``acquire`` on entry, ``Lease.release`` on exit (also on error or cancellation)."""
        ...


class LockCounters(Protocol):
    """The counters and gauges ``gateway.metrics`` exports (``LockStats``, and the store
    leases' ``StoreLockStats``, which adds its own)."""

    @property
    def acquisitions(self) -> int: ...

    @property
    def timeouts(self) -> int: ...

    @property
    def stale_cleared(self) -> int: ...

    @property
    def release_requests(self) -> int: ...

    @property
    def wait_seconds_sum(self) -> float: ...

    def active(self) -> int: ...

    def waiting(self) -> int: ...

    def oldest_age(self) -> float: ...


@runtime_checkable
class LockAdmin(Protocol):
    """What operators and housekeeping see of a locker: statistics, ``/admin/locks``, stale
    clearing, shutdown. Separate from ``Locker``: nothing that takes locks needs these."""

    @property
    def stats(self) -> LockCounters: ...

    async def clear_stale(self) -> int:
        """Clear every stale lease now, whether or not anyone waits; return how many."""
        ...

    def snapshot(self) -> dict[str, Any]:
        """JSON-able state for ``/admin/locks``."""
        ...

    def active(self) -> int:
        """Keys held now (a gauge, computed at call time)."""
        ...

    def waiting(self) -> int:
        """Acquirers waiting now, over all keys."""
        ...

    def oldest_age(self) -> float:
        """Seconds the longest-held current lease has been held; 0.0 when none is."""
        ...

    def __len__(self) -> int:
        """Keys with live entries (held or waited for); 0 when idle."""
        ...

    async def close(self) -> None:
        """Stop background work and release what is still held (store leases); at shutdown."""
        ...


@runtime_checkable
class LockService(Locker, LockAdmin, Protocol):
    """Both views: what the stack builds (``LockManager``, ``storage.leases.StoreLockManager``)."""


@dataclass(eq=False)
class _Waiter:
    owner: str
    enqueued_at: float
    fut: asyncio.Future[Lease]


@dataclass(eq=False)
class _KeyEntry:
    """Everything the manager knows about one key. Exists only while the key is held or waited
    for. Invariant at every ``await`` point: ``waiters`` non-empty implies ``holder`` is set."""

    key: str
    holder: Lease | None = None
    waiters: deque[_Waiter] = field(default_factory=deque)
    # One timer per key (not per waiter) watches the holder's stale deadline while anyone
    # waits, so the deadline is honoured however waiters come and go ahead in the queue.
    stale_timer: asyncio.TimerHandle | None = None


class LockManager:
    """The in-process ``Locker``: correct for any number of tasks in one gateway process.

    ``clock`` supplies every timestamp (ages, staleness, timeouts); sleeps are real, so a fake
    clock that jumps needs ``clear_stale()`` to make the jump take effect at once. Not
    re-entrant: an owner that acquires a key it already holds waits for itself."""

    def __init__(
        self,
        *,
        stale_after: float = 30.0,
        timeout: float = 20.0,
        clock: Callable[[], float] = time.monotonic,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        if not stale_after > 0:
            raise ValueError(f"stale_after must be positive, not {stale_after!r}")
        if not timeout >= 0:
            raise ValueError(f"timeout must not be negative, not {timeout!r}")
        self.stale_after = float(stale_after)
        self.timeout = float(timeout)
        self._clock = clock
        self._on_wait = on_wait
        self._entries: dict[str, _KeyEntry] = {}
        # One counter for all keys: strictly increasing per key even after a key's entry was
        # freed and re-created, which a per-entry counter could not promise.
        self._tokens = itertools.count(1)
        self.stats = LockStats()
        self.stats._live = self

    # -- the Locker protocol ---------------------------------------------------------------

    async def acquire(
        self, key: str, *, owner: str, timeout: float | None = None, request_release: bool = False
    ) -> Lease:
        """Wait, first come first served, for the lock of ``key``; return the lease.

        A stale holder is cleared (and counted, and logged) by the first waiter in line, at the
        holder's stale deadline even if nothing else happens. ``request_release`` sets the
        ``release_requested`` event of the holder at the time of asking (holders after it are
        not asked again). Raises ``LockTimeout`` after ``timeout`` seconds (default: the
        manager's; 0 means "only if free or stale now"). A waiter that times out or is
        cancelled leaves the queue and, if it had just been granted the lock, passes it on."""
        limit = self.timeout if timeout is None else max(0.0, float(timeout))
        start = self._clock()
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _KeyEntry(key)
        self._clear_if_stale(entry, start)
        if entry.holder is None and not entry.waiters:
            return self._grant(entry, owner, start, start)

        waiter = _Waiter(owner, start, asyncio.get_running_loop().create_future())
        entry.waiters.append(waiter)
        self._settle(entry)  # the clearing above may have freed the lock for those ahead of us
        if request_release and entry.holder is not None and not waiter.fut.done():
            entry.holder.release_requested.set()
            self.stats.release_requests += 1

        got = False
        try:
            deadline = start + limit
            while not waiter.fut.done():
                remaining = deadline - self._clock()
                if remaining <= 0:
                    # A holder that went stale exactly now must not make us time out while
                    # being first in line.
                    self._clear_if_stale(entry, self._clock())
                    self._settle(entry)
                    break
                await asyncio.wait((waiter.fut,), timeout=remaining)
            if waiter.fut.done():
                lease = waiter.fut.result()
                got = True
                return lease
            self.stats.timeouts += 1
            raise LockTimeout(key, self._clock() - start)
        finally:
            if not got:
                self._abandon(entry, waiter)

    def hold(
        self, key: str, *, owner: str, timeout: float | None = None, request_release: bool = False
    ) -> AbstractAsyncContextManager[Lease]:
        """``async with manager.hold(key, owner=...) as lease:`` -- released on every exit."""
        return _hold(self, key, owner=owner, timeout=timeout, request_release=request_release)

    async def clear_stale(self) -> int:
        """Clear every stale lease now, even where nobody waits (a holder that leaked its lease
        would otherwise pin its key's entry forever); return how many were cleared. Waiters do
        this themselves at the deadline; this is for a periodic sweep and for fake clocks."""
        now = self._clock()
        cleared = 0
        for entry in list(self._entries.values()):
            if self._clear_if_stale(entry, now):
                cleared += 1
            self._settle(entry)
        return cleared

    def snapshot(self) -> dict[str, Any]:
        """JSON-able state for ``/admin/locks``: every lock held or waited for, and the totals."""
        now = self._clock()
        locks: list[dict[str, Any]] = []
        for key in sorted(self._entries):
            entry = self._entries[key]
            holder = entry.holder
            if holder is None:  # only between two synchronous steps; never seen by an await
                continue
            since_renewal = max(0.0, now - holder.renewed_at)
            locks.append(
                {
                    "key": key,
                    "owner": holder.owner,
                    "token": holder.token,
                    "age_seconds": max(0.0, now - holder.acquired_at),
                    "since_renewal_seconds": since_renewal,
                    "waiters": len(entry.waiters),
                    "release_requested": holder.release_requested.is_set(),
                    "stale": since_renewal > self.stale_after,
                }
            )
        return {
            "locks": locks,
            "totals": {
                "active": self.active(),
                "waiting": self.waiting(),
                "oldest_age_seconds": self.oldest_age(),
                "acquisitions": self.stats.acquisitions,
                "timeouts": self.stats.timeouts,
                "stale_cleared": self.stats.stale_cleared,
                "release_requests": self.stats.release_requests,
                "wait_seconds_sum": self.stats.wait_seconds_sum,
            },
        }

    def __len__(self) -> int:
        return len(self._entries)

    # -- live gauges -----------------------------------------------------------------------

    def active(self) -> int:
        """Number of keys held right now."""
        return sum(1 for e in self._entries.values() if e.holder is not None)

    def waiting(self) -> int:
        """Number of acquirers waiting right now, over all keys."""
        return sum(len(e.waiters) for e in self._entries.values())

    def oldest_age(self) -> float:
        """Seconds the longest-held current lease has been held; 0.0 when none is held."""
        now = self._clock()
        ages = [now - e.holder.acquired_at for e in self._entries.values() if e.holder is not None]
        return max(0.0, max(ages)) if ages else 0.0

    # -- _LeaseHome --------------------------------------------------------------------------

    async def close(self) -> None:
        """Nothing to release: in-process locks end with the process (store leases do more)."""

    def _now(self) -> float:
        return self._clock()

    async def _release(self, lease: Lease) -> None:
        self._release_now(lease)

    # -- the state machine: all synchronous, so no other task runs in between ---------------

    def _grant(self, entry: _KeyEntry, owner: str, enqueued_at: float, now: float) -> Lease:
        lease = Lease(key=entry.key, owner=owner, token=next(self._tokens), acquired_at=now, renewed_at=now)
        lease._home = self
        entry.holder = lease
        wait = max(0.0, now - enqueued_at)
        self.stats.acquisitions += 1
        self.stats.wait_seconds_sum += wait
        if self._on_wait is not None:
            try:
                self._on_wait(wait)
            except Exception:  # a metrics adapter's bug must never break the hand-off
                log.exception("lock wait observer failed")
        return lease

    def _settle(self, entry: _KeyEntry) -> None:
        """Restore the invariants after any change: hand a free lock to the first waiter still
        waiting, free the entry when idle, and keep the stale timer armed exactly while a
        holder has waiters."""
        if entry.holder is None:
            now = self._clock()
            while entry.waiters:
                waiter = entry.waiters.popleft()
                if waiter.fut.done():  # cancelled, not yet removed by its task
                    continue
                waiter.fut.set_result(self._grant(entry, waiter.owner, waiter.enqueued_at, now))
                break
        if entry.holder is None and not entry.waiters:
            self._disarm(entry)
            if self._entries.get(entry.key) is entry:
                del self._entries[entry.key]
        elif entry.waiters:
            self._arm(entry)
        else:
            self._disarm(entry)

    def _clear_if_stale(self, entry: _KeyEntry, now: float) -> bool:
        """Clear the holder if it is stale; the caller settles the entry afterwards."""
        holder = entry.holder
        if holder is None or not now - holder.renewed_at > self.stale_after:
            return False
        entry.holder = None
        holder._state = _LOST
        holder._lost_reason = "was cleared as stale"
        self.stats.stale_cleared += 1
        log.warning(
            "cleared stale lock of key %r held by %r (token %d): not renewed for %.1fs "
            "(stale after %.1fs), held for %.1fs",
            entry.key, holder.owner, holder.token, now - holder.renewed_at,
            self.stale_after, now - holder.acquired_at,
        )
        return True

    def _release_now(self, lease: Lease) -> None:
        if lease._state != _HELD:
            return
        lease._state = _RELEASED
        lease._lost_reason = "was released"
        entry = self._entries.get(lease.key)
        if entry is None or entry.holder is not lease:
            return
        entry.holder = None
        self._settle(entry)

    def _abandon(self, entry: _KeyEntry, waiter: _Waiter) -> None:
        """A waiter leaves without taking the lock (timeout, cancellation, any error)."""
        fut = waiter.fut
        if fut.done() and not fut.cancelled():
            # Granted between its wake-up and its leaving: pass the lock on, or it is lost.
            self._release_now(fut.result())
            return
        fut.cancel()
        try:
            entry.waiters.remove(waiter)
        except ValueError:
            pass
        self._settle(entry)

    def _arm(self, entry: _KeyEntry) -> None:
        if entry.stale_timer is not None or entry.holder is None:
            return
        delay = entry.holder.renewed_at + self.stale_after - self._clock()
        entry.stale_timer = asyncio.get_running_loop().call_later(
            max(delay, _MIN_RECHECK_SECONDS), self._on_stale_timer, entry
        )

    def _disarm(self, entry: _KeyEntry) -> None:
        if entry.stale_timer is not None:
            entry.stale_timer.cancel()
            entry.stale_timer = None

    def _on_stale_timer(self, entry: _KeyEntry) -> None:
        entry.stale_timer = None
        if self._entries.get(entry.key) is not entry:
            return
        # Renewals do not touch the timer; a renewed holder is simply not stale yet here, and
        # settling re-arms the timer for its new deadline.
        self._clear_if_stale(entry, self._clock())
        self._settle(entry)


@asynccontextmanager
async def _hold(
    locker: Locker, key: str, *, owner: str, timeout: float | None, request_release: bool
) -> AsyncIterator[Lease]:
    lease = await locker.acquire(key, owner=owner, timeout=timeout, request_release=request_release)
    try:
        yield lease
    finally:
        await lease.release()
