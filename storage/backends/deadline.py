"""DeadlineBackend: every store operation ends within ``timeout`` seconds, answered or not.

A store that accepts connections and never answers (a firewall that drops, a hung S3 node, a
hung NFS mount under the fs store) must not hold a client's request for minutes: the store
clients' own timeouts bound each attempt (S3: ``--store-connect-timeout``/``--store-read-timeout``),
this wrapper bounds the whole operation -- queueing for a limiter slot, every retry and backoff
-- so it sits outermost in the stack (``storage.stack``). What runs out of time raises
``StoreTimeout``, a ``TransientError``: every layer above already treats a transient failure of a
write as an UNKNOWN outcome (``storage.manifests``), which is exactly what a timed-out write is
-- the request may still land (an HTTP request on the wire, a thread that runs on) -- so nothing
it may have made reachable is deleted on a guess. The gateway answers it 504 ``store_timeout``.

``list`` is bounded per page (each step of the walk), not per walk: a long listing that keeps
making progress is not a stalled store.

Must never: swallow a result that arrived in time; retry (the layers under it do, within the
deadline); import aiohttp or ``gateway``.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Awaitable, TypeVar

from storage.backends.base import Backend, Blob, ObjectInfo, TransientError

T = TypeVar("T")


class StoreTimeout(TransientError):
    """The store did not answer in time: the operation's deadline (``seconds``) or a store
    client's own connect/read timeout (``seconds`` None) ran out. For a write, the outcome is
    unknown (it may still land)."""

    def __init__(self, message: str, *, seconds: float | None = None) -> None:
        super().__init__(message, retry_after=None)
        self.seconds = seconds


class DeadlineBackend:
    def __init__(self, inner: Backend, timeout: float) -> None:
        if timeout <= 0:
            raise ValueError(f"store deadline {timeout!r} must be positive")
        self.inner = inner
        self.timeout = timeout
        self.name = inner.name

    def __getattr__(self, name: str) -> Any:  # queue_depth, stats, and anything else a backend offers
        return getattr(self.inner, name)

    async def _bounded(self, what: str, call: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self.timeout):
                return await call
        except TimeoutError:
            raise StoreTimeout(f"the store {self.name} did not answer {what} within {self.timeout:g}s",
                               seconds=self.timeout) from None

    async def put(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        return await self._bounded(f"put {key!r}", self.inner.put(key, data, if_none_match=if_none_match,
                                                                  if_match=if_match))

    async def get(self, key: str, *, start: int = 0, end: int | None = None, view: bool = False) -> Blob:
        return await self._bounded(f"get {key!r}", self.inner.get(key, start=start, end=end, view=view))

    async def head(self, key: str) -> ObjectInfo:
        return await self._bounded(f"head {key!r}", self.inner.head(key))

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        await self._bounded(f"delete {key!r}", self.inner.delete(key, if_match=if_match))

    def check_key(self, key: str) -> None:
        self.inner.check_key(key)

    async def list(self, prefix: str = "", *, start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        walk = self.inner.list(prefix, start_after=start_after).__aiter__()
        try:
            while True:
                try:
                    info = await self._bounded(f"list {prefix!r}", walk.__anext__())
                except StopAsyncIteration:
                    return
                yield info
        finally:
            aclose = getattr(walk, "aclose", None)
            if aclose is not None:
                try:
                    await asyncio.wait_for(aclose(), self.timeout)
                except (TimeoutError, RuntimeError):  # a walk cut mid-step cannot always close
                    pass

    async def check(self) -> None:
        await self._bounded("its check", self.inner.check())

    async def close(self) -> None:
        await self.inner.close()
