"""Behaviour of ``storage.locks.LockManager``: FIFO hand-off, timeouts, cancellation, stale
clearing and fencing, renewal, release requests, tokens, statistics and the admin snapshot.

Where a test is about *when* something happens it uses a fake clock and ``clear_stale()`` or a
zero timeout, so it is deterministic; the few tests that need a waiter to wake up on its own use
the real clock with short limits and assert only on outcomes, never on durations."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging

import pytest

from storage.locks import Lease, LeaseLost, LockAdmin, Locker, LockManager, LockService, LockStats, LockTimeout

pytestmark = pytest.mark.timeout(60)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def wait_until(predicate, limit: float = 10.0) -> None:
    """Yield to the loop until ``predicate()`` holds (tasks enqueue in the order they run)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not predicate():
        if loop.time() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0)


# -- uncontended basics ------------------------------------------------------------------------


async def test_uncontended_acquire_returns_current_lease_and_release_frees_the_key() -> None:
    clock = FakeClock()
    mgr = LockManager(clock=clock)
    assert isinstance(mgr, Locker) and isinstance(mgr, LockAdmin) and isinstance(mgr, LockService)
    lease = await mgr.acquire("videos/a.mp4", owner="put-1")
    assert (lease.key, lease.owner, lease.acquired_at, lease.renewed_at) == ("videos/a.mp4", "put-1", 1000.0, 1000.0)
    assert lease.valid and len(mgr) == 1 and mgr.active() == 1
    lease.check()
    await lease.release()
    assert not lease.valid and len(mgr) == 0 and mgr.active() == 0
    with pytest.raises(LeaseLost):
        lease.check()
    await lease.release()  # idempotent
    assert len(mgr) == 0


async def test_hold_releases_when_the_body_raises() -> None:
    mgr = LockManager()
    with pytest.raises(RuntimeError):
        async with mgr.hold("k", owner="a") as lease:
            assert lease.valid
            raise RuntimeError("boom")
    assert not lease.valid and len(mgr) == 0
    async with mgr.hold("k", owner="b", timeout=0) as again:
        assert again.owner == "b"


async def test_different_keys_do_not_block_each_other() -> None:
    mgr = LockManager()
    a = await mgr.acquire("a", owner="x", timeout=0)
    b = await mgr.acquire("b", owner="y", timeout=0)
    assert a.valid and b.valid and mgr.active() == 2
    await a.release()
    await b.release()
    assert len(mgr) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"stale_after": 0}, "stale_after"), ({"stale_after": -1}, "stale_after"), ({"timeout": -0.5}, "timeout")],
)
def test_bad_limits_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LockManager(**kwargs)


# -- FIFO, timeouts, cancellation --------------------------------------------------------------


async def test_waiters_get_the_lock_in_arrival_order() -> None:
    mgr = LockManager()
    first = await mgr.acquire("k", owner="first")
    order: list[str] = []

    async def worker(name: str) -> None:
        async with mgr.hold("k", owner=name) as lease:
            order.append(lease.owner)

    tasks = []
    for name in "abcde":
        tasks.append(asyncio.create_task(worker(name)))
        await wait_until(lambda: mgr.waiting() == len(tasks))
    await first.release()
    await asyncio.gather(*tasks)
    assert order == list("abcde")
    assert len(mgr) == 0


async def test_timeout_raises_counts_and_the_next_waiter_still_gets_the_lock() -> None:
    mgr = LockManager(timeout=30)
    holder = await mgr.acquire("k", owner="holder")
    impatient = asyncio.create_task(mgr.acquire("k", owner="impatient", timeout=0.05))
    await wait_until(lambda: mgr.waiting() == 1)
    patient = asyncio.create_task(mgr.acquire("k", owner="patient"))
    with pytest.raises(LockTimeout) as info:
        await impatient
    assert info.value.key == "k" and info.value.waited >= 0.05
    assert mgr.stats.timeouts == 1 and mgr.waiting() == 1
    await holder.release()
    lease = await patient
    assert lease.owner == "patient" and lease.valid
    await lease.release()
    assert len(mgr) == 0


async def test_zero_timeout_on_a_held_key_fails_at_once_and_leaves_no_trace() -> None:
    clock = FakeClock()
    mgr = LockManager(clock=clock)
    holder = await mgr.acquire("k", owner="holder")
    with pytest.raises(LockTimeout):
        await mgr.acquire("k", owner="other", timeout=0)
    assert mgr.waiting() == 0 and mgr.stats.timeouts == 1
    await holder.release()
    assert len(mgr) == 0


async def test_cancelled_waiter_leaves_the_queue_and_the_rest_keep_their_order() -> None:
    mgr = LockManager()
    holder = await mgr.acquire("k", owner="holder")
    order: list[str] = []

    async def worker(name: str) -> None:
        async with mgr.hold("k", owner=name):
            order.append(name)

    tasks = {}
    for name in "bcd":
        tasks[name] = asyncio.create_task(worker(name))
        await wait_until(lambda: mgr.waiting() == len(tasks))
    tasks["c"].cancel()
    await wait_until(lambda: mgr.waiting() == 2)
    await holder.release()
    await asyncio.gather(tasks["b"], tasks["d"])
    assert tasks["c"].cancelled()
    assert order == ["b", "d"]
    assert len(mgr) == 0


async def test_waiter_cancelled_right_after_being_granted_passes_the_lock_on() -> None:
    mgr = LockManager()
    holder = await mgr.acquire("k", owner="holder")
    granted_then_cancelled = asyncio.create_task(mgr.acquire("k", owner="b"))
    await wait_until(lambda: mgr.waiting() == 1)
    nxt = asyncio.create_task(mgr.acquire("k", owner="c", timeout=10))
    await wait_until(lambda: mgr.waiting() == 2)
    await holder.release()  # hands the lock to b synchronously; b has not run yet
    granted_then_cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await granted_then_cancelled
    lease = await nxt
    assert lease.owner == "c" and lease.valid
    await lease.release()
    assert len(mgr) == 0


# -- stale clearing and fencing ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("silent_for", "newcomer_takes_over"),
    [(0.0, False), (29.9, False), (30.0, False), (30.001, True), (500.0, True)],
)
async def test_a_lease_is_stale_only_after_stale_after_seconds_without_renewal(
    silent_for: float, newcomer_takes_over: bool
) -> None:
    clock = FakeClock()
    mgr = LockManager(clock=clock, stale_after=30)
    holder = await mgr.acquire("k", owner="holder")
    clock.advance(silent_for)
    if newcomer_takes_over:
        lease = await mgr.acquire("k", owner="newcomer", timeout=0)
        assert lease.valid and not holder.valid
        assert mgr.stats.stale_cleared == 1
    else:
        with pytest.raises(LockTimeout):
            await mgr.acquire("k", owner="newcomer", timeout=0)
        assert holder.valid and mgr.stats.stale_cleared == 0


@pytest.mark.parametrize(
    ("renew_at", "arrive_at", "newcomer_takes_over"),
    [(20.0, 45.0, False), (20.0, 50.0, False), (20.0, 50.5, True), (29.0, 58.0, False), (None, 45.0, True)],
)
async def test_renewal_pushes_the_stale_deadline_out(
    renew_at: float | None, arrive_at: float, newcomer_takes_over: bool
) -> None:
    clock = FakeClock(0.0)
    mgr = LockManager(clock=clock, stale_after=30)
    holder = await mgr.acquire("k", owner="holder")
    if renew_at is not None:
        clock.now = renew_at
        holder.renew()
        assert holder.renewed_at == renew_at and holder.acquired_at == 0.0
    clock.now = arrive_at
    if newcomer_takes_over:
        assert (await mgr.acquire("k", owner="newcomer", timeout=0)).valid
        assert not holder.valid
    else:
        with pytest.raises(LockTimeout):
            await mgr.acquire("k", owner="newcomer", timeout=0)
        assert holder.valid


async def test_frozen_holder_is_cleared_by_a_waiter_and_cannot_commit_or_release_the_new_lock(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mgr = LockManager(stale_after=0.1, timeout=30)
    frozen = await mgr.acquire("videos/a.mp4", owner="stalled-upload")
    caplog.set_level(logging.WARNING, logger="chunkgate.locks")
    # Nobody calls anything else: the waiter must wake up at the stale deadline by itself.
    taker = await mgr.acquire("videos/a.mp4", owner="new-patch")
    assert taker.valid and taker.token > frozen.token
    assert not frozen.valid
    with pytest.raises(LeaseLost) as info:
        frozen.check()
    assert (info.value.key, info.value.token) == ("videos/a.mp4", frozen.token)
    with pytest.raises(LeaseLost):
        frozen.renew()
    await frozen.release()  # a lost lease's release must not free the new holder's lock
    assert taker.valid and mgr.active() == 1
    with pytest.raises(LockTimeout):
        await mgr.acquire("videos/a.mp4", owner="third", timeout=0)
    assert mgr.stats.stale_cleared == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("videos/a.mp4" in m and "stalled-upload" in m for m in warnings)
    await taker.release()
    assert len(mgr) == 0


async def test_stale_clearing_keeps_fifo_order_among_waiters() -> None:
    clock = FakeClock()
    mgr = LockManager(clock=clock, stale_after=30)
    frozen = await mgr.acquire("k", owner="frozen")
    early = asyncio.create_task(mgr.acquire("k", owner="early", timeout=1000))
    await wait_until(lambda: mgr.waiting() == 1)
    clock.advance(31)
    # The newcomer notices the stale holder, but the lock goes to the waiter who came first.
    with pytest.raises(LockTimeout):
        await mgr.acquire("k", owner="late", timeout=0)
    lease = await early
    assert lease.owner == "early" and not frozen.valid and mgr.stats.stale_cleared == 1
    await lease.release()
    assert len(mgr) == 0


async def test_clear_stale_sweeps_leaked_leases_nobody_waits_for() -> None:
    clock = FakeClock()
    mgr = LockManager(clock=clock, stale_after=30)
    leaked = [await mgr.acquire(f"k{i}", owner="leaky") for i in range(3)]
    fresh = await mgr.acquire("fresh", owner="busy")
    clock.advance(20)
    fresh.renew()
    clock.advance(20)
    assert await mgr.clear_stale() == 3
    assert [lease.valid for lease in leaked] == [False, False, False]
    assert fresh.valid and len(mgr) == 1 and mgr.stats.stale_cleared == 3
    await fresh.release()
    assert len(mgr) == 0


async def test_renewing_holder_keeps_the_lock_while_a_waiter_waits() -> None:
    # Real clock: the waiter's own stale timer fires repeatedly and must find the lease renewed.
    mgr = LockManager(stale_after=0.5, timeout=30)
    holder = await mgr.acquire("k", owner="long-upload")
    waiter = asyncio.create_task(mgr.acquire("k", owner="waiter"))
    await wait_until(lambda: mgr.waiting() == 1)
    for _ in range(60):  # about 1.2 s of work, more than twice stale_after
        await asyncio.sleep(0.02)
        holder.renew()
    assert not waiter.done()
    holder.check()
    await holder.release()
    lease = await waiter
    assert lease.owner == "waiter" and mgr.stats.stale_cleared == 0
    await lease.release()


# -- release requests, tokens, statistics ------------------------------------------------------


async def test_request_release_sets_the_holders_event_and_counts() -> None:
    mgr = LockManager()
    holder = await mgr.acquire("upload-1", owner="patch-1")

    async def holder_side() -> None:
        await holder.release_requested.wait()
        await holder.release()

    plain = asyncio.create_task(mgr.acquire("upload-1", owner="plain", timeout=30))
    await wait_until(lambda: mgr.waiting() == 1)
    assert not holder.release_requested.is_set() and mgr.stats.release_requests == 0
    watcher = asyncio.create_task(holder_side())
    asking = asyncio.create_task(mgr.acquire("upload-1", owner="patch-2", timeout=30, request_release=True))
    await watcher
    assert mgr.stats.release_requests == 1
    first = await plain  # the request does not jump the queue
    assert first.owner == "plain" and not first.release_requested.is_set()
    await first.release()
    second = await asking
    assert second.owner == "patch-2"
    await second.release()


async def test_request_release_on_a_free_key_is_not_counted() -> None:
    mgr = LockManager()
    lease = await mgr.acquire("k", owner="a", request_release=True)
    assert not lease.release_requested.is_set() and mgr.stats.release_requests == 0
    await lease.release()


async def test_tokens_strictly_increase_across_holders_even_after_the_key_was_idle() -> None:
    clock = FakeClock()
    mgr = LockManager(clock=clock, stale_after=30)
    tokens = []
    for _ in range(3):
        lease = await mgr.acquire("k", owner="a", timeout=0)
        tokens.append(lease.token)
        await lease.release()
        assert len(mgr) == 0
    other = await mgr.acquire("other", owner="b")
    lost = await mgr.acquire("k", owner="c")
    tokens.append(lost.token)
    clock.advance(31)
    taker = await mgr.acquire("k", owner="d", timeout=0)
    tokens.append(taker.token)
    assert tokens == sorted(set(tokens))
    await other.release()
    await taker.release()


async def test_statistics_and_wait_observer() -> None:
    waits: list[float] = []
    mgr = LockManager(on_wait=waits.append)
    holder = await mgr.acquire("k", owner="a")
    waiter = asyncio.create_task(mgr.acquire("k", owner="b"))
    await wait_until(lambda: mgr.waiting() == 1)
    await asyncio.sleep(0.02)
    await holder.release()
    lease = await waiter
    await lease.release()
    assert mgr.stats.acquisitions == 2 and len(waits) == 2
    assert waits[0] == 0.0 and waits[1] > 0
    assert mgr.stats.wait_seconds_sum == pytest.approx(sum(waits))
    assert dataclasses.asdict(mgr.stats) == {
        "acquisitions": 2, "timeouts": 0, "stale_cleared": 0, "release_requests": 0,
        "wait_seconds_sum": mgr.stats.wait_seconds_sum,
    }
    assert isinstance(mgr.stats, LockStats)


async def test_a_failing_wait_observer_does_not_break_the_hand_off() -> None:
    def broken(_: float) -> None:
        raise RuntimeError("metrics adapter bug")

    mgr = LockManager(on_wait=broken)
    holder = await mgr.acquire("k", owner="a")
    waiter = asyncio.create_task(mgr.acquire("k", owner="b", timeout=10))
    await wait_until(lambda: mgr.waiting() == 1)
    await holder.release()
    lease = await waiter
    assert lease.valid and mgr.stats.acquisitions == 2
    await lease.release()
    assert len(mgr) == 0


async def test_snapshot_reports_each_lock_and_the_totals() -> None:
    clock = FakeClock(100.0)
    mgr = LockManager(clock=clock, stale_after=30)
    assert mgr.snapshot() == {
        "locks": [],
        "totals": {
            "active": 0, "waiting": 0, "oldest_age_seconds": 0.0, "acquisitions": 0, "timeouts": 0,
            "stale_cleared": 0, "release_requests": 0, "wait_seconds_sum": 0.0,
        },
    }
    old = await mgr.acquire("b/old", owner="put-1")
    clock.advance(3)
    old.renew()
    clock.advance(2)
    young = await mgr.acquire("a/young", owner="put-2")
    w1 = asyncio.create_task(mgr.acquire("b/old", owner="w1", timeout=1000))
    await wait_until(lambda: mgr.waiting() == 1)
    w2 = asyncio.create_task(mgr.acquire("b/old", owner="w2", timeout=1000, request_release=True))
    await wait_until(lambda: mgr.waiting() == 2)
    clock.advance(1)

    snap = mgr.snapshot()
    json.dumps(snap)
    assert snap["locks"] == [
        {"key": "a/young", "owner": "put-2", "token": young.token, "age_seconds": 1.0,
         "since_renewal_seconds": 1.0, "waiters": 0, "release_requested": False, "stale": False},
        {"key": "b/old", "owner": "put-1", "token": old.token, "age_seconds": 6.0,
         "since_renewal_seconds": 3.0, "waiters": 2, "release_requested": True, "stale": False},
    ]
    assert snap["totals"] == {
        "active": 2, "waiting": 2, "oldest_age_seconds": 6.0, "acquisitions": 2, "timeouts": 0,
        "stale_cleared": 0, "release_requests": 1, "wait_seconds_sum": 0.0,
    }
    assert (mgr.stats.active(), mgr.stats.waiting(), mgr.stats.oldest_age()) == (2, 2, 6.0)

    await old.release()
    (await w1).renew()
    await young.release()
    lease1 = w1.result()
    await lease1.release()
    await (await w2).release()
    assert mgr.snapshot()["locks"] == [] and len(mgr) == 0


def test_lease_lost_and_lock_timeout_carry_key_and_details() -> None:
    lost = LeaseLost("k", 7)
    assert (lost.key, lost.token) == ("k", 7) and "7" in str(lost)
    timeout = LockTimeout("k", 1.5)
    assert (timeout.key, timeout.waited) == ("k", 1.5) and "'k'" in str(timeout)
    assert Lease("k", "o", 1, 0.0, 0.0).valid  # a detached lease is usable in other tests' fakes


def test_both_lockers_offer_the_writer_and_the_admin_view() -> None:
    from storage.backends.memory import MemoryBackend
    from storage.leases import StoreLockManager

    for locker in (LockManager(), StoreLockManager(MemoryBackend())):
        assert isinstance(locker, LockService), type(locker)
