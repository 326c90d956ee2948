"""storage.outbox: post-* events recorded with their commits are delivered at least once, in
commit order per key, and the outbox empties.

Commits are the real ones: ``ObjectStore.put(event=...)`` / ``ObjectStore.delete(event=...)``
over a real backend (memory; an fs directory where a crash and a second process are played), so
the events, the pointers and the records are what ``storage.manifests`` writes. The processor
uses real locks (in-process, or store leases for two gateways). Deliveries go to a real hook
receiver through the gateway's real hook client where the HTTP side matters, and to plain
callables where a test needs to stop a delivery at an exact point. The end-to-end tests with real
gateway processes are in tests/test_hooks_delivery.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest

from gateway.hooks import HookClient, delivered
from storage import keys
from storage.backends.base import Backend, PermanentError
from storage.backends.fs import FsBackend
from storage.backends.memory import MemoryBackend
from storage.errors import StoreFailed
from storage.gc import collect
from storage.leases import StoreLockManager
from storage.locks import LockManager
from storage.manifests import Outcome as CommitOutcome
from storage.objects import ObjectStore, StoreOptions
from storage.outbox import (
    Outbox,
    OutboxOptions,
    Pointer,
    Verdict,
    backoff_delay,
    delivery_lock,
    event_time,
    judge_pointer,
    parse_pointer,
    parse_pointer_name,
)
from tests.support.hooks import HookReceiver

pytestmark = pytest.mark.timeout(60)

FAST = OutboxOptions(interval=0.05, takeover_after=0.0, horizon=3600.0, retry_base=0.01, retry_cap=0.05)
POST_FINISH = {"type": "post-finish", "metadata": {}}


def pointer_doc(key: Any, event: Any, replaces: Any = None) -> bytes:
    return json.dumps({"key": key, "event": event, "replaces": replaces}).encode()


# ------------------------------------------------------------------------------ pure parts
@pytest.mark.parametrize(
    "name,body,ok",
    [
        ("o/0000000000001-ev", pointer_doc("k", "ev"), True),
        ("o/0000000000001-ev", pointer_doc("k", "ev", '"etag"'), True),
        ("o/0000000000001-ev", pointer_doc("k", "other"), False),  # body names another event
        ("o/0000000000001-ev", b"not json", False),
        ("o/0000000000001-ev", pointer_doc(1, "ev"), False),
        ("o/0000000000001-ev", pointer_doc("k", "ev", 7), False),
        ("o/1-ev", pointer_doc("k", "ev"), False),  # not 13 hex digits
        ("m/0000000000001-ev", pointer_doc("k", "ev"), False),
    ],
)
def test_parse_pointer(name: str, body: bytes, ok: bool) -> None:
    pointer = parse_pointer(name, body)
    assert (pointer is not None) == ok
    if pointer is not None:
        assert pointer.key == "k" and pointer.event_id == "ev" and pointer.written == 0.001


P = Pointer("o/x", written=100.0, event_id="e", key="k", replaces='"r0"')
P_CREATE = Pointer("o/y", written=100.0, event_id="e", key="k", replaces=None)


@pytest.mark.parametrize(
    "pointer,pending,etag,now,verdict",
    [
        (P, {"e"}, '"r1"', 101.0, Verdict.KEEP),  # committed, not delivered yet
        (P, {"e"}, '"r1"', 99999.0, Verdict.KEEP),  # pending events are never dropped, however old
        (P, set(), '"r1"', 101.0, Verdict.DONE),  # delivered (or lost to another commit)
        (P, set(), None, 101.0, Verdict.DONE),  # the record it would replace is gone
        (P, set(), '"r0"', 101.0, Verdict.KEEP),  # its commit may still be in flight
        (P, set(), '"r0"', 100.0 + 3601, Verdict.EXPIRED),  # ...for longer than the horizon
        (P_CREATE, set(), None, 101.0, Verdict.KEEP),  # a create still in flight
        (P_CREATE, set(), '"r1"', 101.0, Verdict.DONE),  # the key exists now, and not with this event
        (P_CREATE, set(), None, 100.0 + 3601, Verdict.EXPIRED),
    ],
)
def test_judge_pointer(pointer: Pointer, pending: set[str], etag: str | None, now: float, verdict: Verdict) -> None:
    assert judge_pointer(pointer, pending=pending, record_etag=etag, now=now, horizon=3600.0) is verdict


@pytest.mark.parametrize(
    "attempt,rand,expected",
    [(1, 0.999999, 0.5), (2, 0.999999, 1.0), (3, 0.5, 1.0), (8, 0.999999, 60.0), (500, 0.999999, 60.0), (5, 0.0, 0.0)],
)
def test_backoff_is_exponential_capped_and_fully_jittered(attempt: int, rand: float, expected: float) -> None:
    assert backoff_delay(attempt, base=0.5, cap=60.0, rand=lambda: rand) == pytest.approx(expected, rel=1e-5)


def test_delivery_lock_never_names_an_object_keys_lock() -> None:
    with pytest.raises(keys.BadKey):
        keys.validate_key(delivery_lock("videos/a.mp4"))


# ------------------------------------------------------------------------------ the commit side, for real
def make_store(backend: Backend, locks: Any = None, *, clock: Callable[[], float] | None = None) -> ObjectStore:
    options = StoreOptions(chunk_size=64 * 1024, cache_bytes=1 << 20, grace_seconds=3600)
    extra = {"clock": clock} if clock is not None else {}
    locks = locks if locks is not None else LockManager(stale_after=5, timeout=5)  # an idle Locker is falsy (len 0)
    return ObjectStore(backend, locks, options, **extra)


async def body(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def put(store: ObjectStore, key: str, size: int = 100) -> dict[str, Any]:
    """PUT ``key`` announcing post-finish; the event the commit recorded (as the record holds it)."""
    manifest = await store.put(key, body(os.urandom(size)), content_type="video/mp4", event=POST_FINISH)
    return {"type": "post-finish", "version": manifest.version, "size": size, "etag": manifest.etag}


async def delete(store: ObjectStore, key: str) -> dict[str, Any]:
    version = (await store.head(key, fresh=True)).version
    await store.delete(key, event={})
    return {"type": "post-delete", "version": version}


def signature(event: dict[str, Any]) -> tuple[str, str]:
    return event["type"], event["version"]


async def pointers(backend: Backend) -> list[str]:
    return [info.key async for info in backend.list(keys.OUTBOX_PREFIX)]


async def until(predicate: Any, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.02)


async def outbox_empty(store: ObjectStore) -> bool:
    """No pointer, and no record (manifest or tombstone) carrying an event."""
    if await pointers(store.backend):
        return False
    async for key in store.manifests.scan():
        current = await store.manifests.read(key)
        if current is not None and current.events:
            return False
    return True


def by_key(events: list[dict[str, Any]]) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for e in events:
        out.setdefault(e["key"], []).append(signature(e))
    return out


async def test_what_a_commit_writes_is_what_the_outbox_reads() -> None:
    """The writer (storage.manifests) and the reader (storage.outbox) agree on the pointer: its
    name parses, it names the key and the event the record carries, and the event has API.md's fields."""
    store = make_store(MemoryBackend())
    committed = await put(store, "v/a.mp4")
    (name,) = await pointers(store.backend)
    pointer = parse_pointer(name, (await store.backend.get(name)).data)
    record = await store.manifests.read("v/a.mp4")
    assert pointer is not None and record is not None
    (event,) = record.events
    assert pointer.key == "v/a.mp4" and pointer.event_id == event["id"] and pointer.replaces is None
    assert set(event) == {"id", "type", "time", "key", "size", "etag", "version", "content_type", "upload_id", "metadata"}
    assert signature(event) == signature(committed) and event["upload_id"] is None and event["metadata"] == {}
    assert event_time(event) == pytest.approx(parse_pointer_name(name)[0], abs=1.5)  # type: ignore[index]


# ------------------------------------------------------------------------------ behaviour
async def test_events_arrive_in_commit_order_per_key_and_the_outbox_empties() -> None:
    store = make_store(MemoryBackend())
    committed: dict[str, list[tuple[str, str]]] = {}
    async with HookReceiver() as receiver:
        hooks = HookClient(receiver.url, timeout=2)
        outbox = Outbox(store.backend, store.manifests, store.locks, lambda e: delivered(hooks, e), options=FAST)
        await outbox.start()
        try:
            for round_ in range(4):
                for k in range(5):
                    key = f"v/{k}.mp4"
                    if round_ % 2:
                        store.on_committed = outbox.kick  # kicks deliver at once; passes find the rest
                    event = await (delete(store, key) if round_ == 2 and k % 2 else put(store, key))
                    committed.setdefault(key, []).append(signature(event))
                    store.on_committed = None
            await until(lambda: outbox_empty(store))
        finally:
            await outbox.close()
            await hooks.close()
    assert by_key(receiver.accepted) == committed  # each exactly once here, in commit order
    assert outbox.oldest_age() == 0 and outbox.pending() == 0
    assert hooks.stats.deliveries[("post-finish", "ok")] == 18 and hooks.stats.deliveries[("post-delete", "ok")] == 2


async def test_a_create_then_a_delete_empty_the_outbox_and_leave_the_tombstone_to_gc() -> None:
    """create, then delete, both delivered at once by kicks: every pointer goes (the create's,
    which names "no record" as the one it replaces, is judged against the tombstone), and the
    tombstone stays, without events, for gc: the outbox never removes a record (an upload that
    recorded "no record" as what it replaces must not find "no record" again, storage.manifests)."""
    store = make_store(MemoryBackend())
    async with HookReceiver() as receiver:
        hooks = HookClient(receiver.url, timeout=2)
        outbox = Outbox(store.backend, store.manifests, store.locks, lambda e: delivered(hooks, e), options=FAST)
        store.on_committed = outbox.kick
        await outbox.start()
        try:
            created = await put(store, "gone.mp4")
            await until(lambda: asyncio.sleep(0, len(receiver.accepted) == 1))
            deleted = await delete(store, "gone.mp4")
            await until(lambda: outbox_empty(store))
        finally:
            await outbox.close()
            await hooks.close()
    assert [signature(e) for e in receiver.accepted] == [signature(created), signature(deleted)]
    assert outbox.stats.pointers_expired == 0 and outbox.stats.pointers_done == 2
    tombstone = await store.manifests.read("gone.mp4")
    assert tombstone is not None and tombstone.manifest is None and tombstone.events == ()
    await collect(store.backend, grace=0.0)  # gc takes it once its events are delivered
    assert await store.manifests.read("gone.mp4") is None


class PausesPointerDeletes(MemoryBackend):
    """A store where deleting an outbox pointer takes until the test says so: the moment after a
    drain's last read of the record, when a new commit of the key can still land unseen by it."""

    def __init__(self) -> None:
        super().__init__()
        self.deleting = asyncio.Event()
        self.go_on = asyncio.Event()

    async def delete(self, key: str, **kw: Any) -> None:
        if key.startswith(keys.OUTBOX_PREFIX):
            self.deleting.set()
            await self.go_on.wait()
        await super().delete(key, **kw)


async def test_a_commit_landing_while_its_key_is_being_drained_is_delivered_at_once() -> None:
    """A kick while the key's drain runs is not lost: the drain looks again when it ends (there
    are no more passes here to find the event later)."""
    backend = PausesPointerDeletes()
    store = make_store(backend)
    seen: list[tuple[str, str]] = []

    async def deliver(event: Any) -> bool:
        seen.append(signature(event))
        return True

    outbox = Outbox(backend, store.manifests, store.locks, deliver,
                    options=OutboxOptions(interval=3600, takeover_after=0, retry_base=0.01, retry_cap=0.05))
    first = await put(store, "k")
    sweeping = asyncio.ensure_future(outbox.run_pass())  # delivers the first, then deletes its pointer
    await asyncio.wait_for(backend.deleting.wait(), 10)
    store.on_committed = outbox.kick
    second = await put(store, "k")  # lands after the drain's last read of the record
    backend.go_on.set()
    try:
        await sweeping
        await until(lambda: asyncio.sleep(0, len(seen) == 2))
    finally:
        await outbox.close()
    assert seen == [signature(first), signature(second)]


async def test_an_application_that_fails_is_retried_with_backoff_until_it_answers_2xx() -> None:
    store = make_store(MemoryBackend())
    answers = iter([503, 500, 404, 503] + [204] * 100)  # a 4xx is retried too: the app must hear of every commit
    async with HookReceiver(lambda e: (next(answers), "")) as receiver:
        hooks = HookClient(receiver.url, timeout=2)
        outbox = Outbox(store.backend, store.manifests, store.locks, lambda e: delivered(hooks, e), options=FAST)
        store.on_committed = outbox.kick
        await outbox.start()
        try:
            await put(store, "a")
            await until(lambda: outbox_empty(store))
        finally:
            await outbox.close()
            await hooks.close()
    (event_id,) = {e["id"] for e in receiver.events}  # the same id every time
    assert len(receiver.events) == 5 and [e["id"] for e in receiver.accepted] == [event_id]
    assert outbox.stats.failed_attempts == 4
    assert hooks.stats.deliveries[("post-finish", "error")] == 3 and hooks.stats.deliveries[("post-finish", "refused")] == 1


async def test_while_the_application_is_down_the_oldest_age_grows_and_nothing_is_removed() -> None:
    now = [1_000_000.0]
    store = make_store(MemoryBackend(), clock=lambda: now[0])
    receiver = HookReceiver()
    await receiver.start()
    await receiver.stop()  # the port is known, nothing listens
    hooks = HookClient(receiver.url, timeout=1)
    outbox = Outbox(store.backend, store.manifests, store.locks, lambda e: delivered(hooks, e), options=FAST,
                    clock=lambda: now[0])
    try:
        first = await put(store, "a")
        now[0] += 5
        await put(store, "b")
        now[0] += 55
        await outbox.run_pass()
        assert outbox.oldest_age() == pytest.approx(60, abs=0.01)
        assert outbox.pending() == 2
        now[0] += 240
        await outbox.run_pass()
        assert outbox.oldest_age() == pytest.approx(300, abs=0.01)
        record = await store.manifests.read("a")
        assert record is not None and [signature(e) for e in record.events] == [signature(first)]
        assert len(await pointers(store.backend)) == 2
        await receiver.start()  # the application is back
        await outbox.start()
        await until(lambda: outbox_empty(store))
        assert outbox.oldest_age() == 0
    finally:
        await outbox.close()
        await hooks.close()
        await receiver.stop()
    assert sorted(e["key"] for e in receiver.accepted) == ["a", "b"]


async def test_a_crash_after_a_delivery_redelivers_only_the_event_in_flight(tmp_path: Path) -> None:
    store = make_store(FsBackend(tmp_path / "store"))
    seen: list[tuple[str, str]] = []
    reached = asyncio.Event()

    async def dies_after_the_second(event: Any) -> bool:
        seen.append(signature(event))
        if len(seen) == 2:
            reached.set()
            await asyncio.Event().wait()  # the POST got through; the gateway dies before it hears back
        return True

    events = [signature(await put(store, "k")) for _ in range(4)]
    first = Outbox(store.backend, store.manifests, store.locks, dies_after_the_second, options=FAST)
    first.kick("k")
    await asyncio.wait_for(reached.wait(), 10)
    await first.close()  # the process is gone; a new one starts over the same store

    async def fine(event: Any) -> bool:
        seen.append(signature(event))
        return True

    again = make_store(FsBackend(tmp_path / "store"))
    second = Outbox(again.backend, again.manifests, again.locks, fine, options=FAST)
    await second.start()
    try:
        await until(lambda: outbox_empty(again))
    finally:
        await second.close()
    assert seen == [events[0], events[1], events[1], events[2], events[3]]  # one redelivery, same id, order kept


class RefusesRecordWrites(MemoryBackend):
    """A store that accepts everything but writes of manifest records while ``refusing`` is set:
    the commit's pointer is written and its record write never happens (as when the gateway died
    between the two)."""

    refusing = False

    async def put(self, key: str, data: bytes, **kw: Any) -> str:
        if self.refusing and key.startswith(keys.MANIFEST_PREFIX):
            raise PermanentError("refused")
        return await super().put(key, data, **kw)


async def test_a_pointer_whose_commit_never_landed_delivers_nothing_and_expires(caplog: pytest.LogCaptureFixture) -> None:
    now = [2_000_000.0]
    backend = RefusesRecordWrites()
    store = make_store(backend, clock=lambda: now[0])
    delivered_: list[Any] = []

    async def deliver(event: Any) -> bool:
        delivered_.append(event)
        return True

    outbox = Outbox(backend, store.manifests, store.locks, deliver, options=FAST, clock=lambda: now[0])
    backend.refusing = True
    with pytest.raises(StoreFailed):
        await put(store, "a")
    assert await store.manifests.read("a") is None
    await outbox.run_pass()
    assert len(await pointers(backend)) == 1  # its commit might still land, as far as anyone can tell
    assert outbox.pending() == 0 and outbox.oldest_age() == 0  # but nothing is known to be undelivered
    now[0] += 3601
    with caplog.at_level(logging.WARNING, logger="chunkgate.outbox"):
        await outbox.run_pass()
    assert await pointers(backend) == []
    assert "dropping outbox pointer" in caplog.text
    assert delivered_ == [] and outbox.stats.pointers_expired == 1
    await outbox.close()


async def test_a_pointer_whose_commit_lost_to_another_is_deleted_without_a_delivery() -> None:
    store = make_store(MemoryBackend())
    seen: list[str] = []

    async def deliver(event: Any) -> bool:
        seen.append(event["version"])
        return True

    winner = await put(store, "a")
    record = await store.manifests.read("a")
    assert record is not None and record.manifest is not None
    # A second writer read the state before the winner (no record), wrote its pointer, and then
    # lost its conditional write: its pointer names `replaces: null` while the key exists.
    loser = store.announcement(POST_FINISH, record.manifest)
    result = await store.manifests.commit("a", record.manifest, None, events=[loser])
    assert result.outcome is CommitOutcome.LOST
    assert len(await pointers(store.backend)) == 2
    outbox = Outbox(store.backend, store.manifests, store.locks, deliver, options=FAST)
    await outbox.run_pass()
    assert seen == [winner["version"]]  # the winner's event once; nothing for the loser
    assert await pointers(store.backend) == []
    await outbox.close()


async def test_two_gateways_over_one_store_deliver_a_keys_events_one_at_a_time_in_order() -> None:
    backend = MemoryBackend()
    in_flight: set[str] = set()
    overlaps: list[str] = []
    seen: list[dict[str, Any]] = []

    async def deliver(event: Any) -> bool:
        if event["key"] in in_flight:
            overlaps.append(event["key"])  # two deliveries of one key's events at once
        in_flight.add(event["key"])
        try:
            await asyncio.sleep(0.005)
            seen.append(event)
            return True
        finally:
            in_flight.discard(event["key"])

    stores = [make_store(backend, StoreLockManager(backend, stale_after=5, gateway=f"gw{i}")) for i in range(2)]
    gateways = [Outbox(backend, s.manifests, s.locks, deliver, options=FAST, owner=f"outbox-gw{i}")
                for i, s in enumerate(stores)]
    committed: dict[str, list[tuple[str, str]]] = {}
    for store, gw in zip(stores, gateways):
        store.on_committed = gw.kick
        await gw.start()
    try:
        for n in range(30):
            key = f"k{n % 3}"
            committed.setdefault(key, []).append(signature(await put(stores[n % 2], key)))
        await until(lambda: outbox_empty(stores[0]))
    finally:
        for gw in gateways:
            await gw.close()
        for store in stores:
            await store.locks.close()
    assert overlaps == []
    for key, sigs in committed.items():
        got = [signature(e) for e in seen if e["key"] == key]
        positions = [sigs.index(s) for s in got]
        assert positions == sorted(positions), (key, positions)  # never backwards
        assert set(got) == set(sigs)
    assert sum(gw.stats.delivered for gw in gateways) == len(seen)
