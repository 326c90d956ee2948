"""No read pattern makes the store send more than the gateway serves (issue 15): tiny ranges
share one verified block, read-ahead is pinned until taken and bounded by the cache, and a read
that is given up (a client that left) cancels the fetches nobody else waits for."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import aiohttp
import pytest

from gateway.config import ServeConfig
from storage import keys
from storage.backends.base import Blob
from storage.backends.memory import MemoryBackend
from storage.cache import ChunkCache
from storage.locks import LockManager
from storage.objects import ObjectStore, StoreOptions
from tests.support.gateway import in_process_gateway

CHUNK = 64 * 1024
BLOCK = 16 * 1024


class CountingBackend(MemoryBackend):
    """Counts what chunk reads return; ``delay`` makes each chunk read take that long."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay
        self.chunk_bytes = 0
        self.chunk_gets = 0
        self.cancelled = 0

    async def get(self, key: str, *, start: int = 0, end: int | None = None, view: bool = False) -> Blob:
        if not key.startswith(keys.CHUNK_PREFIX):
            return await super().get(key, start=start, end=end, view=view)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        blob = await super().get(key, start=start, end=end, view=view)
        self.chunk_gets += 1
        self.chunk_bytes += len(blob.data)
        return blob


def make_store(backend: Any, **opts: Any) -> ObjectStore:
    options = StoreOptions(chunk_size=CHUNK, block_size=BLOCK, small_read_bytes=8 * 1024, **opts)
    return ObjectStore(backend, LockManager(stale_after=5, timeout=5), options)


async def body_of(data: bytes, piece: int = 10_000) -> Any:
    for i in range(0, len(data), piece):
        yield data[i:i + piece]


async def test_sixteen_tiny_parts_in_one_chunk_cost_one_block_and_repeats_cost_nothing() -> None:
    backend = CountingBackend()
    async with in_process_gateway(ServeConfig(), backend=backend) as (url, _app):
        data = os.urandom(1024 * 1024)
        async with aiohttp.ClientSession() as http:
            async with http.put(f"{url}/objects/multi", data=data) as r:
                assert r.status == 201
            block = 256 * 1024  # the gateway's verified block
            header = "bytes=" + ",".join(f"{2 * n}-{2 * n}" for n in range(16))
            costs = []
            for _ in range(3):
                before = backend.chunk_bytes
                async with http.get(f"{url}/objects/multi", headers={"Range": header}) as r:
                    body = await r.read()
                    assert r.status == 206 and body.count(b"Content-Range: bytes") == 16
                    for n in range(16):
                        assert f"Content-Range: bytes {2 * n}-{2 * n}/{len(data)}".encode() + b"\r\n\r\n" + data[2 * n:2 * n + 1] in body
                costs.append(backend.chunk_bytes - before)
    assert costs == [block, 0, 0]  # one verified block, then served from the cache


async def test_readers_under_cache_pressure_fetch_every_chunk_once() -> None:
    # 8 readers of distinct 6-chunk objects, read-ahead 4, a cache of 6 chunks: their read-ahead
    # alone would need 32 chunks. Prefetched chunks must not be evicted before they are taken.
    backend = CountingBackend(delay=0.002)
    store = make_store(backend, cache_bytes=6 * (CHUNK + 64), readahead=4)
    objects = {f"o{n}": os.urandom(6 * CHUNK) for n in range(8)}
    for key, data in objects.items():
        await store.put(key, body_of(data), content_type="x/y")

    async def reader(key: str) -> bytes:
        m = await store.head(key)
        got = []
        async for piece in store.read(m, 0, m.size):
            got.append(bytes(piece))
            await asyncio.sleep(0.005)  # a reader slower than the store
        return b"".join(got)

    results = await asyncio.gather(*(reader(k) for k in objects))
    assert results == list(objects.values())
    assert backend.chunk_bytes == sum(len(d) for d in objects.values())  # 1.00x, not re-fetched
    assert store.cache.used <= store.cache.max_bytes


async def test_a_read_given_up_after_its_first_chunk_cancels_its_read_ahead() -> None:
    backend = CountingBackend(delay=0.2)
    store = make_store(backend, readahead=4)
    data = os.urandom(6 * CHUNK)
    m = await store.put("v", body_of(data), content_type="x/y")
    stream = store.read(m, 0, m.size)
    assert bytes(await stream.__anext__()) == data[:CHUNK]
    assert bytes(await stream.__anext__()) == data[CHUNK:2 * CHUNK]  # chunks 2 and 3 now come ahead
    await stream.aclose()  # the client went away
    await asyncio.sleep(0.5)
    assert store.cache.stats.dropped == 2 and backend.chunk_gets == 2  # chunks 2 and 3 never arrive
    assert store.cache.held == 0  # no pinned read-ahead left behind


async def test_a_get_abandoned_before_the_first_byte_stops_fetching() -> None:
    backend = CountingBackend(delay=0.5)
    async with in_process_gateway(ServeConfig(), backend=backend) as (url, _app):
        data = os.urandom(4 * 1024 * 1024)
        async with aiohttp.ClientSession() as http:
            async with http.put(f"{url}/objects/gone", data=data) as r:
                assert r.status == 201
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(f"GET /objects/gone HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await asyncio.sleep(1.2)  # longer than one slow chunk read
        assert backend.chunk_gets == 0 and backend.cancelled >= 1
        async with aiohttp.ClientSession() as http:  # and the object still reads whole afterwards
            async with http.get(f"{url}/objects/gone") as r:
                assert await r.read() == data


async def test_read_ahead_starts_only_where_it_fits_beside_what_is_in_flight() -> None:
    cache: ChunkCache[bytes] = ChunkCache(100, len)
    gate = asyncio.Event()

    async def slow() -> bytes:
        await gate.wait()
        return b"x" * 60

    owner = object()
    assert cache.prefetch("a", slow, size=60, owner=owner)
    assert not cache.prefetch("b", slow, size=60, owner=owner)  # 60 in flight + 60 > 100
    assert cache.used == 60 and cache.stats.readahead_skipped == 1
    gate.set()
    assert await cache.get("a", slow, size=60, owner=owner) == b"x" * 60
    assert cache.held == 0 and "a" in cache  # taken: an ordinary entry now


async def test_a_fetch_nobody_waits_for_is_cancelled_and_one_others_wait_for_is_not() -> None:
    cache: ChunkCache[bytes] = ChunkCache(1000, len)
    started = asyncio.Event()
    release = asyncio.Event()

    async def fetch() -> bytes:
        started.set()
        await release.wait()
        return b"y" * 10

    alone = asyncio.ensure_future(cache.get("k", fetch, size=10))
    await started.wait()
    alone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await alone
    await asyncio.sleep(0)
    assert cache.stats.dropped == 1 and "k" not in cache

    started.clear()
    first = asyncio.ensure_future(cache.get("k2", fetch, size=10))
    second = asyncio.ensure_future(cache.get("k2", fetch, size=10))
    await started.wait()
    first.cancel()
    await asyncio.sleep(0)
    release.set()
    assert await second == b"y" * 10  # the other viewer still gets it
    assert cache.stats.dropped == 1


async def test_uploads_through_reused_buffers_keep_every_object_intact() -> None:
    backend = MemoryBackend()
    store = make_store(backend)
    objects = {f"p{n}": os.urandom(5 * CHUNK + n * 777) for n in range(4)}
    for key, data in objects.items():
        await store.put(key, body_of(data, piece=9999), content_type="x/y")
    await asyncio.gather(*(store.put(f"{k}-again", body_of(d, piece=4096), content_type="x/y") for k, d in objects.items()))
    for key, data in objects.items():
        for name in (key, f"{key}-again"):
            m = await store.head(name)
            assert b"".join([bytes(p) async for p in store.read(m, 0, m.size)]) == data
    assert store.buffers.lent == 0


async def test_a_failed_upload_gives_its_buffers_back() -> None:
    class FailingPuts(MemoryBackend):
        async def put(self, key: str, data: bytes, **kw: Any) -> str:
            if key.startswith(keys.CHUNK_PREFIX) and key.endswith("00000002"):
                from storage.backends.base import PermanentError
                raise PermanentError("refused")
            return await super().put(key, data, **kw)

    store = make_store(FailingPuts())
    from storage.errors import StoreFailed
    with pytest.raises(StoreFailed):
        await store.put("f", body_of(os.urandom(6 * CHUNK)), content_type="x/y")
    assert store.buffers.lent == 0


async def test_a_buffer_whose_put_was_cancelled_mid_send_is_never_refilled() -> None:
    # A store client may go on sending from the buffer after its caller is cancelled (a request
    # on the wire): that buffer must never be lent to the next chunk, or the bytes still being
    # sent would change under it -- the replaced system's corruption, with sizes that still match.
    sending: list[memoryview] = []
    stuck = asyncio.Event()

    class SlowPuts(MemoryBackend):
        async def put(self, key: str, data: bytes, **kw: Any) -> str:
            if key.startswith(keys.CHUNK_PREFIX) and not sending:
                sending.append(data)  # type: ignore[arg-type]
                await stuck.wait()  # never set: the client is gone before this ends
            return await super().put(key, data, **kw)

    store = make_store(SlowPuts())

    async def body() -> Any:
        yield os.urandom(2 * CHUNK)
        await asyncio.sleep(3600)  # the client stalls...

    put = asyncio.ensure_future(store.put("c", body(), content_type="x/y"))
    while not sending:
        await asyncio.sleep(0.01)
    put.cancel()  # ...and is gone
    with pytest.raises(asyncio.CancelledError):
        await put
    in_flight = sending[0].obj if isinstance(sending[0], memoryview) else sending[0]
    fresh = [store.buffers.take() for _ in range(8)]
    assert all(buf is not in_flight for buf in fresh)
