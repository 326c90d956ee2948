"""Stored data outlives code: manifests written by earlier releases (SHA-256 block lists of 1 MiB,
or sizes only) stay readable and verified, and what this release writes is versioned by its
``block_hash`` field. The old manifests here are built by hand, as those releases wrote them."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from typing import Any

import pytest
import xxhash

from storage import keys
from storage.backends.memory import MemoryBackend
from storage.errors import ChunkRejected
from storage.locks import LockManager
from storage.manifest import Manifest, ManifestError
from storage.objects import ObjectStore, StoreOptions

MiB = 1024 * 1024
CHUNK = 2 * MiB


async def _store_old_object(backend: MemoryBackend, key: str, data: bytes, *, blocks: bool, sizes_only: bool = False) -> None:
    version = keys.new_version()
    chunks = []
    for index, offset in enumerate(range(0, len(data), CHUNK)):
        piece = data[offset:offset + CHUNK]
        await backend.put(keys.chunk_key(key, version, index), piece)
        entry: dict[str, Any] = {"index": index, "offset": offset, "size": len(piece),
                                 "sha256": None if sizes_only else hashlib.sha256(piece).hexdigest()}
        if blocks:
            entry["blocks"] = [hashlib.sha256(piece[i:i + MiB]).hexdigest() for i in range(0, len(piece), MiB)]
        chunks.append(entry)
    doc: dict[str, Any] = {"format": "chunkgate.manifest/1", "key": key, "version": version, "size": len(data),
                           "content_type": "video/mp4", "etag": '"imported-etag"' if sizes_only else "",
                           "created": "2026-11-01T10:00:00Z", "chunk_size": CHUNK, "chunks": chunks}
    if blocks:
        doc["block_size"] = MiB
    await backend.put(keys.manifest_key(key), json.dumps(doc).encode())


def _store(backend: MemoryBackend) -> ObjectStore:
    return ObjectStore(backend, LockManager(), StoreOptions(chunk_size=CHUNK, cache_bytes=64 * MiB))


async def _read(store: ObjectStore, key: str, start: int, end: int) -> bytes:
    m = await store.head(key, fresh=True)
    return b"".join([bytes(p) async for p in store.read(m, start, end)])


@pytest.mark.parametrize("kind", ["sha256-1MiB-blocks", "sha256-no-blocks", "sizes-only"])
async def test_manifests_of_earlier_releases_are_read_whole_and_in_small_ranges(kind: str) -> None:
    backend = MemoryBackend()
    data = os.urandom(2 * CHUNK + 12345)
    await _store_old_object(backend, "old", data, blocks=kind == "sha256-1MiB-blocks", sizes_only=kind == "sizes-only")
    store = _store(backend)
    m = await store.head("old")
    assert m.block_hash == "sha256"
    assert await _read(store, "old", 0, len(data)) == data
    store.cache.clear()
    assert await _read(store, "old", CHUNK + MiB + 10, CHUNK + MiB + 5000) == data[CHUNK + MiB + 10:CHUNK + MiB + 5000]
    if kind == "sizes-only":
        assert m.etag == '"imported-etag"'


@pytest.mark.parametrize("how", ["whole", "small range"])
async def test_a_corrupt_chunk_under_an_old_manifest_with_sha256_blocks_is_refused(how: str) -> None:
    backend = MemoryBackend()
    data = os.urandom(CHUNK)
    await _store_old_object(backend, "old", data, blocks=True)
    store = _store(backend)
    m = await store.head("old")
    bad = bytearray(data)
    bad[MiB + 3] ^= 1
    await backend.put(keys.chunk_key("old", m.version, 0), bytes(bad))
    with pytest.raises(ChunkRejected):
        await _read(store, "old", *((0, CHUNK) if how == "whole" else (MiB, MiB + 100)))


async def test_this_release_writes_xxh3_block_digests_beside_the_sha256_an_earlier_reader_ignores() -> None:
    backend = MemoryBackend()
    store = _store(backend)
    data = os.urandom(CHUNK + 1000)
    await store.put("new", _body(data), content_type="x/y")
    doc = json.loads((await backend.get(keys.manifest_key("new"))).data)
    assert doc["format"] == "chunkgate.manifest/1" and doc["block_hash"] == "xxh3-128"
    bs = doc["block_size"]
    for c in doc["chunks"]:
        piece = data[c["offset"]:c["offset"] + c["size"]]
        assert c["sha256"] == hashlib.sha256(piece).hexdigest()  # API.md: of the chunk's bytes
        assert "blocks" not in c  # the field an earlier release validates as SHA-256 hex
        assert base64.b64decode(c["block_digests"]) == b"".join(
            xxhash.xxh3_128_digest(piece[i:i + bs]) for i in range(0, len(piece), bs))
    assert Manifest.from_json(json.dumps(doc).encode()).chunks == (await store.head("new")).chunks


async def test_a_block_hash_this_release_does_not_know_leaves_the_manifest_readable() -> None:
    backend = MemoryBackend()
    store = _store(backend)
    data = os.urandom(CHUNK)
    await store.put("later", _body(data), content_type="x/y")
    raw = keys.manifest_key("later")
    doc = json.loads((await backend.get(raw)).data)
    doc["block_hash"] = "from-a-later-release"
    await backend.put(raw, json.dumps(doc).encode())
    m = await store.head("later", fresh=True)
    assert all(c.blocks is None for c in m.chunks)  # verified whole, by SHA-256
    assert await _read(store, "later", 100, 200) == data[100:200]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c.update(block_digests="not base64!"), "not valid base64"),
        (lambda c: c.update(block_digests=base64.b64encode(b"x" * 15).decode()), "do not match"),
        (lambda c: c.update(block_digests=7), "base64 string"),
    ],
)
def test_malformed_block_digests_are_a_manifest_error(mutate: Any, message: str) -> None:
    chunk = {"index": 0, "offset": 0, "size": 10, "sha256": "a" * 64,
             "block_digests": base64.b64encode(b"\0" * 16).decode()}
    mutate(chunk)
    doc = {"format": "chunkgate.manifest/1", "key": "k", "version": "v1", "size": 10, "content_type": "x/y",
           "created": "2026-11-01T10:00:00Z", "chunk_size": 10, "block_size": 16, "block_hash": "xxh3-128",
           "chunks": [chunk]}
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(doc)


async def _body(data: bytes) -> Any:
    for i in range(0, len(data), 100_000):
        yield data[i:i + 100_000]
