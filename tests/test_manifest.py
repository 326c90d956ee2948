"""storage.manifest: chunk arithmetic and ETags (table-driven; the JSON format and old releases'
manifests are in test_manifest_formats.py)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from storage.manifest import ChunkRef, Manifest


def manifest(*sizes: int) -> Manifest:
    refs, offset = [], 0
    for i, s in enumerate(sizes):
        refs.append(ChunkRef(i, offset, s, f"{i:02x}" * 32))
        offset += s
    return Manifest("v/a.mp4", "001a3185c4000aaaaaaaaaaaaaaaa", offset, "video/mp4",
                    datetime(2026, 12, 2, tzinfo=timezone.utc), 100, tuple(refs))


CASES = [
    # (name, chunk sizes, [start, end), chunk indices it touches)
    ("the first byte", (100, 100, 50), 0, 1, [0]),
    ("a whole chunk", (100, 100, 50), 100, 200, [1]),
    ("across a boundary", (100, 100, 50), 99, 101, [0, 1]),
    ("everything", (100, 100, 50), 0, 250, [0, 1, 2]),
    ("the last byte", (100, 100, 50), 249, 250, [2]),
    ("empty range", (100, 100, 50), 10, 10, []),
    ("drifted sizes: offsets decide, not start // chunk_size", (100, 103, 50), 201, 204, [1, 2]),
    ("an empty object", (), 0, 0, []),
]


@pytest.mark.parametrize(("name", "sizes", "start", "end", "touched"), CASES, ids=[c[0] for c in CASES])
def test_chunks_for(name: str, sizes: tuple[int, ...], start: int, end: int, touched: list[int]) -> None:
    assert [r.index for r in manifest(*sizes).chunks_for(start, end)] == touched


def test_with_chunk_recomputes_offsets_size_and_etag() -> None:
    m = manifest(100, 100, 50)
    fixed = m.with_chunk(ChunkRef(1, 100, 103, "ff" * 32))
    assert [c.offset for c in fixed.chunks] == [0, 100, 203] and fixed.size == 253
    assert fixed.etag != m.etag and fixed.version == m.version


def test_the_etag_is_strong_and_follows_the_content_not_the_version() -> None:
    a, b = manifest(100, 50), manifest(100, 50)
    other = Manifest(a.key, "001a3185c4000bbbbbbbbbbbbbbbb", a.size, a.content_type, a.created, a.chunk_size, a.chunks)
    assert a.etag == b.etag == other.etag  # same bytes, same ETag, on every gateway
    assert a.etag.startswith('"') and a.etag.endswith('"')
    assert manifest(100, 51).etag != a.etag
