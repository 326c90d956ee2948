"""storage.tolerance: the size verdict of a chunk read back, either bound sufficing."""

from __future__ import annotations

import pytest

from storage.tolerance import SizeTolerance, Verdict

CASES = [
    # (max_bytes, max_ratio, expected, actual, verdict, why)
    (2048, 0.001, 8388608, 8388608, Verdict.EXACT, "same size"),
    (2048, 0.001, 8388608, 8388608 + 2048, Verdict.TOLERATED, "2 KiB more: the bytes bound"),
    (2048, 0.001, 8388608, 8388608 - 2048, Verdict.TOLERATED, "2 KiB less"),
    (2048, 0.001, 8388608, 8388608 + 8388, Verdict.TOLERATED, "0.1 % more: the ratio bound, beyond the bytes one"),
    (2048, 0.001, 8388608, 8388608 + 8389, Verdict.REJECTED, "just past both bounds"),
    (2048, 0.001, 1000, 3049, Verdict.REJECTED, "a small chunk: the ratio is tiny, the bytes bound decides"),
    (2048, 0.001, 1000, 3048, Verdict.TOLERATED, "within 2048 bytes"),
    (0, 0.0, 100, 101, Verdict.REJECTED, "0 and 0: strict"),
    (0, 0.0, 100, 100, Verdict.EXACT, "strict still serves the exact size"),
    (0, 0.5, 100, 150, Verdict.TOLERATED, "ratio only"),
    (10, 0.0, 0, 10, Verdict.TOLERATED, "an empty chunk that grew a little"),
    (10, 0.0, 0, 11, Verdict.REJECTED, "...or too much"),
]


@pytest.mark.parametrize(("max_bytes", "max_ratio", "expected", "actual", "verdict", "why"), CASES,
                         ids=[c[-1] for c in CASES])
def test_verdict(max_bytes: int, max_ratio: float, expected: int, actual: int, verdict: Verdict, why: str) -> None:
    assert SizeTolerance(max_bytes, max_ratio).verdict(expected, actual) is verdict
