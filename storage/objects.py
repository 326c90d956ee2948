"""ObjectStore: chunked objects with verified manifests on top of one ``Backend``.

Writes stream a body into fresh per-chunk buffers, store each chunk create-only under a version
id no other upload uses, read its size back, record its SHA-256, and commit the manifest last,
under the key's lock, with a conditional write. Reads fetch only the chunks a range needs,
through the single-flight ``ChunkCache``, and check every chunk against the manifest before a
byte of it is handed out.

Must never: import aiohttp or ``gateway``; overwrite a chunk; commit a manifest that references a
chunk it has not verified; skip, pad or truncate a chunk on read.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, AsyncIterable, AsyncIterator, Awaitable, Callable

from cachetools import TTLCache

from storage import hashing, intents, keys, readplan
from storage.backends.base import Backend, Blob, NotFound, PermanentError, PreconditionFailed, TransientError
from storage.buffers import ChunkBuffers
from storage.chunker import Chunk, Chunker
from storage.cache import ChunkCache, Loan
from storage.listing import UNKNOWN, ListingCache, Listed
from storage.errors import (
    BodyTooLarge,
    ChecksumMismatch,
    ChunkRejected,
    ChunkSizeDrift,
    CommitConflict,
    CorruptManifest,
    IncompleteBody,
    ObjectNotFound,
    StoreFailed,
    StoreFull,
    StoreUnavailable,
    from_backend,
)
from storage.locks import Lease
from storage.manifest import ChunkRef, Manifest
from storage.manifests import CommitResult, Contention, Current, Event, ManifestStore, Outcome, version_of
from storage.tolerance import SizeTolerance, Verdict

log = logging.getLogger("chunkgate.objects")


@dataclass
class IntegrityStats:
    """Plain counters; ``gateway.metrics`` exports them."""

    size_tolerated: int = 0
    size_rejected: int = 0
    checksum_mismatch: int = 0
    manifest_repairs: int = 0
    objects_committed: int = 0
    commit_conflicts: int = 0


@dataclass(frozen=True, slots=True)
class StoredChunk:
    """A chunk as fetched from the store: its bytes and the SHA-256 computed once at fetch."""

    data: bytes
    sha256: str | None


@dataclass
class StoreOptions:
    chunk_size: int = 8 * 1024 * 1024
    cache_bytes: int = 256 * 1024 * 1024
    write_concurrency: int = 4  # chunk uploads in flight per PUT: memory ~ (N+1) x chunk_size
    readahead: int = 4  # chunks fetched ahead of a sequential read (bench: 2 -> 4 was +0.1x cold GET)
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


@dataclass
class CommitAttempt:
    """Where a writer stands with its commit, for deciding what its chunks may become on failure:
    ``in_doubt`` while a record write may have landed, ``committed`` once one has."""

    in_doubt: bool = False
    committed: bool = False

    @property
    def may_have_landed(self) -> bool:
        return self.in_doubt or self.committed


class ObjectStore:
    def __init__(self, backend: Backend, locks: Any, options: StoreOptions | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.backend = backend
        self.locks = locks
        self.options = options or StoreOptions()
        self.stats = IntegrityStats()
        self.clock = clock
        self.manifests = ManifestStore(backend, clock=clock)
        self.cache: ChunkCache[StoredChunk] = ChunkCache(self.options.cache_bytes, lambda c: _cost(len(c.data)))
        self._manifests: TTLCache = TTLCache(maxsize=4096, ttl=self.options.manifest_ttl, timer=clock)
        self._manifest_reads: dict[str, tuple[int, asyncio.Future[Current]]] = {}
        self._manifest_writes = 0  # bumped by every commit/delete/repair of this process
        self._pending_gc: set[asyncio.Task[None]] = set()
        self._repairs: dict[str, asyncio.Task[None]] = {}
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
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            pending = (self._manifest_writes, task)
            self._manifest_reads[key] = pending
            task.add_done_callback(lambda t, k=key: self._manifest_reads.pop(k, None)
                                   if self._manifest_reads.get(k, (0, None))[1] is t else None)
        return await asyncio.shield(pending[1])

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

    async def _commit_latest(self, manifest: Manifest, lease: Lease, attempt: CommitAttempt,
                             check: Callable[[str | None], None] | None, events: tuple[Event, ...]) -> None:
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
            if check is not None:
                check(current.manifest.etag if current is not None and current.manifest is not None else None)
            result = await self.commit_record(key, manifest, current, lease, attempt, events=events)
            if result.outcome is Outcome.COMMITTED:
                return
            if result.outcome is Outcome.UNKNOWN:
                raise StoreUnavailable(f"the store failed committing the manifest and its outcome is unknown: {result.error}",
                                       retry_after=getattr(result.error, "retry_after", None), outcome_unknown=True)
            contention.lost(current, result)
        raise CommitConflict(f"gave up committing {key!r}: other writers kept winning")

    async def commit(self, manifest: Manifest, *, check: Callable[[str | None], None] | None = None,
                     owner: str = "commit") -> None:
        """Make ``manifest`` (whose chunks are stored) the key's current version, under the key's
        lock, as a PUT's commit does."""
        async with self.locks.hold(manifest.key, owner=owner, timeout=self.options.lock_timeout) as lease:
            await self._commit_latest(manifest, lease, CommitAttempt(), check, ())

    # ------------------------------------------------------------------ writes
    async def put(
        self,
        key: str,
        body: AsyncIterable[bytes],
        *,
        content_type: str,
        content_length: int | None = None,
        content_md5: str | None = None,
        sha256_hex: str | None = None,
        check: Callable[[str | None], None] | None = None,
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
        if check is not None:
            cur = await self.record(key)
            check(cur.manifest.etag if cur is not None and cur.manifest is not None else None)
        version = keys.new_version(self.clock())
        # The intent first, so gc in any process leaves this version's chunks alone until we
        # have committed or cleaned up (see storage.intents).
        await intents.begin(self.backend, key, version, expires=self.clock() + self.options.intent_seconds)
        writer = ChunkWriter(self, key, version)
        attempt = CommitAttempt()
        md5 = hashlib.md5() if content_md5 else None
        whole_sha = hashlib.sha256() if sha256_hex else None
        try:
            async for piece in _rechunk(body, self.options.chunk_size, limit, self.buffers):
                if md5:
                    md5.update(piece)
                if whole_sha:
                    whole_sha.update(piece)
                await writer.add(piece)
            chunks = await writer.finish()
            size = sum(c.size for c in chunks)
            if content_length is not None and size != content_length:
                raise IncompleteBody(f"the body ended after {size} of {content_length} bytes")
            if md5 is not None:
                _verify_md5(content_md5 or "", md5.digest())
            if whole_sha is not None and whole_sha.hexdigest() != (sha256_hex or "").lower():
                raise ChecksumMismatch("the body's SHA-256 does not match X-Checksum-SHA256")
            manifest = Manifest(
                key=key,
                version=version,
                size=size,
                content_type=content_type,
                created=datetime.fromtimestamp(self.clock(), timezone.utc).replace(microsecond=0),
                chunk_size=self.options.chunk_size,
                chunks=tuple(chunks),
                block_size=self.options.block_size,
            )
            announce = (self.announcement(event, manifest),) if event is not None else ()
            async with self.locks.hold(key, owner=owner, timeout=self.options.lock_timeout) as lease:
                await self._commit_latest(manifest, lease, attempt, check, announce)
        except BaseException:
            if attempt.in_doubt and not attempt.committed:
                # The manifest may still land and name these chunks: keep them and the intent,
                # which protects them from gc until it expires; then gc judges by the manifest.
                raise
            if not attempt.committed:
                await writer.abort()
            await asyncio.shield(intents.end(self.backend, version))
            raise
        await asyncio.shield(intents.end(self.backend, version))
        return manifest

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

    async def delete(self, key: str, *, check: Callable[[str | None], None] | None = None, owner: str = "delete",
                     event: Event | None = None) -> None:
        """Delete ``key``: its record becomes a tombstone by a conditional write, so a delete
        delayed past a lease takeover cannot remove a version committed after its check."""
        async with self.locks.hold(key, owner=owner, timeout=self.options.lock_timeout) as lease:
            attempt = CommitAttempt()
            contention = Contention()
            for _ in contention:
                current = await self.record(key)
                if current is None or current.manifest is None:
                    raise ObjectNotFound(f"no object at key {key!r}")
                if check is not None:
                    check(current.manifest.etag)
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

    def delete_version_later(self, key: str, version: str, count: int) -> None:
        async def later() -> None:
            await asyncio.sleep(self.options.grace_seconds)
            try:
                current = await self.record(key)
            except Exception as exc:  # unsure what is current: leave the chunks to gc
                log.warning("not deleting replaced version %s of %r: %s", version, key, exc)
                return
            if version_of(current) == version:
                return  # still referenced (belt and braces: a replaced version never returns)
            await self.delete_chunks(key, version, count)

        task = asyncio.ensure_future(later())
        self._pending_gc.add(task)
        task.add_done_callback(self._pending_gc.discard)

    async def delete_chunks(self, key: str, version: str, count: int, *, first: int = 0) -> None:
        for index in range(first, first + count):
            ck = keys.chunk_key(key, version, index)
            self.cache.discard(ck)
            try:
                await self.backend.delete(ck)
            except Exception as exc:  # gc sweeps whatever this misses
                log.warning("could not delete chunk %s: %s", ck, exc)

    # ------------------------------------------------------------------ reads: bytes
    async def read(self, manifest: Manifest, start: int, end: int) -> AsyncIterator[bytes]:
        """Yield bytes ``[start, end)`` of ``manifest``'s object, every chunk checked (see
        ``read_pieces``; each piece is yielded as one bytes-like view)."""
        pieces = self.read_pieces(manifest, start, end)
        try:
            async for piece in pieces:
                yield await piece.view()  # type: ignore[misc]
        finally:
            await pieces.aclose()  # type: ignore[attr-defined]

    async def read_pieces(self, manifest: Manifest, start: int, end: int) -> AsyncIterator["ChunkPiece"]:
        """Yield bytes ``[start, end)`` of ``manifest``'s object as ``ChunkPiece``s, every chunk
        checked. A piece lends its chunk from the cache (the memory stays counted against the
        cache's budget) until the consumer asks for the next piece or closes the generator.

        Raises ``ChunkRejected`` (never serve) or ``ChunkSizeDrift`` (the manifest is being
        repaired; the caller must not go on with headers computed from the old sizes). Closing
        the generator early (a client that went away) gives up its read-ahead and its loan:
        fetches nobody else waits for are cancelled."""
        refs = list(manifest.chunks_for(start, end))
        # A cold read of a few KiB inside one chunk (a player's seek, a multi-range part) fetches
        # only the blocks it touches — verified against their recorded SHA-256 and cached, so the
        # next small read there costs nothing — instead of the whole chunk. Without block hashes
        # (older or imported manifests), verification needs the whole chunk.
        if refs and readplan.is_small_read(
            len(refs), end - start, self.options.small_read_bytes, verify=self.options.verify_reads,
            has_blocks=refs[0].blocks is not None and manifest.block_size > 0,
        ) and keys.chunk_key(manifest.key, manifest.version, refs[0].index) not in self.cache:
            yield ChunkPiece.of_bytes(await self._read_small(manifest, refs[0], start, end))
            return
        owner = object()  # this read's read-ahead claims
        claimed: list[str] = []

        def give_up_readahead() -> None:
            # The reader stalled (a client that stopped reading): read-ahead is for readers
            # that keep up, and held for a stalled one it would keep others waiting for room.
            if claimed:
                self.cache.release(owner, list(claimed))
                claimed.clear()

        piece: ChunkPiece | None = None
        try:
            for n, ref in enumerate(refs):
                # The window opens as the reader proves it is still there (each chunk it took
                # widens it by one): a GET abandoned at once costs two chunks, not 1 + readahead.
                window = min(self.options.readahead, n + 1)
                for ahead in refs[n + 1 : n + 1 + window]:
                    ck = keys.chunk_key(manifest.key, manifest.version, ahead.index)
                    if ck in claimed:
                        continue
                    if not self.cache.prefetch(ck, self._fetcher(ck, manifest, ahead), size=_cost(ahead.size), owner=owner):
                        break  # no free room: read on demand rather than evict someone's read-ahead
                    claimed.append(ck)
                ck = keys.chunk_key(manifest.key, manifest.version, ref.index)
                if ck in claimed:
                    claimed.remove(ck)
                loan = await self._borrow(manifest, ref, owner=owner)
                lo = max(start, ref.offset) - ref.offset
                hi = min(end, ref.end) - ref.offset
                piece = ChunkPiece(self, manifest, ref, lo, hi, loan, give_up_readahead)
                yield piece
                piece.release()
                piece = None
        finally:
            if piece is not None:
                piece.release()
            if claimed:
                self.cache.release(owner, claimed)

    async def _borrow(self, manifest: Manifest, ref: ChunkRef, *, owner: object | None = None) -> "Loan[StoredChunk]":
        """A loan of one chunk, from the cache or the store (single-flight), checked against ``ref``."""
        ck = keys.chunk_key(manifest.key, manifest.version, ref.index)
        loan = await self.cache.borrow(ck, self._fetcher(ck, manifest, ref), size=_cost(ref.size), owner=owner)
        try:
            stored = loan.value
            assert stored is not None
            self._check(manifest, ref, len(stored.data), stored.sha256)
        except BaseException:
            loan.release()
            raise
        return loan

    def _fetcher(self, ck: str, manifest: Manifest, ref: ChunkRef) -> Callable[[], Awaitable[StoredChunk]]:
        return lambda: self._fetch_chunk(ck, manifest, ref)

    async def chunk(self, manifest: Manifest, ref: ChunkRef, *, owner: object | None = None) -> StoredChunk:
        """One chunk, from the cache or the store (single-flight), checked against ``ref``."""
        ck = keys.chunk_key(manifest.key, manifest.version, ref.index)
        stored = await self.cache.get(ck, self._fetcher(ck, manifest, ref), size=_cost(ref.size), owner=owner)
        self._check(manifest, ref, len(stored.data), stored.sha256)
        return stored

    async def _fetch_chunk(self, ck: str, manifest: Manifest, ref: ChunkRef) -> StoredChunk:
        try:
            blob = await self.backend.get(ck, view=True)  # read-only and never mutated: no copy needed
        except NotFound:
            raise StoreFailed(f"chunk {ck} referenced by a committed manifest is missing") from None
        except (TransientError, PermanentError) as exc:
            raise from_backend(exc, "reading a chunk") from exc
        if len(blob.data) != blob.size:
            raise StoreUnavailable(f"short read of {ck}: {len(blob.data)} of {blob.size} bytes")
        digest = None
        if self.options.verify_reads:
            # Off the event loop, as on the write path: hashing an 8 MiB chunk takes ~5 ms, and on
            # the loop it stalled every response in flight (21% of the gateway's samples in a cold
            # GET profile, ops/bench); hashlib and xxhash release the GIL meanwhile.
            check = functools.partial(_whole_chunk_digest, blob.data, manifest, ref, self.options.verify_sha256)
            digest = await asyncio.to_thread(check) if len(blob.data) > 1 << 20 else check()
        return StoredChunk(blob.data, digest)

    async def _read_small(self, manifest: Manifest, ref: ChunkRef, start: int, end: int) -> bytes:
        """A cold read of a few KiB inside one chunk: a player's seek should not wait for a whole
        chunk. With verification on, each block the range touches is fetched once, checked
        against its recorded SHA-256, and cached (a multi-range request of many tiny parts in one
        block costs one block); without it, just the range. The stored size is checked either
        way (the store reports it with the range)."""
        ck = keys.chunk_key(manifest.key, manifest.version, ref.index)
        lo, hi = start - ref.offset, end - ref.offset
        if not self.options.verify_reads:
            return bytes((await self._get_range(manifest, ref, ck, lo, hi)).data)
        bs = manifest.block_size
        first, last = readplan.block_span(lo, hi, bs)
        blocks = await asyncio.gather(*(
            self.cache.get(f"{ck}#{b}", self._block_fetcher(manifest, ref, ck, b), size=_cost(min(bs, ref.size - b * bs)))
            for b in range(first, last)
        ))
        if len(blocks) == 1:
            view = memoryview(blocks[0].data)
        else:
            view = memoryview(b"".join(block.data for block in blocks))
        return bytes(view[lo - first * bs:hi - first * bs])

    def _block_fetcher(self, manifest: Manifest, ref: ChunkRef, ck: str, b: int) -> Callable[[], Awaitable[StoredChunk]]:
        async def fetch() -> StoredChunk:
            bs = manifest.block_size
            blob = await self._get_range(manifest, ref, ck, b * bs, min((b + 1) * bs, ref.size))
            bad = hashing.first_bad_block(blob.data, bs, ref.blocks, b, scheme=manifest.block_hash)  # type: ignore[arg-type]
            if bad is not None:
                self.stats.checksum_mismatch += 1
                self.stats.size_rejected += 1
                log.error("chunk block checksum mismatch: key=%r chunk=%d block=%d", manifest.key, ref.index, bad)
                raise ChunkRejected(f"chunk {ref.index} of {manifest.key!r} has the right size but a block with the wrong SHA-256",
                                    key=manifest.key, index=ref.index, expected=ref.size, actual=blob.size)
            return StoredChunk(blob.data, None)

        return fetch

    async def _get_range(self, manifest: Manifest, ref: ChunkRef, ck: str, lo: int, hi: int) -> Blob:
        try:
            blob = await self.backend.get(ck, start=lo, end=hi, view=True)
        except NotFound:
            raise StoreFailed(f"chunk {ck} referenced by a committed manifest is missing") from None
        except (TransientError, PermanentError) as exc:
            raise from_backend(exc, "reading a chunk") from exc
        self._check(manifest, ref, blob.size, None)
        if len(blob.data) != hi - lo:
            raise StoreUnavailable(f"short read of {ck}: {len(blob.data)} of {hi - lo} bytes")
        return blob

    def _check(self, manifest: Manifest, ref: ChunkRef, actual: int, sha256: str | None) -> None:
        verdict = self.options.tolerance.verdict(ref.size, actual)
        where = dict(key=manifest.key, index=ref.index, expected=ref.size, actual=actual)
        if verdict is Verdict.EXACT:
            if sha256 is not None and ref.sha256 is not None and sha256 != ref.sha256:
                self.stats.checksum_mismatch += 1
                self.stats.size_rejected += 1
                log.error("chunk checksum mismatch: key=%r chunk=%d size=%d (same length, other bytes)", manifest.key, ref.index, actual)
                raise ChunkRejected(f"chunk {ref.index} of {manifest.key!r} has the right size but the wrong digest", **where)
            return
        if verdict is Verdict.REJECTED:
            self.stats.size_rejected += 1
            log.error("chunk size mismatch rejected: key=%r chunk=%d expected=%d actual=%d", manifest.key, ref.index, ref.size, actual)
            raise ChunkRejected(
                f"chunk {ref.index} of {manifest.key!r} is {actual} bytes; the manifest says {ref.size}", **where
            )
        self.stats.size_tolerated += 1
        log.warning(
            "chunk size mismatch tolerated: key=%r chunk=%d expected=%d actual=%d; repairing the manifest",
            manifest.key, ref.index, ref.size, actual,
        )
        self._repair_soon(manifest)
        raise ChunkSizeDrift(f"chunk {ref.index} of {manifest.key!r} is {actual} bytes, the manifest said {ref.size}", **where)

    # ------------------------------------------------------------------ repair
    def _repair_soon(self, manifest: Manifest) -> asyncio.Task[None]:
        task = self._repairs.get(manifest.key)
        if task is None or task.done():
            task = asyncio.ensure_future(self.repair(manifest.key))
            self._repairs[manifest.key] = task
            task.add_done_callback(lambda t, k=manifest.key: self._repairs.pop(k, None) if self._repairs.get(k) is t else None)
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

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
                ck = keys.chunk_key(key, manifest.version, ref.index)
                try:
                    info = await self.backend.head(ck)
                except NotFound:
                    raise StoreFailed(f"chunk {ck} of {key!r} is missing; it cannot be repaired") from None
                except (TransientError, PermanentError) as exc:
                    raise from_backend(exc, "reading a chunk to repair") from exc
                if info.size == ref.size and ref.sha256 is not None:
                    continue
                verdict = self.options.tolerance.verdict(ref.size, info.size)
                if verdict is Verdict.REJECTED:
                    raise ChunkRejected(
                        f"chunk {ref.index} of {key!r} is {info.size} bytes, beyond tolerance of {ref.size}",
                        key=key, index=ref.index, expected=ref.size, actual=info.size,
                    )
                try:
                    blob = await self.backend.get(ck)
                except NotFound:
                    raise StoreFailed(f"chunk {ck} of {key!r} is missing; it cannot be repaired") from None
                except (TransientError, PermanentError) as exc:
                    raise from_backend(exc, "reading a chunk to repair") from exc
                if len(blob.data) != blob.size:
                    raise StoreUnavailable(f"short read of {ck} while repairing")
                digest, blocks = await digests(blob.data, manifest.block_size)
                if info.size == ref.size and ref.sha256 is None:
                    manifest = manifest.with_chunk(ChunkRef(ref.index, ref.offset, ref.size, digest, blocks))
                    continue
                self.cache.discard(ck)
                manifest = manifest.with_chunk(ChunkRef(ref.index, ref.offset, len(blob.data), digest, blocks))
                changes.append((ref.index, ref.size, len(blob.data)))
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

    async def close(self) -> None:
        for task in list(self._pending_gc) + list(self._repairs.values()):
            task.cancel()
        await asyncio.gather(*self._pending_gc, *self._repairs.values(), return_exceptions=True)


class ChunkPiece:
    """Bytes ``[lo, hi)`` of one chunk, lent by the cache to the response sending them.

    ``view()`` is the bytes (fetched and checked again if the cache took the chunk back while
    the piece was idle); ``idle()`` says the holder keeps no reference into them for now (its
    client is not reading), so the cache may take the chunk back for a reader that waits for room.
    A piece is only valid until its reader asks for the next one."""

    __slots__ = ("_store", "_manifest", "_ref", "lo", "hi", "_loan", "_data", "_on_idle")

    def __init__(self, store: ObjectStore | None, manifest: Manifest | None, ref: ChunkRef | None, lo: int, hi: int,
                 loan: Loan[StoredChunk] | None, on_idle: Callable[[], None] | None = None, data: Any = None) -> None:
        self._store, self._manifest, self._ref = store, manifest, ref
        self.lo, self.hi = lo, hi
        self._loan = loan
        self._data = data
        self._on_idle = on_idle

    @classmethod
    def of_bytes(cls, data: bytes) -> "ChunkPiece":
        """A piece that is its own small copy (a block read): nothing to lend or take back."""
        return cls(None, None, None, 0, len(data), None, data=data)

    def __len__(self) -> int:
        return self.hi - self.lo

    @property
    def reclaimed(self) -> bool:
        return self._loan is not None and self._loan.reclaimed

    async def view(self) -> Any:
        """The piece's bytes: the whole chunk's ``bytes`` or a read-only view of part of it."""
        if self._data is not None:
            return self._data
        loan = self._loan
        assert loan is not None and self._store is not None and self._manifest is not None and self._ref is not None
        if loan.reclaimed:
            # Taken back while idle: borrow again (a cache hit, or a fetch that waits for room
            # like any other and is verified like any other).
            loan = self._loan = await self._store._borrow(self._manifest, self._ref)
        loan.set_idle(False)
        data = loan.value.data  # type: ignore[union-attr]
        if self.lo == 0 and self.hi == len(data):
            return data
        return memoryview(data)[self.lo:self.hi]

    def idle(self) -> None:
        if self._on_idle is not None:
            self._on_idle()
        if self._loan is not None:
            self._loan.set_idle(True)

    def release(self) -> None:
        if self._loan is not None:
            self._loan.release()


class ChunkWriter:
    """Writes one version's chunks: each in a buffer of its own, at most N in flight.

    The bounded number of in-flight chunk uploads is what keeps memory at about
    (N + 1) x chunk size whatever the object size, and makes a slow store slow the client
    down (``add`` waits for a slot) instead of growing memory."""

    def __init__(self, store: ObjectStore, key: str, version: str, *, first_index: int = 0, first_offset: int = 0,
                 fence: Callable[[], None] | None = None) -> None:
        # first_index/first_offset: a tus upload adds chunks to its version across requests.
        # fence: called right before each chunk put (a lease's check), so a holder cleared as
        # stale stops writing.
        self.store = store
        self.key = key
        self.version = version
        self._slots = asyncio.Semaphore(store.options.write_concurrency)
        self._tasks: list[asyncio.Task[ChunkRef]] = []
        self._first = first_index
        self._offset = first_offset
        self._fence = fence

    async def add(self, data: bytes) -> None:
        """Hand over one chunk's bytes: an immutable ``bytes`` nobody reuses, or a read-only view
        of a buffer lent by ``store.buffers``, which this writer gives back once the chunk is
        stored (or its write ended otherwise) and never touches again."""
        try:
            await self._slots.acquire()
        except BaseException:
            self.store.buffers.give_back(data)
            raise
        for t in self._tasks:
            if t.done() and t.exception() is not None:
                self._slots.release()
                self.store.buffers.give_back(data)
                raise t.exception()  # type: ignore[misc]
        index, offset = self._first + len(self._tasks), self._offset
        self._offset += len(data)
        self._tasks.append(asyncio.ensure_future(self._write(index, offset, data)))

    async def _write(self, index: int, offset: int, data: bytes) -> ChunkRef:
        try:
            bs = self.store.options.block_size
            # One SHA-256 pass for the chunk, and a cheap digest per block in the same sweep over
            # memory (storage.hashing), off the event loop.
            digest, blocks = await digests(data, bs)
            ck = keys.chunk_key(self.key, self.version, index)
            backend = self.store.backend
            try:
                if self._fence is not None:
                    self._fence()
                # create-only: a chunk key is written once, ever; a collision is a bug, not a race to win
                await backend.put(ck, data, if_none_match=True)
                info = await backend.head(ck)
            except (TransientError, PermanentError) as exc:
                raise from_backend(exc, f"writing chunk {index}") from exc
            except (PreconditionFailed, NotFound) as exc:
                raise StoreFailed(f"the store refused chunk {index}: {exc}") from exc
            if info.size != len(data):
                raise StoreFailed(f"chunk {index} reads back as {info.size} bytes; {len(data)} were written")
            return ChunkRef(index, offset, len(data), digest, blocks)
        except asyncio.CancelledError:
            # The put may still be sending from the buffer (cancelling us need not stop it): it
            # must never be refilled for another chunk (the replaced system's corruption).
            self.store.buffers.forget(data)
            raise
        finally:
            self.store.buffers.give_back(data)  # a no-op once forgotten
            self._slots.release()

    async def finish(self) -> list[ChunkRef]:
        return list(await asyncio.gather(*self._tasks))

    async def results(self) -> list[ChunkRef | BaseException]:
        """Wait for every chunk handed over; each one's ref or error, in index order."""
        return list(await asyncio.gather(*self._tasks, return_exceptions=True))

    async def abort(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.shield(self.store.delete_chunks(self.key, self.version, len(self._tasks), first=self._first))


async def _rechunk(body: AsyncIterable[bytes], chunk_size: int, limit: int | None,
                   buffers: ChunkBuffers | None = None) -> AsyncIterator[Chunk]:
    """Re-cut an arbitrary stream of pieces into ``chunk_size`` chunks (the last may be short),
    refusing a body past ``limit`` bytes. With ``buffers`` the chunks are read-only views of lent
    buffers that the writer gives back (storage.chunker says why that is safe)."""
    chunker = Chunker(chunk_size, buffers)
    total = 0
    try:
        async for piece in body:
            if not piece:
                continue
            total += len(piece)
            if limit is not None and total > limit:
                raise BodyTooLarge(f"the body passed the limit of {limit} bytes")
            for chunk in chunker.feed(piece):
                yield chunk  # the writer now holds the buffer and gives it back
        last = chunker.flush()
        if last is not None:
            yield last
    finally:
        chunker.close()


def _whole_chunk_digest(data: Any, manifest: Manifest, ref: ChunkRef, strict: bool = False) -> str:
    """The digest to compare with ``ref.sha256``. Where the manifest records XXH3-128 block
    digests, every block is checked against them (0.03 instead of 0.6 CPU-s/GiB for SHA-256,
    the same protection against corruption, storage.hashing) and the recorded SHA-256 stands for
    the result; otherwise (earlier manifests, a chunk whose size drifted, or ``strict``) the
    SHA-256. Neither stops a store that forges data on purpose: the manifest lives beside it."""
    if (not strict and manifest.block_hash == hashing.XXH3_128 and ref.blocks is not None and ref.sha256 is not None
            and len(data) == ref.size):
        bad = hashing.first_bad_block(data, manifest.block_size, ref.blocks, scheme=hashing.XXH3_128)
        return ref.sha256 if bad is None else _MISMATCH
    return hashing.sha256_hex(data)


_MISMATCH = "mismatch"  # never equal to a recorded digest


def _cost(size: int) -> int:
    """What a cached chunk or block of ``size`` bytes is charged against the cache budget."""
    return size + 64


# Above this, hashing runs in a worker thread (hashlib and xxhash release the GIL): on the event
# loop an 8 MiB chunk stalled every response in flight for ~5 ms. Below it a thread hop costs more.
_HASH_OFF_LOOP_BYTES = 1 << 20


async def sha256_hex(data: bytes) -> str:
    """The SHA-256 of ``data``, off the event loop when it is large."""
    if len(data) > _HASH_OFF_LOOP_BYTES:
        return await asyncio.to_thread(hashing.sha256_hex, data)
    return hashing.sha256_hex(data)


async def digests(data: bytes, block_size: int) -> tuple[str, tuple[str, ...] | None]:
    """The chunk's SHA-256 and its block digests in one sweep (``hashing.hash_chunk``), off the
    event loop when ``data`` is large."""
    if len(data) > _HASH_OFF_LOOP_BYTES:
        return await asyncio.to_thread(hashing.hash_chunk, data, block_size)
    return hashing.hash_chunk(data, block_size)


def _verify_md5(header: str, digest: bytes) -> None:
    try:
        expected = base64.b64decode(header.strip(), validate=True)
    except ValueError:
        raise ChecksumMismatch("Content-MD5 is not valid base64") from None
    if expected != digest:
        raise ChecksumMismatch("the body's MD5 does not match Content-MD5")
