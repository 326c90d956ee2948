"""Bytes a tus PATCH acknowledged stay durable, and every later request reports them:

- a gateway that dies while one PATCH has two chunks in flight, the later one stored and the
  earlier one not, leaves the upload at the offset its last 204 acknowledged (the saved tail of
  chunk N counts although chunk N+1 is stored beyond the gap), and the upload completes from there;
- the uploads' sweep deletes a tail only when its upload's record is really gone, not when the
  store failed to answer for the record this once;
- a delete that a holder sent before it went stale, and that the store applies only later, never
  removes a chunk the next holder stored and acknowledged (no request deletes a chunk key a later
  one may write again: a copy beyond a gap is adopted by the rewrite when it holds the same bytes).

Over the real upload sessions on the memory backend; a second ``UploadSessions`` over the same
store is a restarted gateway (or another one), whose index does not know the upload yet. The
dead gateway is modelled as a chunk write that never returns: nothing after it reaches the store."""

from __future__ import annotations

import time
import asyncio
import hashlib
from typing import Any, AsyncIterator

import pytest

from storage import keys
from storage.backends.base import Blob, TransientError
from storage.backends.memory import MemoryBackend
from storage.locks import LockManager
from storage.objects import ObjectStore, StoreOptions
from storage.upload_layout import info_key, tail_prefix
from storage.uploads import UploadNotFound, UploadOptions, UploadSessions, UploadStatus

CS = 1024
HOUR = 3600.0


class FailsReadsOf(MemoryBackend):
    """GETs of the keys in ``failing`` fail as a store that is briefly unwell does; PUTs of the
    keys in ``never_lands`` never return (the gateway sending them died)."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: set[str] = set()
        self.never_lands: set[str] = set()

    async def put(self, key: str, data: bytes, **kwargs: Any) -> str:
        if key in self.never_lands:
            await asyncio.Event().wait()
        return await super().put(key, data, **kwargs)

    async def get(self, key: str, **kwargs: Any) -> Blob:
        if key in self.failing:
            raise TransientError(f"injected: get {key} failed")
        return await super().get(key, **kwargs)


def sessions_over(backend: MemoryBackend, now: list[float]) -> UploadSessions:
    store = ObjectStore(backend, LockManager(), StoreOptions(chunk_size=CS), clock=lambda: now[0])
    return UploadSessions(store, UploadOptions(chunk_size=CS, expiry=48 * HOUR, tombstone_seconds=HOUR),
                          clock=lambda: now[0])


async def body(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def started(sessions: UploadSessions, key: str, data: bytes, first: int) -> tuple[UploadStatus, list[str]]:
    """An upload of ``data`` whose first PATCH brought ``first`` bytes; its status and the store
    keys of its first four chunks."""
    status = await sessions.create(key, length=len(data), metadata="", content_type="video/mp4")
    async with sessions.lock(status.id, owner="first") as lease:
        assert (await sessions.append(status.id, lease, offset=0, body=body(data[:first]))).offset == first
    record = (await sessions.read_record(status.id))[0]
    return status, [keys.chunk_key(record.key, record.version, i) for i in range(4)]


CASES = [
    # (what happens, record readable by the sweep, record exists, tail's age, tail kept)
    ("the store fails the record's read during the sweep", False, True, 2 * HOUR, True),
    ("the record is there and readable", True, True, 2 * HOUR, True),
    ("the record is gone and the tail is old: an orphan", True, False, 2 * HOUR, False),
    ("the record is gone but the tail is young", True, False, 0.0, True),
]


@pytest.mark.parametrize(("what", "readable", "exists", "age", "kept"), CASES, ids=[c[0] for c in CASES])
async def test_the_sweep_deletes_a_tail_only_when_its_upload_record_is_gone(
        what: str, readable: bool, exists: bool, age: float, kept: bool) -> None:
    backend = FailsReadsOf()
    now = [time.time()]  # the clock the memory backend stamps objects' last-modified with
    first = sessions_over(backend, now)
    status = await first.create("v/paused.mp4", length=10 * CS, metadata="", content_type="video/mp4")
    async with first.lock(status.id, owner="patch") as lease:
        acked = await first.append(status.id, lease, offset=0, body=body(b"x" * 300))
    assert acked.offset == 300
    if not exists:
        await backend.delete(info_key(status.id))
    if not readable:
        backend.failing.add(info_key(status.id))

    now[0] += age  # the client paused; another (or a restarted) gateway sweeps
    other = sessions_over(backend, now)
    await other.sweep()
    tails = [i.key async for i in backend.list(tail_prefix(status.id))]
    assert bool(tails) is kept, f"{what}: tails left {tails}"

    backend.failing.clear()
    if exists:  # the client resumes from what HEAD says: the acknowledged offset
        async with other.lock(status.id, owner="head") as lease:
            assert (await other.status(status.id, lease)).offset == 300
    else:
        with pytest.raises(UploadNotFound):
            async with other.lock(status.id, owner="head") as lease:
                await other.status(status.id, lease)


@pytest.mark.timeout(30)
async def test_a_gateway_killed_with_chunk_n_plus_1_stored_and_chunk_n_not_keeps_the_acknowledged_offset() -> None:
    backend = FailsReadsOf()
    now = [time.time()]
    doomed = sessions_over(backend, now)
    data = hashlib.sha256(b"seed").digest() * (5 * CS // 32)
    status, chunk = await started(doomed, "v/killed.mp4", data, 300)
    # The next PATCH fills chunk 0 and chunk 1; chunk 0's write never lands, chunk 1's does.
    backend.never_lands.add(chunk[0])

    async def second_patch() -> None:
        async with doomed.lock(status.id, owner="patch-2") as lease:
            await doomed.append(status.id, lease, offset=300, body=body(data[300:2 * CS + 300]))

    dying = asyncio.ensure_future(second_patch())
    for _ in range(200):
        if chunk[1] in backend._entries:
            break
        await asyncio.sleep(0.01)
    assert chunk[1] in backend._entries and chunk[0] not in backend._entries
    backend.never_lands.clear()  # the dead gateway's write stays where it is: it never lands

    restarted = sessions_over(backend, now)
    try:
        async with restarted.lock(status.id, owner="head") as lease:
            assert (await restarted.status(status.id, lease)).offset == 300  # what the 204 acknowledged
        async with restarted.lock(status.id, owner="resume") as lease:
            done = await restarted.append(status.id, lease, offset=300, body=body(data[300:]))
        assert done.offset == len(data)
        manifest = await restarted.store.head("v/killed.mp4", fresh=True)
        got = b"".join([bytes(p) async for p in restarted.store.read(manifest, 0, len(data))])
        assert got == data
    finally:
        dying.cancel()
        await asyncio.gather(dying, return_exceptions=True)


class LateDeletes(MemoryBackend):
    """PUTs of ``fail_put`` fail (a moment later); the first DELETE of each key in ``late`` is
    sent at once but applied only when ``arrive`` is set (a request stuck on the wire)."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_put: set[str] = set()
        self.late: set[str] = set()
        self.sent = asyncio.Event()
        self.arrive = asyncio.Event()
        self.deleted: list[str] = []

    async def put(self, key: str, data: bytes, **kwargs: Any) -> str:
        if key in self.fail_put:
            await asyncio.sleep(0.05)
            raise TransientError(f"injected: put {key} failed")
        return await super().put(key, data, **kwargs)

    async def delete(self, key: str, **kwargs: Any) -> None:
        if key in self.late:
            self.late.discard(key)
            self.sent.set()
            await self.arrive.wait()
        self.deleted.append(key)
        await super().delete(key, **kwargs)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("completes", [False, True], ids=["mid-upload", "the next holder completes the upload"])
async def test_a_stale_holders_late_delete_never_removes_a_chunk_the_next_holder_acknowledged(completes: bool) -> None:
    backend = LateDeletes()
    store = ObjectStore(backend, LockManager(stale_after=0.3, timeout=5.0), StoreOptions(chunk_size=CS))
    sessions = UploadSessions(store, UploadOptions(chunk_size=CS, expiry=HOUR, lock_timeout=5.0))
    data = hashlib.sha256(b"late").digest() * ((4 if completes else 6) * CS // 32)
    status, chunk = await started(sessions, "v/late.mp4", data, 2 * CS)
    # The next PATCH: chunk 2 fails, chunk 3 is stored beyond the gap. Were chunk 3 deleted, that
    # delete would be held on the wire while its holder stalls past its lease.
    backend.fail_put.add(chunk[2])
    backend.late.add(chunk[3])

    async def stalled() -> None:
        async with sessions.lock(status.id, owner="stalled") as lease:
            await sessions.append(status.id, lease, offset=2 * CS, body=body(data[2 * CS:4 * CS]))

    first = asyncio.ensure_future(stalled())
    sent = asyncio.ensure_future(backend.sent.wait())
    await asyncio.wait({first, sent}, timeout=2.0, return_when=asyncio.FIRST_COMPLETED)
    sent.cancel()
    backend.fail_put.clear()
    # The client resumes (on this gateway or another) once the stalled holder is cleared as stale.
    async with sessions.lock(status.id, owner="resume") as lease:
        acked = await sessions.append(status.id, lease, offset=2 * CS, body=body(data[2 * CS:4 * CS]))
    assert acked.offset == 4 * CS
    backend.arrive.set()  # whatever was on the wire lands now
    await asyncio.gather(first, return_exceptions=True)
    if completes:
        manifest = await store.head("v/late.mp4", fresh=True)
        got = b"".join([bytes(p) async for p in store.read(manifest, 0, len(data))])
        assert got == data
    else:
        async with sessions.lock(status.id, owner="head") as lease:
            assert (await sessions.status(status.id, lease)).offset == 4 * CS


@pytest.mark.timeout(30)
async def test_copies_left_beyond_a_gap_are_adopted_when_identical_and_replaced_when_not() -> None:
    backend = LateDeletes()
    now = [time.time()]
    sessions = sessions_over(backend, now)
    data = hashlib.sha256(b"left").digest() * (4 * CS // 32)
    status, chunk = await started(sessions, "v/left.mp4", data, CS)
    await backend.put(chunk[2], data[2 * CS:3 * CS])  # what a crashed PATCH left: these very bytes
    await backend.put(chunk[3], b"\0" * CS)  # and bytes the client has since sent differently
    async with sessions.lock(status.id, owner="head") as lease:
        assert (await sessions.status(status.id, lease)).offset == CS  # neither counts: chunk 1 is missing
    async with sessions.lock(status.id, owner="rest") as lease:
        assert (await sessions.append(status.id, lease, offset=CS, body=body(data[CS:]))).offset == len(data)
    manifest = await sessions.store.head("v/left.mp4", fresh=True)
    got = b"".join([bytes(p) async for p in sessions.store.read(manifest, 0, len(data))])
    assert got == data
    assert chunk[2] not in backend.deleted and chunk[3] in backend.deleted  # adopted; replaced
