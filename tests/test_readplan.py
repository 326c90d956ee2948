"""Table-driven tests of the read path's pure arithmetic (storage.readplan)."""

from __future__ import annotations

import pytest

from storage import readplan


@pytest.mark.parametrize(
    ("lo", "hi", "bs", "span"),
    [
        (0, 1, 1024, (0, 1)),
        (1023, 1024, 1024, (0, 1)),
        (1023, 1025, 1024, (0, 2)),  # straddles a boundary: both blocks
        (1024, 2048, 1024, (1, 2)),
        (5000, 70000, 65536, (0, 2)),
        (0, 262144, 262144, (0, 1)),
    ],
)
def test_block_span_names_every_block_a_range_touches(lo: int, hi: int, bs: int, span: tuple[int, int]) -> None:
    assert readplan.block_span(lo, hi, bs) == span


@pytest.mark.parametrize(("lo", "hi", "bs"), [(5, 5, 1024), (6, 5, 1024), (0, 10, 0)])
def test_block_span_refuses_empty_ranges_and_missing_blocks(lo: int, hi: int, bs: int) -> None:
    with pytest.raises(ValueError):
        readplan.block_span(lo, hi, bs)


@pytest.mark.parametrize(
    ("chunks", "length", "verify", "has_blocks", "small"),
    [
        (1, 65536, True, True, True),
        (1, 65536, True, False, False),  # no block digests: verification needs the whole chunk
        (1, 65536, False, False, True),
        (2, 100, True, True, False),  # spans chunks
        (1, 300 * 1024, True, True, False),  # longer than small_read_bytes
        (1, 0, True, True, False),
    ],
)
def test_which_reads_take_the_block_path(chunks: int, length: int, verify: bool, has_blocks: bool, small: bool) -> None:
    assert readplan.is_small_read(chunks, length, 256 * 1024, verify=verify, has_blocks=has_blocks) is small
