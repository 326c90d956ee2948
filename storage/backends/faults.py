"""FaultyBackend: a wrapper that makes a healthy store misbehave the way real ones do, at a rate.

For tests and the ``--fault-rate`` / ``--fault-kinds`` debug flags only. Each call, with
probability ``plan.rate``, suffers one fault drawn from ``plan.kinds``:

- ``error``: a ``TransientError`` (a 500 or a reset connection). For puts and deletes it is raised either
  before the write reaches the store or *after* it succeeded — the "outcome unknown" case a
  retry of a conditional put must not get wrong.
- ``throttle``: a ``TransientError`` with ``retry_after``, like S3's 503 SlowDown; the request
  never reached the store.
- ``latency``: the call is delayed, then done normally.
- ``truncate``: a ``get`` returns fewer bytes than asked for, with ``Blob.size`` still the
  whole value's size — a short read that breaks the backend contract, which the layers above
  must detect rather than serve.

Must never: corrupt stored bytes (faults are on the wire, not on disk), or be in the stack
unless a fault plan was asked for.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from storage.backends.base import Backend, Blob, ObjectInfo, TransientError

KINDS = frozenset({"error", "throttle", "latency", "truncate"})


@dataclass
class FaultPlan:
    """What to inject. ``seed`` makes a run reproducible (None: different every run)."""

    rate: float = 0.1
    kinds: frozenset[str] | set[str] = field(default_factory=lambda: set(KINDS))
    seed: int | None = None
    max_latency: float = 0.05  # seconds; an injected delay is uniform in [0, max_latency]
    retry_after: float = 0.05  # seconds a throttle asks the caller to wait

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"fault rate {self.rate!r} is not between 0 and 1")
        unknown = set(self.kinds) - KINDS
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {sorted(KINDS)}")
        self.kinds = frozenset(self.kinds)

    @classmethod
    def parse(cls, rate: float, kinds: str, seed: int | None = None) -> "FaultPlan":
        """From the debug flags: ``kinds`` is comma-separated, empty or ``all`` for every kind."""
        names = {k.strip() for k in kinds.split(",") if k.strip()}
        return cls(rate=rate, kinds=set(KINDS) if not names or names == {"all"} else names, seed=seed)


@dataclass
class FaultStats:
    """Injected faults by kind, so a test can show the faults really happened."""

    calls: int = 0
    injected: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})


class FaultyBackend:
    def __init__(self, inner: Backend, plan: FaultPlan) -> None:
        self.inner = inner
        self.plan = plan
        self.name = inner.name
        self.stats = FaultStats()
        self._rng = random.Random(plan.seed)

    def __getattr__(self, name: str) -> Any:  # check(), and anything else a backend offers
        return getattr(self.inner, name)

    def _draw(self, op: str) -> str | None:
        self.stats.calls += 1
        if self._rng.random() >= self.plan.rate:
            return None
        kinds = sorted(k for k in self.plan.kinds if k != "truncate" or op == "get")
        if not kinds:
            return None
        kind = self._rng.choice(kinds)
        self.stats.injected[kind] += 1
        return kind

    async def _before(self, op: str, key: str) -> str | None:
        """Inject what happens before the store sees the call; return the kind drawn."""
        kind = self._draw(op)
        if kind == "throttle":
            raise TransientError(f"injected throttle on {op} {key} (SlowDown)", retry_after=self.plan.retry_after)
        if kind == "latency":
            await asyncio.sleep(self._rng.uniform(0.0, self.plan.max_latency))
        if kind == "error" and (op not in ("put", "delete") or self._rng.random() < 0.5):
            raise TransientError(f"injected error on {op} {key}")
        return kind

    async def put(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        kind = await self._before("put", key)
        etag = await self.inner.put(key, data, if_none_match=if_none_match, if_match=if_match)
        if kind == "error":
            # The write landed but the answer was lost: the caller cannot know it succeeded.
            raise TransientError(f"injected error after put {key} was stored")
        return etag

    async def get(self, key: str, *, start: int = 0, end: int | None = None, view: bool = False) -> Blob:
        kind = await self._before("get", key)
        blob = await self.inner.get(key, start=start, end=end, view=view)
        if kind == "truncate" and blob.data:
            cut = self._rng.randrange(0, len(blob.data))
            return Blob(blob.data[:cut], blob.size, blob.etag)
        return blob

    async def head(self, key: str) -> ObjectInfo:
        await self._before("head", key)
        return await self.inner.head(key)

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        kind = await self._before("delete", key)
        await self.inner.delete(key, if_match=if_match)
        if kind == "error":
            raise TransientError(f"injected error after delete {key} was done")

    async def list(self, prefix: str = "", *, start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        await self._before("list", prefix)
        async for info in self.inner.list(prefix, start_after=start_after):
            yield info

    async def close(self) -> None:
        await self.inner.close()
