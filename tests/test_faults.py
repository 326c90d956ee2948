"""Store faults: injection, retries, and what a client sees when the store misbehaves.

The wrappers are tested on their own (table-driven where the logic is pure), then the whole
gateway is run over a store failing 10 % of the time in every way FaultyBackend knows: every
response must be right or a clean 5xx JSON, and the store must be consistent afterwards.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import os
import random
import socket
import tracemalloc
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import ServeConfig
from storage import keys
from storage.backends.base import NotFound, PermanentError, PreconditionFailed, TransientError
from storage.backends.faults import KINDS, FaultPlan, FaultyBackend
from storage.backends.fs import FsBackend
from storage.backends.memory import MemoryBackend
from storage.backends.retrying import RetryingBackend, RetryPolicy
from storage.errors import StoreUnavailable
from storage.locks import LockManager
from storage.manifest import Manifest
from storage.objects import ObjectStore, StoreOptions
from tests.support.gateway import in_process_gateway


async def no_sleep(_: float) -> None:
    return None


# ------------------------------------------------------------------------------ FaultyBackend
@pytest.mark.parametrize("rate,kinds", [(-0.1, {"error"}), (1.5, {"error"}), (0.1, {"disk-on-fire"})])
def test_fault_plan_rejects_nonsense(rate: float, kinds: set[str]) -> None:
    with pytest.raises(ValueError):
        FaultPlan(rate=rate, kinds=kinds)


@pytest.mark.parametrize("text,expected", [("", KINDS), ("all", KINDS), ("error, throttle", {"error", "throttle"})])
def test_fault_plan_parses_the_debug_flag(text: str, expected: set[str]) -> None:
    assert FaultPlan.parse(0.1, text).kinds == frozenset(expected)


async def test_injected_throttle_carries_retry_after_and_never_reaches_the_store() -> None:
    inner = MemoryBackend()
    faulty = FaultyBackend(inner, FaultPlan(rate=1.0, kinds={"throttle"}, retry_after=0.25, seed=1))
    with pytest.raises(TransientError) as caught:
        await faulty.put("a", b"x")
    assert caught.value.retry_after == 0.25
    with pytest.raises(NotFound):
        await inner.head("a")


async def test_injected_put_errors_sometimes_lose_the_answer_of_a_write_that_landed() -> None:
    inner = MemoryBackend()
    faulty = FaultyBackend(inner, FaultPlan(rate=1.0, kinds={"error"}, seed=7))
    landed = 0
    for i in range(40):
        with pytest.raises(TransientError):
            await faulty.put(f"k{i}", b"v")
        try:
            await inner.head(f"k{i}")
            landed += 1
        except NotFound:
            pass
    assert 0 < landed < 40  # both "before" and "after the store" failures happen


async def test_injected_truncation_returns_fewer_bytes_than_the_blob_claims() -> None:
    inner = MemoryBackend()
    await inner.put("k", b"0123456789" * 100)
    faulty = FaultyBackend(inner, FaultPlan(rate=1.0, kinds={"truncate"}, seed=3))
    blob = await faulty.get("k")
    assert blob.size == 1000 and len(blob.data) < 1000
    assert blob.data == (b"0123456789" * 100)[: len(blob.data)]  # a prefix: cut, not corrupted


async def test_the_object_layer_refuses_a_truncated_chunk_instead_of_serving_it() -> None:
    inner = MemoryBackend()
    plain = ObjectStore(inner, LockManager(), StoreOptions(chunk_size=1024))

    async def body() -> Any:
        yield os.urandom(4000)

    m = await plain.put("v.bin", body(), content_type="application/octet-stream")
    faulty = ObjectStore(FaultyBackend(inner, FaultPlan(rate=1.0, kinds={"truncate"}, seed=5)), LockManager(),
                         StoreOptions(chunk_size=1024, small_read_bytes=0))
    with pytest.raises(StoreUnavailable):
        async for _ in faulty.read(m, 0, m.size):
            pass
    small = ObjectStore(FaultyBackend(inner, FaultPlan(rate=1.0, kinds={"truncate"}, seed=5)), LockManager(),
                        StoreOptions(chunk_size=1024))
    with pytest.raises(StoreUnavailable):  # the ranged small-read path checks too
        async for _ in small.read(m, 10, 500):
            pass


# ------------------------------------------------------------------------------ RetryingBackend
class Flaky:
    """A backend whose calls fail as scripted: each entry is an exception to raise (before the
    store sees the call), ('after', exc) to raise after the call landed, or None to succeed."""

    def __init__(self, script: list[Any]) -> None:
        self.inner = MemoryBackend()
        self.name = "flaky"
        self.script = list(script)
        self.calls: list[str] = []

    async def _step(self) -> Any:
        return self.script.pop(0) if self.script else None

    async def put(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        self.calls.append("put")
        step = await self._step()
        if isinstance(step, BaseException):
            raise step
        etag = await self.inner.put(key, data, if_none_match=if_none_match, if_match=if_match)
        if isinstance(step, tuple):
            raise step[1]
        return etag

    async def get(self, key: str, *, start: int = 0, end: int | None = None, view: bool = False) -> Any:
        self.calls.append("get")
        step = await self._step()
        if isinstance(step, BaseException):
            raise step
        return await self.inner.get(key, start=start, end=end, view=view)

    async def head(self, key: str) -> Any:
        self.calls.append("head")
        return await self.inner.head(key)

    async def delete(self, key: str) -> None:
        self.calls.append("delete")
        await self.inner.delete(key)

    def list(self, prefix: str = "", *, start_after: str | None = None) -> Any:
        return self.inner.list(prefix, start_after=start_after)

    async def close(self) -> None:
        pass


def retrying(inner: Any, attempts: int = 4) -> RetryingBackend:
    return RetryingBackend(inner, RetryPolicy(attempts=attempts), sleep=no_sleep, rng=random.Random(0))


async def test_transient_failures_are_retried_until_the_call_succeeds() -> None:
    flaky = Flaky([TransientError("a"), TransientError("b"), None])
    await retrying(flaky).put("k", b"v")
    assert flaky.calls == ["put", "put", "put"]
    assert (await flaky.inner.get("k")).data == b"v"


async def test_retries_are_bounded_and_the_last_error_reaches_the_caller() -> None:
    flaky = Flaky([TransientError(str(i)) for i in range(10)])
    with pytest.raises(TransientError, match="2"):
        await retrying(flaky, attempts=3).get("k")
    assert flaky.calls == ["get"] * 3


@pytest.mark.parametrize("error", [NotFound("k"), PermanentError("no bucket"), PreconditionFailed("k")])
async def test_errors_retrying_cannot_fix_are_not_retried(error: Exception) -> None:
    flaky = Flaky([error])
    with pytest.raises(type(error)):
        await retrying(flaky).get("k")
    assert flaky.calls == ["get"]


async def test_a_create_only_put_whose_answer_was_lost_reports_success_not_412() -> None:
    flaky = Flaky([("after", TransientError("connection reset"))])
    etag = await retrying(flaky).put("k", b"mine", if_none_match=True)
    assert etag == (await flaky.inner.head("k")).etag
    assert flaky.calls.count("put") == 1  # not blindly re-sent


async def test_a_create_only_put_that_never_landed_is_tried_again() -> None:
    flaky = Flaky([TransientError("throttled", retry_after=0.01)])
    await retrying(flaky).put("k", b"mine", if_none_match=True)
    assert flaky.calls.count("put") == 2
    assert (await flaky.inner.get("k")).data == b"mine"


async def test_a_create_only_put_that_lost_to_another_writer_reports_412() -> None:
    flaky = Flaky([TransientError("reset")])
    await flaky.inner.put("k", b"theirs")
    with pytest.raises(PreconditionFailed):
        await retrying(flaky).put("k", b"mine", if_none_match=True)
    assert (await flaky.inner.get("k")).data == b"theirs"


async def test_an_if_match_put_whose_answer_was_lost_reports_the_new_etag() -> None:
    flaky = Flaky([])
    old = await flaky.inner.put("k", b"v1")
    flaky.script = [("after", TransientError("timeout"))]
    etag = await retrying(flaky).put("k", b"v2", if_match=old)
    assert etag == (await flaky.inner.head("k")).etag != old
    assert (await flaky.inner.get("k")).data == b"v2"


async def test_an_if_match_put_that_did_not_land_is_retried_against_the_same_etag() -> None:
    flaky = Flaky([])
    old = await flaky.inner.put("k", b"v1")
    flaky.script = [TransientError("503")]
    await retrying(flaky).put("k", b"v2", if_match=old)
    assert (await flaky.inner.get("k")).data == b"v2"


async def test_a_short_read_is_retried_not_returned() -> None:
    inner = MemoryBackend()
    await inner.put("k", b"x" * 1000)
    faulty = FaultyBackend(inner, FaultPlan(rate=0.5, kinds={"truncate"}, seed=11))
    backend = retrying(faulty, attempts=20)
    for start, end in [(0, None), (10, 20), (990, 5000)]:
        blob = await backend.get("k", start=start, end=end)
        assert blob.data == (b"x" * 1000)[start:end]


@pytest.mark.parametrize("attempt,retry_after,low,high", [
    (0, None, 0.0, 0.02),
    (3, None, 0.0, 0.16),
    (20, None, 0.0, 1.0),  # capped
    (0, 0.5, 0.5, 0.5),  # the store's hint is a floor
    (10, 0.2, 0.2, 1.0),
])
def test_backoff_is_full_jitter_under_an_exponential_ceiling(attempt: int, retry_after: float | None, low: float, high: float) -> None:
    backend = RetryingBackend(MemoryBackend(), RetryPolicy(base_delay=0.02, max_delay=1.0), rng=random.Random(1))
    delays = [backend.delay(attempt, retry_after) for _ in range(200)]
    assert all(low <= d <= high for d in delays)
    if high > low:
        assert len({round(d, 6) for d in delays}) > 100  # jittered, not a fixed schedule


async def test_a_store_asking_for_a_long_wait_is_not_retried() -> None:
    flaky = Flaky([TransientError("SlowDown", retry_after=60)])
    with pytest.raises(TransientError):
        await retrying(flaky).get("k")
    assert flaky.calls == ["get"]


# ------------------------------------------------------------------------------ the gateway under faults
def is_clean_5xx(status: int, content_type: str, body: bytes) -> bool:
    if not 500 <= status <= 599 or not content_type.startswith("application/json"):
        return False
    doc = json.loads(body)
    return isinstance(doc.get("error"), str) and isinstance(doc.get("message"), str)


async def scrape(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(f"{url}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


async def mixed_operations(url: str, count: int, seed: int, *, allow_cut: bool = False) -> dict[str, int]:
    """``count`` PUT/GET/range operations from 6 concurrent clients on 8 keys. Every answer must
    be byte-exact against a version that may be current, or a clean 5xx JSON. ``allow_cut``:
    a read may also end in a cut connection (a chunk failed after the headers were sent)."""
    rng = random.Random(seed)
    # Versions a key may hold: after a 201, only the new one; after a failed PUT, the commit
    # may or may not have happened, so the old ones stay possible too.
    possible: dict[str, list[bytes | None]] = {}  # None: the key may not exist
    tally = {"ok": 0, "5xx": 0, "cut": 0}
    locks = {f"k{i}": asyncio.Lock() for i in range(8)}
    ops = [(rng.choice(["put", "get", "range", "range"]), f"k{rng.randrange(8)}", rng.randrange(1 << 30))
           for _ in range(count)]

    async def one(session: aiohttp.ClientSession, op: str, key: str, r: int) -> None:
        async with locks[key]:  # one operation per key at a time, so the model stays exact
            if op == "put" or key not in possible:
                data = random.Random(r).randbytes(r % 9000 + 1)
                async with session.put(f"{url}/objects/{key}", data=data) as resp:
                    body = await resp.read()
                    if resp.status == 201:
                        assert json.loads(body)["size"] == len(data)
                        possible[key] = [data]
                    else:
                        assert is_clean_5xx(resp.status, resp.content_type, body), (resp.status, body[:300])
                        possible[key] = possible.get(key, [None]) + [data]
                    tally["ok" if resp.status == 201 else "5xx"] += 1
                return
            headers = {}
            if op == "range":
                start = r % 7000
                headers["Range"] = f"bytes={start}-{start + r % 3000}"
            async with session.get(f"{url}/objects/{key}", headers=headers) as resp:
                try:
                    body = await resp.read()
                except aiohttp.ClientPayloadError:
                    assert allow_cut and resp.status in (200, 206)
                    tally["cut"] += 1
                    return
                if resp.status >= 500:
                    assert is_clean_5xx(resp.status, resp.content_type, body), (resp.status, body[:300])
                    tally["5xx"] += 1
                    return
                tally["ok"] += 1
                if resp.status == 416 or (resp.status == 404 and None in possible[key]):
                    return
                assert resp.status in (200, 206), (resp.status, body[:300])
                assert len(body) == int(resp.headers["Content-Length"])
                if resp.status == 200:
                    assert body in possible[key]
                else:
                    first, last = map(int, resp.headers["Content-Range"].split(" ")[1].split("/")[0].split("-"))
                    assert any(v is not None and body == v[first:last + 1] for v in possible[key])

    async with aiohttp.ClientSession() as session:
        queue = list(ops)

        async def worker() -> None:
            while queue:
                await one(session, *queue.pop(0))

        await asyncio.gather(*(worker() for _ in range(6)))
    return tally


async def check_store_consistent(raw: Any) -> int:
    """Every committed manifest's chunks exist with the recorded size and SHA-256."""
    manifests = 0
    async for info in raw.list(keys.MANIFEST_PREFIX):
        m = Manifest.from_json((await raw.get(info.key)).data)
        for ref in m.chunks:
            blob = await raw.get(keys.chunk_key(m.key, m.version, ref.index))
            assert len(blob.data) == ref.size, (m.key, ref.index)
            assert hashlib.sha256(blob.data).hexdigest() == ref.sha256, (m.key, ref.index)
        manifests += 1
    return manifests


@pytest.mark.parametrize("store", ["fs", "memory"])
async def test_mixed_traffic_over_a_store_failing_10_percent_of_the_time_stays_correct(store: str, tmp_path: Path) -> None:
    raw = FsBackend(tmp_path / "store") if store == "fs" else MemoryBackend()
    cfg = ServeConfig(chunk_size=2048, cache_size=64 * 1024, grace=5.0)
    plan = FaultPlan(rate=0.1, kinds=set(KINDS), seed=2026)
    baseline = {t for t in asyncio.all_tasks()}
    async with in_process_gateway(cfg, backend=raw, faults=plan) as (url, app):
        await mixed_operations(url, 60, seed=1)  # warm up caches and code paths
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            tally = await mixed_operations(url, 200, seed=2)
            gc.collect()
            growth = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        faulty = app["store"].backend
        while not isinstance(faulty, FaultyBackend):
            faulty = faulty.inner
        assert all(faulty.stats.injected[k] > 0 for k in KINDS), faulty.stats.injected
        assert tally["ok"] >= 150, tally  # retries hide most faults from clients
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                if await scrape(session, url, "chunkgate_locks_active") == 0:
                    break
                await asyncio.sleep(0.05)
            assert await scrape(session, url, "chunkgate_locks_active") == 0
    assert growth < 8 * 1024 * 1024, f"memory grew by {growth} bytes over 200 operations"
    checker = FsBackend(tmp_path / "store") if store == "fs" else raw
    if store == "memory":
        raw._closed = False  # the gateway closed it; reopen to inspect what it left behind
    assert await check_store_consistent(checker) >= 1
    for _ in range(50):
        if {t for t in asyncio.all_tasks()} - baseline <= {asyncio.current_task()}:
            break
        await asyncio.sleep(0.02)
    assert {t for t in asyncio.all_tasks()} - baseline <= {asyncio.current_task()}


async def test_a_store_failing_most_calls_gives_clean_errors_and_commits_nothing_broken() -> None:
    raw = MemoryBackend()
    cfg = ServeConfig(chunk_size=2048, grace=5.0)
    plan = FaultPlan(rate=0.6, kinds={"error", "throttle", "truncate"}, seed=99, retry_after=0.01)
    async with in_process_gateway(cfg, backend=raw, faults=plan) as (url, app):
        tally = await mixed_operations(url, 80, seed=3, allow_cut=True)
    assert tally["5xx"] > 0 and tally["ok"] > 0, tally  # both outcomes really happened
    raw._closed = False
    await check_store_consistent(raw)


# ------------------------------------------------------------------------------ clients that go away or stall
async def raw_partial_put(url: str, key: str, announced: int, sent: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"PUT /objects/{key} HTTP/1.1\r\nHost: x\r\nContent-Length: {announced}\r\n\r\n".encode() + sent)
    await writer.drain()
    return reader, writer  # type: ignore[return-value]


async def wait_locks_released(session: aiohttp.ClientSession, url: str) -> None:
    for _ in range(200):
        if await scrape(session, url, "chunkgate_locks_active") == 0 and \
                await scrape(session, url, "chunkgate_http_requests_in_flight") <= 1:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the abandoned PUT never finished")


async def test_a_client_that_disconnects_mid_put_leaves_the_old_version_served() -> None:
    raw = MemoryBackend()
    async with in_process_gateway(ServeConfig(chunk_size=1024), backend=raw) as (url, app):
        async with aiohttp.ClientSession() as session:
            async with session.put(f"{url}/objects/clip", data=b"old" * 1000) as r:
                assert r.status == 201
            reader, writer = await raw_partial_put(url, "clip", 100_000, os.urandom(5000))
            writer.close()  # type: ignore[attr-defined]
            await wait_locks_released(session, url)
            async with session.get(f"{url}/objects/clip") as r:
                assert r.status == 200 and await r.read() == b"old" * 1000
            versions = {info.key.split("/")[3] async for info in raw.list(keys.CHUNK_PREFIX)}
            assert len(versions) == 1  # the abandoned upload's chunks were removed


async def test_a_client_that_stalls_mid_put_gets_408_and_the_old_version_stays() -> None:
    async with in_process_gateway(ServeConfig(chunk_size=1024, body_timeout=0.5)) as (url, app):
        async with aiohttp.ClientSession() as session:
            async with session.put(f"{url}/objects/clip", data=b"old" * 1000) as r:
                assert r.status == 201
            reader, writer = await raw_partial_put(url, "clip", 100_000, os.urandom(5000))
            head = await asyncio.wait_for(reader.read(4096), timeout=20)  # type: ignore[attr-defined]
            writer.close()  # type: ignore[attr-defined]
            status_line, _, rest = head.partition(b"\r\n")
            assert status_line.split()[1] == b"408", head[:300]
            assert b'"error": "body_timeout"' in rest or b'"error":"body_timeout"' in rest
            async with session.get(f"{url}/objects/clip") as r:
                assert r.status == 200 and await r.read() == b"old" * 1000
