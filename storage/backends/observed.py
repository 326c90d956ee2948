"""ObservedBackend: a wrapper that reports every store call (operation, outcome, duration, bytes)
to an observer. It records nothing itself: the gateway's metrics adapter is the observer, so the
storage layer stays free of any exporter."""

from __future__ import annotations

import time
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol, TypeVar

from storage.backends.base import (
    Backend,
    Blob,
    NotFound,
    ObjectInfo,
    PermanentError,
    PreconditionFailed,
    TransientError,
)


T = TypeVar("T")


class BackendObserver(Protocol):
    def backend_call(self, op: str, outcome: str, seconds: float, bytes_read: int, bytes_written: int) -> None: ...


def outcome_of(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    if isinstance(exc, NotFound):
        return "not_found"
    if isinstance(exc, PreconditionFailed):
        return "precondition_failed"
    if isinstance(exc, TransientError):
        return "transient"
    if isinstance(exc, PermanentError):
        return "permanent"
    return "transient"  # cancellations and unexpected errors count as failed calls


class ObservedBackend:
    def __init__(self, inner: Backend, observer: BackendObserver) -> None:
        self.inner = inner
        self.observer = observer
        self.name = inner.name

    def __getattr__(self, name: str) -> Any:  # check(), and anything else a backend offers
        return getattr(self.inner, name)

    async def _timed(self, op: str, call: Awaitable[T], *, read: Callable[[T], int] | None = None, written: int = 0) -> T:
        t0 = time.perf_counter()
        try:
            result = await call
        except BaseException as exc:
            self.observer.backend_call(op, outcome_of(exc), time.perf_counter() - t0, 0, 0)
            raise
        self.observer.backend_call(op, "ok", time.perf_counter() - t0, read(result) if read else 0, written)
        return result

    async def put(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        return await self._timed("put", self.inner.put(key, data, if_none_match=if_none_match, if_match=if_match), written=len(data))

    async def get(self, key: str, *, start: int = 0, end: int | None = None, view: bool = False) -> Blob:
        return await self._timed("get", self.inner.get(key, start=start, end=end, view=view), read=lambda b: len(b.data))

    async def head(self, key: str) -> ObjectInfo:
        return await self._timed("head", self.inner.head(key))

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        await self._timed("delete", self.inner.delete(key, if_match=if_match))

    async def list(self, prefix: str = "", *, start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        t0 = time.perf_counter()
        try:
            async for info in self.inner.list(prefix, start_after=start_after):
                yield info
        except GeneratorExit:  # the caller stopped early: the call itself went fine
            self.observer.backend_call("list", "ok", time.perf_counter() - t0, 0, 0)
            raise
        except BaseException as exc:
            self.observer.backend_call("list", outcome_of(exc), time.perf_counter() - t0, 0, 0)
            raise
        self.observer.backend_call("list", "ok", time.perf_counter() - t0, 0, 0)

    async def close(self) -> None:
        await self.inner.close()
