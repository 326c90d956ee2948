"""Concurrent writers of one key never corrupt it: the failure the replaced system was known for.

32 PUTs of distinct content race on one key while 8 readers GET it in a loop. Every body a
reader sees must be exactly one complete written version, carrying that version's ETag, and the
final manifest must match its chunks byte for byte. Run on the embedded fs store and on a real
SeaweedFS server.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any

import aiohttp
import pytest

from gateway.config import ServeConfig
from storage import keys
from storage.backends.memory import MemoryBackend
from storage.manifest import Manifest
from tests.support.gateway import in_process_gateway

CHUNK = 64 * 1024
WRITERS = 32
READERS = 8


def fs_backend(tmp_path, _):
    from storage.backends.fs import FsBackend

    return FsBackend(tmp_path / "store")


def seaweed_backend(_, seaweedfs):
    from storage.backends.s3 import S3Backend

    return S3Backend(seaweedfs.new_bucket(), endpoint_url=seaweedfs.endpoint, region="us-east-1")


@pytest.fixture(params=["fs", pytest.param("seaweedfs", marks=pytest.mark.seaweedfs)])
def backend(request, tmp_path):
    if request.param == "fs":
        return fs_backend(tmp_path, None)
    return seaweed_backend(tmp_path, request.getfixturevalue("seaweedfs"))


async def test_32_writers_and_8_readers_on_one_key_see_only_whole_versions(backend) -> None:
    # Sizes differ per version and straddle chunk boundaries, so a mix-up shows in length too.
    versions = [os.urandom(3 * CHUNK + 1000 * i + 17) for i in range(WRITERS)]
    by_digest = {hashlib.sha256(v).hexdigest(): i for i, v in enumerate(versions)}
    put_etags: dict[int, str] = {}
    seen: list[tuple[int, str]] = []
    done = asyncio.Event()
    cfg = ServeConfig(chunk_size=CHUNK, lock_timeout=60, grace=600)

    async with in_process_gateway(cfg, backend=backend) as (url, app):
        async with aiohttp.ClientSession() as s:

            async def writer(i: int) -> None:
                async with s.put(f"{url}/objects/race/video.mp4", data=versions[i]) as r:
                    assert r.status == 201, await r.text()
                    put_etags[i] = (await r.json())["etag"]

            async def reader() -> None:
                while not done.is_set():
                    async with s.get(f"{url}/objects/race/video.mp4") as r:
                        if r.status == 404:
                            await asyncio.sleep(0.005)
                            continue
                        assert r.status == 200
                        body = await r.read()
                        assert len(body) == int(r.headers["Content-Length"])
                        digest = hashlib.sha256(body).hexdigest()
                        assert digest in by_digest, "a body that is no written version"
                        seen.append((by_digest[digest], r.headers["ETag"]))

            readers = [asyncio.ensure_future(reader()) for _ in range(READERS)]
            await asyncio.gather(*(writer(i) for i in range(WRITERS)))
            await asyncio.sleep(0.2)
            done.set()
            await asyncio.gather(*readers)

            assert len(put_etags) == WRITERS and len(set(put_etags.values())) == WRITERS
            assert seen, "the readers never saw a committed version"
            for index, etag in seen:
                assert etag == put_etags[index], "a body served under another version's ETag"

            # The final manifest is one of the versions and matches its chunks in the store.
            async with s.get(f"{url}/objects/race/video.mp4?manifest") as r:
                manifest = Manifest.from_dict(await r.json())
            async with s.get(f"{url}/objects/race/video.mp4") as r:
                final = await r.read()
            assert manifest.etag in put_etags.values()
            assert final == versions[by_digest[hashlib.sha256(final).hexdigest()]]
            store = app["store"]
            for ref in manifest.chunks:
                blob = await store.backend.get(keys.chunk_key(manifest.key, manifest.version, ref.index))
                assert len(blob.data) == ref.size
                assert hashlib.sha256(blob.data).hexdigest() == ref.sha256
            assert store.locks.active() == 0 and len(store.locks) == 0


class StallsNextRecordRead(MemoryBackend):
    """Once ``armed``, the next read of an object's record waits for ``gate``: a PUT that holds
    the key's lock and stops renewing it (the store is slow, or down and restarting)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.stalled = asyncio.Event()
        self.gate = asyncio.Event()

    async def get(self, key: str, **kw: Any) -> Any:
        if self.armed and key.startswith(keys.MANIFEST_PREFIX):
            self.armed = False
            self.stalled.set()
            await self.gate.wait()
        return await super().get(key, **kw)


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
async def test_a_write_whose_lock_lapsed_before_it_committed_answers_503_and_retrying_works(method: str) -> None:
    """A PUT or DELETE that held the key's lock but could not renew it (its store calls hung)
    is cleared as stale by the next writer; when it wakes it commits nothing. Its client gets
    503 with Retry-After, which says "send it again" (409 "conflict" says that would not help),
    and sending it again does work."""
    backend = StallsNextRecordRead()
    cfg = ServeConfig(chunk_size=CHUNK, lock_stale_after=0.3, lock_timeout=5.0)
    async with in_process_gateway(cfg, backend=backend) as (url, _app), aiohttp.ClientSession() as s:
        first, second = os.urandom(3 * CHUNK), os.urandom(2 * CHUNK)
        if method == "DELETE":
            async with s.put(url + "/objects/k.bin", data=first) as r:
                assert r.status == 201
        backend.armed = True
        stalled = asyncio.ensure_future(s.request(method, url + "/objects/k.bin", data=None if method == "DELETE" else first))
        await asyncio.wait_for(backend.stalled.wait(), timeout=5)
        async with s.put(url + "/objects/k.bin", data=second) as r:  # clears the stalled lock as stale
            assert r.status == 201
        backend.gate.set()
        r = await asyncio.wait_for(stalled, timeout=5)
        assert r.status == 503, (r.status, await r.text())
        assert r.headers["Retry-After"] == "1" and (await r.json())["error"] == "lock_lapsed"
        r.release()
        async with s.get(url + "/objects/k.bin") as r:
            assert await r.read() == second  # the lapsed write committed nothing
        async with s.request(method, url + "/objects/k.bin", data=None if method == "DELETE" else first) as r:
            assert r.status == (204 if method == "DELETE" else 201)
        async with s.get(url + "/objects/k.bin") as r:
            if method == "DELETE":
                assert r.status == 404
            else:
                assert r.status == 200 and await r.read() == first
