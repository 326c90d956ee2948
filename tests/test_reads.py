"""storage.reads and ObjectStore.open: the chunk verdict, and a read that deals with size drift
and repairs itself before its first byte (the HTTP handler knows nothing of repairs)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import pytest

from storage import keys
from storage.errors import ChunkSizeDrift
from storage.manifest import ChunkRef, Manifest
from storage.reads import Finding, verify_chunk
from storage.tolerance import SizeTolerance
from tests.test_objects import CHUNK, body_of, make_store

DIGEST = hashlib.sha256(b"x").hexdigest()


@pytest.mark.parametrize(
    "actual, sha256, finding",
    [
        (1000, DIGEST, Finding.GOOD),
        (1000, None, Finding.GOOD),  # no digest computed (verification off): the size decides
        (1000, "0" * 64, Finding.WRONG_DIGEST),
        (1100, "0" * 64, Finding.DRIFTED),  # within 200 bytes: the manifest wants repairing
        (900, None, Finding.DRIFTED),
        (1201, None, Finding.WRONG_SIZE),
        (0, None, Finding.WRONG_SIZE),
    ],
    ids=["exact", "exact-unhashed", "exact-other-bytes", "longer-within", "shorter-within", "beyond", "empty"],
)
def test_verify_chunk_returns_the_verdict_for_size_and_digest(actual: int, sha256: str | None, finding: Finding) -> None:
    ref = ChunkRef(0, 0, 1000, DIGEST, None)
    assert verify_chunk(SizeTolerance(max_bytes=200, max_ratio=0.0), ref, actual, sha256) is finding


@dataclass
class Whole:
    """A plan that reads the whole object, remembering every manifest it was made from."""

    seen: list[Manifest]

    def __call__(self, m: Manifest) -> "Whole":
        self.seen.append(m)
        self.size = m.size
        return self

    @property
    def spans(self) -> list[tuple[int, int]]:
        return [(0, self.size)]


async def _drift_last_chunk(store, key: str, extra: bytes) -> Manifest:
    m = await store.head(key)
    last = m.chunks[-1]
    ck = keys.chunk_key(key, m.version, last.index)
    stored = bytes((await store.backend.get(ck)).data)
    await store.backend.put(ck, stored + extra)
    return m


async def test_open_answers_drift_found_before_the_first_byte_from_the_repaired_manifest() -> None:
    store = make_store()
    data = os.urandom(CHUNK // 2)  # one chunk: the first piece is the drifted one
    await store.put("v.mp4", body_of(data), content_type="video/mp4")
    old = await _drift_last_chunk(store, "v.mp4", b"tail" * 25)
    plan = Whole([])
    read = await store.open("v.mp4", plan)
    try:
        got = b"".join([bytes(v) async for v in read.views()])
    finally:
        await read.aclose()
    # The caller was asked to plan again from the repaired manifest, and the bytes it gets
    # match that manifest's size: headers built from it would be true.
    assert [m.size for m in plan.seen] == [old.size, old.size + 100]
    assert read.manifest.size == len(got) == old.size + 100
    assert got == data + b"tail" * 25
    assert store.stats.manifest_repairs == 1


async def test_drift_found_after_the_first_byte_raises_and_the_next_open_is_repaired() -> None:
    store = make_store()
    data = os.urandom(2 * CHUNK + 10)
    await store.put("v.mp4", body_of(data), content_type="video/mp4")
    old = await _drift_last_chunk(store, "v.mp4", b"!" * 10)
    read = await store.open("v.mp4", Whole([]))
    assert read.manifest.size == old.size  # the first chunk is fine: headers go out from it
    with pytest.raises(ChunkSizeDrift):
        async for _ in read.views():
            pass
    await read.aclose()
    # The read path started the repair itself; the next reader waits for it and is answered
    # from the manifest that matches the stored bytes.
    again = await store.open("v.mp4", Whole([]))
    try:
        got = b"".join([bytes(v) async for v in again.views()])
    finally:
        await again.aclose()
    assert again.manifest.size == len(got) == old.size + 10
    assert got == data + b"!" * 10


@dataclass
class Span:
    """A plan that reads bytes [start, end) of the object (None: to its end)."""

    start: int
    end: int | None = None

    def __call__(self, m: Manifest) -> "Span":
        return Span(self.start, m.size if self.end is None else self.end)

    @property
    def spans(self) -> list[tuple[int, int]]:
        assert self.end is not None
        return [(self.start, self.end)]


async def _read(store, key: str, plan: Span) -> bytes:
    read = await store.open(key, plan)
    try:
        return b"".join([bytes(v) async for v in read.views()])
    finally:
        await read.aclose()


@pytest.mark.parametrize("first_read", [Span(29_000, 29_100), Span(0)], ids=["a-verified-block", "the-whole-chunk"])
async def test_a_gateway_never_answers_from_bytes_it_cached_before_another_gateway_repaired_the_chunk(first_read: Span) -> None:
    """Found by the simulator (seeds 36046, 45502): gateway B cached a chunk's last block (or the
    whole chunk); the chunk's size drifted in the store and gateway A repaired the manifest; B's
    next read, planned from the repaired manifest, was answered from the bytes cached before and
    came out shorter than the range its headers promised."""
    from storage.backends.memory import MemoryBackend

    backend = MemoryBackend()
    a = make_store(backend, manifest_ttl=0.0, block_size=4096)
    b = make_store(backend, manifest_ttl=0.0, block_size=4096)
    data = os.urandom(30_000)  # one chunk; its last verified block is [28672, 30000)
    await a.put("v.mp4", body_of(data), content_type="video/mp4")
    assert await _read(b, "v.mp4", first_read) == data[first_read.start:first_read.end]
    await _drift_last_chunk(a, "v.mp4", b"+" * 100)
    assert await _read(a, "v.mp4", Span(0)) == data + b"+" * 100  # A finds the drift and repairs
    assert (await a.head("v.mp4")).size == 30_100
    for plan in (Span(29_900, 30_100), Span(0)):
        assert await _read(b, "v.mp4", plan) == (data + b"+" * 100)[plan.start:plan.end]
