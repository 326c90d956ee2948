"""The data-loss races of the commit-protocol issue, reproduced against real processes: real
``chunkgate serve`` (and ``chunkgate gc``) over one store, driven over HTTP as users drive it.

Each test is the issue's black-box reproduction, with the outcome the fix guarantees: a resumed
tus upload never overwrites a newer PUT; gc looping at --grace 0s never breaks an upload that
completes meanwhile; a key the store cannot hold is refused at creation; a correct checksummed
PATCH is never told it is corrupt; a delayed DELETE never removes a version committed after its
precondition was checked; a store that ignores conditional headers is refused for several
gateways; store failures are never a 500.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.support.gateway import GatewayProcess
from tests.support.servers import S3Server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = {"Content-Type": "application/offset+octet-stream"}


def data_of(tag: str, size: int) -> bytes:
    out = bytearray()
    n = 0
    while len(out) < size:
        out += hashlib.sha256(f"{tag}:{n}".encode()).digest()
        n += 1
    return bytes(out[:size])


def meta(key: str) -> str:
    return "key " + base64.b64encode(key.encode()).decode()


async def tus_create(session: aiohttp.ClientSession, url: str, key: str, length: int, *, tries: int = 30) -> str:
    """POST until the gateway answers 201 (a client retries a 503): the upload's URL."""
    for _ in range(tries):
        async with session.post(f"{url}/uploads/", headers={**TUS, "Upload-Length": str(length),
                                                            "Upload-Metadata": meta(key)}) as resp:
            if resp.status == 201:
                return resp.headers["Location"]
            assert resp.status in (503, 502), (resp.status, await resp.text())
    raise AssertionError(f"could not create an upload for {key}")


async def fsck_clean(store: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "fsck", "--store", str(store)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


# ------------------------------------------------------------------------------------ 1
async def test_a_resumed_tus_upload_never_overwrites_a_newer_put(tmp_path: Path) -> None:
    """40 one-PATCH uploads on a gateway whose store fails 60% of calls: some commits land while
    their 'complete' record does not. After a restart without faults, a PUT of new bytes to
    every key, then a HEAD on every upload (which finishes what was left in committing): every
    key still serves the PUT's bytes."""
    store = tmp_path / "store"
    base = ["--store", str(store), "--chunk-size", "64KiB", "--lock-stale-after", "2s", "--lock-timeout", "5s"]
    uploads: dict[str, str] = {}
    gw = GatewayProcess([*base, "--fault-rate", "0.6", "--fault-kinds", "error"])
    try:
        async with aiohttp.ClientSession() as session:
            for n in range(40):
                key = f"race/{n}.mp4"
                loc = await tus_create(session, gw.url, key, 200 * 1024)
                uploads[key] = loc
                async with session.patch(loc, data=data_of(f"tus{n}", 200 * 1024),
                                         headers={**TUS, **OCTETS, "Upload-Offset": "0"}) as resp:
                    assert resp.status in (204, 409, 500, 502, 503), (resp.status, await resp.text())
                    assert resp.status != 500, await resp.text()
    finally:
        gw.stop()
    with GatewayProcess(base) as gw:
        async with aiohttp.ClientSession() as session:
            for n, key in enumerate(uploads):
                async with session.put(f"{gw.url}/objects/{key}", data=data_of(f"put{n}", 100 * 1024)) as resp:
                    assert resp.status == 201, await resp.text()
            for loc in uploads.values():
                path = "/uploads/" + loc.rsplit("/uploads/", 1)[1]  # the same upload, on the restarted gateway
                async with session.head(gw.url + path, headers=TUS) as resp:
                    assert resp.status in (200, 404, 410), resp.status
            old = []
            for n, key in enumerate(uploads):
                async with session.get(f"{gw.url}/objects/{key}") as resp:
                    body = await resp.read()
                    assert resp.status == 200
                    if body != data_of(f"put{n}", 100 * 1024):
                        old.append(key)
            assert old == [], f"{len(old)} of 40 keys lost the acknowledged PUT to an older tus upload: {old}"
    await fsck_clean(store)


# ------------------------------------------------------------------------------------ 2
async def test_gc_in_a_loop_never_breaks_uploads_that_complete_meanwhile(tmp_path: Path) -> None:
    store = tmp_path / "store"
    stop = threading.Event()
    runs = [0]

    def gc_loop() -> None:
        while not stop.is_set():
            subprocess.run([sys.executable, "-m", "gateway.cli", "gc", "--store", str(store), "--grace", "0s"],
                           capture_output=True, timeout=60)
            runs[0] += 1

    with GatewayProcess(["--store", str(store), "--chunk-size", "16KiB"]) as gw:
        looper = threading.Thread(target=gc_loop, daemon=True)
        looper.start()
        try:
            async with aiohttp.ClientSession() as session:

                async def one(n: int) -> None:
                    data = data_of(f"gc{n}", 100 * 1024)
                    loc = await tus_create(session, gw.url, f"gc/{n}.mp4", len(data))
                    for start, end in ((0, 50 * 1024), (50 * 1024, len(data))):
                        async with session.patch(loc, data=data[start:end],
                                                 headers={**TUS, **OCTETS, "Upload-Offset": str(start)}) as resp:
                            assert resp.status == 204, await resp.text()

                for batch in range(6):  # 36 uploads, 6 at a time, while gc sweeps
                    await asyncio.gather(*(one(batch * 6 + i) for i in range(6)))
                while runs[0] < 3:
                    await asyncio.sleep(0.2)
                for n in range(36):
                    async with session.get(f"{gw.url}/objects/gc/{n}.mp4") as resp:
                        assert resp.status == 200, f"gc/{n}.mp4: {resp.status} {await resp.text()}"
                        assert await resp.read() == data_of(f"gc{n}", 100 * 1024)
        finally:
            stop.set()
            looper.join(timeout=90)
    assert runs[0] >= 3
    report = await fsck_clean(store)
    assert "36 objects checked" in report and "0 damaged" in report


# ------------------------------------------------------------------------------------ 4
async def test_the_fs_store_holds_backslash_keys_by_put_and_by_tus(tmp_path: Path) -> None:
    with GatewayProcess(["--store", str(tmp_path / "store")]) as gw:
        async with aiohttp.ClientSession() as session:
            async with session.put(f"{gw.url}/objects/win%5Cpath%5C..%5Cclip.mp4", data=b"put bytes") as resp:
                assert resp.status == 201, await resp.text()
            loc = await tus_create(session, gw.url, "win\\tus\\clip.mp4", 9)
            async with session.patch(loc, data=b"tus bytes", headers={**TUS, **OCTETS, "Upload-Offset": "0"}) as resp:
                assert resp.status == 204, await resp.text()
            for path, body in (("win%5Cpath%5C..%5Cclip.mp4", b"put bytes"), ("win%5Ctus%5Cclip.mp4", b"tus bytes")):
                async with session.get(f"{gw.url}/objects/{path}") as resp:
                    assert (resp.status, await resp.read()) == (200, body)
    assert all((tmp_path / "store") in p.parents for p in tmp_path.rglob("*") if p.is_file())


@pytest.mark.seaweedfs
async def test_a_key_the_store_cannot_hold_is_refused_when_the_upload_is_created(seaweedfs: S3Server) -> None:
    bucket = seaweedfs.new_bucket()
    key = "k/" + "x" * 1020  # 1022 bytes: legal for API.md, too long with the bucket prefix and m/
    with GatewayProcess(["--store", f"s3://{bucket}/tenant", "--s3-endpoint-url", seaweedfs.endpoint]) as gw:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{gw.url}/uploads/", headers={**TUS, "Upload-Length": "10",
                                                                    "Upload-Metadata": meta(key)}) as resp:
                assert resp.status == 400 and (await resp.json())["error"] == "bad_key"
            async with session.put(f"{gw.url}/objects/{key}", data=b"0123456789") as resp:
                assert resp.status == 400 and (await resp.json())["error"] == "bad_key"
    listed = seaweedfs.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    assert [o["Key"] for o in listed if not o["Key"].startswith("tenant/l/")] == []


# ------------------------------------------------------------------------------------ 5
async def test_a_correct_checksummed_patch_interrupted_by_a_head_is_not_told_it_is_corrupt(tmp_path: Path) -> None:
    data = data_of("sum", 256 * 1024)
    digest = base64.b64encode(hashlib.sha256(data).digest()).decode()
    with GatewayProcess(["--store", str(tmp_path / "store"), "--chunk-size", "64KiB"]) as gw:
        async with aiohttp.ClientSession() as session:
            loc = await tus_create(session, gw.url, "sum/clip.mp4", len(data))
            release = asyncio.Event()

            async def slow_body() -> Any:
                yield data[:100 * 1024]
                await release.wait()
                yield data[100 * 1024:]

            async def patch() -> tuple[int, dict[str, str], str]:
                async with session.patch(loc, data=slow_body(), headers={
                        **TUS, **OCTETS, "Upload-Offset": "0", "Upload-Checksum": f"sha256 {digest}",
                        "Content-Length": str(len(data))}) as resp:
                    return resp.status, dict(resp.headers), await resp.text()

            patching = asyncio.ensure_future(patch())
            await asyncio.sleep(1.0)  # the first 100 KiB are in; the client pauses
            async with session.head(loc, headers=TUS) as resp:  # asks the PATCH to let go
                assert resp.status == 200
                offset = int(resp.headers["Upload-Offset"])
            release.set()
            status, headers, text = await patching
            assert status != 460, f"a correct body was called corrupt: {text}"
            assert status in (204, 409), (status, text)
            if status == 409:
                assert json.loads(text)["error"] == "upload_interrupted" and headers["Upload-Offset"] == str(offset)
            assert offset == 0  # nothing of a checksummed body is kept unless all of it verified
            async with session.patch(loc, data=data, headers={**TUS, **OCTETS, "Upload-Offset": "0",
                                                              "Upload-Checksum": f"sha256 {digest}"}) as resp:
                assert resp.status == 204, await resp.text()
            async with session.get(f"{gw.url}/objects/sum/clip.mp4") as resp:
                assert await resp.read() == data


# ------------------------------------------------------------------------------------ 6
async def test_a_delayed_delete_never_removes_a_version_committed_after_its_check(tmp_path: Path) -> None:
    """Two gateways on one directory with store leases; A's store calls are rate-limited so its
    DELETE (If-Match: v1) outlives its lease; B takes the key over and commits v2 (201). A's
    DELETE must then fail its precondition, and v2 must stay."""
    store = tmp_path / "store"
    common = ["--store", str(store), "--locks", "store", "--lock-stale-after", "1s", "--lock-timeout", "15s"]
    with GatewayProcess(common) as b, GatewayProcess([*common, "--store-max-rps", "0.3"]) as a:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as session:
            async with session.put(f"{b.url}/objects/race/key", data=b"version one") as resp:
                assert resp.status == 201
                v1 = resp.headers["ETag"]

            async def slow_delete() -> tuple[int, float]:
                async with session.delete(f"{a.url}/objects/race/key", headers={"If-Match": v1}) as resp:
                    await resp.read()
                    return resp.status, time.monotonic()

            deleting = asyncio.ensure_future(slow_delete())
            await asyncio.sleep(2.5)  # A holds the lease, its calls queued behind the 0.3 req/s limit
            async with session.put(f"{b.url}/objects/race/key", data=b"version two") as resp:
                assert resp.status == 201, await resp.text()
                put_acked = time.monotonic()
            status, delete_answered = await deleting
            async with session.get(f"{b.url}/objects/race/key") as resp:
                body = await resp.read()
    if status == 204:
        assert delete_answered < put_acked, "the DELETE was acknowledged after v2, yet v2's commit came after its check"
    else:
        assert status in (409, 412, 503), status
        assert body == b"version two", "the delayed DELETE removed the version committed after its precondition"


# ------------------------------------------------------------------------------------ 8
class HeaderStrippingProxy:
    """An S3-compatible store that ignores conditional headers: a proxy in front of SeaweedFS
    that drops If-Match and If-None-Match, as some stores silently do."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("host", "if-match", "if-none-match", "content-length", "transfer-encoding")}
        body = await request.read()
        async with aiohttp.ClientSession() as session:
            async with session.request(request.method, self.upstream + request.path_qs, headers=headers, data=body,
                                       allow_redirects=False) as resp:
                payload = await resp.read()
                out = {k: v for k, v in resp.headers.items()
                       if k.lower() not in ("content-length", "transfer-encoding", "content-encoding", "connection")}
                if request.method == "HEAD":  # no body, but the size the client asks about
                    out["Content-Length"] = resp.headers.get("Content-Length", "0")
                    return web.Response(status=resp.status, headers=out)
                return web.Response(status=resp.status, body=payload, headers=out)

    async def __aenter__(self) -> "HeaderStrippingProxy":
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


@pytest.mark.seaweedfs
async def test_a_store_that_ignores_conditions_is_refused_for_several_gateways(moto_s3: S3Server, seaweedfs: S3Server) -> None:
    # In front of moto (which, unlike SeaweedFS here, does not check request signatures, so
    # the proxy may drop signed headers).
    bucket = moto_s3.new_bucket()
    async with HeaderStrippingProxy(moto_s3.endpoint) as proxy:
        args = [sys.executable, "-m", "gateway.cli", "serve", "--port", "0", "--store", f"s3://{bucket}",
                "--s3-endpoint-url", proxy.url, "--locks", "store"]
        done = await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "--locks store" in lines[0] and "conditional" in lines[0], done.stderr
        # One gateway with local locks may still use it, and says what it found.
        # (started in a thread: the proxy serves from this test's event loop meanwhile)
        gw = await asyncio.to_thread(GatewayProcess, ["--store", f"s3://{bucket}", "--s3-endpoint-url", proxy.url,
                                                      "--locks", "local"])
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{gw.url}/readyz") as resp:
                    ready = await resp.json()
            assert resp.status == 200 and ready["conditional_writes"] is False
            assert any("store probe" in line and "replaced" in line for line in gw.stderr_lines)
        finally:
            await asyncio.to_thread(gw.stop)
    # Straight to a store that honours them, the probe finds every condition honoured.
    bucket = seaweedfs.new_bucket()
    with GatewayProcess(["--store", f"s3://{bucket}", "--s3-endpoint-url", seaweedfs.endpoint, "--locks", "store"]) as gw:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{gw.url}/readyz") as resp:
                ready = await resp.json()
        assert ready["conditional_writes"] is True and ready["conditional_deletes"] is True


# ------------------------------------------------------------------------------------ 9
async def test_store_failures_are_never_a_500(tmp_path: Path) -> None:
    statuses: dict[int, int] = {}
    with GatewayProcess(["--store", str(tmp_path / "store"), "--chunk-size", "4KiB", "--lock-timeout", "3s",
                         "--fault-rate", "0.4", "--fault-kinds", "error,throttle,truncate,latency"]) as gw:
        async with aiohttp.ClientSession() as session:

            async def call(method: str, path: str, **kw: Any) -> None:
                async with session.request(method, f"{gw.url}{path}", **kw) as resp:
                    try:
                        body = await resp.read()
                    except aiohttp.ClientPayloadError:
                        # A chunk failed after the headers went out: the connection is closed
                        # instead of sending bytes that contradict them (the honest answer).
                        assert resp.status in (200, 206)
                        statuses[-1] = statuses.get(-1, 0) + 1
                        return
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
                    assert resp.status != 500, (method, path, body[:300])
                    if resp.status >= 400 and method != "HEAD":
                        assert "error" in json.loads(body), (method, path, body[:200])

            for n in range(25):
                key = f"f/{n % 5}.bin"
                await call("PUT", f"/objects/{key}", data=data_of(f"f{n}", 3 * 4096 + n))
                await call("GET", f"/objects/{key}")
                await call("GET", f"/objects/{key}", headers={"Range": "bytes=10-20"})
                await call("GET", f"/objects/{key}", headers={"Range": "bytes=0-0,5000-5001,-3"})
                await call("HEAD", f"/objects/{key}")
                await call("GET", f"/objects/{key}?manifest")
                await call("GET", "/objects?prefix=f/")
                await call("POST", "/uploads/", headers={**TUS, "Upload-Length": "5", "Upload-Metadata": meta(key)})
                if n % 3 == 0:
                    await call("DELETE", f"/objects/{key}")
                await call("GET", "/readyz")
    assert statuses.get(200, 0) > 0 and any(s >= 502 for s in statuses), statuses
