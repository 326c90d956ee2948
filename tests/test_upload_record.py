"""The pure parts of the upload sessions: the record's JSON form, its state machine and expiry rule
(storage.upload_record), and the durable layout that decides an upload's offset from what the
store holds (storage.upload_layout); table-driven."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from storage import keys
from storage.backends.base import ObjectInfo
from storage.errors import StoreFailed
from storage.upload_layout import DurableUpload, durable_layout, recorded_chunks, removable, tail_key
from storage.upload_record import NEXT, UploadRecord, UploadState, expired, overdue

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
    ("chunk 2 landed before chunk 1 when the writer died: the tail of 1 still counts", 350, (100, None, 100), (1, 30), 130, 1),
    ("a misfit chunk where the tail is: the tail counts, the misfit is debris", 350, (100, 40), (1, 30), 130, 1),
    ("a tail after the final short chunk is debris", 250, (100, 100, 50), (3, 10), 250, 1),
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


RECORDED = [
    # (name, length, recorded indices, sizes the record vouches for)
    ("nothing recorded", 250, (), ()),
    ("full chunks from 0", 250, (0, 1), (100, 100)),
    ("the short final chunk ends at the length", 250, (0, 1, 2), (100, 100, 50)),
    ("a gap ends what it vouches for (a listing finds the rest)", 350, (0, 2), (100,)),
    ("deferred length: full chunks only", None, (0, 1, 2), (100, 100, 100)),
    ("nothing past the declared end", 200, (0, 1, 2), (100, 100)),
]


@pytest.mark.parametrize(("name", "length", "recorded", "sizes"), RECORDED, ids=[c[0] for c in RECORDED])
def test_recorded_chunks(name: str, length: int | None, recorded: tuple[int, ...], sizes: tuple[int, ...]) -> None:
    r = record(length)
    r.hashes = {i: f"h{i}" for i in recorded}
    got = recorded_chunks(r)
    assert [i.size for i in got] == list(sizes)
    assert [i.key for i in got] == [keys.chunk_key(r.key, r.version, i) for i in range(len(sizes))]


@pytest.mark.parametrize(("name", "length", "sizes", "tail", "offset", "debris"), CASES, ids=[c[0] for c in CASES])
def test_the_recorded_chunks_and_a_listing_past_them_give_the_layout_of_a_full_listing(
        name: str, length: int | None, sizes: tuple[int | None, ...], tail: tuple[int, int] | None,
        offset: int, debris: int) -> None:
    """What a request records is the contiguous run it found good, so for every stored layout,
    the record's chunks plus a listing past them decide the same offset and debris."""
    r = record(length)
    stored = chunks(sizes)
    good, _, _ = durable_layout(r, stored, [])
    r.hashes = {n: f"h{n}" for n in range(len(good))}
    vouched = recorded_chunks(r)
    past = [i for i in stored if not vouched or i.key > vouched[-1].key]
    full = durable_layout(r, stored, tails(*tail) if tail else [])
    split = durable_layout(r, vouched + past, tails(*tail) if tail else [])
    assert [i.key for i in split[0]] == [i.key for i in full[0]] and [i.size for i in split[0]] == [i.size for i in full[0]]
    assert split[1] == full[1] and split[2] == full[2]


REMOVABLE = [
    # (name, length, debris chunk indices, debris tail indices, which may be deleted before writing)
    ("tails always", 250, (), (0, 3), ["t0", "t3"]),
    ("a chunk this upload may write again stays (the rewrite adopts or replaces it)", 250, (1, 2), (), []),
    ("a chunk past the declared end goes", 150, (1, 2, 5), (), ["c2", "c5"]),
    ("deferred length: any chunk may be written again", None, (1, 9), (), []),
]


@pytest.mark.parametrize(("name", "length", "chunk_ix", "tail_ix", "expected"), REMOVABLE, ids=[c[0] for c in REMOVABLE])
def test_removable_debris(name: str, length: int | None, chunk_ix: tuple[int, ...], tail_ix: tuple[int, ...],
                          expected: list[str]) -> None:
    r = record(length)
    by_name = {f"c{i}": keys.chunk_key(r.key, r.version, i) for i in chunk_ix}
    by_name.update({f"t{i}": tail_key("0" * 32, i) for i in tail_ix})
    durable = DurableUpload(r, "e", [], None, list(by_name.values()))
    assert removable(durable) == [by_name[n] for n in expected]


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


P, R, C = UploadState.PENDING, UploadState.RECEIVING, UploadState.COMMITTING
DONE, AB, EX = UploadState.COMPLETE, UploadState.ABORTED, UploadState.EXPIRED
TRANSITIONS = [
    # (from, to, allowed, what it is)
    (P, R, True, "the first bytes arrive"),
    (P, C, True, "a zero-length upload commits at once"),
    (P, DONE, True, "superseded before any byte (its key was written meanwhile)"),
    (P, AB, True, "terminated"),
    (P, EX, True, "no bytes before its expiry"),
    (R, C, True, "the last byte is in: committing is recorded before the manifest"),
    (R, DONE, True, "superseded: a later write came first"),
    (R, AB, True, "terminated"),
    (R, EX, True, "no progress before its expiry"),
    (R, P, False, "bytes received are never forgotten"),
    (R, R, False, "receiving is entered once"),
    (C, C, True, "an older committing record learns what it replaces"),
    (C, DONE, True, "the commit landed (or was superseded)"),
    (C, AB, True, "the key can never be committed"),
    (C, EX, False, "a committing upload never expires: its manifest may name its chunks"),
    (C, R, False, "no more bytes once committing"),
    (DONE, R, False, "complete is final"),
    (DONE, DONE, False, "complete is final"),
    (AB, R, False, "aborted is final"),
    (EX, R, False, "expired is final"),
    (EX, AB, False, "expired is final"),
]


@pytest.mark.parametrize(("start", "to", "allowed", "what"), TRANSITIONS,
                         ids=[f"{a.value}->{b.value}" for a, b, _, _ in TRANSITIONS])
def test_state_transitions(start: UploadState, to: UploadState, allowed: bool, what: str) -> None:
    r = record(250)
    r.state = start
    if not allowed:
        with pytest.raises(ValueError):
            r.enter(to, 5.0)
        assert r.state is start and r.finished is None  # nothing changed
        return
    r.enter(to, 5.0)
    assert r.state is to
    assert r.finished == (5.0 if to in (DONE, AB, EX) else None)  # when it ended, for the tombstone sweep


def test_every_state_is_in_the_transition_table_and_terminal_states_are_final() -> None:
    assert set(NEXT) == set(UploadState)
    assert all(not NEXT[s] for s in (DONE, AB, EX))


EXPIRY = [
    # (state, expires, now, overdue, expired)
    (P, 10.0, 9.0, False, False),
    (P, 10.0, 10.0, True, True),
    (R, 10.0, 11.0, True, True),
    (C, 10.0, 11.0, True, False),  # overdue: the sweeper finishes its commit; never expired
    (DONE, 10.0, 11.0, False, False),
    (AB, 10.0, 11.0, False, False),
    (EX, 10.0, 11.0, False, False),
    ("receiving", 10.0, 11.0, True, True),  # the index's plain strings (storage.quota) too
    ("committing", 10.0, 11.0, True, False),
    ("damaged", 10.0, 11.0, False, False),
]


@pytest.mark.parametrize(("state", "expires", "now", "is_overdue", "is_expired"), EXPIRY)
def test_the_one_expiry_rule(state: str, expires: float, now: float, is_overdue: bool, is_expired: bool) -> None:
    assert overdue(state, expires, now) is is_overdue
    assert expired(state, expires, now) is is_expired
