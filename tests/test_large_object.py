"""A 1 GiB object through a real `chunkgate serve` on a real SeaweedFS: byte-exact both ways, and
the gateway's memory during the upload stays near (N+2) x chunk size, not the object size."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import aiohttp
import pytest

from tests.support.gateway import GatewayProcess

SIZE = 1024**3
PIECE = 1024**2
CHUNK = 8 * 1024**2
WRITE_CONCURRENCY = 4


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except OSError:
                return
            time.sleep(0.05)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.seaweedfs
@pytest.mark.slow
async def test_a_1_gib_object_round_trips_byte_exact_with_bounded_memory(seaweedfs) -> None:
    bucket = seaweedfs.new_bucket()
    args = ["--store", f"s3://{bucket}/media", "--s3-endpoint-url", seaweedfs.endpoint, "--chunk-size", "8MiB",
            "--write-concurrency", str(WRITE_CONCURRENCY), "--cache-size", "64MiB"]
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    with GatewayProcess(args, env=env) as gw:
        sent = hashlib.sha256()

        async def body():
            for _ in range(SIZE // PIECE):
                piece = os.urandom(PIECE)
                sent.update(piece)
                yield piece

        timeout = aiohttp.ClientTimeout(total=900)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            baseline = rss_bytes(gw.proc.pid)
            with PeakRss(gw.proc.pid) as rss:
                async with s.put(f"{gw.url}/objects/big/video.mp4", data=body(),
                                 headers={"Content-Length": str(SIZE)}) as r:
                    assert r.status == 201, await r.text()
                    doc = await r.json()
            assert doc["size"] == SIZE and doc["chunks"] == SIZE // CHUNK
            growth = rss.peak - baseline
            bound = (WRITE_CONCURRENCY + 2) * CHUNK + 64 * 1024**2
            print(f"peak RSS growth during 1 GiB PUT: {growth / 2**20:.1f} MiB (bound {bound / 2**20:.0f} MiB)")
            assert growth <= bound, f"memory grew {growth / 2**20:.1f} MiB during the upload"

            got = hashlib.sha256()
            received = 0
            async with s.get(f"{gw.url}/objects/big/video.mp4") as r:
                assert r.status == 200 and int(r.headers["Content-Length"]) == SIZE
                async for piece in r.content.iter_chunked(PIECE):
                    got.update(piece)
                    received += len(piece)
            assert received == SIZE and got.hexdigest() == sent.hexdigest()

            # A range deep inside: the right bytes from the middle of the object.
            async with s.get(f"{gw.url}/objects/big/video.mp4", headers={"Range": f"bytes={SIZE - 10}-"}) as r:
                assert r.status == 206 and len(await r.read()) == 10
