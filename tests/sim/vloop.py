"""An asyncio event loop on a virtual clock: when every task waits, time jumps to the next timer.

``asyncio.sleep``, ``wait_for``, ``call_later`` and every timeout inside the real storage code
then take no wall time at all, so a day of upload expiry runs in milliseconds, and the order of
events depends only on the program and the seed (no thread, no real I/O, no wall clock).

Hand-written because what PyPI offers (looptime) patches a running pytest loop; the simulator
needs a loop of its own per run, started and stopped many thousand times in one process.
"""

from __future__ import annotations

import asyncio
import selectors
from typing import Any


class Deadlock(RuntimeError):
    """Every task waits and no timer is due: nothing can ever happen again."""


class _Selector(selectors.DefaultSelector):
    def __init__(self, loop: "VirtualTimeLoop") -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None:
            raise Deadlock("all tasks are waiting and no timer is scheduled")
        if timeout > 0:
            self._loop.advance(timeout)
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """``time()`` is virtual; the selector never blocks but moves the clock instead."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        super().__init__(selector=_Selector(self))
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds
