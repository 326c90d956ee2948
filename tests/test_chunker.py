"""storage.chunker: the one cutter of bodies into chunks, for PUT and tus, in both modes."""

from __future__ import annotations

import pytest

from storage.buffers import ChunkBuffers
from storage.chunker import Chunker


def cut(chunker: Chunker, pieces: list[bytes]) -> tuple[list[bytes], bytes | None]:
    out: list[bytes] = []
    for piece in pieces:
        out.extend(bytes(c) for c in chunker.feed(piece))
    last = chunker.flush()
    return out, None if last is None else bytes(last)


# (pieces, chunk size) -> the chunks expected: every one but the last exactly chunk_size long,
# together the concatenation of the pieces, in order.
CASES = [
    ([], 4, [], None),
    ([b""], 4, [], None),
    ([b"abc"], 4, [], b"abc"),
    ([b"abcd"], 4, [b"abcd"], None),
    ([b"abcdefgh"], 4, [b"abcd", b"efgh"], None),
    ([b"abcdefghi"], 4, [b"abcd", b"efgh"], b"i"),
    ([b"ab", b"cd", b"ef"], 4, [b"abcd"], b"ef"),
    ([b"a", b"", b"bcdefg", b"h"], 4, [b"abcd", b"efgh"], None),
    ([b"x" * 10], 3, [b"xxx"] * 3, b"x"),
    ([b"ab", b"cdefghijk"], 1, [bytes([c]) for c in b"abcdefghijk"], None),
]


@pytest.mark.parametrize("buffered", [False, True], ids=["joined", "buffered"])
@pytest.mark.parametrize("pieces,size,chunks,last", CASES)
def test_chunks_are_the_pieces_recut(pieces: list[bytes], size: int, chunks: list[bytes], last: bytes | None,
                                     buffered: bool) -> None:
    pool = ChunkBuffers(size, keep=2) if buffered else None
    got, rest = cut(Chunker(size, pool), pieces)
    assert (got, rest) == (chunks, last)


def test_a_handed_chunk_is_never_written_again() -> None:
    """The replaced system refilled a buffer an asynchronous write still sent. Here a chunk
    handed on keeps its bytes whatever is fed afterwards, until its holder gives it back."""
    pool = ChunkBuffers(4, keep=4)
    chunker = Chunker(4, pool)
    first = next(iter(chunker.feed(b"abcd")))
    for _ in chunker.feed(b"wxyz" * 3 + b"q"):
        pass
    assert bytes(first) == b"abcd" and first.readonly
    assert pool.lent == 5  # four handed on, one being filled: none lent twice
    chunker.close()
    assert pool.lent == 4  # the partly filled one went back; the handed ones are their holders'


def test_a_given_back_buffer_is_reused_and_a_partial_copy_is_independent() -> None:
    pool = ChunkBuffers(4, keep=4)
    chunker = Chunker(4, pool)
    chunk = next(iter(chunker.feed(b"abcd")))
    owner = chunk.obj
    pool.give_back(chunk)
    list(chunker.feed(b"ef"))
    tail = chunker.partial()
    list(chunker.feed(b"gh"))  # fills the same (reused) buffer on
    assert tail == b"ef" and chunker.filled == 0
    assert pool.lent == 1 and pool._lent.popitem()[1] is owner  # reused, not a new allocation


@pytest.mark.parametrize("buffered", [False, True], ids=["joined", "buffered"])
def test_partial_copies_the_rest_and_keeps_it(buffered: bool) -> None:
    chunker = Chunker(4, ChunkBuffers(4, keep=1) if buffered else None)
    assert chunker.partial() == b""
    list(chunker.feed(b"a"))
    list(chunker.feed(b"bc"))
    assert chunker.partial() == b"abc" and chunker.filled == 3
    assert [bytes(c) for c in chunker.feed(b"de")] == [b"abcd"]
    assert chunker.partial() == b"e"
    assert bytes(chunker.flush() or b"") == b"e" and chunker.flush() is None


def test_a_pool_of_another_size_falls_back_to_fresh_bytes() -> None:
    pool = ChunkBuffers(8, keep=1)
    got = list(Chunker(4, pool).feed(b"abcdefgh"))
    assert got == [b"abcd", b"efgh"] and all(isinstance(c, bytes) for c in got) and pool.lent == 0


def test_a_whole_piece_that_is_one_chunk_is_passed_on_without_a_copy() -> None:
    piece = b"abcd" * 1000
    (chunk,) = Chunker(len(piece)).feed(piece)
    assert chunk is piece


def test_chunk_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Chunker(0)


def write_into(chunker: Chunker, piece: bytes) -> list[bytes]:
    """What a body that writes itself does (gateway.body): fill ``room``, ``advance``."""
    out: list[bytes] = []
    src = memoryview(piece)
    while src:
        room = chunker.room()
        n = min(len(room), len(src))
        room[:n] = src[:n]
        src = src[n:]
        chunk = chunker.advance(n)
        if chunk is not None:
            out.append(bytes(chunk))
    return out


@pytest.mark.parametrize("buffered", [False, True], ids=["joined", "buffered"])
@pytest.mark.parametrize("pieces,size,chunks,last", CASES)
def test_writing_into_room_cuts_the_same_chunks_as_feeding_even_mixed(
        pieces: list[bytes], size: int, chunks: list[bytes], last: bytes | None, buffered: bool) -> None:
    pool = ChunkBuffers(size, keep=2) if buffered else None
    chunker = Chunker(size, pool)
    got: list[bytes] = []
    for n, piece in enumerate(pieces):  # every other piece fed, the rest written into the room
        if n % 2:
            got.extend(bytes(c) for c in chunker.feed(piece))
        else:
            got.extend(write_into(chunker, piece))
    rest = chunker.flush()
    assert (got, None if rest is None else bytes(rest)) == (chunks, last)
    assert pool is None or pool.lent == len(chunks) + (last is not None)  # the holders give them back


@pytest.mark.parametrize("buffered", [False, True], ids=["joined", "buffered"])
def test_room_starts_after_what_was_fed_and_partial_sees_what_was_written(buffered: bool) -> None:
    chunker = Chunker(8, ChunkBuffers(8, keep=2) if buffered else None)
    for _ in chunker.feed(b"abc"):  # a tus upload's saved tail, refilled
        pass
    room = chunker.room()
    assert len(room) == 5
    room[:2] = b"de"
    assert chunker.partial() == b"abc"  # not advanced yet: not part of the chunk
    assert chunker.advance(2) is None and chunker.partial() == b"abcde"
    room = chunker.room()
    room[:3] = b"fgh"
    chunk = chunker.advance(3)
    assert chunk is not None and bytes(chunk) == b"abcdefgh" and chunk.readonly
    assert chunker.filled == 0 and chunker.partial() == b""


@pytest.mark.parametrize("n", [-1, 6])
def test_advancing_past_the_room_is_refused(n: int) -> None:
    chunker = Chunker(8)
    for _ in chunker.feed(b"abc"):
        pass
    chunker.room()
    with pytest.raises(ValueError):
        chunker.advance(n)
