"""ObjectStore: chunked objects with verified manifests on top of one ``Backend`` (the facade).

Writes (``storage.writes``) stream a body into fresh per-chunk buffers, store each chunk
create-only under a version id no other upload uses, read its size back, record its SHA-256, and
commit the manifest last, under the key's lock, with a conditional write (here: the commit
protocol). Reads (``storage.reads``) fetch only the chunks a range needs, through the
single-flight ``ChunkCache``, and check every chunk against the manifest before a byte of it is
handed out; ``open`` is a GET's one call, and deals with size drift and repairs before the first
byte, so no caller has to.

Must never: import aiohttp or ``gateway``; overwrite a chunk; commit a manifest that references a
chunk it has not verified; skip, pad or truncate a chunk on read.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, Callable

from cachetools import TTLCache

from storage import keys, writes
from storage.backends.base import Backend
from storage.buffers import ChunkBuffers
from storage.cache import CacheStats, ChunkCache
from storage.errors import (
    BodyTooLarge,
    ChunkRejected,
    ChunkSizeDrift,
    CommitConflict,
    CorruptManifest,
    ManifestRepairing,
    ObjectNotFound,
    StoreFull,
    StoreUnavailable,
)
from storage.listing import UNKNOWN, ListingCache, Listed
from storage.locks import Lease, LockService
from storage.manifest import ChunkRef, Manifest
from storage.manifests import CommitResult, Contention, Current, Event, ManifestStore, Outcome, version_of
from storage.reads import P, ChunkPiece, ChunkReader, ObjectRead, StoredChunk, chunk_errors, cost
from storage.tolerance import SizeTolerance, Verdict
from storage.writes import Check, ChunkWriter, CommitAttempt, digests, lapse_means_retry, sha256_hex

__all__ = ["ChunkPiece", "ChunkWriter", "CommitAttempt", "IntegrityStats", "ObjectRead", "ObjectStore", "StoreOptions",
           "StoredChunk", "sha256_hex"]

log = logging.getLogger("chunkgate.objects")

Repairs = list[tuple[int, int, int]]  # (chunk index, recorded size, stored size) per chunk re-recorded


CLEANUP_WAIT = 10.0  # seconds ``close`` waits for failed PUTs' cleanups


def _spawn(tasks: set[asyncio.Future[None]], work: Awaitable[None]) -> None:
    """Run ``work`` in the background, kept in ``tasks`` while it runs."""
    task = asyncio.ensure_future(work)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    task.add_done_callback(_observe)


def _observe(task: asyncio.Future[Any]) -> None:
    """A done callback that retrieves a background task's exception (so asyncio does not log it)."""
    if not task.cancelled():
        task.exception()


@dataclass
class IntegrityStats:
    """Plain counters; ``gateway.metrics`` exports them."""

    size_tolerated: int = 0
    size_rejected: int = 0
    checksum_mismatch: int = 0
    manifest_repairs: int = 0
    objects_committed: int = 0
    commit_conflicts: int = 0


@dataclass
class StoreOptions:
    chunk_size: int = 8 * 1024 * 1024
    cache_bytes: int = 256 * 1024 * 1024
    write_concurrency: int = 4  # chunk uploads in flight per PUT: memory ~ (N+1) x chunk_size
    readahead: int = 8  # chunks fetched ahead of a sequential read (bench cold GET: 2 -> 4 +0.1x, 4 -> 8 483 -> 619 MiB/s)
    tolerance: SizeTolerance = field(default_factory=SizeTolerance)
    verify_reads: bool = True  # every chunk fetched from the store is checked against the manifest
    # ...by recomputing its SHA-256, even where the manifest's block digests would do (--verify-reads sha256)
    verify_sha256: bool = False
    manifest_ttl: float = 1.0  # seconds a manifest may be served from memory (other gateways' writes)
    grace_seconds: float = 300.0  # replaced versions are deleted this long after replacement
    max_object_size: int | None = None
    small_read_bytes: int = 256 * 1024  # cold reads up to this size fetch a byte range, not the chunk
    # A digest is recorded per block too, so such a range can be verified. 256 KiB by ops/bench
    # ("blocks"): fetching one costs ~1.07x a 64 KiB range on SeaweedFS (1 MiB: ~1.17x), and a
    # 4 GiB object's manifest stays ~420 KB (1 MiB: 160 KB; 128 KiB: 770 KB).
    block_size: int = 256 * 1024
    lock_timeout: float | None = None
    intent_seconds: float = 86400.0  # a PUT's chunks are protected from gc this long (storage.intents)


class ObjectStore:
    def __init__(self, backend: Backend, locks: LockService, options: StoreOptions | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.backend = backend
        self.locks = locks
        self.options = options or StoreOptions()
        self.stats = IntegrityStats()
        self.clock = clock
        self.manifests = ManifestStore(backend, clock=clock)
        self.cache: ChunkCache[StoredChunk] = ChunkCache(self.options.cache_bytes, lambda c: cost(len(c.data)))
        self.reads = ChunkReader(backend, self.cache, self.options, self.stats, self._repair_soon)
        self._manifests: TTLCache[str, Current] = TTLCache(maxsize=4096, ttl=self.options.manifest_ttl, timer=clock)
        self._manifest_reads: dict[str, tuple[int, asyncio.Future[Current]]] = {}
        self._manifest_writes = 0  # bumped by every commit/delete/repair of this process
        self._pending_gc: set[asyncio.Future[None]] = set()
        self._cleanups: set[asyncio.Future[None]] = set()  # failed PUTs' cleanups (clean_up_later)
        self._repairs: dict[str, asyncio.Task[Repairs]] = {}
        self.buffers = ChunkBuffers(self.options.chunk_size, keep=self.options.write_concurrency + 1)
        self.listing = ListingCache()
        # Called with the key after each commit of this process lands (hooks deliver promptly).
        self.on_committed: Callable[[str], None] | None = None

    # ------------------------------------------------------------------ reads: manifests
    async def head(self, key: str, *, fresh: bool = False) -> Manifest:
        """The committed manifest of ``key``; raises ``ObjectNotFound``. ``fresh``: bypass the
        short-lived manifest cache (after a repair, or when staleness matters)."""
        manifest = (await self._current(key, fresh=fresh)).manifest
        assert manifest is not None  # _current never returns a tombstone
        return manifest

    async def _current(self, key: str, *, fresh: bool = False) -> Current:
        if fresh:
            return await self._read_and_cache(key)
        hit = self._manifests.get(key)
        if hit is not None:
            return hit
        # Single-flight, like chunks: 32 viewers arriving at once cost one manifest read. Join
        # only a read started since the last local write, so nobody gets a manifest older than
        # a commit they could have seen.
        pending = self._manifest_reads.get(key)
        if pending is None or pending[0] != self._manifest_writes:
            task = asyncio.ensure_future(self._read_and_cache(key))
            task.add_done_callback(_observe)
            pending = (self._manifest_writes, task)
            self._manifest_reads[key] = pending
            task.add_done_callback(functools.partial(self._manifest_read_done, key))
        return await asyncio.shield(pending[1])

    def _manifest_read_done(self, key: str, task: asyncio.Future[Current]) -> None:
        if key in self._manifest_reads and self._manifest_reads[key][1] is task:
            del self._manifest_reads[key]

    async def _read_and_cache(self, key: str) -> Current:
        writes = self._manifest_writes
        current = await self.manifests.read(key)
        if current is not None:  # what a listing shows of it, until the record's ETag changes
            self.listing.remember(key, current.etag, Listed.of(current.manifest) if current.manifest is not None else None)
        if current is None or current.manifest is None:
            raise ObjectNotFound(f"no object at key {key!r}")
        # A commit, delete or repair that landed while this read was in flight may have made it
        # stale: caching it would serve the old manifest for a whole TTL after the change (a
        # repaired object kept failing reads that way). Use it once, don't cache it.
        if writes == self._manifest_writes:
            self._manifests[key] = current
        return current

    def _forget_manifest(self, key: str) -> None:
        self._manifest_writes += 1
        self._manifests.pop(key, None)

    # ------------------------------------------------------------------ the commit protocol
    async def commit_record(self, key: str, new: Manifest | None, expected: Current | None, lease: Lease,
                            attempt: CommitAttempt, *, events: tuple[Event, ...] = ()) -> CommitResult:
        """One conditional write of ``key``'s record under ``lease`` (the key's lock), and what
        follows from its outcome here: the cache forgets the key, a replaced version's chunks
        are deleted after the grace period, an emptied tombstone is removed. ``attempt`` says
        where the writer stands if anything below raises or is cancelled."""
        lease.check()  # fencing: a holder cleared as stale must not write (no await until the put)
        attempt.in_doubt = True
        try:
            result = await self.manifests.commit(key, new, expected, events=events)
        except StoreFull:
            # The store refused the write for want of room: nothing landed (a write that landed
            # and then failed is an unknown outcome, never this), so the writer may clean up.
            attempt.in_doubt = False
            raise
        self._forget_manifest(key)
        if result.outcome is Outcome.LOST:
            attempt.in_doubt = False
            self.stats.commit_conflicts += 1
        elif result.outcome is Outcome.COMMITTED:
            attempt.in_doubt, attempt.committed = False, True
            assert result.current is not None
            self._landed(expected, result.current)
        return result

    def _landed(self, replaced: Current | None, now: Current) -> None:
        if now.manifest is not None and version_of(replaced) != now.version:
            self.stats.objects_committed += 1
        if replaced is not None and replaced.manifest is not None and replaced.version != now.version:
            self._delete_version_later(replaced.manifest)
        if self.on_committed is not None:
            try:
                self.on_committed(now.key)
            except Exception:  # a hook's bug must never undo or fail a landed commit
                log.exception("on_committed callback failed")

    async def record(self, key: str) -> Current | None:
        """The key's record as the store holds it now, tombstones included (for a writer about to
        commit over it: the next write names this record's ETag)."""
        return await self.manifests.read(key)

    async def commit_latest(self, manifest: Manifest, lease: Lease, attempt: CommitAttempt,
                            check: Check | None, events: tuple[Event, ...]) -> None:
        """Commit ``manifest`` over whatever is current: the semantics of an unconditional PUT
        (last writer wins) unless ``check`` says otherwise. The key's lock serializes this
        gateway's writers; a LOST write means another gateway's commit landed between our read
        and our write (a lease taken over), so read again and retry, boundedly."""
        key = manifest.key
        contention = Contention()
        for _ in contention:
            current = await self.record(key)
            if version_of(current) == manifest.version:
                attempt.committed = True  # an earlier attempt of ours landed after all
                return
            self._precondition(check, current)
            result = await self.commit_record(key, manifest, current, lease, attempt, events=events)
            if result.outcome is Outcome.COMMITTED:
                return
            if result.outcome is Outcome.UNKNOWN:
                raise StoreUnavailable(f"the store failed committing the manifest and its outcome is unknown: {result.error}",
                                       retry_after=getattr(result.error, "retry_after", None), outcome_unknown=True)
            contention.lost(current, result)
        raise CommitConflict(f"gave up committing {key!r}: other writers kept winning")

    async def commit(self, manifest: Manifest, *, check: Check | None = None,
                     owner: str = "commit") -> None:
        """Make ``manifest`` (whose chunks are stored) the key's current version, under the key's
        lock, as a PUT's commit does."""
        async with self.locks.hold(manifest.key, owner=owner, timeout=self.options.lock_timeout) as lease:
            await self.commit_latest(manifest, lease, CommitAttempt(), check, ())

    @staticmethod
    def _precondition(check: Check | None, current: Current | None) -> None:
        """Run a request's preconditions against ``current`` (the one place ``check`` is called:
        before a body is read, and under the lock right before each commit or delete)."""
        if check is not None:
            check(current.manifest.etag if current is not None and current.manifest is not None else None)

    # ------------------------------------------------------------------ writes
    async def put(
        self,
        key: str,
        body: writes.Body,
        *,
        content_type: str,
        content_length: int | None = None,
        content_md5: str | None = None,
        sha256_hex: str | None = None,
        check: Check | None = None,
        owner: str = "put",
        event: Event | None = None,
    ) -> Manifest:
        """Stream ``body`` into chunks and commit a manifest for ``key``.

        ``check(current_etag_or_None)`` evaluates the request's preconditions against the
        object as it is; it raises ``PreconditionNotMet``. It runs before the body is read (to
        fail fast) and again under the lock right before the commit (to be right).
        ``event``: announce the commit (hooks): written into the record with the commit.
        On a failure before the commit, nothing is committed and the chunks are removed. When
        the commit's outcome is unknown (a store failure, cancellation) the chunks are left for
        gc: the manifest may have landed, and it would then name them."""
        limit = self.options.max_object_size
        if limit is not None and content_length is not None and content_length > limit:
            raise BodyTooLarge(f"the object is {content_length} bytes; the limit is {limit}")
        self.manifests.check_key(key)
        if check is not None:  # fail fast, before the body is read
            self._precondition(check, await self.record(key))
        claims = writes.BodyChecks(content_length, content_md5, sha256_hex)
        return await writes.put(self, key, body, content_type=content_type, claims=claims, check=check, owner=owner,
                                event=event)

    def announcement(self, event: Event, manifest: Manifest, *, upload_id: str | None = None) -> Event:
        """The post-commit event a commit of ``manifest`` carries (the fields API.md names)."""
        return {
            "id": f"{event.get('type', 'post-finish')}-{manifest.version}-{keys.new_version(self.clock())[13:]}",
            "type": event.get("type", "post-finish"),
            "time": datetime.fromtimestamp(self.clock(), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "key": manifest.key,
            "size": manifest.size,
            "etag": manifest.etag,
            "version": manifest.version,
            "content_type": manifest.content_type,
            "upload_id": upload_id,
            "metadata": event.get("metadata", {}),
        }

    async def delete(self, key: str, *, check: Check | None = None, owner: str = "delete",
                     event: Event | None = None) -> None:
        """Delete ``key``: its record becomes a tombstone by a conditional write, so a delete
        delayed past a lease takeover cannot remove a version committed after its check."""
        attempt = CommitAttempt()
        with lapse_means_retry(attempt, f"the DELETE of {key!r}"):
            async with self.locks.hold(key, owner=owner, timeout=self.options.lock_timeout) as lease:
                await self._delete(key, check, event, lease, attempt)

    async def _delete(self, key: str, check: Check | None, event: Event | None, lease: Lease,
                      attempt: CommitAttempt) -> None:
        contention = Contention()
        for _ in contention:
            current = await self.record(key)
            if current is None or current.manifest is None:
                raise ObjectNotFound(f"no object at key {key!r}")
            self._precondition(check, current)
            announce: tuple[Event, ...] = ()
            if event is not None:
                announce = ({"id": f"post-delete-{current.manifest.version}-{keys.new_version(self.clock())[13:]}",
                             "type": "post-delete", "key": key, "version": current.manifest.version,
                             "time": datetime.fromtimestamp(self.clock(), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")},)
            result = await self.commit_record(key, None, current, lease, attempt, events=announce)
            if result.outcome is Outcome.COMMITTED:
                return  # the tombstone stays until gc (storage.manifests explains why)
            if result.outcome is Outcome.UNKNOWN:
                raise StoreUnavailable(f"the store failed deleting and the outcome is unknown: {result.error}",
                                       retry_after=getattr(result.error, "retry_after", None), outcome_unknown=True)
            contention.lost(current, result)
        raise CommitConflict(f"gave up deleting {key!r}: other writers kept winning")

    def _delete_version_later(self, manifest: Manifest) -> None:
        """Remove a replaced version's chunks after the grace period, so readers in flight finish.
        If the process stops first, ``chunkgate gc`` finds them as unreferenced."""
        self.delete_version_later(manifest.key, manifest.version, len(manifest.chunks))

    def clean_up_later(self, cleanup: Awaitable[None]) -> None:
        """Run ``cleanup`` (a failed PUT's) without its caller waiting: the client's answer
        comes within ``--store-timeout``, not after one more store call per chunk and intent.
        ``close`` waits for it, up to ``CLEANUP_WAIT`` seconds."""
        _spawn(self._cleanups, cleanup)

    def delete_version_later(self, key: str, version: str, count: int) -> None:
        async def later() -> None:
            await asyncio.sleep(self.options.grace_seconds)
            try:
                current = await self.record(key)
            except Exception as exc:  # noqa: BLE001 - unsure what is current: leave the chunks to gc
                log.warning("not deleting replaced version %s of %r: %s", version, key, exc)
                return
            if version_of(current) == version:
                return  # still referenced (belt and braces: a replaced version never returns)
            await self.delete_chunks(key, version, count)

        _spawn(self._pending_gc, later())

    async def delete_chunks(self, key: str, version: str, count: int, *, first: int = 0) -> None:
        self.cache.discard_prefix(keys.chunk_prefix(key, version))
        for index in range(first, first + count):
            ck = keys.chunk_key(key, version, index)
            try:
                await self.backend.delete(ck)
            except Exception as exc:  # noqa: BLE001 - gc sweeps whatever this misses
                log.warning("could not delete chunk %s: %s", ck, exc)

    # ------------------------------------------------------------------ reads: bytes
    async def open(self, key: str, plan: Callable[[Manifest], P]) -> ObjectRead[P]:
        """Open ``key`` for reading, as a GET does: its manifest, ``plan(manifest)`` (which spans
        to read; it may raise to refuse the read), and the first piece fetched and checked
        before the caller sends a header. Repairs are dealt with here, never by the caller: a
        repair in flight is waited for, and tolerated drift found in the first piece is answered
        with the repaired manifest (``plan`` is asked again). Raises ``ManifestRepairing`` if
        the manifest still drifted after one repair. Drift found later, in a stream, raises
        ``ChunkSizeDrift`` (a repair is under way): the caller must not go on with headers
        computed from the old sizes."""
        # A repair of this key in flight is about to change chunk sizes: wait for it rather
        # than answer from the manifest it replaces (the body would be cut short). If it
        # fails, the read below meets the same fault and reports it.
        with contextlib.suppress(Exception):
            await self.wait_repair(key)
        for attempt in range(2):
            manifest = await self.head(key, fresh=attempt > 0)
            try:
                return await self.reads.open(manifest, plan(manifest))
            except ChunkSizeDrift:
                await self.wait_repair(key)  # then answer with sizes that match the bytes as stored
        raise ManifestRepairing("the object's manifest is being repaired; try again", retry_after=1)

    async def read(self, manifest: Manifest, start: int, end: int) -> AsyncIterator[bytes]:
        """Yield bytes ``[start, end)`` of ``manifest``'s object, every chunk checked (see
        ``read_pieces``; each piece is yielded as one bytes-like view)."""
        pieces = self.read_pieces(manifest, start, end)
        try:
            async for piece in pieces:
                yield await piece.view()
        finally:
            await pieces.aclose()

    def read_pieces(self, manifest: Manifest, start: int, end: int) -> AsyncGenerator[ChunkPiece, None]:
        """Bytes ``[start, end)`` of ``manifest``'s object as ``ChunkPiece``s, every chunk checked
        (``storage.reads.ChunkReader.pieces``)."""
        return self.reads.pieces(manifest, start, end)

    async def chunk(self, manifest: Manifest, ref: ChunkRef, *, owner: object | None = None) -> StoredChunk:
        """One chunk, from the cache or the store (single-flight), checked against ``ref``."""
        return await self.reads.chunk(manifest, ref, owner=owner)

    # ------------------------------------------------------------------ repair
    def _repair_soon(self, manifest: Manifest) -> asyncio.Task[Repairs]:
        task = self._repairs.get(manifest.key)
        if task is None or task.done():
            task = asyncio.ensure_future(self.repair(manifest.key))
            self._repairs[manifest.key] = task
            task.add_done_callback(functools.partial(self._repair_done, manifest.key))
            task.add_done_callback(_observe)
        return task

    def _repair_done(self, key: str, task: asyncio.Task[Repairs]) -> None:
        if self._repairs.get(key) is task:
            del self._repairs[key]

    async def wait_repair(self, key: str) -> None:
        task = self._repairs.get(key)
        if task is not None:
            await asyncio.shield(task)

    async def repair(self, key: str, *, owner: str = "repair") -> list[tuple[int, int, int]]:
        """Re-record every chunk whose stored size drifted within tolerance (and chunks lacking a
        SHA-256) as stored: the chunk is taken as it is. Returns (index, old, new) per change.
        Raises ``ChunkRejected`` for chunks beyond repair (the manifest is left as it was), and
        ``CommitConflict`` when the object changed while it was being repaired."""
        async with self.locks.hold(key, owner=owner, timeout=self.options.lock_timeout) as lease:
            current = await self.record(key)
            if current is None or current.manifest is None:
                raise ObjectNotFound(f"no object at key {key!r}")
            manifest = current.manifest
            changes: list[tuple[int, int, int]] = []
            for ref in manifest.chunks:
                manifest, change = await self._remeasure(manifest, ref)
                if change is not None:
                    changes.append(change)
            if manifest is current.manifest:
                return changes
            result = await self.commit_record(key, manifest, current, lease, CommitAttempt())
            if result.outcome is Outcome.LOST:
                raise CommitConflict(f"{key!r} changed while it was being repaired; nothing was changed")
            if result.outcome is Outcome.UNKNOWN:
                raise StoreUnavailable(f"the store failed recording the repair: {result.error}", outcome_unknown=True)
            self.stats.manifest_repairs += 1
            log.warning("manifest repaired: key=%r changes=%s", key, changes)
            return changes

    async def _remeasure(self, manifest: Manifest, ref: ChunkRef) -> tuple[Manifest, tuple[int, int, int] | None]:
        """``manifest`` with ``ref`` re-recorded as its chunk is stored (a SHA-256 added where it
        lacks one, a size within tolerance taken as it is), and the (index, old, new) size change."""
        key = manifest.key
        ck = keys.chunk_key(key, manifest.version, ref.index)
        missing = f"of {key!r} is missing; it cannot be repaired"
        with chunk_errors(ck, "reading a chunk to repair", missing):
            info = await self.backend.head(ck)
        if info.size == ref.size and ref.sha256 is not None:
            return manifest, None
        if self.options.tolerance.verdict(ref.size, info.size) is Verdict.REJECTED:
            raise ChunkRejected(
                f"chunk {ref.index} of {key!r} is {info.size} bytes, beyond tolerance of {ref.size}",
                key=key, index=ref.index, expected=ref.size, actual=info.size,
            )
        with chunk_errors(ck, "reading a chunk to repair", missing):
            blob = await self.backend.get(ck)
        if len(blob.data) != blob.size:
            raise StoreUnavailable(f"short read of {ck} while repairing")
        digest, blocks = await digests(blob.data, manifest.block_size)
        if info.size == ref.size and ref.sha256 is None:
            return manifest.with_chunk(ChunkRef(ref.index, ref.offset, ref.size, digest, blocks)), None
        self.cache.discard_prefix(ck)  # what was cached of it under the old size (storage.reads.cache_key)
        return (manifest.with_chunk(ChunkRef(ref.index, ref.offset, len(blob.data), digest, blocks)),
                (ref.index, ref.size, len(blob.data)))

    # ------------------------------------------------------------------ listing
    async def list(self, prefix: str = "", *, after: str | None = None, limit: int = 1000) -> tuple[list[Listed], str | None]:
        """Up to ``limit`` objects whose key starts with ``prefix``, in key order, after
        ``after``; and the key to continue after (None when there is no more). A record whose
        ETag in the store's listing is the one its summary was remembered under costs no read
        (storage.listing): a repeated page is one list request."""
        found: list[tuple[str, str]] = []
        more = False
        async for name, record_etag in self.manifests.scan_records(prefix, start_after=after):
            if len(found) == limit:
                more = True
                break
            found.append((name, record_etag))
        sem = asyncio.Semaphore(16)

        async def one(k: str, record_etag: str) -> Listed | None:
            known = self.listing.lookup(k, record_etag)
            if known is not UNKNOWN:
                return known  # type: ignore[return-value]
            async with sem:
                try:
                    return Listed.of((await self._current(k)).manifest)  # type: ignore[arg-type]
                except (ObjectNotFound, CorruptManifest):
                    return None

        listed = [m for m in await asyncio.gather(*(one(k, e) for k, e in found)) if m is not None]
        return listed, (found[-1][0] if more and found else None)

    @property
    def cache_stats(self) -> CacheStats:
        return self.cache.stats

    @property
    def queue_depth(self) -> int:
        """Store calls waiting for the limiter now (0 without a limiter)."""
        return int(getattr(self.backend, "queue_depth", 0))

    async def cleaned_up(self, timeout: float | None = None) -> None:
        """Wait for every failed PUT's cleanup started so far (``clean_up_later``); after
        ``timeout`` seconds the rest are cancelled (their intents expire, and gc then judges
        their chunks by the manifest, as after a crash)."""
        if not self._cleanups:
            return
        _, late = await asyncio.wait(set(self._cleanups), timeout=timeout)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    async def close(self) -> None:
        # Bounded: with --store-timeout 0 a cleanup on a store that never answers never ends.
        await self.cleaned_up(timeout=CLEANUP_WAIT)
        for task in list(self._pending_gc) + list(self._repairs.values()):
            task.cancel()
        await asyncio.gather(*self._pending_gc, *self._repairs.values(), return_exceptions=True)


