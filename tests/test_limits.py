"""Limits: the store limiter, object size, header size, list and range caps, key rules, the body
idle timeout, and slow clients that must not starve everyone else."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

import aiohttp
import pytest

from gateway.config import ServeConfig
from storage.backends.limited import LimitedBackend
from storage.backends.memory import MemoryBackend
from tests.support.gateway import in_process_gateway


# ------------------------------------------------------------------------------ LimitedBackend
class Gated(MemoryBackend):
    """A store whose gets wait on a gate, recording how many run at once and in what order."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.running = 0
        self.peak = 0
        self.order: list[str] = []

    async def get(self, key: str, *, start: int = 0, end: int | None = None, view: bool = False) -> Any:
        self.order.append(key)
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.gate.wait()
            return await super().get(key, start=start, end=end, view=view)
        finally:
            self.running -= 1


async def test_the_limiter_caps_store_calls_in_flight_and_queues_the_rest_in_order() -> None:
    inner = Gated()
    for i in range(20):
        await inner.put(f"k{i:02d}", b"v")
    limited = LimitedBackend(inner, max_concurrency=3)
    calls = []
    for i in range(20):
        calls.append(asyncio.ensure_future(limited.get(f"k{i:02d}")))
        await asyncio.sleep(0)  # arrival order = i
    await asyncio.sleep(0.05)
    assert inner.running == 3 and limited.queue_depth == 17
    inner.gate.set()
    results = await asyncio.gather(*calls)
    assert all(r.data == b"v" for r in results)  # queued, not failed
    assert inner.peak == 3
    assert inner.order == [f"k{i:02d}" for i in range(20)]  # FIFO: nobody overtook
    assert limited.queue_depth == 0 and limited.in_flight == 0


async def test_a_cancelled_waiter_does_not_keep_a_slot() -> None:
    inner = Gated()
    await inner.put("k", b"v")
    limited = LimitedBackend(inner, max_concurrency=1)
    first = asyncio.ensure_future(limited.get("k"))
    await asyncio.sleep(0.01)
    waiting = asyncio.ensure_future(limited.get("k"))
    await asyncio.sleep(0.01)
    assert limited.queue_depth == 1
    waiting.cancel()
    inner.gate.set()
    await first
    assert (await limited.get("k")).data == b"v"
    assert limited.in_flight == 0 and limited.queue_depth == 0


async def test_the_rate_limit_spreads_a_burst_over_time_without_failing_calls() -> None:
    inner = MemoryBackend()
    await inner.put("k", b"v")
    limited = LimitedBackend(inner, max_rps=50)
    t0 = time.monotonic()
    results = await asyncio.gather(*(limited.head("k") for _ in range(75)))
    # 50 may start at once (one second's budget), the other 25 at 50 per second: at least 0.5 s.
    # Only a lower bound: a busy machine can make it slower, never faster.
    assert time.monotonic() - t0 >= 0.45
    assert len(results) == 75


async def test_queue_depth_is_exported_while_callers_wait() -> None:
    cfg = ServeConfig(store_max_concurrency=1)
    async with in_process_gateway(cfg) as (url, app), aiohttp.ClientSession() as session:
        limited = app["store"].backend  # the limiter, wherever it sits among the wrappers
        while not isinstance(limited, LimitedBackend):
            limited = limited.inner
        await limited._admission.acquire()  # hold the queue's head so callers pile up behind it
        try:
            reads = [asyncio.ensure_future(session.get(f"{url}/objects/k{i}")) for i in range(4)]
            for _ in range(100):
                if limited.queue_depth >= 3:
                    break
                await asyncio.sleep(0.02)
            async with session.get(f"{url}/metrics") as r:
                text = await r.text()
            depth = next(float(line.split()[1]) for line in text.splitlines()
                         if line.startswith("chunkgate_backend_queue_depth "))
            assert depth >= 3
        finally:
            limited._admission.release()
        for resp in await asyncio.gather(*reads):
            assert resp.status == 404
            resp.release()


# ------------------------------------------------------------------------------ HTTP limits
async def raw_exchange(url: str, request: bytes, *, read_timeout: float = 20.0) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), timeout=read_timeout)
    finally:
        writer.close()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


async def test_a_declared_body_over_the_limit_is_refused_before_it_is_sent() -> None:
    async with in_process_gateway(ServeConfig(max_object_size=1000, body_timeout=60)) as (url, _app):
        # Headers only, no body: the answer must come without waiting for the 10^9 bytes.
        resp = await raw_exchange(url, b"PUT /objects/big HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
        assert status_of(resp) == 413 and b'"too_large"' in resp


async def test_a_streamed_body_is_cut_off_as_soon_as_it_passes_the_limit() -> None:
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(1000):
            sent += 500
            yield b"x" * 500
            await asyncio.sleep(0.002)

    async with in_process_gateway(ServeConfig(max_object_size=1000, chunk_size=1024)) as (url, _app), \
            aiohttp.ClientSession() as session:
        try:
            async with session.put(f"{url}/objects/big", data=body()) as r:  # chunked: no Content-Length
                assert r.status == 413
        except aiohttp.ClientError:
            pass  # the server may close before the client finishes sending; still refused
        assert sent < 500_000  # the gateway stopped reading long before the end
        async with session.get(f"{url}/objects/big") as r:
            assert r.status == 404  # nothing committed


async def test_an_object_at_the_limit_is_accepted() -> None:
    async with in_process_gateway(ServeConfig(max_object_size=1000, chunk_size=1024)) as (url, _app), \
            aiohttp.ClientSession() as session:
        async with session.put(f"{url}/objects/ok", data=b"x" * 1000) as r:
            assert r.status == 201


@pytest.mark.parametrize("request_bytes", [
    b"GET /objects/a HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
    b"GET /objects/" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /objects/a HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(5000)) + b"\r\n",
])
async def test_oversized_request_lines_and_headers_get_a_4xx(request_bytes: bytes) -> None:
    async with in_process_gateway() as (url, _app):
        try:
            resp = await raw_exchange(url, request_bytes)
        except ConnectionResetError:
            return  # refused by closing: also fine, nothing was processed
        assert 400 <= status_of(resp) < 500
        async with aiohttp.ClientSession() as session, session.get(f"{url}/healthz") as r:
            assert r.status == 200


@pytest.mark.parametrize("query,status", [
    ("limit=1000", 200), ("limit=1", 200), ("limit=1001", 400), ("limit=0", 400), ("limit=-5", 400),
    ("limit=ten", 400), ("limit=" + "9" * 5000, 400), ("prefix=" + "p" * 1025, 400), ("prefix=%01", 400),
])
async def test_list_limit_and_prefix_are_capped(query: str, status: int) -> None:
    async with in_process_gateway() as (url, _app), aiohttp.ClientSession() as session:
        async with session.get(f"{url}/objects?{query}") as r:
            assert r.status == status
            doc = await r.json()
            assert ("objects" in doc) if status == 200 else doc["error"] in ("bad_limit", "bad_prefix")


@pytest.mark.parametrize("raw_key", [
    "a" * 1025, "%C3%A9" * 512 + "a", "a%00b", "a%0Ab", "a%7Fb", "a//b", "a/./b", "a/%2E%2E/b", "%2E", "/a",
    "%2Fa", "a/", "%FF%FE",
])
async def test_keys_that_break_the_rules_are_400(raw_key: str) -> None:
    async with in_process_gateway() as (url, _app), aiohttp.ClientSession() as session:
        target = aiohttp.client.URL(f"{url}/objects/{raw_key}", encoded=True)
        async with session.put(target, data=b"x") as r:
            assert r.status == 400, raw_key
            assert (await r.json())["error"] == "bad_key"
        async with session.get(f"{url}/objects?limit=10") as r:
            assert (await r.json())["objects"] == []


async def test_a_key_too_long_for_the_store_is_a_clear_400_and_one_that_fits_works() -> None:
    # The memory store holds keys of at most 1024 bytes including the manifest record's "m/",
    # as S3 does: a 1024-byte object key can't be stored there, and the client is told so.
    async with in_process_gateway() as (url, _app), aiohttp.ClientSession() as session:
        async with session.put(f"{url}/objects/{'k' * 1024}", data=b"x") as r:
            assert r.status == 400
            body = await r.json()
            assert body["error"] == "bad_key" and "shorter" in body["message"]
        async with session.put(f"{url}/objects/{'k' * 1022}", data=b"x") as r:
            assert r.status == 201
        async with session.get(f"{url}/objects/{'k' * 1022}") as r:
            assert await r.read() == b"x"


async def test_more_ranges_than_the_cap_get_the_whole_object() -> None:
    async with in_process_gateway(ServeConfig(chunk_size=1024)) as (url, app), aiohttp.ClientSession() as session:
        data = bytes(range(256)) * 20
        async with session.put(f"{url}/objects/r", data=data) as r:
            assert r.status == 201
        cap = app["config_max_ranges"]
        many = ",".join(f"{i * 100}-{i * 100 + 9}" for i in range(cap + 1))
        async with session.get(f"{url}/objects/r", headers={"Range": f"bytes={many}"}) as r:
            assert r.status == 200 and await r.read() == data
        some = ",".join(f"{i * 100}-{i * 100 + 9}" for i in range(cap))
        async with session.get(f"{url}/objects/r", headers={"Range": f"bytes={some}"}) as r:
            assert r.status == 206 and r.content_type == "multipart/byteranges"


async def test_a_stalled_body_gets_408_and_commits_nothing() -> None:
    async with in_process_gateway(ServeConfig(body_timeout=0.3)) as (url, _app), aiohttp.ClientSession() as session:
        resp = await raw_exchange(url, b"PUT /objects/slow HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        assert status_of(resp) == 408 and b"body_timeout" in resp
        async with session.get(f"{url}/objects/slow") as r:
            assert r.status == 404


async def test_slow_clients_do_not_starve_a_normal_one() -> None:
    """Slowloris: many connections dribbling headers or bodies a byte at a time. A normal client
    must still be able to write and read while they hang on. (The upload cap is off here: 75
    dribbling uploads would hold 75 of its slots, and new uploads would be told to retry —
    that behaviour has its own test below.)"""
    async with in_process_gateway(ServeConfig(body_timeout=30, max_concurrent_uploads=0)) as (url, _app), aiohttp.ClientSession() as session:
        host, port = url.removeprefix("http://").split(":")
        writers: list[asyncio.StreamWriter] = []
        for i in range(150):
            _, w = await asyncio.open_connection(host, int(port))
            if i % 2:
                w.write(b"GET /objects/x HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # headers never end
            else:
                w.write(f"PUT /objects/slow{i} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n".encode())
            writers.append(w)
        stop = asyncio.Event()

        async def dribble() -> None:
            while not stop.is_set():
                for w in writers:
                    if not w.is_closing():
                        w.write(b"a")
                await asyncio.sleep(0.1)

        dribbler = asyncio.ensure_future(dribble())
        try:
            for i in range(10):
                async with session.put(f"{url}/objects/normal{i}", data=b"n" * 5000) as r:
                    assert r.status == 201
                async with session.get(f"{url}/objects/normal{i}") as r:
                    assert r.status == 200 and await r.read() == b"n" * 5000
        finally:
            stop.set()
            await dribbler
            for w in writers:
                w.close()
        async with session.get(f"{url}/objects?prefix=slow") as r:
            assert (await r.json())["objects"] == []  # none of the dribbled bodies was committed


async def test_uploads_over_the_concurrency_cap_get_503_with_retry_after_and_the_rest_succeed() -> None:
    cfg = ServeConfig(max_concurrent_uploads=2, chunk_size=1024)
    async with in_process_gateway(cfg) as (url, _app), aiohttp.ClientSession() as session:
        release = asyncio.Event()

        async def slow_body():
            yield b"a" * 100
            await release.wait()
            yield b"b" * 100

        slow = [asyncio.ensure_future(session.put(f"{url}/objects/slow{i}", data=slow_body())) for i in range(2)]
        await asyncio.sleep(0.3)
        async with session.put(f"{url}/objects/third", data=b"x") as r:
            assert r.status == 503 and r.headers["Retry-After"] == "1"
            assert (await r.json())["error"] == "too_many_uploads"
        release.set()
        for fut in slow:
            r = await fut
            assert r.status == 201
            r.release()
        async with session.put(f"{url}/objects/third", data=b"x") as r:
            assert r.status == 201


@pytest.mark.parametrize(
    "min_rate,grace,elapsed,received,refused",
    [
        (1024, 10, 5, 0, False),          # within the grace period anything goes
        (1024, 10, 20, 20 * 1024, False),  # exactly the floor
        (1024, 10, 20, 20 * 1024 - 1, True),
        (1024, 10, 100, 10**9, False),     # fast
        (0, 10, 1000, 1, False),           # floor off
    ],
    ids=["in-grace", "at-the-floor", "just-under-the-floor", "fast", "floor-off"],
)
def test_upload_rate_floor(min_rate: int, grace: float, elapsed: float, received: int, refused: bool) -> None:
    from gateway.errors import HTTPError
    from gateway.objects import UploadRateFloor

    now = [0.0]
    floor = UploadRateFloor(min_rate, grace, clock=lambda: now[0])
    now[0] = elapsed
    if refused:
        with pytest.raises(HTTPError) as info:
            floor.check(received)
        assert info.value.status == 408 and info.value.code == "body_too_slow"
    else:
        floor.check(received)


async def test_a_dribbling_upload_is_refused_with_408_and_nothing_is_committed() -> None:
    cfg = ServeConfig(body_timeout=1, min_upload_rate=10_000)
    async with in_process_gateway(cfg) as (url, _app), aiohttp.ClientSession() as session:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"PUT /objects/drip HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        answer = b""
        for _ in range(60):  # ~100 B/s, never idle long enough for the idle timeout
            writer.write(b"x" * 10)
            await writer.drain()
            try:
                answer = await asyncio.wait_for(reader.read(4096), timeout=0.1)
            except asyncio.TimeoutError:
                continue
            break
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        assert b"body_too_slow" in answer
        async with session.get(f"{url}/objects/drip") as r:
            assert r.status == 404
