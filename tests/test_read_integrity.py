"""What a reader gets when a stored chunk no longer matches its manifest, branch by branch.

The chunks are altered directly in the store (found with ``storage.keys.chunk_key`` from the
object's ``?manifest``), under a gateway that has not read them yet. The promises checked:
- exact size and SHA-256 -> served;
- size drift within tolerance -> the chunk is taken as stored: headers and body agree with the
  STORED bytes, the manifest is re-recorded (``?manifest`` shows the new size and SHA-256) and
  ``chunkgate_chunk_size_mismatch_total{verdict="tolerated"}`` counts it;
- beyond tolerance, or the right size with other bytes -> never served: a 502 JSON error when
  found before the headers, a closed connection (short body) when a later chunk is found bad;
- whatever happens, a complete body matches its Content-Length and a short body is a prefix of
  the object its headers describe (the replaced system skipped bad chunks and kept streaming).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable

import aiohttp
import pytest
from multidict import CIMultiDictProxy
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import ServeConfig
from storage.backends.fs import FsBackend
from storage.keys import chunk_key, manifest_key, new_version

pytestmark = pytest.mark.timeout(120)

CHUNK = 64 * 1024
KEY = "videos/clip.mp4"
BODY = os.urandom(4 * CHUNK - 1000)  # four chunks, the last one short

Tamper = Callable[[bytes], bytes]


def grow(n: int) -> Tamper:
    """``n`` extra bytes at the START of the chunk, so every later offset shifts (a range
    answered from the old offsets would return the wrong bytes)."""
    return lambda d: b"\xaa" * n + d


def shrink(n: int) -> Tamper:
    return lambda d: d[n:]


def flip_a_byte(d: bytes) -> bytes:
    return d[:100] + bytes([d[100] ^ 0xFF]) + d[101:]


@dataclass
class Got:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    complete: bool  # False: the connection ended before Content-Length bytes arrived


@dataclass
class Rig:
    base: str
    raw: FsBackend  # the store itself, beneath the gateway's cache and metrics
    http: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return f"{self.base}/objects/{KEY}"

    async def get(self, headers: dict[str, str] | None = None) -> Got:
        async with self.http.get(self.url, headers=headers or {}) as resp:
            buf = bytearray()
            complete = True
            try:
                async for piece in resp.content.iter_any():
                    buf += piece
            except aiohttp.ClientPayloadError:
                complete = False
            return Got(resp.status, resp.headers, bytes(buf), complete)

    async def manifest(self) -> dict:  # type: ignore[type-arg]
        async with self.http.get(self.url + "?manifest") as resp:
            assert resp.status == 200
            return await resp.json()  # type: ignore[no-any-return]

    async def tamper(self, index: int, change: Tamper) -> bytes:
        """Rewrite chunk ``index`` in the store; return the object's bytes as now stored."""
        m = await self.manifest()
        ck = chunk_key(KEY, m["version"], index)
        await self.raw.put(ck, change((await self.raw.get(ck)).data))
        return await self.stored(m["version"], len(m["chunks"]))

    async def stored(self, version: str, count: int) -> bytes:
        return b"".join([(await self.raw.get(chunk_key(KEY, version, i))).data for i in range(count)])

    async def mismatches(self) -> dict[str, float]:
        async with self.http.get(f"{self.base}/metrics") as resp:
            text = await resp.text()
        out = {}
        for fam in text_string_to_metric_families(text):
            if fam.name == "chunkgate_chunk_size_mismatch":
                out.update({s.labels["verdict"]: s.value for s in fam.samples if s.name.endswith("_total")})
            if fam.name == "chunkgate_manifest_repairs":
                out["repairs"] = fam.samples[0].value
        return out


@contextlib.asynccontextmanager
async def rig(tmp_path: Path, *, put: bool = True, **settings: object) -> AsyncIterator[Rig]:
    from tests.support.gateway import in_process_gateway

    raw = FsBackend(tmp_path / "store")
    cfg = ServeConfig(chunk_size=CHUNK, **settings)  # type: ignore[arg-type]
    async with in_process_gateway(cfg, backend=raw) as (base, _app), aiohttp.ClientSession() as http:
        r = Rig(base, raw, http)
        if put:
            async with http.put(r.url, data=BODY, headers={"Content-Type": "video/mp4"}) as resp:
                assert resp.status == 201, await resp.text()
        yield r


def assert_honest(got: Got, described: bytes) -> None:
    """A complete body is exactly what its headers announce; a short one is a prefix of the
    object the headers describe. Never bytes that contradict Content-Length."""
    length = int(got.headers["Content-Length"])
    if got.complete:
        assert len(got.body) == length
    else:
        assert len(got.body) < length
    assert described.startswith(got.body)


def assert_error_json(got: Got, status: int, code: str) -> None:
    assert got.status == status and got.complete
    assert got.headers["Content-Type"].startswith("application/json")
    assert json.loads(got.body)["error"] == code


# ------------------------------------------------------------------------------------ exact
async def test_exact_chunks_are_served_whole_and_by_range(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        got = await r.get()
        assert (got.status, got.body, got.complete) == (200, BODY, True)
        got = await r.get({"Range": f"bytes={CHUNK - 10}-{2 * CHUNK + 9}"})
        assert (got.status, got.body) == (206, BODY[CHUNK - 10:2 * CHUNK + 10])
        assert await r.mismatches() == {"tolerated": 0, "rejected": 0, "repairs": 0}


# ------------------------------------------------------------------------ within tolerance
@pytest.mark.parametrize("change", [grow(100), shrink(100)], ids=["grown", "shrunk"])
async def test_drift_in_the_first_chunk_is_served_as_stored_and_repairs_the_manifest(tmp_path: Path, change: Tamper) -> None:
    async with rig(tmp_path) as r:
        stored = await r.tamper(0, change)
        got = await r.get()
        # Found before any header went out: the answer already describes the stored bytes.
        assert (got.status, got.complete) == (200, True)
        assert int(got.headers["Content-Length"]) == len(stored) and got.body == stored
        m = await r.manifest()
        assert m["size"] == len(stored) == sum(c["size"] for c in m["chunks"])
        assert m["chunks"][0]["sha256"] == hashlib.sha256(stored[: m["chunks"][0]["size"]]).hexdigest()
        assert m["etag"] == got.headers["ETag"]
        counts = await r.mismatches()
        assert counts["tolerated"] >= 1 and counts["rejected"] == 0 and counts["repairs"] == 1


async def test_drift_in_a_later_chunk_never_contradicts_headers_and_the_next_read_is_whole(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        stored = await r.tamper(2, grow(100))
        first = await r.get()
        # Headers were computed from the old sizes before chunk 2 was read: the gateway may only
        # end the connection early (or, had it known in time, answer with the stored sizes).
        assert first.status == 200
        if first.complete:
            assert first.body == stored and int(first.headers["Content-Length"]) == len(stored)
        else:
            assert_honest(first, BODY)
        second = await r.get()
        assert (second.status, second.complete, second.body) == (200, True, stored)
        m = await r.manifest()
        assert [c["size"] for c in m["chunks"]] == [CHUNK, CHUNK, CHUNK + 100, CHUNK - 1000]
        assert m["chunks"][2]["sha256"] == hashlib.sha256(stored[2 * CHUNK:3 * CHUNK + 100]).hexdigest()
        assert (await r.mismatches())["tolerated"] >= 1


async def test_a_range_into_a_drifted_chunk_is_answered_from_the_repaired_offsets(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        stored = await r.tamper(2, grow(100))
        lo, hi = 3 * CHUNK - 50, 3 * CHUNK + 200  # straddles the shifted boundary between chunks 2 and 3
        got = await r.get({"Range": f"bytes={lo}-{hi}"})
        assert got.status == 206
        assert got.headers["Content-Range"] == f"bytes {lo}-{hi}/{len(stored)}"
        assert got.body == stored[lo:hi + 1] != BODY[lo:hi + 1]


# ------------------------------------------------------------------------ beyond tolerance
async def test_a_first_chunk_beyond_tolerance_is_a_502_and_the_manifest_is_left_alone(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        before = await r.manifest()
        await r.tamper(0, grow(5000))
        for _ in range(2):  # and it stays refused: nothing "learns" the bad size
            assert_error_json(await r.get(), 502, "chunk_corrupt")
        assert await r.manifest() == before
        counts = await r.mismatches()
        assert counts["rejected"] >= 2 and counts["tolerated"] == 0 and counts["repairs"] == 0


async def test_a_later_chunk_beyond_tolerance_ends_the_connection_without_its_bytes(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        await r.tamper(2, shrink(5000))
        got = await r.get()
        assert got.status == 200 and not got.complete
        assert_honest(got, BODY)
        assert len(got.body) <= 2 * CHUNK  # nothing of chunk 2 or after
        ranged = await r.get({"Range": f"bytes={2 * CHUNK + 10}-{2 * CHUNK + 5000}"})
        assert_error_json(ranged, 502, "chunk_corrupt")


# ------------------------------------------------------------- same size, other bytes
@pytest.mark.parametrize("mode", ["blocks", "sha256"])  # the default, and the strict one
async def test_same_size_other_bytes_is_rejected_when_reads_are_verified(tmp_path: Path, mode: str) -> None:
    async with rig(tmp_path, verify_reads=mode) as r:
        await r.tamper(0, flip_a_byte)
        assert_error_json(await r.get(), 502, "chunk_corrupt")
        # Spanning two chunks, so the whole chunk is fetched and hashed.
        assert_error_json(await r.get({"Range": f"bytes=0-{CHUNK + 10}"}), 502, "chunk_corrupt")
        assert (await r.mismatches())["rejected"] >= 2


@pytest.mark.parametrize("mode", ["blocks", "sha256"])  # the default, and the strict one
async def test_same_size_other_bytes_in_a_later_chunk_is_never_sent(tmp_path: Path, mode: str) -> None:
    async with rig(tmp_path, verify_reads=mode) as r:
        await r.tamper(1, flip_a_byte)
        got = await r.get()
        assert got.status == 200 and not got.complete
        assert_honest(got, BODY)
        assert len(got.body) <= CHUNK


@pytest.mark.parametrize("mode", ["blocks", "sha256"])  # the default, and the strict one
async def test_a_small_range_of_a_same_size_corrupt_chunk_is_rejected(tmp_path: Path, mode: str) -> None:
    async with rig(tmp_path, verify_reads=mode) as r:
        await r.tamper(1, flip_a_byte)
        assert_error_json(await r.get({"Range": f"bytes={CHUNK}-{CHUNK + 999}"}), 502, "chunk_corrupt")


# ------------------------------------------------------------------ sizes-only imports
async def write_imported_object(r: Rig, recorded: list[int], stored_chunks: list[bytes]) -> None:
    """An object as a sizes-only system left it: chunks in the store, and an ``m/<key>``
    manifest recording each chunk's size but no SHA-256."""
    version = new_version()
    for i, data in enumerate(stored_chunks):
        await r.raw.put(chunk_key(KEY, version, i), data)
    doc = {"format": "chunkgate.manifest/1", "key": KEY, "version": version, "size": sum(recorded),
           "content_type": "video/mp4", "created": "2026-11-01T10:00:00Z", "chunk_size": CHUNK,
           "chunks": [{"index": i, "size": s} for i, s in enumerate(recorded)]}
    await r.raw.put(manifest_key(KEY), json.dumps(doc).encode(), if_none_match=True)


def split(body: bytes) -> list[bytes]:
    return [body[i:i + CHUNK] for i in range(0, len(body), CHUNK)]


async def test_a_sizes_only_imported_manifest_is_readable(tmp_path: Path) -> None:
    async with rig(tmp_path, put=False) as r:
        chunks = split(BODY)
        await write_imported_object(r, [len(c) for c in chunks], chunks)
        got = await r.get()
        assert (got.status, got.complete, got.body) == (200, True, BODY)
        got = await r.get({"Range": f"bytes={CHUNK - 5}-{CHUNK + 4}"})
        assert (got.status, got.body) == (206, BODY[CHUNK - 5:CHUNK + 5])


async def test_a_sizes_only_import_with_drift_within_tolerance_is_repaired_with_checksums(tmp_path: Path) -> None:
    async with rig(tmp_path, put=False) as r:
        chunks = split(BODY)
        recorded = [len(c) for c in chunks]
        recorded[0] -= 50  # the old system's sizes were slightly off
        await write_imported_object(r, recorded, chunks)
        got = await r.get()
        assert (got.status, got.complete, got.body) == (200, True, BODY)
        assert int(got.headers["Content-Length"]) == len(BODY)
        m = await r.manifest()
        assert [c["size"] for c in m["chunks"]] == [len(c) for c in chunks]
        # The repair recorded every chunk's SHA-256, so later reads are fully verified.
        assert [c["sha256"] for c in m["chunks"]] == [hashlib.sha256(c).hexdigest() for c in chunks]
        assert (await r.mismatches())["repairs"] == 1


# ------------------------------------------------------------------ tolerance settings
# (size_tolerance_bytes, size_tolerance_ratio, drift of chunk 0 in bytes, served?)
# Chunk 0 is 65536 bytes: a ratio of 0.001 is 65.5 bytes, 0.01 is 655.4 bytes.
TOLERANCE_CASES = [
    (2048, 0.001, 100, True),  # the defaults
    (2048, 0.001, 2048, True),
    (2048, 0.001, 2049, False),
    (2048, 0.001, -2049, False),
    (0, 0.0, 1, False),  # 0 and 0 = strict
    (0, 0.0, -1, False),
    (0, 0.01, 655, True),  # the ratio alone suffices
    (0, 0.01, 656, False),
    (10, 0.0, -10, True),  # the byte bound alone suffices
    (10, 0.0, -11, False),
    (10, 0.01, 600, True),  # either bound suffices
]


@pytest.mark.parametrize("tol_bytes,tol_ratio,drift,served", TOLERANCE_CASES)
async def test_size_tolerance_settings_decide_between_repair_and_refusal(
    tmp_path: Path, tol_bytes: int, tol_ratio: float, drift: int, served: bool
) -> None:
    async with rig(tmp_path, size_tolerance_bytes=tol_bytes, size_tolerance_ratio=tol_ratio) as r:
        stored = await r.tamper(0, grow(drift) if drift > 0 else shrink(-drift))
        got = await r.get()
        counts = await r.mismatches()
        if served:
            assert (got.status, got.complete, got.body) == (200, True, stored)
            assert counts["tolerated"] >= 1 and counts["rejected"] == 0
            assert (await r.manifest())["size"] == len(stored)
        else:
            assert_error_json(got, 502, "chunk_corrupt")
            assert counts["rejected"] >= 1 and counts["tolerated"] == 0
            assert (await r.manifest())["size"] == len(BODY)
