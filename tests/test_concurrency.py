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

import aiohttp
import pytest

from gateway.config import ServeConfig
from storage import keys
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
