"""ObjectStore: chunked writes, verified manifests, nothing committed on failure, single-flight reads."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from typing import AsyncIterator

import pytest
import xxhash

from storage import keys
from storage.backends.base import TransientError
from storage.backends.memory import MemoryBackend
from storage.errors import BodyTooLarge, ChecksumMismatch, IncompleteBody, ObjectNotFound, PreconditionNotMet, StoreUnavailable
from storage.locks import LockManager
from storage.manifest import Manifest
from storage.objects import ObjectStore, StoreOptions

CHUNK = 64 * 1024


def make_store(backend=None, **opts) -> ObjectStore:
    options = StoreOptions(chunk_size=CHUNK, cache_bytes=64 * CHUNK, grace_seconds=opts.pop("grace_seconds", 60), **opts)
    return ObjectStore(backend or MemoryBackend(), LockManager(stale_after=5, timeout=5), options)


async def body_of(data: bytes, piece: int = 10_000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), piece):
        yield data[i:i + piece]


async def read_all(store: ObjectStore, key: str) -> bytes:
    m = await store.head(key)
    return b"".join([bytes(p) async for p in store.read(m, 0, m.size)])


async def stored_keys(backend: MemoryBackend, prefix: str) -> list[str]:
    return [info.key async for info in backend.list(prefix)]


@pytest.mark.parametrize(
    "size",
    [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5],
    ids=["empty", "one-byte", "just-under-a-chunk", "exactly-a-chunk", "just-over-a-chunk", "several-chunks"],
)
async def test_put_then_read_returns_the_same_bytes_and_a_valid_manifest(size: int) -> None:
    store = make_store()
    data = os.urandom(size)
    m = await store.put("videos/a.mp4", body_of(data, piece=7777), content_type="video/mp4")
    assert await read_all(store, "videos/a.mp4") == data
    # The manifest's invariants (API.md): sizes add up, offsets are running sums, every chunk but
    # the last is chunk_size long, sha256 is of the chunk's bytes.
    stored = Manifest.from_json((await store.backend.get(keys.manifest_key("videos/a.mp4"))).data)
    assert stored.size == size == sum(c.size for c in stored.chunks)
    assert all(c.size == CHUNK for c in stored.chunks[:-1])
    for c in stored.chunks:
        assert c.sha256 == hashlib.sha256(data[c.offset:c.end]).hexdigest()
    assert m.etag == stored.etag and m.etag.startswith('"')


async def test_every_upload_writes_chunks_under_a_fresh_version_never_touching_the_old_ones() -> None:
    store = make_store()
    first = await store.put("k", body_of(os.urandom(3 * CHUNK)), content_type="x/y")
    first_chunks = set(await stored_keys(store.backend, keys.chunk_prefix("k", first.version)))
    second = await store.put("k", body_of(os.urandom(3 * CHUNK)), content_type="x/y")
    assert first.version != second.version
    second_chunks = set(await stored_keys(store.backend, keys.chunk_prefix("k", second.version)))
    assert first_chunks and second_chunks and not first_chunks & second_chunks
    # Old chunks stay readable for the grace period (readers in flight).
    for ck in first_chunks:
        await store.backend.head(ck)


async def test_replaced_version_is_deleted_after_the_grace_period() -> None:
    store = make_store(grace_seconds=0.05)
    first = await store.put("k", body_of(os.urandom(2 * CHUNK)), content_type="x/y")
    await store.put("k", body_of(b"new"), content_type="x/y")
    await asyncio.sleep(0.3)
    assert await stored_keys(store.backend, keys.chunk_prefix("k", first.version)) == []
    assert await read_all(store, "k") == b"new"


class FailingBackend(MemoryBackend):
    """Fails the n-th chunk put."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at
        self.chunk_puts = 0

    async def put(self, key, data, **kw):  # type: ignore[no-untyped-def]
        if key.startswith(keys.CHUNK_PREFIX):
            self.chunk_puts += 1
            if self.chunk_puts == self.fail_at:
                raise TransientError("injected")
        return await super().put(key, data, **kw)


async def test_a_failed_chunk_write_commits_nothing_and_removes_the_written_chunks() -> None:
    backend = FailingBackend(fail_at=3)
    store = make_store(backend)
    with pytest.raises(StoreUnavailable):
        await store.put("k", body_of(os.urandom(5 * CHUNK)), content_type="x/y")
    with pytest.raises(ObjectNotFound):
        await store.head("k")
    await store.cleaned_up()  # the failed PUT's answer does not wait for its cleanup
    assert await stored_keys(backend, keys.CHUNK_PREFIX) == []


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"content_md5": base64.b64encode(hashlib.md5(b"other").digest()).decode()}, ChecksumMismatch),
        ({"content_md5": "not base64!"}, ChecksumMismatch),
        ({"sha256_hex": hashlib.sha256(b"other").hexdigest()}, ChecksumMismatch),
        ({"content_length": 10 * CHUNK}, IncompleteBody),
    ],
    ids=["wrong-content-md5", "malformed-content-md5", "wrong-sha256", "body-shorter-than-content-length"],
)
async def test_a_bad_body_commits_nothing_and_keeps_the_old_version(kwargs: dict, error: type) -> None:
    store = make_store()
    old = os.urandom(CHUNK + 3)
    await store.put("k", body_of(old), content_type="x/y")
    with pytest.raises(error):
        await store.put("k", body_of(os.urandom(2 * CHUNK + 1)), content_type="x/y", **kwargs)
    assert await read_all(store, "k") == old
    m = await store.head("k")
    assert await stored_keys(store.backend, keys.CHUNK_PREFIX) == await stored_keys(
        store.backend, keys.chunk_prefix("k", m.version))


async def test_matching_checksums_are_accepted() -> None:
    store = make_store()
    data = os.urandom(2 * CHUNK + 9)
    await store.put("k", body_of(data), content_type="x/y",
                    content_md5=base64.b64encode(hashlib.md5(data).digest()).decode(),
                    sha256_hex=hashlib.sha256(data).hexdigest().upper())
    assert await read_all(store, "k") == data


class DeletesNeverAnswer(FailingBackend):
    """Fails the first chunk put; then every delete hangs (a store with no deadline that stalls)."""

    async def delete(self, key, **kw):  # type: ignore[no-untyped-def]
        await asyncio.Event().wait()


async def test_a_failed_put_answers_at_once_and_close_does_not_wait_forever_for_its_cleanup(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import storage.objects
    monkeypatch.setattr(storage.objects, "CLEANUP_WAIT", 0.2)
    backend = DeletesNeverAnswer(fail_at=1)
    store = make_store(backend)
    with pytest.raises(StoreUnavailable):  # not held up by the cleanup's hung deletes
        await asyncio.wait_for(store.put("k", body_of(os.urandom(3 * CHUNK)), content_type="x/y"), timeout=30)
    await asyncio.wait_for(store.close(), timeout=30)
    # The cleanup was given up: the PUT's intent stays, protecting its chunks until it expires.
    assert await stored_keys(backend, keys.INTENT_PREFIX) != []


async def test_a_body_past_the_size_limit_is_refused_before_and_while_streaming() -> None:
    store = make_store(max_object_size=CHUNK)
    with pytest.raises(BodyTooLarge):
        await store.put("k", body_of(b"x"), content_type="x/y", content_length=CHUNK + 1)
    with pytest.raises(BodyTooLarge):
        await store.put("k", body_of(os.urandom(3 * CHUNK)), content_type="x/y")
    await store.cleaned_up()  # the failed PUTs' answers do not wait for their cleanup
    assert await stored_keys(store.backend, "") == []


async def test_preconditions_are_checked_before_reading_and_again_at_commit() -> None:
    store = make_store()
    await store.put("k", body_of(b"one"), content_type="x/y")

    def create_only(current: str | None) -> None:
        if current is not None:
            raise PreconditionNotMet("exists")

    consumed = 0

    async def counting_body() -> AsyncIterator[bytes]:
        nonlocal consumed
        consumed += 1
        yield b"two"

    with pytest.raises(PreconditionNotMet):
        await store.put("k", counting_body(), content_type="x/y", check=create_only)
    assert consumed == 0  # failed fast: not one byte of the body was read
    assert await read_all(store, "k") == b"one"


class SlowCountingBackend(MemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.in_flight = 0
        self.max_in_flight = 0

    async def put(self, key, data, **kw):  # type: ignore[no-untyped-def]
        if key.startswith(keys.CHUNK_PREFIX):
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            await asyncio.sleep(0.01)
            self.in_flight -= 1
        return await super().put(key, data, **kw)


async def test_at_most_write_concurrency_chunks_are_in_flight_so_memory_stays_bounded() -> None:
    backend = SlowCountingBackend()
    store = make_store(backend, write_concurrency=3)
    produced = 0

    async def fast_body() -> AsyncIterator[bytes]:
        nonlocal produced
        for _ in range(40):
            produced += 1
            # The producer can't run ahead of the store by more than the in-flight slots allow.
            assert produced - len(await stored_keys(backend, keys.CHUNK_PREFIX)) <= 3 + 1
            yield os.urandom(CHUNK)

    await store.put("k", fast_body(), content_type="x/y")
    assert 1 < backend.max_in_flight <= 3


class CountingGets(MemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.gets: dict[str, int] = {}

    async def get(self, key, **kw):  # type: ignore[no-untyped-def]
        self.gets[key] = self.gets.get(key, 0) + 1
        await asyncio.sleep(0.005)
        return await super().get(key, **kw)


async def test_many_concurrent_readers_cost_one_store_fetch_per_chunk() -> None:
    backend = CountingGets()
    store = make_store(backend)
    data = os.urandom(6 * CHUNK)
    await store.put("v", body_of(data), content_type="video/mp4")
    backend.gets.clear()
    store._manifests.clear()
    bodies = await asyncio.gather(*(read_all(store, "v") for _ in range(20)))
    assert all(b == data for b in bodies)
    chunk_gets = {k: n for k, n in backend.gets.items() if k.startswith(keys.CHUNK_PREFIX)}
    assert len(chunk_gets) == 6 and set(chunk_gets.values()) == {1}


async def test_a_cancelled_reader_does_not_cancel_the_fetch_others_wait_on() -> None:
    backend = CountingGets()
    store = make_store(backend)
    data = os.urandom(CHUNK)
    await store.put("v", body_of(data), content_type="x/y")
    m = await store.head("v")
    first = asyncio.ensure_future(store.chunk(m, m.chunks[0]))
    second = asyncio.ensure_future(store.chunk(m, m.chunks[0]))
    await asyncio.sleep(0)
    first.cancel()
    assert (await second).data == data
    assert sum(n for k, n in backend.gets.items() if k.startswith(keys.CHUNK_PREFIX)) == 1


async def test_delete_removes_the_object_and_a_second_delete_is_not_found() -> None:
    store = make_store(grace_seconds=0.01)
    await store.put("k", body_of(b"abc"), content_type="x/y")
    await store.delete("k")
    with pytest.raises(ObjectNotFound):
        await store.head("k")
    with pytest.raises(ObjectNotFound):
        await store.delete("k")
    await asyncio.sleep(0.1)
    # The chunks went after the grace period; the record is a tombstone until gc removes it
    # (a DELETE is a conditional write of the record, never an unconditional removal).
    assert await stored_keys(store.backend, "") == ["m/k"]
    from storage.gc import collect

    await collect(store.backend, grace=0.0)
    assert await stored_keys(store.backend, "") == []


async def test_listing_is_in_key_order_and_pages_with_after() -> None:
    store = make_store()
    names = ["b/2", "a", "b/1", "a/x", "é", "c"]
    for n in names:
        await store.put(n, body_of(n.encode()), content_type="x/y")
    page, nxt = await store.list("", limit=4)
    assert [m.key for m in page] == sorted(names, key=lambda k: k.encode())[:4]
    rest, end = await store.list("", after=nxt, limit=4)
    assert [m.key for m in page + rest] == sorted(names, key=lambda k: k.encode()) and end is None
    only_b, _ = await store.list("b/")
    assert [m.key for m in only_b] == ["b/1", "b/2"]


class LostAnswerBackend(MemoryBackend):
    """The manifest write lands, but its answer is lost: ``mode`` says what the caller sees."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.reads_fail = False

    async def put(self, key, data, **kw):  # type: ignore[no-untyped-def]
        etag = await super().put(key, data, **kw)
        if key.startswith(keys.MANIFEST_PREFIX):
            if self.mode == "timeout":
                raise TransientError("timed out after the store took it")
            if self.mode == "retried":
                from storage.backends.base import PreconditionFailed
                raise PreconditionFailed("a retry of our own create-only put")
            if self.mode == "blackout":
                self.reads_fail = True
                raise TransientError("timed out, and the store is gone")
        return etag

    async def get(self, key, **kw):  # type: ignore[no-untyped-def]
        if self.reads_fail and key.startswith(keys.MANIFEST_PREFIX):
            raise TransientError("unreachable")
        return await super().get(key, **kw)


@pytest.mark.parametrize("mode", ["timeout", "retried"], ids=["write-timed-out-after-landing", "retry-conflicts-with-itself"])
async def test_a_commit_whose_answer_was_lost_is_recognised_as_committed(mode: str) -> None:
    backend = LostAnswerBackend(mode)
    store = make_store(backend)
    data = os.urandom(2 * CHUNK)
    await store.put("k", body_of(data), content_type="x/y", check=lambda current: None)
    assert await read_all(store, "k") == data  # the chunks were not deleted under it


async def test_a_commit_of_unknown_outcome_keeps_its_chunks_for_gc() -> None:
    backend = LostAnswerBackend("blackout")
    store = make_store(backend)
    data = os.urandom(2 * CHUNK)
    with pytest.raises(StoreUnavailable) as info:
        await store.put("k", body_of(data), content_type="x/y")
    assert info.value.outcome_unknown
    backend.reads_fail = False
    assert await read_all(store, "k") == data  # the manifest did land, and its chunks are all there


class RangeRecordingBackend(MemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.chunk_reads: list[tuple[int, int | None]] = []

    async def get(self, key, *, start=0, end=None, view=False):  # type: ignore[no-untyped-def]
        if key.startswith(keys.CHUNK_PREFIX):
            self.chunk_reads.append((start, end))
        return await super().get(key, start=start, end=end, view=view)


async def test_a_cold_seek_fetches_and_verifies_only_the_blocks_it_touches() -> None:
    backend = RangeRecordingBackend()
    block = 16 * 1024
    store = make_store(backend, block_size=block, small_read_bytes=8 * 1024)
    data = os.urandom(3 * CHUNK)
    m = await store.put("v", body_of(data), content_type="video/mp4")
    assert m.block_size == block and all(len(c.blocks or ()) == CHUNK // block for c in m.chunks)
    start = CHUNK + block + 100  # inside chunk 1, block 1
    got = b"".join([bytes(p) async for p in store.read(m, start, start + 4096)])
    assert got == data[start:start + 4096]
    assert backend.chunk_reads == [(block, 2 * block)]  # one block, not the 64 KiB chunk
    # The verified block is kept: another small read in it costs the store nothing.
    again = b"".join([bytes(p) async for p in store.read(m, start + 5000, start + 6000)])
    assert again == data[start + 5000:start + 6000] and backend.chunk_reads == [(block, 2 * block)]

    # Same size, other bytes in that block (the reused-buffer corruption): rejected, not served.
    ck = keys.chunk_key("v", m.version, 1)
    bad = bytearray(data[CHUNK:2 * CHUNK])
    bad[block + 5] ^= 0xFF
    await backend.put(ck, bytes(bad))
    store.cache.clear()
    from storage.errors import ChunkRejected
    with pytest.raises(ChunkRejected):
        async for _ in store.read(m, start, start + 4096):
            pass
    assert store.stats.checksum_mismatch == 1


async def test_the_manifest_records_block_hashes_that_survive_a_json_round_trip() -> None:
    store = make_store(block_size=16 * 1024)
    data = os.urandom(CHUNK + 20000)
    m = await store.put("v", body_of(data), content_type="x/y")
    again = Manifest.from_json(m.to_json())
    assert again.block_size == 16 * 1024 and again.chunks == m.chunks
    last = m.chunks[-1]
    assert m.block_hash == "xxh3-128" and last.sha256 == hashlib.sha256(data[CHUNK:]).hexdigest()
    assert last.blocks == (xxhash.xxh3_128_hexdigest(data[CHUNK:CHUNK + 16384]),
                           xxhash.xxh3_128_hexdigest(data[CHUNK + 16384:]))


async def test_concurrent_cold_reads_of_one_manifest_cost_one_store_read() -> None:
    backend = CountingGets()
    store = make_store(backend)
    await store.put("v", body_of(b"abc"), content_type="x/y")
    store._manifests.clear()
    backend.gets.clear()
    heads = await asyncio.gather(*(store.head("v") for _ in range(32)))
    assert {m.etag for m in heads} == {heads[0].etag}
    assert backend.gets == {keys.manifest_key("v"): 1}


class GatedManifestReads(MemoryBackend):
    """After ``hold_next()``, the next manifest read stalls until ``gate`` opens — a read still in
    flight while a commit lands."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self._hold = False

    def hold_next(self) -> None:
        self._hold, self.gate = True, asyncio.Event()

    async def get(self, key, **kw):  # type: ignore[no-untyped-def]
        blob = await super().get(key, **kw)
        if key.startswith(keys.MANIFEST_PREFIX) and self._hold:
            self._hold = False
            await self.gate.wait()
        return blob


async def test_a_read_after_a_local_commit_never_joins_an_older_manifest_read() -> None:
    backend = GatedManifestReads()
    store = make_store(backend)
    await store.put("k", body_of(b"old"), content_type="x/y")
    store._manifests.clear()
    backend.hold_next()
    stale_reader = asyncio.ensure_future(store.head("k"))  # has read "old", held before returning
    await asyncio.sleep(0.01)
    new = await store.put("k", body_of(b"new"), content_type="x/y")
    fresh_reader = asyncio.ensure_future(store.head("k"))
    await asyncio.sleep(0.01)
    assert fresh_reader.done(), "a read after the commit waited on the older read in flight"
    assert fresh_reader.result().etag == new.etag
    backend.gate.set()
    assert (await stale_reader).etag != new.etag  # the old read is used once by its own caller
    assert (await store.head("k")).etag == new.etag  # and was not cached over the new manifest
