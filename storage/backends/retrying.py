"""RetryingBackend: bounded retries with exponential backoff and full jitter, for stores whose
client does not retry by itself (fs, memory; S3's botocore retries in its own ``standard`` mode,
so the stack does not put this wrapper over it).

What is retried: ``TransientError`` only (never ``NotFound``, ``PreconditionFailed`` or a
``PermanentError``). Reads, heads, deletes and unconditional puts are idempotent, so they are
simply tried again. A short read (fewer bytes than the range asked for) breaks the backend
contract; it is turned into a ``TransientError`` and retried like one.

Must never blindly retry a conditional put: a create-only put whose answer was lost may have
succeeded, and trying it again would report ``PreconditionFailed`` for our own write. After a
failed conditional put the key is read back: if it holds exactly our bytes, the write landed
and its ETag is returned; if it is still as the condition expected (absent, or the ETag we
matched), the write did not land and is tried again; otherwise the condition no longer holds
and ``PreconditionFailed`` is the true answer. This relies on every conditional payload being
unique to its writer, which chunkgate's are (chunk keys and manifests carry a fresh version id,
leases a fencing token).
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from storage.backends.base import Backend, Blob, NotFound, ObjectInfo, PreconditionFailed, TransientError

log = logging.getLogger("chunkgate.store")
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # calls in all, the first included
    base_delay: float = 0.02  # seconds; the backoff ceiling doubles from here per attempt
    max_delay: float = 1.0  # the backoff ceiling never grows past this
    max_retry_after: float = 5.0  # a store asking us to wait longer than this: give up, tell the client


@dataclass
class RetryStats:
    retries: int = 0
    gave_up: int = 0
    unknown_outcomes_resolved: int = 0


class RetryingBackend:
    def __init__(self, inner: Backend, policy: RetryPolicy | None = None, *,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, rng: random.Random | None = None) -> None:
        self.inner = inner
        self.policy = policy or RetryPolicy()
        self.name = inner.name
        self.stats = RetryStats()
        self._sleep = sleep
        self._rng = rng or random.Random()

    def __getattr__(self, name: str) -> Any:  # check(), queue_depth, and anything else a backend offers
        return getattr(self.inner, name)

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Full jitter (uniform in [0, ceiling]) spreads retrying clients apart instead of
        having them hammer a throttled store in lockstep; a store's own hint is a floor."""
        ceiling = min(self.policy.max_delay, self.policy.base_delay * (2 ** attempt))
        return max(self._rng.uniform(0.0, ceiling), retry_after or 0.0)

    async def _backoff(self, attempt: int, exc: TransientError, what: str) -> None:
        """Sleep before the next attempt, or re-raise ``exc`` when no attempt is left."""
        if attempt + 1 >= self.policy.attempts or (exc.retry_after or 0.0) > self.policy.max_retry_after:
            self.stats.gave_up += 1
            raise exc
        self.stats.retries += 1
        wait = self.delay(attempt, exc.retry_after)
        log.debug("store %s failed (%s); retry %d in %.3fs", what, exc, attempt + 1, wait)
        await self._sleep(wait)

    async def _call(self, what: str, make: Callable[[], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            try:
                return await make()
            except TransientError as exc:
                await self._backoff(attempt, exc, what)
                attempt += 1

    async def get(self, key: str, *, start: int = 0, end: int | None = None, view: bool = False) -> Blob:
        async def once() -> Blob:
            blob = await self.inner.get(key, start=start, end=end, view=view)
            want = max(0, min(blob.size if end is None else end, blob.size) - start)
            if len(blob.data) != want:
                raise TransientError(f"short read of {key}: {len(blob.data)} of {want} bytes")
            return blob

        return await self._call(f"get {key}", once)

    async def head(self, key: str) -> ObjectInfo:
        return await self._call(f"head {key}", lambda: self.inner.head(key))

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        if if_match is None:
            await self._call(f"delete {key}", lambda: self.inner.delete(key))
            return
        attempt = 0
        while True:
            try:
                await self.inner.delete(key, if_match=if_match)
                return
            except TransientError as exc:
                # As for a conditional put: find out whether it happened before trying again.
                try:
                    current = await self._call(f"head {key}", lambda: self.inner.head(key))
                except NotFound:
                    self.stats.unknown_outcomes_resolved += 1
                    return  # gone: ours (or an equivalent removal) took effect
                except TransientError:
                    self.stats.gave_up += 1
                    raise exc from None
                if current.etag != if_match:
                    raise PreconditionFailed(f"{key!r} changed while a conditional delete of it failed") from None
                await self._backoff(attempt, exc, f"conditional delete {key}")
                attempt += 1

    async def put(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        if not if_none_match and if_match is None:
            return await self._call(f"put {key}", lambda: self.inner.put(key, data))
        attempt = 0
        while True:
            try:
                return await self.inner.put(key, data, if_none_match=if_none_match, if_match=if_match)
            except TransientError as exc:
                landed = await self._resolve(key, data, if_none_match, if_match, exc)
                if landed is not None:
                    self.stats.unknown_outcomes_resolved += 1
                    return landed
                await self._backoff(attempt, exc, f"conditional put {key}")
                attempt += 1

    async def _resolve(self, key: str, data: bytes, if_none_match: bool, if_match: str | None,
                       failure: TransientError) -> str | None:
        """After a conditional put failed transiently: our ETag if it landed, None if it did
        not (safe to retry); raises ``PreconditionFailed`` if the condition no longer holds and
        ``failure`` if the store cannot tell us (the outcome stays unknown)."""
        try:
            try:
                current = await self._call(f"head {key}", lambda: self.inner.head(key))
            except NotFound:
                if if_none_match:
                    return None
                raise PreconditionFailed(f"{key!r} vanished while a conditional put on it failed") from None
            if if_match is not None and current.etag == if_match:
                return None
            if current.size == len(data):
                blob = await self.get(key)
                if blob.data == data:
                    return blob.etag
        except TransientError:
            self.stats.gave_up += 1
            raise failure from None
        raise PreconditionFailed(f"{key!r} was changed by another writer while our conditional put failed")

    async def list(self, prefix: str = "", *, start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        # Only a failure before the first key can be retried: after that the caller has seen
        # part of the walk, so resuming is its decision (it knows the last key it got).
        attempt = 0
        while True:
            yielded = False
            try:
                async for info in self.inner.list(prefix, start_after=start_after):
                    yielded = True
                    yield info
                return
            except TransientError as exc:
                if yielded:
                    raise
                await self._backoff(attempt, exc, f"list {prefix}")
                attempt += 1

    async def close(self) -> None:
        await self.inner.close()
