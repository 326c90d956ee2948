"""The one small async key/value protocol every store backend implements.

A backend stores opaque immutable-ish byte strings under '/'-separated string keys. It knows
nothing of manifests, chunks, locks or HTTP; the object layer (``storage.objects``) builds on
it, and cross-cutting concerns (metrics, limits, retries, fault injection) wrap it
(one module each under ``storage/backends/``, stacked by ``storage.stack``). A backend must never import aiohttp or ``gateway``.

Errors are typed here, where they arise; the gateway maps them to HTTP status in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import AsyncIterator, Protocol, runtime_checkable


class BackendError(Exception):
    """Base class of every error a backend raises."""


class NotFound(BackendError):
    """The key does not exist (or vanished between list and get)."""


class PreconditionFailed(BackendError):
    """A conditional put lost: ``if_none_match`` on an existing key, or ``if_match`` on a
    key whose current ETag differs (or that no longer exists)."""


class TransientError(BackendError):
    """The store failed in a way that may succeed if retried later (timeouts, 5xx, throttling).

    ``retry_after`` is the store's hint in seconds, when it gave one."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(BackendError):
    """The store refused in a way retrying will not fix (bad credentials, bad key, no bucket)."""


class StoreFull(PermanentError):
    """The store has no room for this write (a full disk, a quota: ENOSPC, EDQUOT) and refused
    it: nothing of it landed, so what it would have made reachable may be cleaned up. Not
    retried: it succeeds only once space is freed. A write that did land but could not be
    made durable afterwards is a ``TransientError`` (its outcome is unknown), never this."""


class InvalidKey(PermanentError):
    """The key cannot be stored by this backend (escapes the root, too long, bad characters)."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What ``head`` and ``list`` report of a stored value."""

    key: str
    size: int
    etag: str  # opaque; only ever compared for equality and passed back to ``put(if_match=)``
    last_modified: datetime


@dataclass(frozen=True, slots=True)
class Blob:
    """What ``get`` returns: the bytes asked for, and facts about the whole stored value."""

    data: bytes  # a read-only memoryview when the caller asked ``get(view=True)``
    size: int  # size of the whole stored value, even when ``data`` is a range of it
    etag: str


@runtime_checkable
class Backend(Protocol):
    """The store contract. Every implementation passes ``tests/test_backend_contract.py``.

    Keys: non-empty '/'-separated strings of UTF-8, no empty, '.' or '..' segments, no leading
    '/'; at most 1024 UTF-8 bytes including the backend's own prefix. A key the backend cannot
    hold raises ``InvalidKey`` (never silently maps two keys onto one value).
    """

    name: str  # short description for logs and the ready line, e.g. "fs:/data" or "s3://b/p"

    async def put(
        self,
        key: str,
        data: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        """Store ``data`` under ``key`` atomically and return the new ETag.

        A reader sees either the old value or the whole new one, never a prefix (no 0-byte
        files). ``if_none_match=True``: create only; raises ``PreconditionFailed`` if the key
        exists. ``if_match=etag``: replace only if the current ETag equals ``etag``; raises
        ``PreconditionFailed`` otherwise (including when the key is absent). Both conditions
        are atomic with respect to other puts on the same key through any backend instance
        over the same store. Unconditional puts overwrite. Not idempotent when conditional.
        ``data`` may be a read-only ``memoryview``: the caller keeps it unchanged until put
        returns; a writable buffer may change after the first await and must be copied.
        """
        ...

    async def get(self, key: str, *, start: int = 0, end: int | None = None, view: bool = False) -> Blob:
        """Return bytes ``[start, end)`` of the value (``end=None``: to the end).

        ``view=True``: the caller accepts ``Blob.data`` as a read-only ``memoryview`` over the
        client's own buffer instead of ``bytes`` (a backend may ignore it and return bytes):
        copying an 8 MiB chunk into fresh memory cost ~5 ms of page faults here.

        ``end`` past the value's size is clamped; ``start`` at or past the size returns empty
        data; ``start < 0`` or ``end < start`` raise ``ValueError`` (an S3 server would silently
        send the whole value). Raises ``NotFound``. The returned ``Blob.size`` is the whole value's size, so
        a caller can check it without reading everything. A short read from the store is
        never returned as success: it raises ``TransientError``.
        """
        ...

    async def head(self, key: str) -> ObjectInfo:
        """Size, ETag and modification time of ``key``; raises ``NotFound``."""
        ...

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        """Remove ``key``. Idempotent: deleting an absent key is not an error.

        ``if_match=etag``: remove only if the current ETag equals ``etag``, atomically with
        respect to puts on the same key; raises ``PreconditionFailed`` otherwise (including when
        the key is absent). A removal that must not take a newer value with it (a manifest
        tombstone, a lease record) is conditional; ``storage.probe`` checks the store honours it.
        """
        ...

    def check_key(self, key: str) -> None:
        """Raise ``InvalidKey`` if this backend cannot hold ``key`` (no I/O): asked before any
        byte of an upload is stored, so a key the store would refuse at commit time is refused
        up front instead of leaving an upload that can never complete."""
        ...

    def list(self, prefix: str = "", *, start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        """Yield every key starting with ``prefix``, in ascending order of their UTF-8 bytes,
        beginning after ``start_after`` when given. Pages lazily; consistent enough for gc and
        listing (keys added or removed during the walk may or may not appear)."""
        ...

    async def check(self) -> None:
        """Raise ``PermanentError`` (or ``TransientError`` when unreachable) with a clear message
        if the store cannot be used: missing bucket or root, bad credentials, no write access.
        Used at startup and by ``/readyz``."""
        ...

    async def close(self) -> None:
        """Release connections and threads. Idempotent."""
        ...
