"""storage.gc.doomed_chunks: the one decision that deletes data, as a table.

A chunk goes only when no record references it, no writer that may still commit protects its
version, its version is older than the grace period, its object's record last changed before
the grace period, and its object's record is readable."""

from __future__ import annotations

import pytest

from storage import keys
from storage.gc import _Chunk, _Referenced, doomed_chunks

NOW = 1_800_000_000.0
GRACE = 3600.0
KID = keys.key_id("v/a.mp4")
OLD = keys.new_version(NOW - 2 * GRACE)
YOUNG = keys.new_version(NOW - GRACE / 2)


def chunk(version: str, index: int = 0) -> _Chunk:
    return _Chunk(keys.chunk_key("v/a.mp4", version, index), KID, version, 100)


CASES = [
    # (name, chunk, referenced?, protected?, record changed (seconds ago, None: no record), damaged?, doomed?)
    ("an old unreferenced chunk of a deleted object goes", chunk(OLD), False, False, None, False, True),
    ("a referenced chunk stays", chunk(OLD), True, False, 2 * GRACE, False, False),
    ("a young version stays (a writer may be about to commit)", chunk(YOUNG), False, False, None, False, False),
    ("a protected version stays (a live upload or PUT intent)", chunk(OLD), False, True, None, False, False),
    ("the object changed within grace: readers of the replaced version finish", chunk(OLD), False, False, GRACE / 2, False, False),
    ("the object changed long ago: the replaced version goes", chunk(OLD), False, False, 2 * GRACE, False, True),
    ("a damaged record keeps every chunk of its object", chunk(OLD), False, False, 2 * GRACE, True, False),
]


@pytest.mark.parametrize(("name", "c", "referenced", "protected", "changed", "damaged", "doomed"), CASES,
                         ids=[case[0] for case in CASES])
def test_doomed_chunks(name: str, c: _Chunk, referenced: bool, protected: bool, changed: float | None,
                       damaged: bool, doomed: bool) -> None:
    seen = _Referenced()
    if referenced:
        seen.chunks.add(c.store_key)
    if changed is not None:
        seen.committed_at[KID] = NOW - changed
    if damaged:
        seen.damaged.add(KID)
    guarded = {(KID, c.version)} if protected else set()
    gone, n_referenced, kept = doomed_chunks([c], seen, guarded, now=NOW, grace=GRACE)
    assert (gone == [c]) is doomed
    assert n_referenced == int(referenced) and kept == int(not doomed and not referenced)


def test_grace_zero_takes_every_unreferenced_unprotected_chunk_at_once() -> None:
    young = chunk(keys.new_version(NOW - 0.001))
    gone, _, _ = doomed_chunks([young], _Referenced(), set(), now=NOW, grace=0.0)
    assert gone == [young]
    gone, _, _ = doomed_chunks([young], _Referenced(), {(KID, young.version)}, now=NOW, grace=0.0)
    assert gone == []
