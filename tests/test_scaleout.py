"""Several real ``chunkgate serve`` processes over one real SeaweedFS bucket, with store leases.

- 48 concurrent writers spread over three gateways overwrite the same 4 keys while readers on
  all three read in a loop: every body read is exactly one complete written version and matches
  its ETag; afterwards fsck is clean, and gc --grace 0 removes every unreferenced chunk and
  nothing else.
- A gateway holding an upload's lease (a slow tus PATCH) is killed with SIGKILL: a request for
  that upload on another gateway gets the lock within --lock-stale-after + 1 s (by take-over of
  the expired lease), and the upload resumes there from its durable offset.
(Fencing of a holder that comes back after being taken over is unit-tested in test_leases.py.)
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from storage import keys
from tests.support.gateway import GatewayProcess
from tests.support.servers import ACCESS_KEY, REGION, SECRET_KEY

pytestmark = [pytest.mark.seaweedfs, pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parent.parent
CHUNK = 64 * 1024
ENV = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION,
       "PYTHONPATH": str(REPO)}
STALE = 3.0


def store_args(seaweedfs, bucket: str) -> list[str]:
    return ["--store", f"s3://{bucket}", "--s3-endpoint-url", seaweedfs.endpoint]


def start_gateways(count: int, args: list[str]) -> list[GatewayProcess]:
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: GatewayProcess(args, env=ENV, cwd=REPO, ready_timeout=60), range(count)))


def make_body(writer: int, n: int, size: int) -> bytes:
    """A body that describes itself, so a reader can tell a complete version from a mix."""
    head = f"w{writer:03d}-{n:03d}-{size:08d}|".encode()
    return head + random.Random(f"{writer}/{n}").randbytes(size - len(head))


def is_complete_version(data: bytes) -> bool:
    try:
        writer, n, size = data[: data.index(b"|")].decode()[1:].split("-")
    except ValueError:
        return False
    return len(data) == int(size) and data == make_body(int(writer), int(n), int(size))


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **ENV}, cwd=REPO, timeout=300, check=False)


def bucket_state(seaweedfs, bucket: str) -> tuple[set[str], set[str]]:
    """(every chunk key in the bucket, the chunk keys the committed manifests reference)."""
    client = seaweedfs.client()
    listed: set[str] = set()
    manifests: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            if item["Key"].startswith(keys.CHUNK_PREFIX):
                listed.add(item["Key"])
            elif item["Key"].startswith(keys.MANIFEST_PREFIX):
                manifests.append(item["Key"])
    referenced: set[str] = set()
    for mk in manifests:
        doc = json.loads(client.get_object(Bucket=bucket, Key=mk)["Body"].read())
        referenced |= {keys.chunk_key(doc["key"], doc["version"], c["index"]) for c in doc["chunks"]}
    return listed, referenced


async def test_three_gateways_48_writers_readers_then_fsck_and_gc(seaweedfs) -> None:
    bucket = seaweedfs.new_bucket()
    gws = start_gateways(3, [*store_args(seaweedfs, bucket), "--locks", "store", "--chunk-size", "64KiB",
                             "--lock-stale-after", "10s", "--lock-timeout", "60s", "--grace", "1h",
                             "--log-level", "warning"])
    names = [f"shared/clip-{i}.bin" for i in range(4)]
    written: dict[str, str] = {}  # etag -> sha256 of the body
    reads: list[tuple[str, str]] = []
    bad_reads: list[str] = []
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:

            async def put(gw: GatewayProcess, name: str, writer: int, n: int) -> None:
                data = make_body(writer, n, 2 * CHUNK + random.Random(writer * 7 + n).randrange(1, CHUNK))
                async with http.put(f"{gw.url}/objects/{name}", data=data) as resp:
                    assert resp.status == 201, await resp.text()
                    written[resp.headers["ETag"]] = hashlib.sha256(data).hexdigest()

            for i, name in enumerate(names):  # every key exists before readers start
                await put(gws[i % 3], name, 900 + i, 0)

            writers_done = asyncio.Event()

            async def writer(w: int) -> None:
                for n in range(2):
                    await put(gws[w % 3], names[w % 4], w, n)

            async def reader(gw: GatewayProcess, r: int) -> None:
                rng = random.Random(r)
                while not writers_done.is_set():
                    async with http.get(f"{gw.url}/objects/{rng.choice(names)}") as resp:
                        data = await resp.read()
                        if resp.status != 200 or not is_complete_version(data) \
                                or int(resp.headers["Content-Length"]) != len(data):
                            bad_reads.append(f"{gw.url} {resp.status} {len(data)} bytes {data[:24]!r}")
                        reads.append((resp.headers.get("ETag", ""), hashlib.sha256(data).hexdigest()))

            readers = [asyncio.ensure_future(reader(gw, 10 * i + j)) for i, gw in enumerate(gws) for j in range(2)]
            await asyncio.gather(*(writer(w) for w in range(48)))
            writers_done.set()
            await asyncio.gather(*readers)

            assert not bad_reads, bad_reads[:5]
            assert len(written) == 4 + 96
            assert reads and all(written.get(etag) == digest for etag, digest in reads), "a body did not match its ETag"
            # Other gateways may serve a manifest from memory for up to manifest_ttl (1 s) after a
            # commit elsewhere; past that bound all three serve one and the same version per key.
            await asyncio.sleep(1.2)
            for name in names:
                etags = set()
                for gw in gws:
                    async with http.get(f"{gw.url}/objects/{name}") as resp:
                        assert resp.status == 200 and is_complete_version(await resp.read())
                        etags.add(resp.headers["ETag"])
                assert len(etags) == 1
            async with http.get(f"{gws[0].url}/metrics") as resp:
                assert "chunkgate_lock_lease_conflicts_total" in await resp.text()
    finally:
        for gw in gws:
            gw.stop()

    checked = run_cli("fsck", *store_args(seaweedfs, bucket))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "fsck: 4 objects checked: 4 ok, 0 repaired, 0 damaged" in checked.stdout

    listed, referenced = bucket_state(seaweedfs, bucket)
    assert referenced <= listed and len(listed - referenced) > 0  # replaced versions are left over
    swept = run_cli("gc", *store_args(seaweedfs, bucket), "--grace", "0")
    assert swept.returncode == 0, swept.stdout + swept.stderr
    assert f"deleted {len(listed - referenced)} chunks" in swept.stdout
    after, still_referenced = bucket_state(seaweedfs, bucket)
    assert after == referenced == still_referenced
    assert run_cli("fsck", *store_args(seaweedfs, bucket), "--quiet").returncode == 0


def tus_metadata(**pairs: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in pairs.items())


class SlowPatch(threading.Thread):
    """A tus PATCH that sends its body a little at a time over a raw socket, so the gateway holds
    the upload's lease while it reads, until the connection dies with the gateway."""

    def __init__(self, url: str, path: str, data: bytes, first: int) -> None:
        super().__init__(daemon=True)
        self.url, self.path, self.data, self.first = urlsplit(url), path, data, first
        self.sent = 0

    def run(self) -> None:
        try:
            with socket.create_connection((self.url.hostname, self.url.port), timeout=60) as sock:
                head = (f"PATCH {self.path} HTTP/1.1\r\nHost: {self.url.netloc}\r\nTus-Resumable: 1.0.0\r\n"
                        f"Upload-Offset: 0\r\nContent-Type: application/offset+octet-stream\r\n"
                        f"Content-Length: {len(self.data)}\r\n\r\n")
                sock.sendall(head.encode())
                sock.sendall(self.data[: self.first])
                self.sent = self.first
                while self.sent < len(self.data):
                    time.sleep(0.2)
                    sock.sendall(self.data[self.sent: self.sent + 1024])
                    self.sent += 1024
        except OSError:
            pass  # the gateway died: expected


async def test_sigkilled_lease_holder_is_taken_over_within_stale_after(seaweedfs) -> None:
    bucket = seaweedfs.new_bucket()
    common = [*store_args(seaweedfs, bucket), "--locks", "store", "--chunk-size", "64KiB",
              "--lock-stale-after", f"{STALE:g}s", "--lock-timeout", "30s", "--log-level", "warning"]
    doomed, survivor = start_gateways(2, common)
    data = os.urandom(3 * CHUNK + 1000)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            async with http.post(f"{doomed.url}/uploads/", headers={
                "Tus-Resumable": "1.0.0", "Upload-Length": str(len(data)),
                "Upload-Metadata": tus_metadata(key="big/upload.bin")}) as resp:
                assert resp.status == 201, await resp.text()
                path = urlsplit(resp.headers["Location"]).path
            upload_id = path.rstrip("/").rsplit("/", 1)[1]

            patch = SlowPatch(doomed.url, path, data, first=CHUNK + 5000)
            patch.start()
            for _ in range(100):  # the doomed gateway holds the upload's lock, in the store too
                async with http.get(f"{doomed.url}/admin/locks") as resp:
                    held = [lk for lk in (await resp.json())["locks"] if upload_id in lk["key"]]
                if held and patch.sent > CHUNK:
                    break
                await asyncio.sleep(0.1)
            assert held, "the PATCH never took the upload's lock"
            await asyncio.sleep(STALE)  # longer than stale_after: renewals keep it held meanwhile

            doomed.stop(kill=True)
            killed_at = time.monotonic()
            async with http.head(f"{survivor.url}{path}", headers={"Tus-Resumable": "1.0.0"}) as resp:
                took = time.monotonic() - killed_at
                assert resp.status == 200
                offset = int(resp.headers["Upload-Offset"])
            assert took <= STALE + 1.0, f"the lock came free {took:.2f}s after the kill"
            assert 0 < offset <= patch.sent
            async with http.get(f"{survivor.url}/metrics") as resp:
                text = await resp.text()
            takeovers = [ln for ln in text.splitlines() if ln.startswith("chunkgate_lock_takeovers_total")]
            assert takeovers and float(takeovers[0].split()[-1]) >= 1

            # The upload resumes on the survivor from the durable offset.
            async with http.patch(f"{survivor.url}{path}", data=data[offset:], headers={
                "Tus-Resumable": "1.0.0", "Upload-Offset": str(offset),
                "Content-Type": "application/offset+octet-stream"}) as resp:
                assert resp.status == 204, await resp.text()
            async with http.get(f"{survivor.url}/objects/big/upload.bin") as resp:
                assert resp.status == 200 and await resp.read() == data
    finally:
        doomed.stop(kill=True)
        survivor.stop()
