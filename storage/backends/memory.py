"""An in-process dict backend: the reference implementation of the protocol, for tests.

It keeps every value in memory and forgets it on exit, so it must never be used as a real
store. It enforces the same key rules and conditions as the durable backends, so code tested
against it behaves the same on fs and S3.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import AsyncIterator

from storage.backends.base import (
    Blob,
    InvalidKey,
    NotFound,
    ObjectInfo,
    PermanentError,
    PreconditionFailed,
)
from storage.keys import BadKey, validate_key


def _check_range(start: int, end: int | None) -> None:
    """Reject ranges no caller should ask for; S3 would silently ignore them and send all."""
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"bad byte range [{start}, {end})")


@dataclass(frozen=True, slots=True)
class _Entry:
    data: bytes
    etag: str
    last_modified: datetime


class MemoryBackend:
    """Dict-backed ``Backend``. ETags are fresh random ids, so they change on every put."""

    def __init__(self, *, max_key_bytes: int | None = None) -> None:
        # max_key_bytes: behave like an S3 bucket whose prefix leaves fewer bytes for keys.
        self.name = "memory"
        self._entries: dict[str, _Entry] = {}
        self._closed = False
        self._max_key_bytes = max_key_bytes

    def _key(self, key: str) -> str:
        if self._closed:
            raise PermanentError("the memory backend is closed")
        try:
            validate_key(key)
        except BadKey as exc:
            raise InvalidKey(f"{key!r}: {exc}") from None
        if self._max_key_bytes is not None and len(key.encode("utf-8")) > self._max_key_bytes:
            raise InvalidKey(f"{key!r}: longer than the {self._max_key_bytes} bytes this store holds")
        return key

    async def put(
        self,
        key: str,
        data: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        self._key(key)
        # Copy: a caller's bytearray reused after the await must not change what we stored.
        data = bytes(data)
        # No await between the check and the store, so the condition is atomic in one loop.
        current = self._entries.get(key)
        if if_none_match and current is not None:
            raise PreconditionFailed(f"{key!r} already exists")
        if if_match is not None and (current is None or current.etag != if_match):
            raise PreconditionFailed(f"{key!r} does not have ETag {if_match!r}")
        etag = f'"{uuid.uuid4().hex}"'
        self._entries[key] = _Entry(data, etag, datetime.now(timezone.utc))
        return etag

    async def get(self, key: str, *, start: int = 0, end: int | None = None, view: bool = False) -> Blob:
        self._key(key)
        _check_range(start, end)
        entry = self._entries.get(key)
        if entry is None:
            raise NotFound(key)
        return Blob(entry.data[start:end], len(entry.data), entry.etag)

    async def head(self, key: str) -> ObjectInfo:
        self._key(key)
        entry = self._entries.get(key)
        if entry is None:
            raise NotFound(key)
        return ObjectInfo(key, len(entry.data), entry.etag, entry.last_modified)

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        self._key(key)
        if if_match is not None:
            current = self._entries.get(key)
            if current is None or current.etag != if_match:
                raise PreconditionFailed(f"{key!r} does not have ETag {if_match!r}")
        self._entries.pop(key, None)

    def check_key(self, key: str) -> None:
        self._key(key)

    async def list(
        self, prefix: str = "", *, start_after: str | None = None
    ) -> AsyncIterator[ObjectInfo]:
        if self._closed:
            raise PermanentError("the memory backend is closed")
        # A snapshot: puts and deletes during the walk may or may not show, as the contract allows.
        # Python orders str by code point, which is the same order as their UTF-8 bytes.
        keys = sorted(
            k
            for k in self._entries
            if k.startswith(prefix) and (start_after is None or k > start_after)
        )
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None:
                yield ObjectInfo(key, len(entry.data), entry.etag, entry.last_modified)

    async def check(self) -> None:
        """Nothing can be wrong with a dict."""

    async def close(self) -> None:
        self._closed = True
