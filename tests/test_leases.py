"""Store-backed leases (``storage.leases.StoreLockManager``): several "gateways" -- managers with
their own process-local state -- over one shared backend.

Covers exclusion across managers, hand-off on release, background renewal keeping a lease alive
past ``stale_after``, take-over of an expired lease, fencing of a frozen holder (its check, its
renewal and its commit all refused), in-process coalescing (one store lease request per key per
gateway), release requests across managers, statistics and the stack's choice of locker; lease
records removed on release (never a newer holder's) and swept when a crashed holder left them.
Real clocks with short limits; assertions are on outcomes, never on durations."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from storage import keys
from storage.backends.base import Backend, Blob, ObjectInfo
from storage.backends.memory import MemoryBackend
from storage.errors import ObjectNotFound
from storage.leases import StoreLease, StoreLockManager
from storage.locks import LeaseLost, LockManager, LockTimeout
from storage.objects import CommitAttempt, ObjectStore, StoreOptions
from storage.stack import StackOptions, build_locks

pytestmark = pytest.mark.timeout(60)

STALE = 0.6


class Freezable:
    """A view of a shared backend that can freeze (every call blocks) like a paused process or a
    partitioned gateway, and counts the calls it passes on."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.thawed = asyncio.Event()
        self.thawed.set()
        self.calls: list[tuple[str, str]] = []
        self.in_flight = 0
        self.peak_lease_in_flight = 0

    async def _gate(self, op: str, key: str) -> None:
        await self.thawed.wait()
        self.calls.append((op, key))

    async def _track(self, op: str, key: str, coro: Any) -> Any:
        try:
            await self._gate(op, key)
        except BaseException:
            coro.close()  # cancelled while frozen: the call never reached the store
            raise
        lease = key.startswith(keys.LEASE_PREFIX) and not key.endswith(".release")
        if lease:
            self.in_flight += 1
            self.peak_lease_in_flight = max(self.peak_lease_in_flight, self.in_flight)
        try:
            return await coro
        finally:
            if lease:
                self.in_flight -= 1

    async def put(self, key: str, data: bytes, **kw: Any) -> str:
        return await self._track("put", key, self.inner.put(key, data, **kw))

    async def get(self, key: str, **kw: Any) -> Blob:
        return await self._track("get", key, self.inner.get(key, **kw))

    async def head(self, key: str) -> ObjectInfo:
        return await self._track("head", key, self.inner.head(key))

    async def delete(self, key: str, **kw: Any) -> None:
        return await self._track("delete", key, self.inner.delete(key, **kw))

    def check_key(self, key: str) -> None:
        self.inner.check_key(key)

    async def list(self, prefix: str = "", *, start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        await self._gate("list", prefix)
        async for info in self.inner.list(prefix, start_after=start_after):
            yield info

    async def close(self) -> None:
        pass


def manager(backend: Backend, **kw: Any) -> StoreLockManager:
    kw.setdefault("stale_after", STALE)
    kw.setdefault("timeout", 5.0)
    return StoreLockManager(backend, **kw)


async def record_of(backend: Backend, key: str) -> dict[str, Any]:
    return json.loads((await backend.get(keys.lease_key(key))).data)


async def body(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_lease_record_carries_owner_token_and_expiry_and_is_deleted_on_release() -> None:
    store = MemoryBackend()
    a = manager(store, gateway="gw-a")
    lease = await a.acquire("videos/x.mp4", owner="put-1")
    rec = await record_of(store, "videos/x.mp4")
    assert (rec["owner"], rec["gateway"], rec["token"], rec["released"]) == ("put-1", "gw-a", lease.token, False)
    assert rec["expires"] > rec["renewed"]
    assert lease.valid
    await lease.release()
    assert [k async for k in store.list(keys.LEASE_PREFIX)] == []  # nothing left behind
    with pytest.raises(LeaseLost):
        lease.check()
    again = await a.acquire("videos/x.mp4", owner="put-2")
    assert again.token > lease.token  # tokens keep growing across removals (wall clock)
    await again.release()
    assert [k async for k in store.list(keys.LEASE_PREFIX)] == []


async def test_a_release_never_removes_the_record_of_whoever_took_the_lease_over() -> None:
    # Holder a stalls; b takes its expired lease over; a's release arrives late. Its delete is
    # conditional on a's own ETag, so b's record stays and b still excludes everyone else.
    shared = MemoryBackend()
    view = Freezable(shared)
    a, b, c = manager(view, gateway="a"), manager(shared, gateway="b"), manager(shared, gateway="c")
    lease_a = await a.acquire("k", owner="a")
    view.thawed.clear()
    lease_b = await b.acquire("k", owner="b", timeout=5)
    view.thawed.set()
    await lease_a.release()
    rec = await record_of(shared, "k")
    assert rec["gateway"] == "b" and rec["token"] == lease_b.token
    lease_b.check()
    with pytest.raises(LockTimeout):
        await c.acquire("k", owner="c", timeout=STALE / 2)
    await lease_b.release()
    assert [k async for k in shared.list(keys.LEASE_PREFIX)] == []
    lease_c = await c.acquire("k", owner="c", timeout=1)
    await lease_c.release()


async def test_records_left_by_a_crashed_holder_are_swept_once_stale_and_live_ones_stay() -> None:
    shared = MemoryBackend()
    view = Freezable(shared)
    dead, live, sweeper = manager(view, gateway="dead"), manager(shared, gateway="live"), manager(shared, gateway="s")
    await dead.acquire("crashed-key", owner="killed")
    view.thawed.clear()  # the process is gone: no renewal, no release ever reaches the store
    # A waiter that asked the dead holder to let go leaves a release request behind.
    with pytest.raises(LockTimeout):
        await live.acquire("crashed-key", owner="w", timeout=STALE / 4, request_release=True)
    held = await live.acquire("busy-key", owner="long-upload")
    assert await sweeper.sweep_records() == 0  # nothing is stale yet
    lkeys = {k.key async for k in shared.list(keys.LEASE_PREFIX)}
    assert keys.lease_key("crashed-key") in lkeys and keys.lease_key("crashed-key") + ".release" in lkeys
    for _ in range(40):
        await asyncio.sleep(STALE / 2)
        held.renew()
        await sweeper.sweep_records()
        if {k.key async for k in shared.list(keys.LEASE_PREFIX)} == {keys.lease_key("busy-key")}:
            break
    assert {k.key async for k in shared.list(keys.LEASE_PREFIX)} == {keys.lease_key("busy-key")}
    held.check()  # the live holder's record was never touched
    assert (await record_of(shared, "busy-key"))["gateway"] == "live"
    assert sweeper.stats.records_removed == 2
    assert sweeper.stats.takeovers == 1  # the crashed holder's lease (its release request is no lease)
    await held.release()
    assert [k async for k in shared.list(keys.LEASE_PREFIX)] == []


async def test_a_sweep_reads_only_lease_records_that_changed() -> None:
    shared = MemoryBackend()
    view = Freezable(shared)
    sweeper = manager(view, gateway="s", stale_after=60.0)
    owners = [manager(shared, gateway=f"g{i}", stale_after=60.0) for i in range(5)]
    leases = [await g.acquire(f"k{i}", owner="o") for i, g in enumerate(owners)]
    await sweeper.sweep_records()
    first = sum(1 for op, _ in view.calls if op == "get")
    view.calls.clear()
    await sweeper.sweep_records()
    assert first == 5 and sum(1 for op, _ in view.calls if op == "get") == 0
    for lease in leases:
        await lease.release()


async def test_without_conditional_deletes_a_release_only_marks_the_record() -> None:
    store = MemoryBackend()
    a = manager(store, gateway="a")
    a.conditional_deletes = False  # what storage.probe reports for such a store
    lease = await a.acquire("k", owner="o")
    await lease.release()
    assert (await record_of(store, "k"))["released"] is True
    assert await a.sweep_records() == 0
    again = await a.acquire("k", owner="o2", timeout=1)
    assert again.token == lease.token + 1
    await again.release()


async def test_a_second_gateway_waits_while_the_first_holds_and_renews() -> None:
    store = MemoryBackend()
    a, b = manager(store, gateway="a"), manager(store, gateway="b")
    lease = await a.acquire("k", owner="a1")
    # Held for several stale periods; the background renewal keeps it from looking stale.
    for _ in range(4):
        with pytest.raises(LockTimeout):
            await b.acquire("k", owner="b1", timeout=STALE / 2)
        lease.renew()  # the holder is alive (as an upload renewing as bytes arrive)
    lease.check()
    assert b.stats.takeovers == 0
    waiter = asyncio.ensure_future(b.acquire("k", owner="b1", timeout=5))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await lease.release()
    taken = await waiter
    assert taken.token > lease.token
    assert b.stats.timeouts == 4
    await taken.release()


async def test_frozen_holder_is_taken_over_and_everything_it_still_writes_is_refused() -> None:
    shared = MemoryBackend()
    frozen_view = Freezable(shared)
    a = manager(frozen_view, gateway="a")
    b = manager(shared, gateway="b")
    opts = StoreOptions(chunk_size=1024, grace_seconds=3600)
    store_a = ObjectStore(frozen_view, a, opts)
    store_b = ObjectStore(shared, b, opts)

    manifest_a = await store_a.put("obj", body(b"A" * 3000), content_type="text/plain")
    lease_a = await a.acquire("obj", owner="a-commit")
    frozen_view.thawed.clear()  # gateway a stops: no renewals reach the store

    lease_b = await b.acquire("obj", owner="b-commit", timeout=5)
    assert b.stats.takeovers == 1 and b.stats.stale_cleared == 1
    assert lease_b.token > lease_a.token
    with pytest.raises(LeaseLost):
        lease_a.check()  # its own deadline passed, even before it can hear from the store

    # b hands its lease on to its own writer, which commits a new version.
    await lease_b.release()
    manifest_b = await store_b.put("obj", body(b"B" * 2500), content_type="text/plain")
    assert (await store_b.head("obj")).version == manifest_b.version

    # a wakes up and tries to commit its old manifest under its old lease: refused.
    frozen_view.thawed.set()
    with pytest.raises(LeaseLost):
        await store_a.commit_record("obj", manifest_a, await store_a.record("obj"), lease_a, CommitAttempt())
    assert (await ObjectStore(shared, LockManager()).head("obj")).version == manifest_b.version
    await asyncio.sleep(STALE / 3 + 0.2)  # a's renewer has run: the store said no
    with pytest.raises(LeaseLost, match="taken over|expired"):
        lease_a.renew()
    await lease_a.release()  # must not release anything of b's
    lease_c = await b.acquire("obj", owner="b2", timeout=1)
    assert lease_c.token > lease_b.token
    await lease_c.release()


async def test_renewal_refused_by_the_store_marks_the_lease_lost() -> None:
    shared = MemoryBackend()
    view = Freezable(shared)
    a = manager(view, gateway="a")
    b = manager(shared, gateway="b")
    lease_a = await a.acquire("k", owner="a")
    view.thawed.clear()
    lease_b = await b.acquire("k", owner="b", timeout=5)
    view.thawed.set()
    for _ in range(50):
        await asyncio.sleep(0.05)
        if "taken over" in str(getattr(lease_a._slot, "lost", "")):
            break
    with pytest.raises(LeaseLost, match="taken over"):
        lease_a.check()
    lease_b.check()  # b's lease is untouched by a's failed renewal
    assert (await record_of(shared, "k"))["gateway"] == "b"
    await lease_b.release()


async def test_tasks_of_one_gateway_coalesce_into_one_store_request_at_a_time() -> None:
    shared = MemoryBackend()
    view = Freezable(shared)
    a = manager(view, gateway="a")
    inside = 0
    order: list[int] = []

    async def worker(n: int) -> None:
        nonlocal inside
        async with a.hold("k", owner=f"t{n}") as lease:
            inside += 1
            assert inside == 1
            order.append(n)
            await asyncio.sleep(0.002)
            lease.check()
            inside -= 1

    tasks = []
    for n in range(20):
        tasks.append(asyncio.ensure_future(worker(n)))
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == list(range(20))  # FIFO inside the gateway
    assert view.peak_lease_in_flight == 1
    assert a.stats.lease_conflicts == 0
    assert a.stats.acquisitions == 20
    assert len(a) == 0


async def test_three_gateways_never_hold_one_key_at_once() -> None:
    shared = MemoryBackend()
    gateways = [manager(shared, gateway=f"g{i}", max_poll=0.02) for i in range(3)]
    holders: list[str] = []
    peak = 0
    done = 0

    async def worker(g: StoreLockManager, n: int) -> None:
        nonlocal peak, done
        async with g.hold("hot", owner=f"{g.gateway}-{n}", timeout=20) as lease:
            holders.append(lease.owner)
            peak = max(peak, len(holders))
            await asyncio.sleep(0.003)
            lease.check()
            holders.remove(lease.owner)
            done += 1

    await asyncio.gather(*(worker(g, n) for g in gateways for n in range(8)))
    assert peak == 1 and done == 24
    assert [k async for k in shared.list(keys.LEASE_PREFIX)] == []  # every record removed on release
    assert sum(g.stats.takeovers for g in gateways) == 0


async def test_cancelled_waiter_leaves_the_key_free() -> None:
    shared = MemoryBackend()
    a, b = manager(shared, gateway="a"), manager(shared, gateway="b")
    lease = await a.acquire("k", owner="a")
    waiter = asyncio.ensure_future(b.acquire("k", owner="b", timeout=5))
    await asyncio.sleep(0.05)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await lease.release()
    again = await b.acquire("k", owner="b2", timeout=1)
    assert len(b) == 1
    await again.release()
    assert len(a) == 0 and len(b) == 0


async def test_waiter_on_another_gateway_can_ask_the_holder_to_release() -> None:
    shared = MemoryBackend()
    a, b = manager(shared, gateway="a"), manager(shared, gateway="b")
    lease = await a.acquire("upload:1", owner="stalled-patch")

    async def holder() -> None:
        while not lease.release_requested.is_set():
            lease.renew()
            await asyncio.sleep(0.02)
        await lease.release()

    task = asyncio.ensure_future(holder())
    taken = await b.acquire("upload:1", owner="new-patch", timeout=10, request_release=True)
    await task
    assert b.stats.release_requests == 1
    assert b.stats.takeovers == 0  # it was handed over, not taken from a dead holder
    await taken.release()


async def test_holder_that_stops_renewing_is_let_go_for_other_gateways() -> None:
    shared = MemoryBackend()
    a, b = manager(shared, gateway="a"), manager(shared, gateway="b")
    lease = await a.acquire("k", owner="hung-task")  # never renews, never releases
    taken = await b.acquire("k", owner="b", timeout=10)
    assert b.stats.takeovers == 1
    with pytest.raises(LeaseLost):
        lease.check()
    await taken.release()
    await lease.release()


async def test_commits_from_two_gateways_serialize_and_the_store_keeps_the_last() -> None:
    shared = MemoryBackend()
    opts = StoreOptions(chunk_size=1024, grace_seconds=3600)
    stores = [ObjectStore(shared, manager(shared, gateway=f"g{i}", max_poll=0.02), opts) for i in range(2)]
    results = await asyncio.gather(
        *(stores[i % 2].put("same", body(bytes([i]) * 1500), content_type="x/y") for i in range(10))
    )
    final = await ObjectStore(shared, LockManager()).head("same")
    assert final.version in {m.version for m in results}
    assert sum(s.stats.objects_committed for s in stores) == 10
    with pytest.raises(ObjectNotFound):
        await stores[0].head("other")


async def test_snapshot_and_stats_report_store_details() -> None:
    shared = MemoryBackend()
    a = manager(shared, gateway="gw")
    lease = await a.acquire("k", owner="o")
    snap = a.snapshot()
    assert snap["mode"] == "store" and snap["gateway"] == "gw"
    (entry,) = snap["locks"]
    assert entry["key"] == "k" and entry["owner"] == "o" and entry["store_token"] == lease.token
    assert {"lease_conflicts", "takeovers", "acquisitions"} <= set(snap["totals"])
    assert a.stats.active() == 1
    await lease.release()
    assert a.stats.active() == 0 and a.stats.acquisitions == 1
    assert isinstance(lease, StoreLease)


@pytest.mark.parametrize(
    ("store", "locks", "expected"),
    [
        ("s3://bucket", "auto", StoreLockManager),
        ("S3://bucket/prefix", "auto", StoreLockManager),
        ("./data", "auto", LockManager),
        ("file:///tmp/x", "auto", LockManager),
        ("./data", "store", StoreLockManager),
        ("s3://bucket", "local", LockManager),
    ],
)
def test_stack_chooses_the_locker(store: str, locks: str, expected: type) -> None:
    chosen = build_locks(StackOptions(store=store, locks=locks), MemoryBackend())
    assert type(chosen) is expected


def test_store_locks_bypass_the_limiter() -> None:
    from storage.backends.limited import LimitedBackend

    raw = MemoryBackend()
    limited = LimitedBackend(raw, max_concurrency=1)
    chosen = build_locks(StackOptions(store="s3://b", locks="auto"), limited)
    assert chosen.backend.inner is raw  # under the limiter, only the store deadline over it
