"""ManifestStore: the one component that reads and writes manifest records (``m/<key>``).

A key's record is the single source of truth of what the key means: a manifest (the committed
version), a tombstone (deleted), or nothing. Every change of it -- a PUT's or a tus upload's
commit, a repair, a DELETE, an update of the events it carries -- is one conditional write
through ``commit``: ``If-None-Match: *`` when the writer saw no record, ``If-Match`` on the
record's ETag when it saw one. Each has one of three outcomes:

- ``COMMITTED``: the record holds what was written. Also when the store's answer was lost or a
  retried write was refused by its own first attempt: every record carries a fresh ``rev``, so a
  read-back recognises the writer's own write.
- ``LOST``: the condition failed; another writer changed the record first; nothing was written.
- ``UNKNOWN``: the store failed while the write was in flight and a read-back could not show it
  landed. It may still land (a timed-out request, a write thread that runs on). Whoever wrote
  chunks for it must leave them to gc, never delete them on a guess. A caller cancelled while
  awaiting ``commit`` is in the same position: the write goes on without it.

Tombstones: a DELETE replaces the manifest with a tombstone by ``If-Match``, so a delete delayed
past a lease takeover fails instead of removing a newer version (an unconditional delete of the
record would take it). Reads treat a tombstone as absent. gc removes it later, by a conditional
delete when the store honours those (``storage.probe``), once it is older than the grace period,
carries no undelivered events, and no upload that may still commit names its key: an upload that
recorded "no record" as what it replaces must not find "no record" again after its own commit
landed and was deleted (it would commit a second time).

Events: a commit may carry post-commit events (hooks). They are written inside the record, in
the same conditional write as the commit, after the undelivered events of the record it
replaces, so an event exists exactly when its commit landed and a key's events are in commit
order. So that they can be found without reading every record, each such commit first writes a
pointer ``o/<ms time>-<event id>`` naming the key and the record ETag the commit replaces.

Must never: write ``m/<key>`` unconditionally; report COMMITTED for a write it has not seen land;
report LOST for a write that may still land; import aiohttp or ``gateway``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from storage import keys
from storage.backends.base import Backend, InvalidKey, NotFound, PermanentError, PreconditionFailed, TransientError
from storage.errors import CorruptManifest, from_backend
from storage.manifest import Manifest, ManifestError

log = logging.getLogger("chunkgate.manifests")

TOMBSTONE_FORMAT = "chunkgate.tombstone/1"
# Fields of a record that are not part of the manifest it holds (``?manifest`` never shows them).
_RECORD_FIELDS = ("rev", "events")

Event = dict[str, Any]


class Outcome(str, Enum):
    COMMITTED = "committed"
    LOST = "lost"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Current:
    """A key's record as read (or as just written): its manifest, or None for a tombstone."""

    key: str
    manifest: Manifest | None
    etag: str  # the record's store ETag: what the next conditional write names
    rev: str = ""  # unique per record write ("" for records written before revs existed)
    events: tuple[Event, ...] = ()
    deleted_version: str | None = None  # a tombstone: the version it deleted
    deleted_at: float | None = None  # a tombstone: when (unix seconds)

    @property
    def version(self) -> str | None:
        """The committed version, or None when the record is a tombstone."""
        return self.manifest.version if self.manifest is not None else None


@dataclass(frozen=True, slots=True)
class CommitResult:
    outcome: Outcome
    # COMMITTED: the record as written. LOST: the record as read back (None: no record, or it
    # could not be read). UNKNOWN: None.
    current: Current | None = None
    error: BaseException | None = field(default=None, compare=False)  # UNKNOWN: the store's failure


def version_of(current: Current | None) -> str | None:
    """The committed version a record holds; None for no record or a tombstone."""
    return current.version if current is not None else None


class Contention:
    """How long a writer keeps retrying after LOST. Only a loss to another state counts: a rewrite
    of the same version (the hook outbox removing a delivered event, a repair) says nothing about
    other writers winning, so it is simply retried, within a generous cap."""

    def __init__(self, losses: int = 5, rounds: int = 50) -> None:
        self.losses, self.rounds = losses, rounds

    def __iter__(self) -> "Contention":
        return self

    def __next__(self) -> int:
        if self.losses <= 0 or self.rounds <= 0:
            raise StopIteration
        self.rounds -= 1
        return self.rounds

    def lost(self, seen: "Current | None", result: CommitResult) -> None:
        if identity(result.current) != identity(seen):
            self.losses -= 1


def identity(current: Current | None) -> str | None:
    """What a record means, for a writer that must commit over exactly what it saw: the version
    (rewrites of the same version -- repairs, events -- keep it), or which version a tombstone
    deleted; None for no record at all. Unlike a version, a tombstone is never 'no object' again
    while it exists, which is why tombstones are swept only when no upload may still commit
    over the key (storage.gc)."""
    if current is None:
        return None
    if current.manifest is not None:
        return "v:" + current.manifest.version
    return "d:" + (current.deleted_version or current.rev)


class ManifestStore:
    """Reads and conditional writes of manifest records over one backend."""

    def __init__(self, backend: Backend, *, clock: Callable[[], float] = time.time) -> None:
        self.backend = backend
        self._clock = clock
        # Set from the startup probe (storage.probe): a store that ignores If-Match on DELETE
        # keeps its tombstones rather than risk removing a newer record with them.
        self.conditional_deletes = True

    # -------------------------------------------------------------------------- reading
    def check_key(self, key: str) -> None:
        """Raise ``BadKey`` unless ``key`` is a valid object key this store can hold (asked
        before any byte of an upload is stored). Chunk, upload and lease keys have a fixed
        length, so the manifest record's key is the one that can be too long."""
        keys.validate_key(key)
        try:
            self.backend.check_key(keys.manifest_key(key))
        except InvalidKey as exc:
            raise from_backend(exc, "") from None

    async def read(self, key: str) -> Current | None:
        """The record of ``key`` as the store holds it now; None when there is none. Raises
        ``StoreUnavailable``/``StoreFailed``, ``CorruptManifest``, ``BadKey``."""
        try:
            blob = await self.backend.get(keys.manifest_key(key))
        except NotFound:
            return None
        except (TransientError, PermanentError) as exc:
            raise from_backend(exc, "reading the manifest") from exc
        return self.parse(key, blob.data, blob.etag)

    def parse(self, key: str, data: bytes, etag: str) -> Current:
        """A stored record of ``key``; raises ``CorruptManifest`` for one that is damaged."""
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise CorruptManifest(f"the manifest of {key!r} is damaged: not JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise CorruptManifest(f"the manifest of {key!r} is damaged: not a JSON object")
        rev = doc.pop("rev", "")
        events = doc.pop("events", [])
        if not isinstance(rev, str) or not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
            raise CorruptManifest(f"the manifest record of {key!r} has a malformed rev or events list")
        if doc.get("format") == TOMBSTONE_FORMAT:
            if doc.get("key") != key:
                raise CorruptManifest(f"the tombstone of {key!r} names another key")
            deleted = doc.get("deleted_version")
            at = doc.get("deleted_at")
            return Current(key, None, etag, rev, tuple(events),
                           deleted if isinstance(deleted, str) else None,
                           float(at) if isinstance(at, (int, float)) else None)
        try:
            manifest = Manifest.from_dict(doc, expect_key=key)
        except ManifestError as exc:
            raise CorruptManifest(f"the manifest of {key!r} is damaged: {exc}") from exc
        return Current(key, manifest, etag, rev, tuple(events))

    async def scan(self, prefix: str = "", *, start_after: str | None = None) -> AsyncIterator[str]:
        """The object keys that have a record (manifest or tombstone), in key order."""
        async for key, _etag in self.scan_records(prefix, start_after=start_after):
            yield key

    async def scan_records(self, prefix: str = "", *, start_after: str | None = None) -> AsyncIterator[tuple[str, str]]:
        """``scan``, with each record's store ETag as the listing reports it (storage.listing)."""
        after = keys.manifest_key(start_after) if start_after is not None else None
        try:
            async for info in self.backend.list(keys.manifest_key(prefix), start_after=after):
                yield keys.object_key_of_manifest(info.key), info.etag
        except (TransientError, PermanentError) as exc:
            raise from_backend(exc, "listing manifests") from exc

    # -------------------------------------------------------------------------- writing
    async def commit(self, key: str, new: Manifest | None, expected: Current | None, *,
                     events: Sequence[Event] = ()) -> CommitResult:
        """Replace the record ``expected`` (None: no record) of ``key`` by ``new`` (None: a
        tombstone of ``expected``'s version), carrying ``expected``'s events and then ``events``.

        Raises only for a write the store refused outright (``StoreFailed``, ``BadKey``): then
        nothing landed. Every other failure is an outcome. If the caller is cancelled while
        the write is in flight, the write goes on and its outcome is unknown to the caller."""
        carried = tuple(expected.events) if expected is not None else ()
        return await self._write(key, new, expected, carried + tuple(events), pointers=tuple(events))

    async def set_events(self, expected: Current, events: Sequence[Event]) -> CommitResult:
        """Rewrite ``expected``'s record with only its events changed (after a delivery)."""
        return await self._write(expected.key, expected.manifest, expected, tuple(events), pointers=(),
                                 deleted_version=expected.deleted_version, deleted_at=expected.deleted_at)

    async def remove_tombstone(self, current: Current) -> bool:
        """Remove a tombstone that carries no events, conditionally: True if it is gone.
        A record that changed meanwhile (a new commit over the tombstone) is left alone."""
        if current.manifest is not None or current.events or not self.conditional_deletes:
            return False
        try:
            await self.backend.delete(keys.manifest_key(current.key), if_match=current.etag)
        except PreconditionFailed:
            return False
        except (TransientError, PermanentError) as exc:
            log.info("tombstone of %r kept for now: %s", current.key, exc)
            return False
        return True

    async def _write(self, key: str, new: Manifest | None, expected: Current | None, events: tuple[Event, ...], *,
                     pointers: tuple[Event, ...], deleted_version: str | None = None,
                     deleted_at: float | None = None) -> CommitResult:
        rev = os.urandom(8).hex()
        if new is None and deleted_version is None:
            deleted_version, deleted_at = version_of(expected), self._clock()
        raw = self._encode(key, new, rev, events, deleted_version, deleted_at)
        if pointers:
            await self._point(key, pointers, expected)
        condition: dict[str, Any] = {"if_match": expected.etag} if expected is not None else {"if_none_match": True}
        # The write runs as its own task: if our caller is cancelled, the store still does it
        # (as a thread or a request on the wire would), and nobody may act as if it did not.
        put = asyncio.ensure_future(self.backend.put(keys.manifest_key(key), raw, **condition))
        put.add_done_callback(_consume)
        try:
            etag = await asyncio.shield(put)
        except PreconditionFailed:
            return await self._read_back(key, rev, None, lost=True)
        except TransientError as exc:
            return await self._read_back(key, rev, exc, lost=False)
        except (InvalidKey, PermanentError) as exc:
            raise from_backend(exc, "committing the manifest") from exc
        return CommitResult(Outcome.COMMITTED, Current(key, new, etag, rev, events, deleted_version, deleted_at))

    async def _read_back(self, key: str, rev: str, failure: BaseException | None, *, lost: bool) -> CommitResult:
        """After a refused or failed write: ours if the record carries our rev (a retried write
        refused by its own first attempt, or an answer lost after the write landed)."""
        try:
            current = await self.read(key)
        except Exception as exc:  # noqa: BLE001 - cannot tell: the outcome stays unknown
            return CommitResult(Outcome.UNKNOWN, None, failure or exc)
        if current is not None and current.rev == rev:
            return CommitResult(Outcome.COMMITTED, current)
        if lost:
            return CommitResult(Outcome.LOST, current)
        return CommitResult(Outcome.UNKNOWN, None, failure)

    async def _point(self, key: str, events: tuple[Event, ...], expected: Current | None) -> None:
        """Outbox pointers, written before the commit they announce (see the module docstring)."""
        stamp = f"{int(self._clock() * 1000):013x}"
        for event in events:
            doc = {"key": key, "event": event.get("id"), "replaces": expected.etag if expected is not None else None}
            try:
                await self.backend.put(f"{keys.OUTBOX_PREFIX}{stamp}-{event.get('id')}", json.dumps(doc).encode())
            except (TransientError, PermanentError, InvalidKey) as exc:
                raise from_backend(exc, "recording the commit's event") from exc

    @staticmethod
    def _encode(key: str, new: Manifest | None, rev: str, events: tuple[Event, ...],
                deleted_version: str | None, deleted_at: float | None) -> bytes:
        if new is not None:
            doc = new.to_dict()
            for name in _RECORD_FIELDS:
                doc.pop(name, None)
        else:
            doc = {"format": TOMBSTONE_FORMAT, "key": key, "deleted_version": deleted_version,
                   "deleted_at": deleted_at,
                   "deleted": datetime.fromtimestamp(deleted_at or 0, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        doc["rev"] = rev
        if events:
            doc["events"] = list(events)
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve a write task's outcome so an orphaned one (its caller was cancelled) does not
    log 'exception was never retrieved'."""
    if not task.cancelled():
        task.exception()
