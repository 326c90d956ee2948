"""storage.uploads, the pure parts: the session record's JSON form and the durable layout that
decides an upload's offset from what the store holds (table-driven)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from storage import keys
from storage.backends.base import ObjectInfo
from storage.errors import StoreFailed
from storage.uploads import UploadRecord, UploadState, durable_layout, tail_key

CS = 100
NOW = datetime(2026, 12, 2, tzinfo=timezone.utc)


def record(length: int | None) -> UploadRecord:
    return UploadRecord(id="0" * 32, key="v/a.mp4", version="001a3185c4000aaaaaaaaaaaaaaaa", length=length,
                        chunk_size=CS, content_type="video/mp4", metadata="key dg==", created=1.0, expires=2.0)


def chunks(sizes: tuple[int | None, ...]) -> list[ObjectInfo]:
    """Chunk i of ``sizes[i]`` bytes; None: chunk i is not in the store."""
    r = record(None)
    return [ObjectInfo(keys.chunk_key(r.key, r.version, i), s, f"e{i}", NOW) for i, s in enumerate(sizes) if s is not None]


def tails(index: int, size: int) -> list[ObjectInfo]:
    return [ObjectInfo(tail_key("0" * 32, index), size, "t", NOW)]


CASES = [
    # (name, length, chunk sizes, tail (index, size) or None, offset, debris count)
    ("nothing yet", 250, (), None, 0, 0),
    ("two full chunks", 250, (100, 100), None, 200, 0),
    ("two full chunks and a tail", 250, (100, 100), (2, 30), 230, 0),
    ("every byte: the final short chunk", 250, (100, 100, 50), None, 250, 0),
    ("a gap: chunk 1 missing, chunk 2 is debris", 250, (100, None, 50), None, 100, 1),
    ("a short chunk that is not the last is debris, and so is what follows", 350, (100, 40, 100), None, 100, 2),
    ("a tail that does not continue the chunks is debris", 250, (100,), (3, 10), 100, 1),
    ("a tail as long as a chunk is debris", 250, (100,), (1, 100), 100, 1),
    ("deferred length: full chunks and a tail", None, (100, 100), (2, 99), 299, 0),
    ("deferred length: a short chunk can't be final yet", None, (100, 50), None, 100, 1),
    ("a chunk past the declared end is debris", 150, (100, 100), None, 100, 1),
]


@pytest.mark.parametrize(("name", "length", "sizes", "tail", "offset", "debris"), CASES, ids=[c[0] for c in CASES])
def test_durable_layout(name: str, length: int | None, sizes: tuple[int | None, ...], tail: tuple[int, int] | None,
                        offset: int, debris: int) -> None:
    good, t, left = durable_layout(record(length), chunks(sizes), tails(*tail) if tail else [])
    assert sum(i.size for i in good) + (t.size if t else 0) == offset
    assert len(left) == debris


def test_a_record_round_trips_through_its_json_form() -> None:
    r = record(250)
    r.state, r.hashes, r.blocks = UploadState.COMMITTING, {0: "ab" * 32}, {0: ["cd" * 16]}
    r.replaces, r.replaces_known, r.superseded, r.meta = "v:001a3185c4000bbbbbbbbbbbbbbbb", True, False, {"key": "v/a.mp4"}
    again = UploadRecord.from_json(r.to_json())
    assert again == r


@pytest.mark.parametrize("raw", [b"", b"{}", b"[]", b'{"format": "chunkgate.upload/9"}', b"\xff",
                                 b'{"format": "chunkgate.upload/1", "id": "x"}'])
def test_a_damaged_record_is_a_store_failure_not_a_crash(raw: bytes) -> None:
    with pytest.raises(StoreFailed):
        UploadRecord.from_json(raw)
