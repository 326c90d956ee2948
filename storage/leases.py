"""Store-backed leases: the ``Locker`` protocol across several gateway processes over one store.

``StoreLockManager`` composes two layers per key:

1. the in-process ``LockManager`` first, so the tasks of one gateway queue FIFO among
   themselves and the store sees at most one lease request per key per gateway;
2. then a lease record in the store (``storage.keys.lease_key``), a small JSON document with
   owner, gateway id, fencing token and expiry, created with ``If-None-Match: *`` and renewed,
   released or taken over with ``If-Match`` on the record's ETag. The conditional write is the
   only arbiter: whoever's write succeeds holds the lease, whoever's write fails learns it lost.

A holder's record is renewed in the background every ``stale_after / 3`` seconds for as long as
its in-process lease is live (held, and renewed by its holder within ``stale_after`` -- the same
rule as in one process). A record whose expiry has passed belongs to a dead or frozen gateway:
the next waiter takes it over with a conditional write and a token one larger. The frozen holder
learns it on its next renewal (``If-Match`` fails), and even before that its ``check()`` refuses
once its own conservative deadline (measured from *before* its last successful write) has
passed -- so a holder that slept through its expiry never commits under a lease someone else
may hold.

A released lease's record is removed by a conditional delete (``If-Match`` its ETag): a record
another gateway took over or re-created meanwhile has another ETag, so the delete fails and the
newer holder's record stays. A record a crashed holder left is removed by ``sweep_records``
(run with ``clear_stale``) once a waiter could take it over: released, or expired by the same
rule a waiter uses, or seen unchanged for ``stale_after`` on the sweeper's own monotonic clock;
again by ``If-Match``, so a renewal or take-over that lands first keeps its record. On a store
that does not honour conditional deletes (``storage.probe``) records are only marked released,
never deleted. Fencing tokens grow by one on every take-over; a record created afresh starts at
the wall clock in microseconds, so tokens still grow across removals (as long as clocks agree
better than the time between two holders). Nothing's safety rests on the token: every write
under a lease is fenced by the holder's deadline (``check()``) and is itself conditional.

Expiry is written with the holder's wall clock and judged with the waiter's, so a waiter whose
clock runs ahead would take over a lease that is still being renewed. Two rules make a takeover
safe: a record is expired for a waiter only once its ``expires`` is ``max_clock_skew`` (default:
``stale_after``) in the waiter's past -- so clocks may disagree by up to ``stale_after`` (NTP keeps
them within milliseconds) -- and, whatever the clocks say, a waiter that has seen the record
unchanged (same ETag) for ``stale_after`` on its own monotonic clock takes it over: the holder's
own deadline ended before that, since it is measured from before the write the waiter saw. A
waiter therefore waits at most about ``stale_after`` for a dead holder, and never takes over a
live one within the tolerated skew.

Must never: let two leases of one key be valid at once as far as ``check()`` can tell (a valid
lease's deadline always ends before its record's expiry); delete a lease record unconditionally
or one a waiter could not yet take over; let a renewal
or a take-over wait behind data traffic (build it on the backend *below* any limiter); import
aiohttp or ``gateway``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, cast

from storage import keys
from storage.backends.base import (
    Backend,
    NotFound,
    PermanentError,
    PreconditionFailed,
    TransientError,
)
from storage.errors import StoreUnavailable, from_backend
from storage.lease_records import StoreLockStats, gateway_id, judged_record, new_record, parse_record, release_request_key
from storage.locks import Lease, LeaseLost, Locker, LockManager, LockTimeout, _hold

log = logging.getLogger("chunkgate.leases")

# Time taken off a holder's own deadline: the record's expiry is written as wall time after the
# write, the local deadline is measured from before it, and this covers clock granularity.
_SAFETY_SECONDS = 0.05
_FIRST_POLL_SECONDS = 0.01


@dataclass(eq=False)
class _Slot:
    """This gateway's hold on one key's lease record."""

    key: str
    token: int
    etag: str
    record: dict[str, Any]
    valid_until: float  # monotonic; check() refuses after it
    lost: str = ""
    renewer: asyncio.Task[None] | None = None


class StoreLease(Lease):
    """A ``Lease`` valid only while both its in-process lease and its store record are.

    ``token`` is the store record's fencing token (strictly increasing per key across every
    gateway on the store)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        # Set by the manager right after construction; not dataclass fields (see ``Lease``).
        self._local: Lease | None = None
        self._slot: _Slot | None = None

    @property
    def valid(self) -> bool:
        try:
            self.check()
        except LeaseLost:
            return False
        return True

    def check(self) -> None:
        """Raise ``LeaseLost`` unless both layers are current. Synchronous, so a caller can run
        it with no ``await`` before its conditional write."""
        assert self._local is not None and self._slot is not None
        if not self._local.valid:
            raise LeaseLost(self.key, self.token, self._local._lost_reason or "is no longer current")
        slot = self._slot
        if slot.lost:
            raise LeaseLost(self.key, self.token, slot.lost)
        assert isinstance(self._home, StoreLockManager)
        if self._home._monotonic() > slot.valid_until:
            raise LeaseLost(self.key, self.token, "expired in the store before it could be renewed")

    def renew(self) -> None:
        """Mark the holder alive: the background renewer keeps the store record current while
        the holder renews within ``stale_after``."""
        self.check()
        assert self._local is not None
        self._local.renew()
        self.renewed_at = self._local.renewed_at

    async def release(self) -> None:
        if self._home is None or self._state != "held":
            return
        await self._home._release(self)


class StoreLockManager:
    """A ``Locker`` whose leases hold across every gateway using the same store.

    ``backend`` must be the backend below any request limiter (renewals must never queue behind
    data traffic). ``clock`` is the wall clock written into records; local deadlines use
    ``time.monotonic``."""

    def __init__(
        self,
        backend: Backend,
        *,
        stale_after: float = 30.0,
        timeout: float = 20.0,
        on_wait: Callable[[float], None] | None = None,
        gateway: str | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        max_poll: float | None = None,
        max_clock_skew: float | None = None,
    ) -> None:
        self.backend = backend
        self._monotonic = monotonic
        self.local = LockManager(stale_after=stale_after, timeout=timeout, clock=monotonic)
        self.stale_after = float(stale_after)
        self.timeout = float(timeout)
        self.gateway = gateway or gateway_id()
        self.renew_interval = self.stale_after / 3
        # How far another gateway's wall clock may be ahead of the holder's without a takeover of
        # a lease still being renewed (see the module docstring).
        self.max_clock_skew = self.stale_after if max_clock_skew is None else float(max_clock_skew)
        # Waiters poll the record; a free lease is found within this much (plus jitter).
        self.max_poll = max_poll if max_poll is not None else min(0.2, self.stale_after / 5)
        self._clock = clock
        self._on_wait = on_wait
        self._slots: dict[str, _Slot] = {}
        self.stats = StoreLockStats(self)
        # Set from the startup probe (storage.probe): without conditional deletes a record is
        # never deleted (an unconditional delete could take a newer holder's record with it).
        self.conditional_deletes = True
        # sweep_records' memory: store key -> (ETag, monotonic time first seen with it, record)
        self._swept: dict[str, tuple[str, float, dict[str, Any]]] = {}

    # -- the Locker protocol ---------------------------------------------------------------

    async def acquire(
        self, key: str, *, owner: str, timeout: float | None = None, request_release: bool = False
    ) -> Lease:
        """In-process FIFO first, then the store record; one deadline covers both. Raises
        ``LockTimeout``; ``StoreUnavailable``/``StoreFailed`` when the store cannot be asked."""
        limit = self.timeout if timeout is None else max(0.0, float(timeout))
        started = self._monotonic()
        deadline = started + limit
        try:
            local = await self.local.acquire(key, owner=owner, timeout=limit, request_release=request_release)
        except LockTimeout:
            self.stats.timeouts += 1
            raise
        try:
            slot = await self._take(key, owner, started, deadline, request_release)
        except BaseException:
            await local.release()
            raise
        now = self._clock()
        lease = StoreLease(
            key=key, owner=owner, token=slot.token, acquired_at=local.acquired_at, renewed_at=local.renewed_at,
            release_requested=local.release_requested,
        )
        lease._home, lease._local, lease._slot = self, local, slot
        self._slots[key] = slot
        slot.renewer = asyncio.ensure_future(self._renew_loop(lease))
        waited = self._monotonic() - started
        self.stats.acquisitions += 1
        self.stats.wait_seconds_sum += waited
        if self._on_wait is not None:
            try:
                self._on_wait(waited)
            except Exception:  # a metrics adapter's bug must never break the hand-off
                log.exception("lock wait observer failed")
        log.debug("lease of %r taken by %s/%s, token %d at %.3f", key, self.gateway, owner, slot.token, now)
        return lease

    def hold(
        self, key: str, *, owner: str, timeout: float | None = None, request_release: bool = False
    ) -> AbstractAsyncContextManager[Lease]:
        return _hold(cast(Locker, self), key, owner=owner, timeout=timeout, request_release=request_release)

    async def clear_stale(self) -> int:
        """Clear stale in-process leases, then remove the store's lease records that nobody can
        hold any more (``sweep_records``); return how many of both."""
        cleared = await self.local.clear_stale()
        try:
            cleared += await self.sweep_records()
        except (TransientError, PermanentError) as exc:
            log.warning("sweeping lease records failed (tried again later): %s", exc)
        return cleared

    async def sweep_records(self) -> int:
        """Remove lease records a waiter could take over now: released ones (left when a
        release's delete failed, or by an older release), expired ones (``expires`` is
        ``max_clock_skew`` in our past, as a waiter judges), and ones seen unchanged for
        ``stale_after`` on our own monotonic clock; release requests once a live holder has
        surely seen them. Each by ``If-Match`` on the ETag judged, so a renewal or a take-over
        that lands first keeps its record. A record is read only when its listed ETag is new to
        this sweeper, so a sweep costs one listing plus the records that changed. Returns how
        many were removed."""
        if not self.conditional_deletes:
            return 0
        now, mono = self._clock(), self._monotonic()
        mine: set[str] = set()
        for slot in self._slots.values():
            if not slot.lost and slot.renewer is not None and not slot.renewer.done():
                mine |= {keys.lease_key(slot.key), release_request_key(slot.key)}
        seen: dict[str, tuple[str, float, dict[str, Any]]] = {}
        doomed: list[tuple[str, str, bool]] = []  # key, etag, whether a live-looking holder's lease expired
        async for info in self.backend.list(keys.LEASE_PREFIX):
            if info.key in mine:
                continue
            before = self._swept.get(info.key)
            if before is not None and before[0] == info.etag:
                etag, since, record = before
            else:
                try:
                    blob = await self.backend.get(info.key)
                except NotFound:
                    continue
                etag, since = blob.etag, mono
                record = judged_record(info.key, blob.data, self.stale_after)
            seen[info.key] = (etag, since, record)
            expires = float(record.get("expires", float("inf")))
            if record.get("released") or expires + self.max_clock_skew <= now or mono - since > self.stale_after:
                doomed.append((info.key, etag, not record.get("released") and not info.key.endswith(".release")))
        self._swept = seen
        removed = 0
        for lkey, etag, expired in doomed:
            try:
                await self.backend.delete(lkey, if_match=etag)
            except PreconditionFailed:
                continue  # renewed, taken over or re-created meanwhile: it stays
            except (TransientError, PermanentError) as exc:
                log.warning("could not remove the lease record %s (tried again later): %s", lkey, exc)
                continue
            seen.pop(lkey, None)
            removed += 1
            # A holder that stopped renewing (crashed) lost its lease to this sweep: counted as a
            # take-over, as when a waiter takes the record over itself.
            self.stats.takeovers += expired
        self.stats.records_removed += removed
        return removed

    def snapshot(self) -> dict[str, Any]:
        snap = self.local.snapshot()
        for entry in snap["locks"]:
            slot = self._slots.get(entry["key"])
            if slot is not None:
                entry["store_token"] = slot.token
                entry["store_expires"] = slot.record.get("expires")
        snap["gateway"] = self.gateway
        snap["mode"] = "store"
        snap["totals"].update(
            acquisitions=self.stats.acquisitions,
            timeouts=self.stats.timeouts,
            stale_cleared=self.stats.stale_cleared,
            release_requests=self.stats.release_requests,
            wait_seconds_sum=self.stats.wait_seconds_sum,
            lease_conflicts=self.stats.lease_conflicts,
            takeovers=self.stats.takeovers,
            records_removed=self.stats.records_removed,
        )
        return snap

    def __len__(self) -> int:
        return len(self.local)

    def active(self) -> int:
        return self.local.active()

    def waiting(self) -> int:
        return self.local.waiting()

    def oldest_age(self) -> float:
        return self.local.oldest_age()

    async def close(self) -> None:
        """Stop every renewer and release every record still held (shutdown). Idempotent."""
        for slot in list(self._slots.values()):
            await self._drop(slot, release_record=True)

    # -- records -----------------------------------------------------------------------------

    async def _write(self, key: str, record: dict[str, Any], **cond: Any) -> tuple[str, float]:
        """Conditional write of a record; returns (etag, monotonic deadline for check()).

        Shielded: if the caller is cancelled while the write is in flight, a write that then
        succeeds is released at once instead of blocking the key until it expires."""
        before = self._monotonic()
        data = json.dumps(record, sort_keys=True).encode()
        put = asyncio.ensure_future(self.backend.put(keys.lease_key(key), data, **cond))
        try:
            etag = await asyncio.shield(put)
        except asyncio.CancelledError:
            put.add_done_callback(lambda t: self._release_orphan(key, record, t))
            raise
        return etag, before + self.stale_after - _SAFETY_SECONDS

    def _release_orphan(self, key: str, record: dict[str, Any], put: asyncio.Future[str]) -> None:
        if put.cancelled() or put.exception() is not None:
            return
        task = asyncio.ensure_future(self._free_record(key, record, put.result()))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _free_record(self, key: str, record: dict[str, Any], etag: str) -> None:
        """Give up our record of ``key`` (ETag ``etag``): removed by a conditional delete, or
        marked released where the store ignores conditional deletes. Raises the store's errors;
        ``PreconditionFailed`` when it is not ours any more (nothing of ours to free)."""
        if self.conditional_deletes:
            await self.backend.delete(keys.lease_key(key), if_match=etag)
            return
        released = dict(record, released=True, expires=self._clock())
        await self.backend.put(keys.lease_key(key), json.dumps(released, sort_keys=True).encode(), if_match=etag)

    async def _take(self, key: str, owner: str, started: float, deadline: float, request_release: bool) -> _Slot:
        """Get the store record of ``key`` for this gateway, waiting while another holds it."""
        delay = _FIRST_POLL_SECONDS
        seen_etag, seen_since = "", 0.0
        asked = False
        last_error: Exception | None = None
        while True:
            wait_for: float | None = None
            try:
                slot = await self._try_take(key, owner)
                if isinstance(slot, _Slot):
                    return slot
                if slot is not None:
                    record, etag = slot
                    now_mono = self._monotonic()
                    if etag != seen_etag:
                        seen_etag, seen_since = etag, now_mono
                    elif now_mono - seen_since > self.stale_after:
                        # Backstop for a holder whose clock runs ahead: unchanged for a whole
                        # stale period by our own clock means nobody renews it.
                        taken = await self._take_over(key, owner, record, etag, expired=True)
                        if taken is not None:
                            return taken
                        continue
                    if request_release and not asked:
                        asked = True
                        await self._ask_release(key, record)
                    wait_for = max(0.0, float(record.get("expires", 0)) + self.max_clock_skew - self._clock()) + 0.005
            except TransientError as exc:
                last_error = exc
            except PermanentError as exc:
                raise from_backend(exc, f"taking the lease of {key!r}") from exc  # a full store: 507
            remaining = deadline - self._monotonic()
            if remaining <= 0:
                self.stats.timeouts += 1
                if last_error is not None:
                    raise StoreUnavailable(f"the store failed while waiting for the lease of {key!r}: {last_error}")
                raise LockTimeout(key, self._monotonic() - started)
            # Full jitter, so pollers on several gateways do not line up; never sleep past the
            # holder's expiry, so a dead holder's key frees within a few ms of it.
            pause = random.uniform(delay / 2, delay)
            if wait_for is not None:
                pause = min(pause, wait_for)
            await asyncio.sleep(min(pause, remaining))
            delay = min(delay * 2, self.max_poll)

    async def _try_take(self, key: str, owner: str) -> _Slot | tuple[dict[str, Any], str] | None:
        """One attempt. Returns the slot when taken, (record, etag) of a live holder, or None
        when a race was lost (retry at once)."""
        lkey = keys.lease_key(key)
        mine = self._slots.get(key)
        if mine is not None and not mine.lost and mine.renewer is not None:
            # Our own previous holder still owns the record (it was cleared as stale in this
            # process, or is releasing): take it from our own ETag, no need to wait for expiry.
            prior = mine
            await self._drop(prior, release_record=False)
            taken = await self._take_over(key, owner, prior.record, prior.etag, expired=False)
            if taken is not None:
                return taken
        try:
            blob = await self.backend.get(lkey)
        except NotFound:
            # No record (never locked, or removed after its release): start from the wall clock in
            # microseconds, so tokens keep growing across removals (see the module docstring).
            token = max(1, int(self._clock() * 1_000_000))
            record = new_record(key, owner, token, gateway=self.gateway, now=self._clock(), stale_after=self.stale_after)
            try:
                etag, until = await self._write(key, record, if_none_match=True)
            except PreconditionFailed:
                self.stats.lease_conflicts += 1
                return None
            return _Slot(key, token, etag, record, until)
        current = parse_record(blob.data)
        if current is None:
            # Damaged (or a short read a store let through): it may still be someone's live
            # lease, so it is taken over only by the unchanged-for-stale_after rule, with a
            # token larger than any it could have held (its own cannot be read).
            log.error("lease record of %r is unreadable; it is taken over once unchanged for %.0fs", key, self.stale_after)
            return {"token": int(self._clock() * 1000), "expires": float("inf")}, blob.etag
        if current.get("released") or float(current.get("expires", 0)) + self.max_clock_skew <= self._clock():
            return await self._take_over(key, owner, current, blob.etag, expired=not current.get("released"))
        return current, blob.etag

    async def _take_over(
        self, key: str, owner: str, current: dict[str, Any], etag: str, *, expired: bool
    ) -> _Slot | None:
        token = int(current.get("token", 0)) + 1
        record = new_record(key, owner, token, gateway=self.gateway, now=self._clock(), stale_after=self.stale_after)
        try:
            new_etag, until = await self._write(key, record, if_match=etag)
        except PreconditionFailed:
            self.stats.lease_conflicts += 1
            return None
        if expired and current.get("gateway") != self.gateway:
            self.stats.takeovers += 1
            log.warning(
                "took over the expired lease of %r from %s/%s (token %s, expired %.1fs ago)",
                key, current.get("gateway"), current.get("owner"), current.get("token"),
                self._clock() - float(current.get("expires", 0)),
            )
        return _Slot(key, token, new_etag, record, until)

    async def _ask_release(self, key: str, current: dict[str, Any]) -> None:
        doc = {"token": current.get("token"), "by": self.gateway, "at": self._clock()}
        try:
            await self.backend.put(release_request_key(key), json.dumps(doc).encode())
        except (TransientError, PermanentError) as exc:
            log.warning("could not ask the holder of %r to release: %s", key, exc)
            return
        self.stats.remote_release_requests += 1

    # -- holding -----------------------------------------------------------------------------

    async def _renew_loop(self, lease: StoreLease) -> None:
        slot, local = lease._slot, lease._local
        assert slot is not None and local is not None
        interval = self.renew_interval
        while True:
            await asyncio.sleep(interval)
            if slot.lost or not local.valid:
                return
            if self._monotonic() - local.renewed_at > self.stale_after:
                # Same rule as in one process: a holder that stopped renewing is stale. Stop
                # renewing the record so a waiter anywhere can take over at its expiry.
                log.warning("lease of %r (token %d) not renewed by its holder %r for %.1fs; letting it expire",
                            slot.key, slot.token, lease.owner, self._monotonic() - local.renewed_at)
                return
            record = dict(slot.record, renewed=self._clock(), expires=self._clock() + self.stale_after)
            try:
                etag, until = await self._write(slot.key, record, if_match=slot.etag)
            except PreconditionFailed:
                slot.lost = "was taken over in the store by another gateway"
                log.error("lease of %r (token %d) lost: %s", slot.key, slot.token, slot.lost)
                return
            except (TransientError, PermanentError) as exc:
                # Keep trying; check() starts refusing on its own when the deadline passes.
                log.warning("renewing the lease of %r failed: %s", slot.key, exc)
                interval = max(0.05, min(self.renew_interval, slot.valid_until - self._monotonic()) / 2)
                continue
            slot.etag, slot.record, slot.valid_until = etag, record, until
            interval = self.renew_interval
            await self._check_release_request(slot, lease)

    async def _check_release_request(self, slot: _Slot, lease: StoreLease) -> None:
        try:
            blob = await self.backend.get(release_request_key(slot.key))
        except (NotFound, TransientError, PermanentError):
            return
        try:
            doc = json.loads(blob.data)
        except ValueError:
            doc = {}
        if isinstance(doc, dict) and doc.get("token") == slot.token:
            lease.release_requested.set()
        try:
            # Conditional where the store honours it: a newer request written meanwhile stays.
            await self.backend.delete(release_request_key(slot.key), if_match=blob.etag if self.conditional_deletes else None)
        except (PreconditionFailed, TransientError, PermanentError):
            pass

    async def _drop(self, slot: _Slot, *, release_record: bool) -> None:
        """Stop renewing ``slot``; mark its record released (conditionally) when asked."""
        task, slot.renewer = slot.renewer, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._slots.get(slot.key) is slot:
            del self._slots[slot.key]
        was_lost = slot.lost
        if not slot.lost:
            slot.lost = "was released"
        if not release_record or was_lost:
            return
        # Whatever our deadline says: the condition (our ETag) is the arbiter, so a record taken
        # over or re-created since is never touched.
        try:
            await self._free_record(slot.key, slot.record, slot.etag)
        except PreconditionFailed:
            pass  # someone took it over already: nothing of ours to release
        except (TransientError, PermanentError) as exc:
            log.warning("could not release the lease of %r in the store (it expires, and is swept): %s", slot.key, exc)

    def _now(self) -> float:
        return self.local._now()

    async def _release(self, lease: Lease) -> None:
        assert isinstance(lease, StoreLease) and lease._slot is not None and lease._local is not None
        if lease._state != "held":
            return
        lease._state = "released"
        lease._lost_reason = "was released"
        try:
            # The store record first, so the next holder (here or elsewhere) finds it free.
            if self._slots.get(lease.key) is lease._slot:
                # Even when the in-process lease was cleared as stale: the record is only ever
                # freed by its own ETag, so a holder that took it over since keeps it.
                await asyncio.shield(self._drop(lease._slot, release_record=lease._local.valid or self.conditional_deletes))
            else:
                lease._slot.lost = lease._slot.lost or "was released"
        finally:
            await lease._local.release()
