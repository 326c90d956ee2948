"""What a listing shows of each object, cached by the ETag of its manifest record.

``GET /objects`` used to read every listed key's manifest: one store GET per key, on every
page. The store's own listing already returns each record's ETag, and a record's ETag changes
with every write of it (commit, delete, repair), so a summary remembered under the ETag it was
read with stays right for exactly as long as the listing reports that ETag: a repeated page
costs one list request, plus one GET per record that changed since. Another gateway's write
changes the ETag too, so nothing here needs a TTL.

Pure bookkeeping, bounded in entries; must never return a summary for an ETag it was not
recorded under.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from datetime import datetime

from storage.manifest import Manifest


@dataclass(frozen=True, slots=True)
class Listed:
    """The listing fields of one object (API.md: key, size, etag, last_modified, content_type)."""

    key: str
    size: int
    etag: str
    last_modified: datetime
    content_type: str

    @classmethod
    def of(cls, manifest: Manifest) -> "Listed":
        return cls(manifest.key, manifest.size, manifest.etag, manifest.last_modified, manifest.content_type)


class _Unknown:
    pass


UNKNOWN = _Unknown()  # not remembered under that ETag: the record must be read


class ListingCache:
    def __init__(self, max_entries: int = 100_000) -> None:
        self._max = max_entries
        self._entries: collections.OrderedDict[str, tuple[str, Listed | None]] = collections.OrderedDict()

    def remember(self, key: str, record_etag: str, listed: Listed | None) -> None:
        """``listed`` None: the record is a tombstone (the key is not listed)."""
        self._entries[key] = (record_etag, listed)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def lookup(self, key: str, record_etag: str) -> Listed | None | _Unknown:
        hit = self._entries.get(key)
        if hit is None or hit[0] != record_etag:
            return UNKNOWN
        self._entries.move_to_end(key)
        return hit[1]

    def __len__(self) -> int:
        return len(self._entries)
