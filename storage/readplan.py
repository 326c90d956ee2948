"""Pure arithmetic of the read path: which reads take the small (block) path, and which blocks
a byte range of a chunk touches. No I/O; table-driven tests in tests/test_readplan.py."""

from __future__ import annotations


def block_span(lo: int, hi: int, block_size: int) -> tuple[int, int]:
    """Blocks ``[first, last)`` that bytes ``[lo, hi)`` of a chunk touch (``hi > lo``)."""
    if hi <= lo or block_size <= 0:
        raise ValueError(f"bad span [{lo}, {hi}) for block size {block_size}")
    return lo // block_size, -(-hi // block_size)


def is_small_read(chunks: int, length: int, small_read_bytes: int, *, verify: bool, has_blocks: bool) -> bool:
    """Whether a read is served from a few fetched blocks instead of whole chunks: one chunk, at
    most ``small_read_bytes`` long, and (when reads are verified) with block hashes recorded."""
    return chunks == 1 and 0 < length <= small_read_bytes and (has_blocks or not verify)
