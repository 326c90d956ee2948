"""Many viewers of one cold video cost the store one read of each chunk.

32 readers start on a 64 MiB object nobody has read yet (the replaced system fetched the same
chunk once per viewer). Each body must be byte-exact, and the store must have been read exactly
once per byte: ``chunkgate_backend_bytes_read_total`` == object size. The ranged variant checks
the same for random seeks: store bytes == the distinct chunks the ranges touch.
Viewers that walk away mid-stream must not disturb the others, nor count as server errors.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import ServeConfig
from storage.backends.fs import FsBackend
from storage.keys import manifest_key
from tests.support.gateway import GatewayProcess, in_process_gateway

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

MiB = 1024 * 1024
SIZE = 64 * MiB
CHUNK = 1 * MiB
VIEWERS = 32


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def scrape(http: aiohttp.ClientSession, base: str) -> str:
    async with http.get(f"{base}/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


async def put(http: aiohttp.ClientSession, url: str, body: bytes) -> None:
    async with http.put(url, data=body, headers={"Content-Type": "video/mp4"}) as resp:
        assert resp.status == 201, await resp.text()


async def read_digest(http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None) -> tuple[int, str, int]:
    """(status, sha256 of the body, body length), streaming: 32 x 64 MiB is not kept in memory."""
    h = hashlib.sha256()
    n = 0
    async with http.get(url, headers=headers or {}) as resp:
        async for piece in resp.content.iter_chunked(MiB):
            h.update(piece)
            n += len(piece)
        assert n == int(resp.headers["Content-Length"])
        return resp.status, h.hexdigest(), n


async def manifest_size(tmp_path: Path, key: str) -> int:
    """Bytes of the stored manifest record, as the gateway reads it from the store."""
    return (await FsBackend(tmp_path / "store").head(manifest_key(key))).size


@pytest.fixture
def gateway(tmp_path: Path):  # type: ignore[no-untyped-def]
    gw = GatewayProcess(["--store", str(tmp_path / "store"), "--chunk-size", str(CHUNK), "--cache-size", "256MiB"])
    try:
        yield gw
    finally:
        gw.stop()


async def test_32_viewers_of_a_cold_object_read_each_store_byte_once(gateway: GatewayProcess, tmp_path: Path) -> None:
    body = os.urandom(SIZE)
    want = hashlib.sha256(body).hexdigest()
    url = f"{gateway.url}/objects/storm/cold.mp4"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=VIEWERS + 4)) as http:
        await put(http, url, body)
        del body
        before = metric(await scrape(http, gateway.url), "chunkgate_backend_bytes_read_total")
        results = await asyncio.gather(*(read_digest(http, url) for _ in range(VIEWERS)))
        after_text = await scrape(http, gateway.url)
    assert all(r == (200, want, SIZE) for r in results), [r[:1] + r[2:] for r in results if r != (200, want, SIZE)]
    read = metric(after_text, "chunkgate_backend_bytes_read_total") - before
    # The counter also sees manifest reads (a few KiB; re-read once its 1 s memory TTL runs out
    # on a slow machine): the rest must be the object's bytes exactly once.
    manifest = await manifest_size(tmp_path, "storm/cold.mp4")
    assert (read - SIZE) % manifest == 0 and 0 <= (read - SIZE) // manifest <= 5, \
        f"the store was read {read / SIZE:.4f}x the object size ({read} bytes, manifest {manifest})"
    assert metric(after_text, "chunkgate_chunk_size_mismatch_total") == 0


async def test_32_viewers_seeking_at_random_read_each_touched_chunk_once(gateway: GatewayProcess, tmp_path: Path) -> None:
    body = os.urandom(SIZE)
    url = f"{gateway.url}/objects/storm/seeks.mp4"
    rng = random.Random(3)
    # Ranges of 1-3 MiB: a player's seek-and-buffer, big enough to go through the chunk cache.
    plans = [[(s, s + rng.randint(MiB, 3 * MiB) - 1) for s in (rng.randrange(0, SIZE - 3 * MiB) for _ in range(3))]
             for _ in range(VIEWERS)]
    touched = {i for plan in plans for lo, hi in plan for i in range(lo // CHUNK, hi // CHUNK + 1)}

    async def viewer(plan: list[tuple[int, int]]) -> list[bool]:
        out = []
        for lo, hi in plan:
            async with http.get(url, headers={"Range": f"bytes={lo}-{hi}"}) as resp:
                data = await resp.read()
                out.append(resp.status == 206 and resp.headers["Content-Range"] == f"bytes {lo}-{hi}/{SIZE}"
                           and data == body[lo:hi + 1])
        return out

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=VIEWERS + 4)) as http:
        await put(http, url, body)
        before = metric(await scrape(http, gateway.url), "chunkgate_backend_bytes_read_total")
        results = await asyncio.gather(*(viewer(p) for p in plans))
        read = metric(await scrape(http, gateway.url), "chunkgate_backend_bytes_read_total") - before
    assert all(all(r) for r in results)
    manifest = await manifest_size(tmp_path, "storm/seeks.mp4")
    chunk_bytes = len(touched) * CHUNK
    assert (read - chunk_bytes) % manifest == 0 and 0 <= (read - chunk_bytes) // manifest <= 10, \
        f"store read {read} bytes for {len(touched)} distinct chunks ({chunk_bytes} bytes, manifest {manifest})"


async def test_viewers_leaving_mid_stream_neither_disturb_the_others_nor_count_as_errors(tmp_path: Path) -> None:
    size = 16 * MiB
    body = os.urandom(size)
    want = hashlib.sha256(body).hexdigest()
    cfg = ServeConfig(chunk_size=256 * 1024)
    async with in_process_gateway(cfg, backend=FsBackend(tmp_path)) as (base, _), \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        url = f"{base}/objects/storm/leavers.mp4"
        await put(http, url, body)

        async def leaver(after: int) -> None:
            resp = await http.get(url)
            await resp.content.readexactly(after)
            resp.close()  # like a player seeking or a tab closing: drop the connection

        stayers = [read_digest(http, url) for _ in range(8)]
        leavers = [leaver(64 * 1024 * (i + 1)) for i in range(8)]
        results = await asyncio.gather(*stayers, *leavers)
        await asyncio.sleep(0.2)  # let the gateway notice the closed connections
        text = await scrape(http, base)
    assert all(r == (200, want, size) for r in results[:8])
    errors = sum(metric(text, "chunkgate_http_requests_total", status=s) for s in ("500", "502", "503"))
    assert errors == 0
    assert metric(text, "chunkgate_http_requests_total", method="GET", status="200") == 16
