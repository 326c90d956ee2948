"""storage.outbox: post-* events recorded with their commits are delivered at least once, in
commit order per key, and the outbox empties.

The processor runs over a real backend (memory, and an fs directory for the crash test) and real
locks. Commits follow the agreed protocol — pointer first, then the conditional write of the
record with the event appended — through ``JsonRecords`` below, a small stand-in for the commit
component's event half (``storage.manifests`` on main supersedes it; the end-to-end tests in
tests/test_hooks_delivery.py use the real gateway). Deliveries go to a real hook receiver through
the gateway's real hook client where the HTTP side matters, and to plain callables where a test
needs to stop a delivery at an exact point.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

import pytest

from gateway.hooks import HookClient, Outcome
from storage.backends.base import Backend, NotFound, PreconditionFailed
from storage.backends.fs import FsBackend
from storage.backends.memory import MemoryBackend
from storage.leases import StoreLockManager
from storage.locks import LockManager
from storage.outbox import (
    POINTER_PREFIX,
    Outbox,
    OutboxOptions,
    Pointer,
    Verdict,
    backoff_delay,
    delivery_lock,
    event_time,
    judge_pointer,
    metadata_map,
    parse_pointer,
    parse_pointer_name,
    pointer_body,
    pointer_key,
    post_delete_event,
    post_finish_event,
)
from tests.support.hooks import HookReceiver

pytestmark = pytest.mark.timeout(60)

FAST = OutboxOptions(interval=0.05, takeover_after=0.0, horizon=3600.0, retry_base=0.01, retry_cap=0.05)


# ------------------------------------------------------------------------------ pure parts
def test_pointer_names_carry_time_and_event_id() -> None:
    name = pointer_key("e1f2", 1_764_000_000.123)
    assert name == "o/" + format(1_764_000_000_123, "013x") + "-e1f2"
    assert parse_pointer_name(name) == (1_764_000_000.123, "e1f2")
    assert sorted([pointer_key("b", 2.0), pointer_key("a", 10.0)]) == [pointer_key("b", 2.0), pointer_key("a", 10.0)]


@pytest.mark.parametrize(
    "name,body,ok",
    [
        ("o/0000000000001-ev", pointer_body("k", "ev", None), True),
        ("o/0000000000001-ev", pointer_body("k", "ev", '"etag"'), True),
        ("o/0000000000001-ev", pointer_body("k", "other", None), False),  # body names another event
        ("o/0000000000001-ev", b"not json", False),
        ("o/0000000000001-ev", json.dumps({"key": 1, "event": "ev"}).encode(), False),
        ("o/1-ev", pointer_body("k", "ev", None), False),  # not 13 hex digits
        ("m/0000000000001-ev", pointer_body("k", "ev", None), False),
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


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("key dmlkZW9zL2EubXA0,filetype dmlkZW8vbXA0", {"key": "videos/a.mp4", "filetype": "video/mp4"}),
        ("key dmlkZW9zL2EubXA0,is_private", {"key": "videos/a.mp4", "is_private": ""}),
        ("name w6l0w6k=", {"name": "été"}),
        ("", {}),
        (None, {}),
    ],
)
def test_metadata_map_is_the_tus_metadata_as_strings(raw: str | None, expected: dict[str, str]) -> None:
    assert metadata_map(raw) == expected


def test_post_events_have_the_api_fields() -> None:
    put = post_finish_event(key="v/a.mp4", size=10, etag='"e"', version="v1", content_type="video/mp4")
    assert set(put) == {"id", "type", "time", "key", "size", "etag", "version", "content_type", "upload_id", "metadata"}
    assert put["type"] == "post-finish" and put["upload_id"] is None and put["metadata"] == {}
    assert put["time"].endswith("Z") and event_time(put) is not None
    tus = post_finish_event(key="v/a.mp4", size=10, etag='"e"', version="v1", content_type="video/mp4",
                            upload_id="u" * 32, metadata={"key": "v/a.mp4"})
    assert tus["upload_id"] == "u" * 32 and tus["metadata"] == {"key": "v/a.mp4"} and tus["id"] != put["id"]
    deleted = post_delete_event(key="v/a.mp4", version="v1")
    assert set(deleted) == {"id", "type", "time", "key", "version"} and deleted["type"] == "post-delete"
    assert parse_pointer_name(pointer_key(put["id"], 1.0)) == (1.0, put["id"])  # ids fit pointer names


def test_delivery_lock_never_names_an_object_keys_lock() -> None:
    from storage.keys import BadKey, validate_key

    with pytest.raises(BadKey):
        validate_key(delivery_lock("videos/a.mp4"))


# ------------------------------------------------------------------------------ the commit side, as agreed
@dataclass(frozen=True)
class Current:
    key: str
    etag: str
    events: tuple[dict[str, Any], ...]
    version: str
    manifest: Any = "a manifest"  # the outbox only asks whether it is a tombstone (None)


class JsonRecords:
    """Records ``m/<key>`` = {"version", "events"} on a real backend, committed the agreed way."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.committed: dict[str, list[str]] = {}  # key -> event ids in commit order

    async def read(self, key: str) -> Current | None:
        try:
            blob = await self.backend.get(f"m/{key}")
        except NotFound:
            return None
        doc = json.loads(blob.data)
        return Current(key, blob.etag, tuple(doc["events"]), doc["version"])

    async def set_events(self, expected: Current, events: Sequence[dict[str, Any]]) -> str:
        doc = {"version": expected.version, "events": list(events)}
        try:
            await self.backend.put(f"m/{expected.key}", json.dumps(doc).encode(), if_match=expected.etag)
        except PreconditionFailed:
            return "lost"
        return "committed"

    async def remove_tombstone(self, current: Current) -> bool:
        return False  # no deletes here

    async def commit(self, key: str, *, land: bool = True, clock: float | None = None) -> dict[str, Any]:
        """A post-finish commit: pointer first, then the conditional write (skipped with
        ``land=False``: a crash between the two)."""
        import time

        while True:
            current = await self.read(key)
            version = uuid.uuid4().hex
            event = {"id": uuid.uuid4().hex, "type": "post-finish", "key": key, "version": version,
                     "time": "2026-12-01T10:00:00.000Z"}
            await self.backend.put(pointer_key(event["id"], clock or time.time()),
                                   pointer_body(key, event["id"], current.etag if current else None), if_none_match=True)
            if not land:
                return event
            doc = {"version": version, "events": [*(current.events if current else ()), event]}
            try:
                if current is None:
                    await self.backend.put(f"m/{key}", json.dumps(doc).encode(), if_none_match=True)
                else:
                    await self.backend.put(f"m/{key}", json.dumps(doc).encode(), if_match=current.etag)
            except PreconditionFailed:
                continue  # another commit won: this attempt's pointer is now undecidable-then-done
            self.committed.setdefault(key, []).append(event["id"])
            return event


async def pointers(backend: Backend) -> list[str]:
    return [info.key async for info in backend.list(POINTER_PREFIX)]


async def until(predicate: Any, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.02)


def by_key(events: list[dict[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in events:
        out.setdefault(e["key"], []).append(e["id"])
    return out


async def outbox_empty(backend: Backend, records: JsonRecords) -> bool:
    if await pointers(backend):
        return False
    for key in records.committed:
        cur = await records.read(key)
        if cur is not None and cur.events:
            return False
    return True


# ------------------------------------------------------------------------------ behaviour
async def test_events_arrive_in_commit_order_per_key_and_the_outbox_empties() -> None:
    backend = MemoryBackend()
    records = JsonRecords(backend)
    async with HookReceiver() as receiver:
        hooks = HookClient(receiver.url, timeout=2)
        outbox = Outbox(backend, records, LockManager(), lambda e: _ok(hooks, e), options=FAST)
        await outbox.start()
        try:
            for round_ in range(4):
                for k in range(5):
                    await records.commit(f"v/{k}.mp4")
                    if round_ % 2:
                        outbox.kick(f"v/{k}.mp4")  # a kick delivers at once; the passes find the rest
            await until(lambda: outbox_empty(backend, records))
        finally:
            await outbox.close()
            await hooks.close()
    assert by_key(receiver.accepted) == records.committed  # each exactly once here, in commit order
    assert outbox.oldest_age() == 0 and outbox.pending() == 0
    assert hooks.stats.deliveries[("post-finish", "ok")] == 20


async def _ok(hooks: HookClient, event: Any) -> bool:
    return (await hooks.deliver(event)) is Outcome.OK


async def test_an_application_that_fails_is_retried_with_backoff_until_it_answers_2xx() -> None:
    backend = MemoryBackend()
    records = JsonRecords(backend)
    answers = iter([503, 500, 404, 503] + [204] * 100)  # a 4xx is retried too: the app must hear of every commit
    async with HookReceiver(lambda e: (next(answers), "")) as receiver:
        hooks = HookClient(receiver.url, timeout=2)
        outbox = Outbox(backend, records, LockManager(), lambda e: _ok(hooks, e), options=FAST)
        await outbox.start()
        try:
            event = await records.commit("a")
            outbox.kick("a")
            await until(lambda: outbox_empty(backend, records))
        finally:
            await outbox.close()
            await hooks.close()
    assert [e["id"] for e in receiver.events] == [event["id"]] * 5  # the same id every time
    assert [e["id"] for e in receiver.accepted] == [event["id"]]
    assert outbox.stats.failed_attempts == 4
    assert hooks.stats.deliveries[("post-finish", "error")] == 3 and hooks.stats.deliveries[("post-finish", "refused")] == 1


async def test_while_the_application_is_down_the_oldest_age_grows_and_nothing_is_removed() -> None:
    backend = MemoryBackend()
    records = JsonRecords(backend)
    now = [1_000_000.0]
    receiver = HookReceiver()
    await receiver.start()
    await receiver.stop()  # the port is known, nothing listens
    hooks = HookClient(receiver.url, timeout=1)
    outbox = Outbox(backend, records, LockManager(), lambda e: _ok(hooks, e), options=FAST, clock=lambda: now[0])
    try:
        first = await records.commit("a", clock=now[0])
        await records.commit("b", clock=now[0] + 5)
        now[0] += 60
        await outbox.run_pass()
        assert outbox.oldest_age() == pytest.approx(60, abs=0.01)
        assert outbox.pending() == 2
        now[0] += 240
        await outbox.run_pass()
        assert outbox.oldest_age() == pytest.approx(300, abs=0.01)
        assert [e["id"] for e in (await records.read("a")).events] == [first["id"]]  # type: ignore[union-attr]
        assert len(await pointers(backend)) == 2
        await receiver.start()  # the application is back
        await outbox.start()
        await until(lambda: outbox_empty(backend, records))
        assert outbox.oldest_age() == 0
    finally:
        await outbox.close()
        await hooks.close()
        await receiver.stop()
    assert sorted(e["key"] for e in receiver.accepted) == ["a", "b"]


async def test_a_crash_after_a_delivery_redelivers_only_the_event_in_flight(tmp_path: Any) -> None:
    backend = FsBackend(tmp_path / "store")
    records = JsonRecords(backend)
    seen: list[str] = []
    reached = asyncio.Event()

    async def dies_after_the_second(event: Any) -> bool:
        seen.append(event["id"])
        if len(seen) == 2:
            reached.set()
            await asyncio.Event().wait()  # the POST got through; the gateway dies before it hears back
        return True

    events = [await records.commit("k") for _ in range(4)]
    first = Outbox(backend, records, LockManager(), dies_after_the_second, options=FAST)
    first.kick("k")
    await asyncio.wait_for(reached.wait(), 10)
    await first.close()  # the process is gone; a new one starts over the same store

    async def fine(event: Any) -> bool:
        seen.append(event["id"])
        return True

    second = Outbox(FsBackend(tmp_path / "store"), JsonRecords(FsBackend(tmp_path / "store")), LockManager(), fine,
                    options=FAST)
    await second.start()
    try:
        await until(lambda: outbox_empty(backend, records))
    finally:
        await second.close()
    ids = [e["id"] for e in events]
    assert seen == [ids[0], ids[1], ids[1], ids[2], ids[3]]  # one redelivery, same id, order kept


async def test_a_pointer_whose_commit_never_landed_delivers_nothing_and_expires(caplog: pytest.LogCaptureFixture) -> None:
    backend = MemoryBackend()
    records = JsonRecords(backend)
    now = [2_000_000.0]
    delivered: list[Any] = []

    async def deliver(event: Any) -> bool:
        delivered.append(event)
        return True

    outbox = Outbox(backend, records, LockManager(), deliver, options=FAST, clock=lambda: now[0])
    await records.commit("a", land=False, clock=now[0])  # crashed between pointer and commit
    await outbox.run_pass()
    assert len(await pointers(backend)) == 1  # its commit might still land
    assert outbox.pending() == 0 and outbox.oldest_age() == 0  # but nothing is known to be undelivered
    now[0] += 3601
    with caplog.at_level(logging.WARNING, logger="chunkgate.outbox"):
        await outbox.run_pass()
    assert await pointers(backend) == []
    assert "dropping outbox pointer" in caplog.text
    assert delivered == [] and outbox.stats.pointers_expired == 1
    await outbox.close()


async def test_a_pointer_whose_commit_lost_to_another_is_deleted_without_a_delivery() -> None:
    backend = MemoryBackend()
    records = JsonRecords(backend)
    delivered: list[str] = []

    async def deliver(event: Any) -> bool:
        delivered.append(event["id"])
        return True

    winner = await records.commit("a")
    # A second writer read the same record state as the winner (none), wrote its pointer, and
    # then lost its conditional write: its pointer names `replaces: null` while the key exists.
    loser_id = uuid.uuid4().hex
    await backend.put(pointer_key(loser_id, 1.0), pointer_body("a", loser_id, None), if_none_match=True)
    outbox = Outbox(backend, records, LockManager(), deliver, options=FAST)
    await outbox.run_pass()
    assert delivered == [winner["id"]]
    assert await pointers(backend) == []
    await outbox.close()


async def test_two_gateways_over_one_store_deliver_a_keys_events_one_at_a_time_in_order() -> None:
    backend = MemoryBackend()
    records = JsonRecords(backend)
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

    gateways = [Outbox(backend, records, StoreLockManager(backend, stale_after=5, gateway=f"gw{i}"), deliver,
                       options=FAST, owner=f"outbox-gw{i}") for i in range(2)]
    for gw in gateways:
        await gw.start()
    try:
        for n in range(30):
            await records.commit(f"k{n % 3}")
            gateways[n % 2].kick(f"k{n % 3}")
        await until(lambda: outbox_empty(backend, records))
    finally:
        for gw in gateways:
            await gw.close()
    assert overlaps == []
    for key, ids in records.committed.items():
        got = [e["id"] for e in seen if e["key"] == key]
        positions = [ids.index(i) for i in got]
        assert positions == sorted(positions), (key, positions)  # never backwards
        assert set(got) == set(ids)
    assert sum(gw.stats.delivered for gw in gateways) == len(seen)
