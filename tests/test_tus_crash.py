"""A real ``chunkgate serve`` on an fs store is SIGKILLed in the middle of a slow PATCH and
restarted on the same directory: HEAD must report exactly the bytes that are durable in the
store, the object must not exist yet, and the rest must be accepted into a byte-exact object."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import pytest

from storage.backends.fs import FsBackend
from tests.support.gateway import GatewayProcess

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = "application/offset+octet-stream"
CHUNK = 4096


def data_of(size: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


async def durable_bytes(store_dir: Path, upload_id: str) -> bytes:
    """What the store holds for the upload, read without the gateway: the contiguous full chunks
    from index 0, then the partly filled chunk that continues them (if any)."""
    backend = FsBackend(store_dir)
    try:
        chunks = [i async for i in backend.list("c/")]
        out = b""
        for n, info in enumerate(chunks):
            if not info.key.endswith(f"/{n:08d}") or info.size != CHUNK:
                break
            out += (await backend.get(info.key)).data
        tail_key = f"u/{upload_id}/t/{len(out) // CHUNK:08d}"
        tails = [i.key async for i in backend.list(f"u/{upload_id}/t/")]
        if tail_key in tails:
            out += (await backend.get(tail_key)).data
        return out
    finally:
        await backend.close()


# A slow body in pieces (aiohttp's reader), or a plain one of 1 MiB or more with its
# Content-Length, which the gateway reads straight into the chunk buffers (gateway/body.py).
@pytest.mark.parametrize("large", [False, True], ids=["pieces", "read-into"])
async def test_sigkill_mid_patch_then_restart_resumes_at_the_durable_offset(tmp_path: Path, large: bool) -> None:
    store = tmp_path / "store"
    args = ["--store", str(store), "--chunk-size", str(CHUNK), "--lock-stale-after", "5s", "--body-timeout", "30s"]
    data = data_of((300 if large else 40) * CHUNK + 123)
    piece = 8192 if large else 1000
    key = "crash/movie.mp4"

    gw = GatewayProcess(args)
    try:
        async with aiohttp.ClientSession() as s:
            headers = {**TUS, "Upload-Length": str(len(data)),
                       "Upload-Metadata": "key " + base64.b64encode(key.encode()).decode()}
            async with s.post(gw.url + "/uploads/", headers=headers) as r:
                assert r.status == 201
                location = r.headers["Location"]
            upload_id = location.rsplit("/", 1)[1]
            # A first PATCH leaves a partly filled chunk (1 full chunk + 904 bytes).
            async with s.patch(location, headers={**TUS, "Upload-Offset": "0", "Content-Type": OCTETS},
                               data=data[:5000]) as r:
                assert r.status == 204
            assert await durable_bytes(store, upload_id) == data[:5000]

            async def slow_body() -> AsyncIterator[bytes]:
                for pos in range(5000, len(data), piece):
                    yield data[pos:pos + piece]
                    await asyncio.sleep(0.03)

            async def slow_patch() -> None:
                headers = {**TUS, "Upload-Offset": "5000", "Content-Type": OCTETS}
                if large:
                    headers["Content-Length"] = str(len(data) - 5000)
                async with aiohttp.ClientSession() as other:
                    async with other.patch(location, headers=headers, data=slow_body()) as r:
                        await r.read()

            patch_task = asyncio.ensure_future(slow_patch())
            backend = FsBackend(store)
            try:
                for _ in range(400):
                    await asyncio.sleep(0.025)
                    if len([i async for i in backend.list("c/")]) >= 5:
                        break
            finally:
                await backend.close()
            assert not patch_task.done()
            gw.stop(kill=True)
            await asyncio.gather(patch_task, return_exceptions=True)
    finally:
        gw.stop(kill=True)

    durable = await durable_bytes(store, upload_id)
    assert len(durable) >= 5 * CHUNK
    assert durable == data[: len(durable)]  # every durable byte is the client's byte at its place
    assert len(durable) < len(data)

    with GatewayProcess(args) as gw2:
        location = f"{gw2.url}/uploads/{upload_id}"
        async with aiohttp.ClientSession() as s:
            async with s.head(location, headers=TUS) as r:
                assert r.status == 200
                offset = int(r.headers["Upload-Offset"])
            assert offset == len(durable)
            async with s.get(f"{gw2.url}/objects/{key}") as r:
                assert r.status == 404
            async with s.patch(location, headers={**TUS, "Upload-Offset": str(offset), "Content-Type": OCTETS},
                               data=data[offset:]) as r:
                assert r.status == 204
                assert r.headers["Upload-Offset"] == str(len(data))
            async with s.get(f"{gw2.url}/objects/{key}") as r:
                assert r.status == 200
                assert await r.read() == data
            async with s.head(location, headers=TUS) as r:
                assert r.headers["Upload-Offset"] == str(len(data))
