"""A store that stalls: real ``chunkgate serve`` processes over moto's S3, with a fault proxy
(tests/support/faultproxy.py) between them that stalls, slows, resets and heals on command.

What a user must see (README "A store that stalls"): startup fails in bounded time with one line
naming the endpoint; requests that need the stalled store get a JSON 504/503 within a few times
``--store-timeout``, never a 500 and never a hang; requests that need no store stay fast; a PUT
cut off by the stall leaves the old version or a whole new one, nothing half-committed; once
the store answers again, everything works again by itself.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.faultproxy import FaultProxy
from tests.support.gateway import GatewayProcess
from tests.support.servers import S3Server

ROOT = Path(__file__).resolve().parents[1]
DEADLINE = 2.0  # --store-timeout in these tests
BOUND = 3 * DEADLINE  # what a client may wait at most for a clean error
TIMEOUT_FLAGS = ["--store-timeout", f"{DEADLINE:g}s", "--store-read-timeout", "1s", "--store-connect-timeout", "1s"]


def url_port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def call(port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 30.0) -> tuple[int, dict[str, str], bytes, float]:
    """One request on a fresh connection: (status, headers, body, seconds)."""
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data, time.monotonic() - t0
    finally:
        conn.close()


def assert_clean_store_error(status: int, headers: dict[str, str], body: bytes, seconds: float, *,
                             head: bool = False) -> None:
    """What a client gets from a stalled store: a JSON 503/504 with Retry-After, in bounded time."""
    assert status in (503, 504), (status, body)
    assert headers["content-type"].startswith("application/json")
    if not head:  # a HEAD's answer has the headers of the JSON error and no body
        doc = json.loads(body)
        assert doc["error"] in ("store_timeout", "store_unavailable", "lock_timeout") and doc["message"]
    assert "retry-after" in headers
    assert seconds < BOUND, f"{seconds:.1f}s for a clean error; the deadline is {DEADLINE}s"


@pytest.fixture
def proxied(moto_s3: S3Server) -> Iterator[tuple[FaultProxy, str]]:
    host, port = moto_s3.endpoint.removeprefix("http://").split(":")
    with FaultProxy(host, int(port)) as proxy:
        yield proxy, moto_s3.new_bucket()


def start_gateway(proxy: FaultProxy, bucket: str, *extra: str) -> GatewayProcess:
    return GatewayProcess(["--store", f"s3://{bucket}", "--s3-endpoint-url", proxy.endpoint, "--chunk-size", "64KiB",
                           "--lock-timeout", "4s", *TIMEOUT_FLAGS, *extra], cwd=ROOT, env={"PYTHONPATH": str(ROOT)})


def test_serve_exits_2_with_one_line_naming_the_endpoint_when_the_store_stalls_at_startup(
        proxied: tuple[FaultProxy, str]) -> None:
    proxy, bucket = proxied
    proxy.stall()
    t0 = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--port", "0", "--store", f"s3://{bucket}",
                             "--s3-endpoint-url", proxy.endpoint, *TIMEOUT_FLAGS],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            timeout=120)
    seconds = time.monotonic() - t0
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert proxy.endpoint in lines[0] and "--store" in lines[0] and "did not answer" in lines[0]
    assert result.stdout == ""
    assert proxy.accepted >= 1  # it really reached the stalled endpoint
    # The deadline plus interpreter startup (imports take seconds on a busy machine), not minutes.
    assert seconds < BOUND + 20, seconds


def test_a_store_stalled_after_startup_gives_clean_errors_while_healthz_metrics_and_cache_hits_stay_fast(
        proxied: tuple[FaultProxy, str]) -> None:
    proxy, bucket = proxied
    clients = 24
    with start_gateway(proxy, bucket) as gw:
        port = gw.port
        warm = os.urandom(100_000)
        assert call(port, "PUT", "/objects/warm.bin", warm)[0] == 201
        for i in range(4):
            assert call(port, "PUT", f"/objects/cold-{i}.bin", os.urandom(5000))[0] == 201
        fds_before = metric(port, "process_open_fds")

        # A cache hit: chunks and the manifest in memory (the manifest for --manifest-ttl, 1 s).
        for _attempt in range(3):
            assert call(port, "GET", "/objects/warm.bin")[2] == warm
            proxy.stall()
            status, _, data, seconds = call(port, "GET", "/objects/warm.bin", timeout=BOUND + 5)
            if seconds < 0.5:
                break
            proxy.heal()  # the machine was too busy to hit inside the manifest's TTL: once more
        assert status == 200 and data == warm

        def one(i: int) -> tuple[int, dict[str, str], bytes, float]:
            if i % 3 == 0:
                return call(port, "PUT", f"/objects/new-{i}.bin", os.urandom(3000), timeout=BOUND + 30)
            if i % 3 == 1:
                return call(port, "GET", f"/objects/cold-{i % 4}.bin", timeout=BOUND + 30)
            return call(port, "HEAD", f"/objects/absent-{i}.bin", timeout=BOUND + 30)

        with ThreadPoolExecutor(clients + 4) as pool:
            stalled = [pool.submit(one, i) for i in range(clients)]
            time.sleep(0.3)  # they are all waiting on the store now
            health = call(port, "GET", "/healthz")
            metrics_answer = call(port, "GET", "/metrics")
            ready = pool.submit(call, port, "GET", "/readyz", None, None, BOUND + 30)
            results = [f.result() for f in stalled]
            ready_status, _, ready_body, ready_seconds = ready.result()

        assert health[0] == 200 and health[3] < DEADLINE
        assert metrics_answer[0] == 200 and metrics_answer[3] < DEADLINE
        for i, (status, headers, body, seconds) in enumerate(results):
            assert_clean_store_error(status, headers, body, seconds, head=i % 3 == 2)
            if i % 3 == 1:  # a GET that needs the store: the gateway's upstream timed out
                assert status == 504 and json.loads(body)["error"] == "store_timeout"
        assert ready_status == 503 and json.loads(ready_body)["error"] == "store_unavailable"
        assert ready_seconds < BOUND
        # Sockets stay bounded: one per waiting client and store request, not a pile-up.
        assert metric(port, "process_open_fds") < fds_before + 3 * clients + 20
        assert not any("Traceback" in line for line in gw.stderr_lines), "".join(gw.stderr_lines[-20:])

        # Heal: the next requests succeed by themselves, within a few seconds of the store answering.
        proxy.heal()
        t0 = time.monotonic()
        while True:
            status, _, data, _ = call(port, "GET", "/objects/cold-1.bin", timeout=BOUND + 30)
            if status == 200:
                break
            assert time.monotonic() - t0 < 2 * BOUND, f"still {status} {time.monotonic() - t0:.1f}s after healing"
            time.sleep(0.1)
        assert call(port, "PUT", "/objects/after.bin", b"after")[0] == 201
        assert call(port, "GET", "/objects/after.bin")[2] == b"after"
        assert call(port, "GET", "/readyz")[0] == 200
        assert count_status(port, "504") >= clients // 3  # the metrics saw the stall's answers...
        assert count_500s(port) == 0  # ...and no 500 among them


def test_a_put_cut_off_by_a_stall_leaves_the_old_version_or_the_whole_new_one(
        proxied: tuple[FaultProxy, str]) -> None:
    proxy, bucket = proxied
    old, new = os.urandom(200_000), os.urandom(300_000)
    with start_gateway(proxy, bucket) as gw:
        port = gw.port
        assert call(port, "PUT", "/objects/v.bin", old)[0] == 201

        def body() -> Iterator[bytes]:
            yield new[:150_000]
            proxy.stall()  # the store stops answering in the middle of the upload
            yield new[150_000:]

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=BOUND + 30)
        t0 = time.monotonic()
        conn.request("PUT", "/objects/v.bin", body=body(), headers={"Content-Length": str(len(new))})
        resp = conn.getresponse()
        answer, seconds = resp.read(), time.monotonic() - t0
        conn.close()
        assert_clean_store_error(resp.status, {k.lower(): v for k, v in resp.getheaders()}, answer, seconds)

        proxy.heal()
        t0 = time.monotonic()
        while (got := call(port, "GET", "/objects/v.bin"))[0] != 200:
            assert time.monotonic() - t0 < 2 * BOUND, got
            time.sleep(0.1)
        assert got[2] in (old, new)  # one committed version's bytes, whole
        assert count_500s(port) == 0
    fsck = subprocess.run([sys.executable, "-m", "gateway.cli", "fsck", "--store", f"s3://{bucket}",
                           "--s3-endpoint-url", proxy.endpoint, "--quiet"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=120)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


@pytest.mark.parametrize("mode", ["slow", "reset"])
def test_a_slow_or_resetting_store_gives_answers_or_clean_errors_never_a_500(
        proxied: tuple[FaultProxy, str], mode: str) -> None:
    proxy, bucket = proxied
    proxy.slow_delay = 0.002  # ~500 bytes/s: a request's headers take about a second
    data = os.urandom(2000)
    with start_gateway(proxy, bucket) as gw:
        port = gw.port
        assert call(port, "PUT", "/objects/small.bin", data)[0] == 201
        proxy.set_mode(mode)
        outcomes = []
        for method, path, body in [("GET", "/objects/small.bin", None), ("PUT", "/objects/other.bin", data),
                                   ("GET", "/objects/other.bin", None)]:
            status, headers, answer, seconds = call(port, method, path, body, timeout=BOUND + 30)
            outcomes.append(status)
            if mode == "reset":
                assert status in (502, 503, 504), (method, status, answer)
                assert json.loads(answer)["error"].startswith("store_")
                assert seconds < BOUND
            elif status in (200, 201):
                if method == "GET" and path.endswith("small.bin"):
                    assert answer == data
            else:
                assert_clean_store_error(status, headers, answer, seconds)
        proxy.heal()
        t0 = time.monotonic()
        while call(port, "GET", "/objects/small.bin")[0] != 200:
            assert time.monotonic() - t0 < 2 * BOUND
            time.sleep(0.1)
        assert count_500s(port) == 0, outcomes


def test_a_slow_but_moving_store_is_not_cut_off_by_the_read_timeout(proxied: tuple[FaultProxy, str]) -> None:
    """--store-read-timeout is between two bytes: an upload of chunks that takes several times as
    long to reach the store (one byte at a time) still succeeds, and so does reading it back."""
    proxy, bucket = proxied
    proxy.slow_delay = 0.0  # one byte per write: tens of KB/s here
    data = os.urandom(60_000)
    with GatewayProcess(["--store", f"s3://{bucket}", "--s3-endpoint-url", proxy.endpoint, "--chunk-size", "64KiB",
                         "--store-timeout", "60s", "--store-read-timeout", "500ms", "--store-connect-timeout", "1s"],
                        cwd=ROOT, env={"PYTHONPATH": str(ROOT)}) as gw:
        port = gw.port
        proxy.slow()
        status, _, answer, seconds = call(port, "PUT", "/objects/slow.bin", data, timeout=120)
        assert status == 201, answer
        assert seconds > 0.5  # it did take longer than the read timeout
        status, _, body, _ = call(port, "GET", "/objects/slow.bin", timeout=120)
        assert status == 200 and body == data
        proxy.heal()


def metric(port: int, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = call(port, "GET", "/metrics")[2].decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"no metric {name}")


def count_status(port: int, status: str) -> int:
    """Requests the gateway answered with ``status``, by its own metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = call(port, "GET", "/metrics")[2].decode()
    return sum(int(s.value) for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "chunkgate_http_requests_total" and s.labels.get("status") == status)


def count_500s(port: int) -> int:
    return count_status(port, "500")


class HeldManifestWrites:
    """A memory store whose manifest writes are held on the wire until ``release()`` and then
    land, whether or not the caller still waits -- as a request already sent to S3 does."""

    def __init__(self) -> None:
        from storage.backends.memory import MemoryBackend

        self.inner = MemoryBackend()
        self.name = "held"
        self.holding = False
        self._released = asyncio.Event()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def release(self) -> None:
        self.holding = False
        self._released.set()

    async def put(self, key: str, data: bytes, **cond: object) -> str:
        if not (self.holding and key.startswith("m/")):
            return await self.inner.put(key, data, **cond)  # type: ignore[arg-type]

        async def later() -> str:
            await self._released.wait()
            return await self.inner.put(key, bytes(data), **cond)  # type: ignore[arg-type]

        return await asyncio.shield(asyncio.ensure_future(later()))


async def test_a_commit_cut_off_by_the_deadline_is_unknown_and_keeps_its_chunks_so_it_can_still_land() -> None:
    from storage.errors import StoreUnavailable
    from storage.locks import LockManager
    from storage.objects import ObjectStore, StoreOptions
    from storage.stack import StackOptions, build_backend

    raw = HeldManifestWrites()
    backend = build_backend(StackOptions(store="mem", store_timeout=0.3), raw=raw)  # type: ignore[arg-type]
    store = ObjectStore(backend, LockManager(), StoreOptions(chunk_size=1024))

    async def body(data: bytes):
        yield data

    old, new = os.urandom(3000), os.urandom(5000)
    await store.put("k", body(old), content_type="application/octet-stream")
    chunks_before = {info.key async for info in raw.inner.list("c/")}
    raw.holding = True
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable) as caught:
        await store.put("k", body(new), content_type="application/octet-stream")
    assert time.monotonic() - t0 < 10 * 0.3  # the deadline, the read-back's, and the lock's
    assert caught.value.outcome_unknown  # a timed-out commit is unknown, never "failed"
    chunks_after = {info.key async for info in raw.inner.list("c/")}
    assert len(chunks_after - chunks_before) == 5  # the new version's chunks are kept, not deleted on a guess

    raw.release()  # the held write lands after all: the new version must be whole
    for _ in range(100):
        await asyncio.sleep(0.02)
        manifest = await store.head("k", fresh=True)
        if manifest.size == len(new):
            break
    data = b"".join([bytes(piece) async for piece in store.read(manifest, 0, manifest.size)])
    assert data == new
    await store.close()


async def test_a_hung_file_under_the_directory_store_answers_504_store_timeout_within_the_deadline(tmp_path: Path) -> None:
    """A hung NFS mount, as a FIFO nobody writes: opening it blocks the store's thread."""
    import aiohttp

    from gateway.config import ServeConfig
    from storage.backends.fs import FsBackend
    from tests.support.gateway import in_process_gateway

    fs = FsBackend(str(tmp_path / "data"))
    cfg = ServeConfig(store=str(tmp_path / "data"), store_timeout=0.5)
    async with in_process_gateway(cfg, backend=fs) as (url, _app):
        async with aiohttp.ClientSession() as http:
            async with http.put(f"{url}/objects/fine.txt", data=b"fine") as resp:
                assert resp.status == 201
            fifo = fs.path_of("m/hung.txt")
            os.makedirs(os.path.dirname(fifo), exist_ok=True)
            os.mkfifo(fifo)
            try:
                t0 = time.monotonic()
                async with http.get(f"{url}/objects/hung.txt") as resp:
                    doc, seconds = await resp.json(), time.monotonic() - t0
                    assert resp.status == 504 and resp.headers["Retry-After"] == "1"
                assert doc["error"] == "store_timeout" and "0.5s" in doc["message"]
                assert seconds < 3 * 0.5 + 1.0
                async with http.get(f"{url}/objects/fine.txt") as resp:  # the rest of the store still works
                    assert resp.status == 200 and await resp.read() == b"fine"
                async with http.get(f"{url}/healthz") as resp:
                    assert resp.status == 200
            finally:
                # Unblock the store's thread that still waits on the FIFO, so the store can close.
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.parametrize(("argv", "environ", "expected"), [
    ([], {}, (3.0, 10.0, 30.0)),
    (["--store-timeout", "5s"], {}, (3.0, 10.0, 5.0)),
    ([], {"CHUNKGATE_STORE_TIMEOUT": "1m", "CHUNKGATE_STORE_READ_TIMEOUT": "500ms",
          "CHUNKGATE_STORE_CONNECT_TIMEOUT": "1"}, (1.0, 0.5, 60.0)),
    (["--store-timeout", "0"], {}, (3.0, 10.0, 0.0)),
], ids=["defaults", "flag", "env", "no-deadline"])
def test_the_store_timeout_flags_and_their_environment_variables(argv: list[str], environ: dict[str, str],
                                                                  expected: tuple[float, float, float]) -> None:
    from gateway.config import parse_serve_args

    cfg = parse_serve_args(argv, environ)
    assert (cfg.store_connect_timeout, cfg.store_read_timeout, cfg.store_timeout) == expected


@pytest.mark.parametrize("argv", [["--store-timeout", "soon"], ["--store-read-timeout", "0"],
                                  ["--store-connect-timeout", "0s"], ["--store-timeout=-1s"]])
def test_a_bad_store_timeout_is_refused_naming_the_flag(argv: list[str]) -> None:
    from gateway.config import ConfigError, parse_serve_args

    with pytest.raises(ConfigError) as caught:
        parse_serve_args(argv, {})
    assert str(caught.value).startswith(argv[0].split("=")[0] + ":")


def test_serve_with_a_bad_store_timeout_exits_2_with_one_line() -> None:
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "serve", "--port", "0", "--store-timeout", "soon"],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--store-timeout" in lines[0] and "Traceback" not in result.stderr
