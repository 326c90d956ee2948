"""tuspy (a tus client nobody here wrote) against an in-process gateway: full upload, an upload
interrupted and resumed by a fresh client, checksum mismatch (460), wrong offset (409),
termination, and the expiry sweep. tuspy is synchronous (requests), so it runs in a thread."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
import requests
import xxhash
from tusclient import client as tus_client
from tusclient.exceptions import TusCommunicationError

from gateway.config import ServeConfig
from tests.support.gateway import in_process_gateway

pytestmark = pytest.mark.timeout(90)

CHUNK = 64 * 1024


def make_file(tmp_path: Path, size: int, name: str = "clip.mp4") -> Path:
    path = tmp_path / name
    block = hashlib.sha256(name.encode()).digest() * 2048
    path.write_bytes((block * (size // len(block) + 1))[:size])
    return path


@pytest.fixture
async def gw() -> AsyncIterator[tuple[str, Any]]:
    cfg = ServeConfig(chunk_size=CHUNK, upload_expiry=3600.0, lock_timeout=5.0)
    async with in_process_gateway(cfg) as (url, app):
        yield url, app


async def fetch(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            return r.status, await r.read()


def uploader(base: str, path: Path, key: str, **kw: Any) -> Any:
    client = tus_client.TusClient(base + "/uploads/")
    return client.uploader(str(path), metadata={"key": key, "filetype": "video/mp4"}, **kw)


async def test_tuspy_full_upload_in_several_patches(gw: Any, tmp_path: Path) -> None:
    url, _app = gw
    path = make_file(tmp_path, 5 * CHUNK + 999)
    up = uploader(url, path, "tuspy/full.mp4", chunk_size=100_000)
    await asyncio.to_thread(up.upload)
    status, body = await fetch(url + "/objects/tuspy/full.mp4")
    assert status == 200
    assert body == path.read_bytes()
    # Like a PUT, the committed manifest records per-block hashes, so seeks are verified cheaply.
    status, raw = await fetch(url + "/objects/tuspy/full.mp4?manifest")
    doc = json.loads(raw)
    assert doc["block_size"] > 0
    for c in doc["chunks"]:
        data = body[c["offset"]:c["offset"] + c["size"]]
        bs = doc["block_size"]
        assert doc["block_hash"] == "xxh3-128" and c["sha256"] == hashlib.sha256(data).hexdigest()
        assert base64.b64decode(c["block_digests"]) == b"".join(
            xxhash.xxh3_128_digest(data[i:i + bs]) for i in range(0, len(data), bs))


async def test_tuspy_upload_with_checksums(gw: Any, tmp_path: Path) -> None:
    url, _app = gw
    path = make_file(tmp_path, 3 * CHUNK + 5, "sums.bin")
    up = uploader(url, path, "tuspy/sums.bin", chunk_size=50_000, upload_checksum=True)
    await asyncio.to_thread(up.upload)
    assert (await fetch(url + "/objects/tuspy/sums.bin"))[1] == path.read_bytes()


async def test_tuspy_interrupted_upload_is_resumed_by_a_fresh_client(gw: Any, tmp_path: Path) -> None:
    url, _app = gw
    path = make_file(tmp_path, 6 * CHUNK + 17)
    first = uploader(url, path, "tuspy/resumed.mp4", chunk_size=70_000)
    await asyncio.to_thread(first.upload, 140_000)  # stops after two PATCHes, as if the client died
    assert (await fetch(url + "/objects/tuspy/resumed.mp4"))[0] == 404
    # Constructed in a thread: with a url, tuspy asks the server for the offset right away.
    fresh = await asyncio.to_thread(uploader, url, path, "tuspy/resumed.mp4", chunk_size=70_000, url=first.url)
    assert fresh.offset == 140_000  # learnt by HEAD from the server
    await asyncio.to_thread(fresh.upload)
    assert (await fetch(url + "/objects/tuspy/resumed.mp4"))[1] == path.read_bytes()


async def test_tuspy_checksum_mismatch_is_460_and_the_offset_stays(gw: Any, tmp_path: Path) -> None:
    url, _app = gw
    path = make_file(tmp_path, 2 * CHUNK)
    up = uploader(url, path, "tuspy/bad-sum.bin", chunk_size=CHUNK + 10, upload_checksum=True)
    await asyncio.to_thread(up.upload_chunk)
    assert up.offset == CHUNK + 10

    class WrongSha1:
        def __init__(self, data: bytes) -> None:
            self.inner = hashlib.sha1(data + b"!")

        def digest(self) -> bytes:
            return self.inner.digest()

    up._BaseUploader__checksum_algorithm = WrongSha1  # what a corrupted chunk in transit looks like
    with pytest.raises(TusCommunicationError) as info:
        await asyncio.to_thread(up.upload_chunk)
    assert info.value.status_code == 460
    assert await asyncio.to_thread(up.get_offset) == CHUNK + 10


async def test_tuspy_wrong_offset_is_409(gw: Any, tmp_path: Path) -> None:
    url, _app = gw
    path = make_file(tmp_path, 3 * CHUNK)
    up = uploader(url, path, "tuspy/offset.bin", chunk_size=CHUNK)
    await asyncio.to_thread(up.upload_chunk)
    up.offset = 5  # a client that lost track
    with pytest.raises(TusCommunicationError) as info:
        await asyncio.to_thread(up.upload_chunk)
    assert info.value.status_code == 409
    assert await asyncio.to_thread(up.get_offset) == CHUNK


async def test_tuspy_upload_terminated_is_gone(gw: Any, tmp_path: Path) -> None:
    url, app = gw
    path = make_file(tmp_path, 4 * CHUNK)
    up = uploader(url, path, "tuspy/terminated.bin", chunk_size=2 * CHUNK + 3)
    await asyncio.to_thread(up.upload_chunk)
    r = await asyncio.to_thread(requests.delete, up.url, headers={"Tus-Resumable": "1.0.0"})
    assert r.status_code == 204
    with pytest.raises(TusCommunicationError) as info:
        await asyncio.to_thread(up.get_offset)
    assert info.value.status_code == 410
    assert [i.key async for i in app["store"].backend.list("c/")] == []


async def test_tuspy_abandoned_upload_expires_and_is_swept(tmp_path: Path) -> None:
    cfg = ServeConfig(chunk_size=CHUNK, upload_expiry=1.0)
    async with in_process_gateway(cfg) as (url, app):
        path = make_file(tmp_path, 4 * CHUNK)
        up = uploader(url, path, "tuspy/abandoned.bin", chunk_size=2 * CHUNK + 3)
        await asyncio.to_thread(up.upload_chunk)
        backend = app["store"].backend
        assert [i.key async for i in backend.list("c/")]
        await asyncio.sleep(1.3)
        assert await app["uploads"].sweep() == 1
        assert [i.key async for i in backend.list("c/")] == []
        assert [i.key async for i in backend.list("u/") if "/t/" in i.key] == []
        with pytest.raises(TusCommunicationError) as info:
            await asyncio.to_thread(up.get_offset)
        assert info.value.status_code == 410
        assert (await fetch(url + "/objects/tuspy/abandoned.bin"))[0] == 404
