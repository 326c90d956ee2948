"""The size-check verdict for a chunk read back from the store: exact, tolerated or rejected.

Pure. The replaced system accepted chunks whose size was within 2 KiB or 0.1 % of what it
expected; chunkgate keeps that tolerance configurable, and 0/0 means strict.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Verdict(str, Enum):
    EXACT = "exact"
    TOLERATED = "tolerated"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class SizeTolerance:
    max_bytes: int = 2048
    max_ratio: float = 0.001

    def verdict(self, expected: int, actual: int) -> Verdict:
        """Either bound suffices: a difference within ``max_bytes`` or within ``max_ratio`` of
        the expected size is tolerated."""
        diff = abs(actual - expected)
        if diff == 0:
            return Verdict.EXACT
        if diff <= self.max_bytes or diff <= self.max_ratio * expected:
            return Verdict.TOLERATED
        return Verdict.REJECTED
