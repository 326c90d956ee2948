"""Resumable upload sessions (tus) kept in the store, so a restarted gateway resumes them:
``UploadSessions`` creates, reports, appends to, terminates and completes them.

The parts, one module each: the record and its state machine (``storage.upload_record``), where
an upload lives in the store and what of it is durable (``storage.upload_layout``), a PATCH's
bytes on their way in (``storage.upload_append``), the expiry sweeper (``storage.upload_sweep``),
what ``chunkgate gc`` needs (``storage.upload_gc``); the errors are in ``storage.errors``.

The offset is derived from what the store holds, never counted (``upload_layout``). Writes that
could race a stale holder are conditional: chunks are create-only, the tail and the record are
replaced with If-Match on the ETag read at the start of the request, and every durable write is
preceded by the upload lease's fencing check. ``committing`` is written (with every chunk's
SHA-256) before the manifest is committed, so a crash between the two is finished by the next
request on the upload.

Must never: import aiohttp or ``gateway``; make any byte of a PATCH durable before its
checksum verified; report an offset that is not durable; write without the upload's lease;
delete the chunks of an upload whose manifest may be committed; let an object appear at its
key before the last byte is in.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import AsyncIterable, AsyncIterator, Callable

from storage import keys
from storage.backends.base import (
    NotFound,
    ObjectInfo,
    PermanentError,
    PreconditionFailed,
    TransientError,
)
from storage.errors import (  # the upload errors are re-exported here until gateway/ imports them from storage.errors
    BadUploadRequest,
    BodyInterrupted,
    OffsetMismatch,
    StoreUnavailable,
    UploadChecksumMismatch,
    UploadConflict,
    UploadGone,
    UploadInterrupted,
    UploadNotFound,
    UploadStatusUnsettled,
    UploadTooLarge,
    from_backend,
)
from storage.locks import Lease, LeaseLost, Locker
from storage.manifests import identity, version_of
from storage.objects import ObjectStore
from storage.quota import ANONYMOUS, UploadCaps, UploadIndex
from storage.upload_append import Appender
from storage.upload_commit import UploadCommitter
from storage.upload_gc import UploadsGcHook, gc_hook
from storage.upload_layout import (
    DurableUpload,
    durable_layout,
    removable,
    guarded,
    info_key,
    leftover_prefixes,
    lock_key,
    new_upload_id,
    recorded_chunks,
    summary,
    tail_key,
    tail_prefix,
    valid_upload_id,
)
from storage.upload_record import (
    LIVE_STATES,
    RECORD_FORMAT,
    UploadRecord,
    UploadState,
    expired,
)
from storage.upload_sweep import UploadSweeper
from storage.writes import BodyIntoSome

__all__ = [  # what other modules import from here (some names live in the modules above)
    "CHECKSUM_ALGORITHMS",
    "RECORD_FORMAT",
    "BadUploadRequest",
    "BodyInterrupted",
    "OffsetMismatch",
    "UploadChecksumMismatch",
    "UploadConflict",
    "UploadGone",
    "UploadInterrupted",
    "UploadNotFound",
    "UploadOptions",
    "UploadRecord",
    "UploadSessions",
    "UploadState",
    "UploadStats",
    "UploadStatus",
    "UploadTooLarge",
    "UploadsGcHook",
    "durable_layout",
    "gc_hook",
    "info_key",
    "new_upload_id",
    "tail_key",
    "valid_upload_id",
]

log = logging.getLogger("chunkgate.uploads")

CHECKSUM_ALGORITHMS = ("sha1", "sha256", "md5")  # tus names; all three are hashlib names too


@dataclass(frozen=True, slots=True)
class UploadStatus:
    """What the protocol layer reports about an upload."""

    id: str
    key: str
    state: UploadState
    offset: int
    length: int | None
    expires: float
    metadata: str


@dataclass
class UploadOptions:
    chunk_size: int = 8 * 1024 * 1024
    expiry: float = 86400.0  # an upload without progress for this long expires
    max_size: int = 1 << 40
    lock_timeout: float | None = None
    # A PATCH with Upload-Checksum is held in memory until verified (no byte of it may become
    # durable before): this bounds that memory.
    checksum_body_limit: int = 64 * 1024 * 1024
    # A slow PATCH persists its partly filled chunk this often, so a crash loses little.
    checkpoint_seconds: float = 5.0
    sweep_interval: float = 60.0
    # Terminal records are kept this long (HEAD answers 410, not 404), then removed by the sweep.
    tombstone_seconds: float = 3600.0
    # Open uploads allowed per client and in all (storage.quota).
    caps: UploadCaps = field(default_factory=UploadCaps)


@dataclass
class UploadStats:
    """Plain counters; ``gateway.tus`` exports them."""

    created: int = 0
    completed: int = 0
    aborted: int = 0
    expired: int = 0
    bytes_received: int = 0


# ------------------------------------------------------------------------------------ sessions
class UploadSessions:
    """tus upload sessions over one ``ObjectStore``. Every public method but ``create`` and
    ``sweep`` expects the caller to hold the upload's lease (``lock(upload_id)``)."""

    def __init__(self, store: ObjectStore, options: UploadOptions | None = None, *,
                 clock: Callable[[], float] | None = None, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.backend = store.backend
        self.locks: Locker = store.locks
        self.options = options or UploadOptions()
        self.stats = UploadStats()
        self.clock = clock or store.clock
        self.monotonic = monotonic
        # Announce each completed upload's commit (hooks): set from --hook-url by the gateway.
        self.announce = False
        # Every upload record in the store, summarized (storage.quota): the cap counts from it,
        # and the sweeper reads only the records whose listed ETag it does not know yet.
        self.index = UploadIndex()
        self.sweeper = UploadSweeper(self)
        self.committer = UploadCommitter(self)

    @property
    def in_progress(self) -> int:
        """Open uploads in the store (as of this gateway's index), whichever gateway has them."""
        return self.index.open_total(self.clock())

    def lock(self, upload_id: str, *, owner: str, request_release: bool = True) -> AbstractAsyncContextManager[Lease]:
        """The upload's lock. By default a new request asks the current holder to let go: a
        PATCH stalled on a dead connection must not block the client's retry (tusd does so)."""
        return self.locks.hold(lock_key(upload_id), owner=owner, timeout=self.options.lock_timeout,
                               request_release=request_release)

    # -------------------------------------------------------------------------- create
    async def create(self, key: str, *, length: int | None, metadata: str, content_type: str,
                     owner: str = "tus-create", meta: dict[str, str] | None = None,
                     upload_id: str | None = None, client: str = ANONYMOUS) -> UploadStatus:
        """A new session; ``upload_id``: the id to give it (``new_upload_id()``), when the caller
        had to name it before (the pre-create hook), else a fresh one. ``client``: whom it
        counts against (``storage.quota.client_id``); raises ``TooManyOpenUploads`` or
        ``OpenUploadsFull`` when it would exceed a cap (nothing is stored then)."""
        # A key the store cannot hold is refused here, before anything is stored: found only at
        # commit time, it left an upload that could never complete and pinned its chunks.
        self.store.manifests.check_key(key)
        if length is not None and length > self.options.max_size:
            raise UploadTooLarge(f"the upload is {length} bytes; at most {self.options.max_size} are accepted")
        await self.admit(client)
        now = self.clock()
        self.index.check(self.options.caps, client, now)  # again: no await from here to the reservation
        record = UploadRecord(
            id=upload_id or new_upload_id(), key=key, version=keys.new_version(now), length=length,
            chunk_size=self.options.chunk_size, content_type=content_type, metadata=metadata,
            created=now, expires=now + self.options.expiry, meta=dict(meta or {}), client=client,
        )
        self.index.note(summary(record, ""))  # the slot is taken before the first await
        try:
            etag = await guarded("creating the upload record",
                                self.backend.put(info_key(record.id), record.to_json(), if_none_match=True))
        except BaseException:
            # Not stored (or unknown: then the next refresh finds it and counts it again).
            self.index.forget(record.id)
            raise
        self.index.note(summary(record, etag))
        self.stats.created += 1
        if length == 0:
            async with self.lock(record.id, owner=owner) as lease:
                await self.committer.complete(DurableUpload(record, etag, [], None, []), lease)
        return UploadStatus(record.id, key, record.state, 0, length, record.expires, metadata)

    async def admit(self, client: str) -> None:
        """Raise ``TooManyOpenUploads`` / ``OpenUploadsFull`` if one more upload of ``client``
        would exceed a cap (``create`` asks too; the gateway asks first, before the pre-create
        hook). Before the first count, and close to a cap, the count is refreshed from the store
        first (other gateways' uploads, ones finished elsewhere), at most every ``refresh_seconds``."""
        caps = self.options.caps
        if (caps.total or caps.per_client) and (self.sweeper.never_scanned
                                                or self.index.near_cap(caps, client, self.clock())):
            # Never counted yet (just started: the first sweep may still be running), or close
            # to a cap: count what the store holds first.
            await self.refresh(max_age=caps.refresh_seconds)
        self.index.check(caps, client, self.clock())

    # -------------------------------------------------------------------------- status
    async def status(self, upload_id: str, lease: Lease) -> UploadStatus:
        """The durable state, finishing an upload whose bytes are all in (a crash between the
        last byte and the commit is completed here)."""
        try:
            durable = await self._load(upload_id, lease)
            await self._finish_if_all_in(durable, lease)
        except LeaseLost as exc:
            raise UploadStatusUnsettled(f"upload {upload_id}: {exc}; try again", retry_after=1) from exc
        return self._status(durable)

    # -------------------------------------------------------------------------- append
    async def append(
        self,
        upload_id: str,
        lease: Lease,
        *,
        offset: int,
        body: AsyncIterable[bytes] | BodyIntoSome,
        length: int | None = None,
        checksum: tuple[str, bytes] | None = None,
        content_length: int | None = None,
    ) -> UploadStatus:
        """Append ``body`` at ``offset`` (which must be the durable offset).

        Bytes become chunks of the object version as they arrive (bounded in flight); when the
        body ends -- normally, by error, by a release request, or by cancellation -- what was
        received is made durable (full chunks, then the partly filled one) before this returns
        or raises. With ``checksum`` (algorithm, digest) nothing is written unless the whole
        body matches. When the last byte is in, the object is committed and the session
        completes."""
        durable = await self._load(upload_id, lease)
        await self._finish_if_all_in(durable, lease)
        limit = await self._check_patch(durable, lease, offset=offset, length=length, checksum=checksum,
                                        content_length=content_length)
        if durable.record.state is UploadState.COMPLETE:
            async for piece in pieces_of(body):
                if piece:
                    raise UploadTooLarge("the upload is complete; no more bytes are accepted")
            return self._status(durable)
        session = await self._open_append(durable, lease)
        hasher = hashlib.new(checksum[0]) if checksum is not None else None
        if isinstance(body, BodyIntoSome) and hasher is None:
            error = await session.receive_into(body, offset=offset, limit=limit)
        else:
            error = await session.receive(pieces_of(body), offset=offset, limit=limit, hasher=hasher)
        error = await self._judge_body(session, error, hasher, checksum)
        # Shielded: a cancelled request (shutdown, client gone) still leaves its bytes durable.
        await asyncio.shield(session.save(lost=isinstance(error, LeaseLost)))
        if error is not None:
            raise error
        if durable.done_receiving:
            # This request carried the last bytes: its commit is now, over whatever is current.
            await self.committer.complete(durable, lease, inline=session.received > 0)
        return self._status(durable)

    async def _finish_if_all_in(self, durable: DurableUpload, lease: Lease) -> None:
        """Complete an upload left in ``committing``, or whose bytes are all in (a crash between
        the last byte and the commit). A commit left in ``committing`` is finished whatever its
        chunks look like now: the version may have landed and been replaced since, its chunks
        deleted with it."""
        record = durable.record
        if record.state is UploadState.COMMITTING or (record.state in LIVE_STATES and durable.done_receiving):
            await self.committer.complete(durable, lease)

    async def _check_patch(self, durable: DurableUpload, lease: Lease, *, offset: int, length: int | None,
                           checksum: tuple[str, bytes] | None, content_length: int | None) -> int:
        """Refuse a PATCH that cannot be taken, before any byte of it is read; record a deferred
        length it names. Returns the byte the upload ends at (at most)."""
        opts = self.options
        record = durable.record
        if length is not None and record.length is not None and record.length != length:
            raise BadUploadRequest(f"Upload-Length is already {record.length}; it cannot change")
        if offset != durable.offset:
            raise OffsetMismatch(f"Upload-Offset is {offset} but the upload has {durable.offset} bytes", offset=durable.offset)
        if length is not None and record.length is None:
            if length < durable.offset:
                raise BadUploadRequest(f"Upload-Length {length} is less than the {durable.offset} bytes already received")
            if length > opts.max_size:
                raise UploadTooLarge(f"the upload is {length} bytes; at most {opts.max_size} are accepted")
            record.length = length
            await self.put_record(durable, lease)
        limit = record.length if record.length is not None else opts.max_size
        if content_length is not None and offset + content_length > limit:
            raise UploadTooLarge(f"the body would end at byte {offset + content_length}; the upload ends at {limit}")
        if checksum is not None and content_length is not None and content_length > opts.checksum_body_limit:
            raise UploadTooLarge(f"a PATCH with Upload-Checksum may carry at most {opts.checksum_body_limit} bytes; send smaller PATCHes")
        return limit

    async def _open_append(self, durable: DurableUpload, lease: Lease) -> Appender:
        """Ready to take bytes: debris gone, the saved tail read back to be refilled (what the
        key holds is recorded when the first byte arrives: ``expect``)."""
        await self.remove(removable(durable), lease)
        durable.debris = []
        tail_bytes = b""
        if durable.tail is not None:
            blob = await guarded("reading the upload's last chunk", self.backend.get(durable.tail.key))
            if len(blob.data) != durable.tail.size:
                raise StoreUnavailable(f"short read of {durable.tail.key}")
            tail_bytes = blob.data
        return Appender(self, durable, lease, tail_bytes, expected=await self.holds_now(durable))

    async def _judge_body(self, session: Appender, error: BaseException | None, hasher: hashlib._Hash | None,
                          checksum: tuple[str, bytes] | None) -> BaseException | None:
        """How the body ended, once judged: a release request keeps what arrived (none of a
        checksummed body); a checksummed body is verified, then handed on, or discarded. Returns
        the error to raise after saving (None: the body was fine)."""
        durable = session.durable
        if isinstance(error, BodyInterrupted):
            if hasher is not None:
                # Only part of the body was read, so its checksum cannot be judged: keep none of
                # it and say so truthfully (never 460 for bytes that may well be right).
                session.discard()
                raise UploadInterrupted("another request for this upload asked it to stop; this PATCH's bytes were "
                                        "not kept (its Upload-Checksum covers the whole body); resume from Upload-Offset",
                                        offset=durable.offset)
            error = None  # what arrived is kept; the client resumes from the new offset
        if hasher is not None:
            if error is None and checksum is not None and hasher.digest() != checksum[1]:
                error = UploadChecksumMismatch(f"the body's {checksum[0]} does not match Upload-Checksum; it was discarded")
            if error is not None:
                session.discard()  # nothing of a checksummed body is kept unless it verified
                raise error
            try:
                await session.release_held()
            except BaseException as exc:  # noqa: BLE001
                error = exc
        return error

    async def holds_now(self, durable: DurableUpload) -> str | None:
        """What the upload's key holds now (``storage.manifests.identity``), read when a PATCH
        starts, before any of its body is read."""
        return identity(await self.store.record(durable.record.key))

    async def expect(self, durable: DurableUpload, lease: Lease, expected: str | None) -> None:
        """When a PATCH's first byte arrives, before it writes anything, record what the key
        held when the PATCH started (``holds_now``). If this request dies after the last byte
        lands but before the commit, a later request finishing the upload commits only over
        exactly that: a write to the key that came in between (an acknowledged PUT, say) is
        never overwritten by this older upload. Only a PATCH that brings bytes records it: one
        stopped (or ending) before its first byte must not move the expectation past a PUT
        while an earlier request's bytes, sent before that PUT, may still land (a store write
        delayed past its lease) and complete the upload."""
        record = durable.record
        if not record.replaces_known or record.replaces != expected:
            record.replaces, record.replaces_known = expected, True
            await self.put_record(durable, lease)

    # -------------------------------------------------------------------------- terminate
    async def terminate(self, upload_id: str, lease: Lease) -> None:
        """tus termination: an unfinished upload's data is removed and later requests get 410;
        a completed upload's record is removed (its object stays)."""
        durable = await self._load(upload_id, lease)
        record = durable.record
        if record.state is UploadState.COMMITTING:
            await self.committer.complete(durable, lease)
        if record.state is UploadState.COMPLETE:
            lease.check()
            await guarded("deleting the upload record", self.backend.delete(info_key(upload_id)))
            self.index.forget(upload_id)
            return
        record.enter(UploadState.ABORTED, self.clock())
        await self.put_record(durable, lease)  # frees its slot (storage.quota counts from the record)
        self.stats.aborted += 1
        await self.delete_data(record, lease)

    # -------------------------------------------------------------------------- sweeping
    async def sweep(self) -> int:
        """One sweep (``UploadSweeper.sweep``): returns how many uploads expired."""
        return await self.sweeper.sweep()

    async def refresh(self, *, max_age: float = 0.0) -> None:
        """Bring the index up to date with the store (``UploadSweeper.refresh``)."""
        await self.sweeper.refresh(max_age=max_age)

    async def start(self) -> None:
        """Run the sweeper in the background (``UploadSweeper.start``)."""
        await self.sweeper.start()

    async def close(self) -> None:
        await self.sweeper.close()

    # -------------------------------------------------------------------------- internals
    def _status(self, durable: DurableUpload) -> UploadStatus:
        r = durable.record
        offset = r.length if r.state is UploadState.COMPLETE and r.length is not None else durable.offset
        return UploadStatus(r.id, r.key, r.state, offset, r.length, r.expires, r.metadata)

    async def read_record(self, upload_id: str) -> tuple[UploadRecord, str]:
        if not valid_upload_id(upload_id):
            raise UploadNotFound(f"no upload {upload_id!r}")
        try:
            blob = await guarded("reading the upload record", self.backend.get(info_key(upload_id)))
        except NotFound:
            if self.index.get(upload_id) is not None:
                self.index.forget(upload_id)
            raise UploadNotFound(f"no upload {upload_id!r}") from None
        record = UploadRecord.from_json(blob.data)
        self.index.note(summary(record, blob.etag))
        return record, blob.etag

    async def leftovers(self, upload_id: str) -> list[str]:
        """The upload's stored keys besides its record and chunks: tails and digest segments."""
        return [k for prefix in leftover_prefixes(upload_id) async for k in self.store_keys(prefix)]

    async def store_keys(self, prefix: str) -> AsyncIterator[str]:
        async for info in self.listing(prefix):
            yield info.key

    async def listing(self, prefix: str, *, start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        try:
            async for info in self.backend.list(prefix, start_after=start_after):
                yield info
        except (TransientError, PermanentError) as exc:
            raise from_backend(exc, f"listing {prefix}") from exc

    async def _load(self, upload_id: str, lease: Lease) -> DurableUpload:
        """The upload as stored; an upload past its expiry is expired here (under the lease)."""
        record, etag = await self.read_record(upload_id)
        if record.state in (UploadState.ABORTED, UploadState.EXPIRED):
            raise UploadGone(f"upload {upload_id} was {'terminated' if record.state is UploadState.ABORTED else 'expired'}")
        if record.state is UploadState.COMPLETE:
            return DurableUpload(record, etag, [], None, [])
        # The chunks the record vouches for, and a listing past them (storage.upload_layout).
        chunks = recorded_chunks(record)
        after = chunks[-1].key if chunks else None
        chunks += [i async for i in self.listing(keys.chunk_prefix(record.key, record.version), start_after=after)]
        tails = [i async for i in self.listing(tail_prefix(upload_id))]
        # What was read counts only if no other request could have changed it meanwhile: a
        # holder stalled past its lease may have listed the chunks before a takeover's
        # terminate and the tails after it (an offset the upload never had).
        lease.check()
        good, tail, debris = durable_layout(record, chunks, tails)
        durable = DurableUpload(record, etag, good, tail, debris)
        now = self.clock()
        if expired(record.state, record.expires, now):
            record.enter(UploadState.EXPIRED, now)
            await self.put_record(durable, lease)
            self.stats.expired += 1
            await self.delete_data(record, lease)
            raise UploadGone(f"upload {upload_id} expired")
        return durable

    async def put_record(self, durable: DurableUpload, lease: Lease) -> None:
        lease.check()
        try:
            durable.record_etag = await guarded(
                "writing the upload record",
                self.backend.put(info_key(durable.record.id), durable.record.to_json(), if_match=durable.record_etag),
            )
        except PreconditionFailed:
            raise UploadConflict("the upload record changed underneath this request; ask HEAD for the offset") from None
        self.index.note(summary(durable.record, durable.record_etag))

    async def remove(self, store_keys: list[str], lease: Lease) -> None:
        for k in store_keys:
            lease.check()
            try:
                await self.backend.delete(k)
            except Exception as exc:  # noqa: BLE001 - left for the next request or the sweep
                log.warning("could not delete %s: %s", k, exc)

    async def delete_data(self, record: UploadRecord, lease: Lease) -> None:
        """Remove an unfinished upload's chunks and tail. Never for a complete upload, and never
        the chunks of a version that the key's record names (belt and braces: a commit whose
        outcome was unknown may have landed after all)."""
        assert record.state not in (UploadState.COMPLETE, UploadState.COMMITTING)
        doomed = await self.leftovers(record.id)
        if version_of(await self.store.record(record.key)) != record.version:
            doomed += [k async for k in self.store_keys(keys.chunk_prefix(record.key, record.version))]
            self.store.cache.discard_prefix(keys.chunk_prefix(record.key, record.version))
        else:
            log.error("upload %s ended, but its version is %r's committed one: its chunks stay", record.id, record.key)
        await self.remove(doomed, lease)


def pieces_of(body: AsyncIterable[bytes] | BodyIntoSome) -> AsyncIterable[bytes]:
    """``body`` as pieces of ``bytes`` (a checksummed body is held as pieces)."""
    return _read_pieces(body) if isinstance(body, BodyIntoSome) else body


async def _read_pieces(body: BodyIntoSome) -> AsyncIterator[bytes]:
    buf = memoryview(bytearray(1 << 20))
    while not body.ended:
        n = await body.readinto_some(buf)
        if n:
            yield bytes(buf[:n])
