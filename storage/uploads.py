"""Resumable upload sessions (tus) kept in the store, so a restarted gateway resumes them.

Layout (under ``keys.UPLOAD_PREFIX``)::

    u/<id>/info                 the session record (JSON): key, version, length, state, expiry,
                                SHA-256 of the chunks written so far
    u/<id>/t/<index:08d>        the partly filled chunk ``index`` (the "tail"), bytes only
    c/.../<key id>/<version>/<index:08d>
                                full chunks, written create-only as the chunks of the object
                                version the upload will commit (``keys.chunk_key``)

The offset of an upload is *derived from what the store holds*: the contiguous full chunks
from index 0, plus the tail that continues them. There is no counter anywhere, in memory or in
the record, so whatever a crash leaves behind, the next request reports exactly the bytes that
are durable and accepts the rest. Writes that could race a stale holder are conditional: chunks
are create-only, the tail and the record are replaced with If-Match on the ETag read at the
start of the request, and every durable write is preceded by the upload lease's fencing check.

State machine of the record: pending -> receiving -> committing -> complete | aborted | expired.
``committing`` is written (with every chunk's SHA-256) before the manifest is committed, so a
crash between the two is finished by the next request on the upload.

Must never: import aiohttp or ``gateway``; make any byte of a PATCH durable before its
checksum verified; report an offset that is not durable; write without the upload's lease;
delete the chunks of an upload whose manifest may be committed; let an object appear at its
key before the last byte is in.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any, AsyncIterable, Awaitable, Callable, TypeVar

from storage import keys
from storage.backends.base import NotFound, ObjectInfo, PermanentError, PreconditionFailed, TransientError
from storage.chunker import Chunker
from storage.errors import (
    BadRequest,
    BodyTooLarge,
    CommitConflict,
    ObjectError,
    ObjectNotFound,
    StoreFailed,
    StoreUnavailable,
    from_backend,
)
from storage.keys import BadKey
from storage.locks import LeaseLost
from storage.manifest import ChunkRef, Manifest, block_count
from storage.manifests import Contention, Event, Outcome, identity, version_of
from storage.objects import ChunkWriter, CommitAttempt, ObjectStore, sha256_hex

log = logging.getLogger("chunkgate.uploads")

RECORD_FORMAT = "chunkgate.upload/1"
CHECKSUM_ALGORITHMS = ("sha1", "sha256", "md5")  # tus names; all three are hashlib names too
_ID = re.compile(r"^[0-9a-f]{32}$")
T = TypeVar("T")


# ------------------------------------------------------------------------------------ errors
class UploadNotFound(ObjectNotFound):
    code = "not_found"


class UploadGone(ObjectError):
    """The upload was terminated or has expired (HTTP 410)."""

    code = "gone"


class OffsetMismatch(ObjectError):
    """The request's Upload-Offset is not the durable offset; nothing was changed (HTTP 409)."""

    code = "offset_mismatch"

    def __init__(self, message: str, *, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


class UploadChecksumMismatch(ObjectError):
    """The PATCH body does not match its Upload-Checksum; it was discarded (tus: HTTP 460)."""

    code = "checksum_mismatch"


class UploadInterrupted(ObjectError):
    """Another request for the upload asked this PATCH to stop before its body was all read,
    and its Upload-Checksum covers the whole body, so none of it was kept (HTTP 409 with the
    durable Upload-Offset): the bytes were not wrong, so this is never a 460."""

    code = "upload_interrupted"

    def __init__(self, message: str, *, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


class BodyInterrupted(Exception):
    """Raised by a PATCH body iterator that stops early because another request asked for the
    upload's lock (``Lease.release_requested``)."""


class UploadTooLarge(BodyTooLarge):
    code = "too_large"


class UploadConflict(CommitConflict):
    """The upload changed underneath this request (another holder wrote); nothing more was
    written. HEAD tells the durable offset."""

    code = "conflict"


class BadUploadRequest(BadRequest):
    code = "bad_request"


class UploadState(str, Enum):
    PENDING = "pending"
    RECEIVING = "receiving"
    COMMITTING = "committing"
    COMPLETE = "complete"
    ABORTED = "aborted"
    EXPIRED = "expired"


LIVE_STATES = frozenset({UploadState.PENDING, UploadState.RECEIVING, UploadState.COMMITTING})


# ------------------------------------------------------------------------------------ records
@dataclass
class UploadRecord:
    id: str
    key: str
    version: str
    length: int | None  # None: deferred (creation-defer-length) until a PATCH names it
    chunk_size: int
    content_type: str
    metadata: str  # the client's Upload-Metadata header, echoed by HEAD
    created: float
    expires: float
    state: UploadState = UploadState.PENDING
    hashes: dict[int, str] = field(default_factory=dict)  # SHA-256 of chunks known to be written
    blocks: dict[int, list[str]] = field(default_factory=dict)  # their per-block SHA-256, when known
    finished: float | None = None  # when it entered a terminal state
    # Recorded under the object key's lock when the upload enters ``committing``: what its commit
    # replaces (``storage.manifests.identity``: a version, a tombstone, or None for no record).
    # A retry commits only over exactly that, so it can never replace what came after its own.
    replaces: str | None = None
    replaces_known: bool = False
    # Completed without its own commit: a later write replaced what this upload was to replace
    # before its commit could land, so the upload took effect and was replaced at once.
    superseded: bool = False
    meta: dict[str, str] = field(default_factory=dict)  # the tus metadata as a map (hook events)

    def to_json(self) -> bytes:
        doc = {
            "format": RECORD_FORMAT, "id": self.id, "key": self.key, "version": self.version,
            "length": self.length, "chunk_size": self.chunk_size, "content_type": self.content_type,
            "metadata": self.metadata, "created": self.created, "expires": self.expires,
            "state": self.state.value, "hashes": {str(i): h for i, h in sorted(self.hashes.items())},
            "blocks": {str(i): b for i, b in sorted(self.blocks.items())},
            "finished": self.finished, "replaces": self.replaces, "replaces_known": self.replaces_known,
            "superseded": self.superseded, "meta": self.meta,
        }
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "UploadRecord":
        try:
            doc = json.loads(raw)
            if doc.get("format") != RECORD_FORMAT:
                raise ValueError(f"unknown format {doc.get('format')!r}")
            length = doc["length"]
            return cls(
                id=str(doc["id"]), key=keys.validate_key(doc["key"]), version=str(doc["version"]),
                length=None if length is None else int(length), chunk_size=int(doc["chunk_size"]),
                content_type=str(doc["content_type"]), metadata=str(doc.get("metadata") or ""),
                created=float(doc["created"]), expires=float(doc["expires"]), state=UploadState(doc["state"]),
                hashes={int(i): str(h) for i, h in (doc.get("hashes") or {}).items()},
                blocks={int(i): [str(h) for h in b] for i, b in (doc.get("blocks") or {}).items()},
                finished=None if doc.get("finished") is None else float(doc["finished"]),
                replaces=None if doc.get("replaces") is None else str(doc["replaces"]),
                replaces_known=bool(doc.get("replaces_known", False)),
                superseded=bool(doc.get("superseded", False)),
                meta={str(k): str(v) for k, v in (doc.get("meta") or {}).items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StoreFailed(f"an upload record is damaged: {exc}") from None


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


@dataclass
class UploadStats:
    """Plain counters; ``gateway.tus`` exports them."""

    created: int = 0
    completed: int = 0
    aborted: int = 0
    expired: int = 0
    bytes_received: int = 0


@dataclass
class _Durable:
    """An upload as the store holds it right now."""

    record: UploadRecord
    record_etag: str
    chunks: list[ObjectInfo]  # contiguous full chunks from index 0 (the final one may be short)
    tail: ObjectInfo | None  # the partly filled chunk that continues them
    debris: list[str]  # stored keys a crash or a stale holder left that are not part of the offset

    @property
    def offset(self) -> int:
        if self.record.state is UploadState.COMPLETE and self.record.length is not None:
            return self.record.length
        return sum(c.size for c in self.chunks) + (self.tail.size if self.tail else 0)

    @property
    def done_receiving(self) -> bool:
        return self.record.length is not None and self.offset == self.record.length


def new_upload_id() -> str:
    return os.urandom(16).hex()


def valid_upload_id(upload_id: str) -> bool:
    return bool(_ID.match(upload_id))


def info_key(upload_id: str) -> str:
    return f"{keys.UPLOAD_PREFIX}{upload_id}/info"


def tail_prefix(upload_id: str) -> str:
    return f"{keys.UPLOAD_PREFIX}{upload_id}/t/"


def tail_key(upload_id: str, index: int) -> str:
    return f"{tail_prefix(upload_id)}{index:08d}"


def lock_key(upload_id: str) -> str:
    return f"upload:{upload_id}"


def durable_layout(record: UploadRecord, chunks: list[ObjectInfo], tails: list[ObjectInfo]) -> tuple[list[ObjectInfo], ObjectInfo | None, list[str]]:
    """Pure: which stored chunks and tail make up the durable offset, and what is debris.

    Chunks count from index 0 while each is a full ``chunk_size`` (or the final short one ending
    exactly at a known length); the first gap or misfit ends the run. A tail counts only if it
    continues that run. Everything else is left over from a crash or a stale writer."""
    cs = record.chunk_size
    good: list[ObjectInfo] = []
    debris: list[str] = []
    offset = 0
    final = broken = False
    for info in sorted(chunks, key=lambda i: i.key):
        index = _index_of(info.key)
        fits = not (broken or final) and index == len(good)
        if fits and info.size == cs and (record.length is None or offset + cs <= record.length):
            good.append(info)
            offset += cs
        elif fits and record.length is not None and 0 < info.size < cs and offset + info.size == record.length:
            good.append(info)
            offset += info.size
            final = True
        else:
            broken = True
            debris.append(info.key)
    tail: ObjectInfo | None = None
    for info in sorted(tails, key=lambda i: i.key):
        fits = not (broken or final) and tail is None and _index_of(info.key) == len(good)
        if fits and 0 < info.size < cs and (record.length is None or offset + info.size <= record.length):
            tail = info
        else:
            debris.append(info.key)
    return good, tail, debris


def _index_of(store_key: str) -> int:
    try:
        return int(store_key.rsplit("/", 1)[1])
    except ValueError:
        return -1


async def _guard(what: str, call: Awaitable[T]) -> T:
    """Backend errors as object-layer errors (the gateway maps those to HTTP in one place)."""
    try:
        return await call
    except (TransientError, PermanentError) as exc:
        raise from_backend(exc, what) from exc


# ------------------------------------------------------------------------------------ sessions
class UploadSessions:
    """tus upload sessions over one ``ObjectStore``. Every public method but ``create`` and
    ``sweep`` expects the caller to hold the upload's lease (``lock(upload_id)``)."""

    def __init__(self, store: ObjectStore, options: UploadOptions | None = None, *,
                 clock: Callable[[], float] | None = None, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.backend = store.backend
        self.locks = store.locks
        self.options = options or UploadOptions()
        self.stats = UploadStats()
        self._clock = clock or store.clock
        self._monotonic = monotonic
        # Announce each completed upload's commit (hooks): set from --hook-url by the gateway.
        self.announce = False
        self._live: set[str] = set()  # ids of live sessions this gateway knows of (a gauge)
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def in_progress(self) -> int:
        return len(self._live)

    def lock(self, upload_id: str, *, owner: str, request_release: bool = True) -> AbstractAsyncContextManager[Any]:
        """The upload's lock. By default a new request asks the current holder to let go: a
        PATCH stalled on a dead connection must not block the client's retry (tusd does so)."""
        return self.locks.hold(lock_key(upload_id), owner=owner, timeout=self.options.lock_timeout,
                               request_release=request_release)

    # -------------------------------------------------------------------------- create
    async def create(self, key: str, *, length: int | None, metadata: str, content_type: str,
                     owner: str = "tus-create", meta: dict[str, str] | None = None,
                     upload_id: str | None = None) -> UploadStatus:
        """A new session; ``upload_id``: the id to give it (``new_upload_id()``), when the caller
        had to name it before (the pre-create hook), else a fresh one."""
        # A key the store cannot hold is refused here, before anything is stored: found only at
        # commit time, it left an upload that could never complete and pinned its chunks.
        self.store.manifests.check_key(key)
        if length is not None and length > self.options.max_size:
            raise UploadTooLarge(f"the upload is {length} bytes; at most {self.options.max_size} are accepted")
        now = self._clock()
        record = UploadRecord(
            id=upload_id or new_upload_id(), key=key, version=keys.new_version(now), length=length,
            chunk_size=self.options.chunk_size, content_type=content_type, metadata=metadata,
            created=now, expires=now + self.options.expiry, meta=dict(meta or {}),
        )
        etag = await _guard("creating the upload record",
                            self.backend.put(info_key(record.id), record.to_json(), if_none_match=True))
        self.stats.created += 1
        self._live.add(record.id)
        if length == 0:
            async with self.lock(record.id, owner=owner) as lease:
                await self._complete(_Durable(record, etag, [], None, []), lease)
        return UploadStatus(record.id, key, record.state, 0, length, record.expires, metadata)

    # -------------------------------------------------------------------------- status
    async def status(self, upload_id: str, lease: Any) -> UploadStatus:
        """The durable state, finishing an upload whose bytes are all in (a crash between the
        last byte and the commit is completed here)."""
        durable = await self._load(upload_id, lease)
        record = durable.record
        # A commit left in ``committing`` is finished whatever its chunks look like now: the
        # version may have landed and been replaced since, its chunks deleted with it.
        if record.state is UploadState.COMMITTING or (record.state in LIVE_STATES and durable.done_receiving):
            await self._complete(durable, lease)
        return self._status(durable)

    # -------------------------------------------------------------------------- append
    async def append(
        self,
        upload_id: str,
        lease: Any,
        *,
        offset: int,
        body: AsyncIterable[bytes],
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
        opts = self.options
        durable = await self._load(upload_id, lease)
        record = durable.record
        if record.state is UploadState.COMMITTING or (record.state in LIVE_STATES and durable.done_receiving):
            await self._complete(durable, lease)
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
            await self._put_record(durable, lease)
        limit = record.length if record.length is not None else opts.max_size
        if content_length is not None and offset + content_length > limit:
            raise UploadTooLarge(f"the body would end at byte {offset + content_length}; the upload ends at {limit}")
        if checksum is not None and content_length is not None and content_length > opts.checksum_body_limit:
            raise UploadTooLarge(f"a PATCH with Upload-Checksum may carry at most {opts.checksum_body_limit} bytes; send smaller PATCHes")
        if record.state is UploadState.COMPLETE:
            async for piece in body:
                if piece:
                    raise UploadTooLarge("the upload is complete; no more bytes are accepted")
            return self._status(durable)

        await self._remove(durable.debris, lease)
        durable.debris = []
        await self._expect(durable, lease)
        tail_bytes = b""
        if durable.tail is not None:
            blob = await _guard("reading the upload's last chunk", self.backend.get(durable.tail.key))
            if len(blob.data) != durable.tail.size:
                raise StoreUnavailable(f"short read of {durable.tail.key}")
            tail_bytes = blob.data

        session = _Append(self, durable, lease, tail_bytes)
        hasher = hashlib.new(checksum[0]) if checksum is not None else None
        error: BaseException | None = None
        try:
            async for piece in body:
                if not piece:
                    continue
                lease.renew()  # progress keeps the lock ours; raises LeaseLost if it was cleared
                if offset + session.received + len(piece) > limit:
                    raise UploadTooLarge(f"the body goes past the upload's end at byte {limit}")
                self.stats.bytes_received += len(piece)
                if hasher is not None:
                    hasher.update(piece)
                    if session.received + len(piece) > opts.checksum_body_limit:
                        raise UploadTooLarge(f"a PATCH with Upload-Checksum may carry at most {opts.checksum_body_limit} bytes")
                    session.hold(piece)
                else:
                    await session.feed(piece)
                    await session.maybe_checkpoint()
        except BaseException as exc:  # noqa: BLE001 - every ending saves first, then re-raises
            error = exc
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
        # Shielded: a cancelled request (shutdown, client gone) still leaves its bytes durable.
        await asyncio.shield(session.save(lost=isinstance(error, LeaseLost)))
        if error is not None:
            raise error
        if durable.done_receiving:
            # This request carried the last bytes: its commit is now, over whatever is current.
            await self._complete(durable, lease, inline=session.received > 0)
        return self._status(durable)

    async def _expect(self, durable: _Durable, lease: Any) -> None:
        """Before a PATCH writes bytes, record what the key holds now. If this request dies
        after the last byte lands but before the commit, a later request finishing the upload
        commits only over exactly that: a write to the key that came in between (an
        acknowledged PUT, say) is never overwritten by this older upload."""
        record = durable.record
        expected = identity(await self.store.record(record.key))
        if not record.replaces_known or record.replaces != expected:
            record.replaces, record.replaces_known = expected, True
            await self._put_record(durable, lease)

    # -------------------------------------------------------------------------- terminate
    async def terminate(self, upload_id: str, lease: Any) -> None:
        """tus termination: an unfinished upload's data is removed and later requests get 410;
        a completed upload's record is removed (its object stays)."""
        durable = await self._load(upload_id, lease)
        record = durable.record
        if record.state is UploadState.COMMITTING:
            await self._complete(durable, lease)
        if record.state is UploadState.COMPLETE:
            lease.check()
            await _guard("deleting the upload record", self.backend.delete(info_key(upload_id)))
            self._live.discard(upload_id)
            return
        record.state = UploadState.ABORTED
        record.finished = self._clock()
        await self._put_record(durable, lease)
        self.stats.aborted += 1
        self._live.discard(upload_id)
        await self._delete_data(record, lease)

    # -------------------------------------------------------------------------- sweeping
    async def sweep(self) -> int:
        """Expire live uploads past their expiry (their data is deleted) and drop old terminal
        records. Uploads whose lock is held right now are active and skipped. Returns how many
        uploads expired."""
        now = self._clock()
        expired = 0
        seen_live: set[str] = set()
        ids: list[str] = []
        tails: dict[str, list[ObjectInfo]] = {}
        async for info in self._list(keys.UPLOAD_PREFIX):
            rest = info.key[len(keys.UPLOAD_PREFIX):]
            upload_id, _, tail = rest.partition("/")
            if tail == "info" and valid_upload_id(upload_id):
                ids.append(upload_id)
            elif tail.startswith("t/"):
                tails.setdefault(upload_id, []).append(info)
        await self._sweep_orphan_tails(tails, set(ids), now)
        for upload_id in ids:
            try:
                record, _etag = await self._read_record(upload_id)
            except (UploadNotFound, StoreFailed, StoreUnavailable):
                continue
            due_live = record.state in LIVE_STATES and record.expires <= now
            due_tomb = record.state not in LIVE_STATES and (record.finished or record.created) + self.options.tombstone_seconds <= now
            if record.state in LIVE_STATES and not due_live:
                seen_live.add(upload_id)
                continue
            if not (due_live or due_tomb):
                continue
            try:
                lease = await self.locks.acquire(lock_key(upload_id), owner="tus-sweep", timeout=0.0)
            except Exception:  # held: someone is using it right now
                if record.state in LIVE_STATES:
                    seen_live.add(upload_id)
                continue
            try:
                if due_live:
                    try:
                        # Expires it (and deletes its data), or finishes a crashed commit.
                        status = await self.status(upload_id, lease)
                    except UploadGone:
                        expired += 1
                    except UploadNotFound:
                        pass
                    else:
                        if status.state in LIVE_STATES:
                            seen_live.add(upload_id)
                else:
                    if record.state is not UploadState.COMPLETE:
                        await self._delete_data(record, lease)  # in case a crash interrupted it
                    else:  # a tail a stalled request wrote after the upload completed
                        await self._remove([k async for k in self._keys(tail_prefix(upload_id))], lease)
                    lease.check()
                    await _guard("deleting an upload record", self.backend.delete(info_key(upload_id)))
            except Exception as exc:  # one bad upload must not stop the sweep
                log.warning("sweeping upload %s failed: %s", upload_id, exc)
            finally:
                await lease.release()
        # Keep ids created after the listing; the rest is what the store says now.
        self._live = seen_live | (self._live - set(ids))
        return expired

    async def _sweep_orphan_tails(self, tails: dict[str, list[ObjectInfo]], records: set[str], now: float) -> None:
        """Tails whose upload record is gone (a write delayed on the wire landed after the
        upload ended and was swept): nobody can resume them, so they go once old enough that
        the record is surely not just being created."""
        for upload_id, infos in tails.items():
            if upload_id in records:
                continue
            old = [i.key for i in infos if now - i.last_modified.timestamp() > self.options.tombstone_seconds]
            for k in old:
                try:
                    await self.backend.delete(k)
                except (TransientError, PermanentError) as exc:
                    log.warning("could not delete the orphaned tail %s: %s", k, exc)

    async def start(self) -> None:
        """Run the sweeper in the background (first sweep right away: it also counts the live
        uploads a previous process left)."""
        if self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._sweep_forever())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None

    async def _sweep_forever(self) -> None:
        while True:
            try:
                n = await self.sweep()
                if n:
                    log.info("expired %d upload(s)", n)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store may be down for a while; try again later
                log.warning("upload sweep failed: %s", exc)
            await asyncio.sleep(self.options.sweep_interval)

    # -------------------------------------------------------------------------- internals
    def _status(self, durable: _Durable) -> UploadStatus:
        r = durable.record
        offset = r.length if r.state is UploadState.COMPLETE and r.length is not None else durable.offset
        return UploadStatus(r.id, r.key, r.state, offset, r.length, r.expires, r.metadata)

    async def _read_record(self, upload_id: str) -> tuple[UploadRecord, str]:
        if not valid_upload_id(upload_id):
            raise UploadNotFound(f"no upload {upload_id!r}")
        try:
            blob = await _guard("reading the upload record", self.backend.get(info_key(upload_id)))
        except NotFound:
            raise UploadNotFound(f"no upload {upload_id!r}") from None
        return UploadRecord.from_json(blob.data), blob.etag

    async def _keys(self, prefix: str) -> Any:
        async for info in self._list(prefix):
            yield info.key

    async def _list(self, prefix: str) -> Any:
        try:
            async for info in self.backend.list(prefix):
                yield info
        except (TransientError, PermanentError) as exc:
            raise from_backend(exc, f"listing {prefix}") from exc

    async def _load(self, upload_id: str, lease: Any) -> _Durable:
        """The upload as stored; an upload past its expiry is expired here (under the lease)."""
        record, etag = await self._read_record(upload_id)
        if record.state in (UploadState.ABORTED, UploadState.EXPIRED):
            raise UploadGone(f"upload {upload_id} was {'terminated' if record.state is UploadState.ABORTED else 'expired'}")
        if record.state is UploadState.COMPLETE:
            return _Durable(record, etag, [], None, [])
        chunks = [i async for i in self._list(keys.chunk_prefix(record.key, record.version))]
        tails = [i async for i in self._list(tail_prefix(upload_id))]
        good, tail, debris = durable_layout(record, chunks, tails)
        durable = _Durable(record, etag, good, tail, debris)
        if record.state in (UploadState.PENDING, UploadState.RECEIVING) and record.expires <= self._clock():
            record.state = UploadState.EXPIRED
            record.finished = self._clock()
            await self._put_record(durable, lease)
            self.stats.expired += 1
            self._live.discard(upload_id)
            await self._delete_data(record, lease)
            raise UploadGone(f"upload {upload_id} expired")
        return durable

    async def _put_record(self, durable: _Durable, lease: Any) -> None:
        lease.check()
        try:
            durable.record_etag = await _guard(
                "writing the upload record",
                self.backend.put(info_key(durable.record.id), durable.record.to_json(), if_match=durable.record_etag),
            )
        except PreconditionFailed:
            raise UploadConflict("the upload record changed underneath this request; ask HEAD for the offset") from None

    async def _remove(self, store_keys: list[str], lease: Any) -> None:
        for k in store_keys:
            lease.check()
            try:
                await self.backend.delete(k)
            except Exception as exc:  # left for the next request or the sweep
                log.warning("could not delete %s: %s", k, exc)

    async def _delete_data(self, record: UploadRecord, lease: Any) -> None:
        """Remove an unfinished upload's chunks and tail. Never for a complete upload, and never
        the chunks of a version that the key's record names (belt and braces: a commit whose
        outcome was unknown may have landed after all)."""
        assert record.state not in (UploadState.COMPLETE, UploadState.COMMITTING)
        doomed = [k async for k in self._keys(tail_prefix(record.id))]
        if version_of(await self.store.record(record.key)) != record.version:
            doomed += [k async for k in self._keys(keys.chunk_prefix(record.key, record.version))]
        else:
            log.error("upload %s ended, but its version is %r's committed one: its chunks stay", record.id, record.key)
        for k in doomed:
            self.store.cache.discard(k)
        await self._remove(doomed, lease)

    async def _complete(self, durable: _Durable, lease: Any, *, inline: bool = False) -> None:
        """All bytes are in: commit the upload's manifest under the object key's lock (same
        verification as a PUT) and record ``complete``. ``inline``: called by the request that
        carried the last bytes. Otherwise this finishes what a crash or a failure left behind,
        and never over anything written to the key since the last bytes were sent."""
        record = durable.record
        if record.state is UploadState.COMPLETE:
            return
        try:
            await self._commit(durable, lease, inline=inline)
        except BadKey as exc:
            # The store cannot hold the key (refused outright, nothing landed): the upload can
            # never complete, so it ends here instead of pinning its chunks forever.
            log.error("upload %s cannot be committed and is aborted: %s", record.id, exc)
            await self._abort(durable, lease, f"could not be committed: {exc}")
            raise

    async def _manifest(self, durable: _Durable, lease: Any) -> Manifest:
        """The manifest of the upload's version from its durable chunks: the saved tail becomes
        the final chunk, and chunks a dead request wrote without recording are hashed once."""
        record = durable.record
        if record.state is not UploadState.COMMITTING:
            # Before ``committing`` no manifest can name them; after, chunks are only ever
            # removed by what replaces the version, or by gc (which reads the manifests).
            await self._remove(durable.debris, lease)
            durable.debris = []
        if durable.tail is not None:
            # The last bytes were saved as a tail (a checkpoint, or the length was deferred):
            # they become the final chunk.
            blob = await _guard("reading the upload's last chunk", self.backend.get(durable.tail.key))
            writer = ChunkWriter(self.store, record.key, record.version, first_index=len(durable.chunks),
                                 first_offset=durable.offset - durable.tail.size, fence=lease.check)
            await writer.add(blob.data)
            (ref,) = await writer.finish()
            record.hashes[ref.index] = ref.sha256 or ""
            if ref.blocks is not None:
                record.blocks[ref.index] = list(ref.blocks)
            durable.debris.append(durable.tail.key)
            durable.chunks.append(ObjectInfo(keys.chunk_key(record.key, record.version, ref.index), ref.size, "", datetime.now(timezone.utc)))
            durable.tail = None
        refs: list[ChunkRef] = []
        offset = 0
        for index, info in enumerate(durable.chunks):
            digest = record.hashes.get(index)
            if not digest:
                # Written by a request that died before recording it: read it back once.
                blob = await _guard("reading back a chunk", self.backend.get(info.key))
                if len(blob.data) != info.size:
                    raise StoreUnavailable(f"short read of {info.key}")
                digest = await sha256_hex(blob.data)
                record.hashes[index] = digest
            blocks = record.blocks.get(index)
            block_size = self.store.options.block_size
            if blocks is not None and len(blocks) != block_count(info.size, block_size):
                blocks = None  # recorded under another block size: seeks fall back to the whole chunk
            refs.append(ChunkRef(index, offset, info.size, digest, tuple(blocks) if blocks is not None else None))
            offset += info.size
        return Manifest(
            key=record.key, version=record.version, size=offset, content_type=record.content_type,
            created=datetime.fromtimestamp(self._clock(), timezone.utc).replace(microsecond=0),
            chunk_size=record.chunk_size, chunks=tuple(refs), extra={"upload": record.id},
            block_size=self.store.options.block_size,
        )

    async def _commit(self, durable: _Durable, lease: Any, *, inline: bool) -> None:
        """The commit protocol of an upload (README, "Commits"): under the object key's lock,
        read the key's record. Already ours: complete. Then the record to commit over: by the
        request that carried the last bytes (``inline``), whatever is current; by any later
        one, only what the last writing request saw (``_expect``) or what ``committing``
        recorded. Anything else means a later write came first, and the upload completes as
        superseded, never committed over it. ``committing`` is recorded, with what it
        replaces, durably before the manifest is written by a conditional write over it."""
        record = durable.record
        manifest: Manifest | None = None
        async with self.locks.hold(record.key, owner=f"tus-commit {record.id}", timeout=self.options.lock_timeout) as key_lease:
            contention = Contention()
            for _ in contention:
                lease.check()
                current = await self.store.record(record.key)
                if version_of(current) == record.version:
                    break  # an earlier attempt landed (its answer or our record was lost)
                if record.replaces_known and (record.state is UploadState.COMMITTING or not inline):
                    if identity(current) != record.replaces:
                        await self._supersede(durable, lease, version_of(current))
                        return
                if manifest is None:
                    if record.length is None or durable.offset != record.length:
                        # Not committed, yet bytes are missing: the data is gone (deleted by hand?)
                        await self._abort(durable, lease, "lost data before it could be committed")
                        raise StoreFailed(f"upload {record.id} lost data before it could be committed")
                    manifest = await self._manifest(durable, lease)
                if not (record.state is UploadState.COMMITTING and record.replaces_known):
                    record.state = UploadState.COMMITTING
                    record.replaces, record.replaces_known = identity(current), True
                    await self._put_record(durable, lease)
                events = (self._announcement(record, manifest),) if self.announce else ()
                result = await self.store.commit_record(record.key, manifest, current, key_lease, CommitAttempt(),
                                                        events=events)
                if result.outcome is Outcome.COMMITTED:
                    break
                if result.outcome is Outcome.UNKNOWN:
                    # Left in committing: the next request (or the sweeper) reads it back.
                    raise StoreUnavailable(f"the store failed committing upload {record.id}; its outcome is "
                                           f"unknown and is resolved on the next request: {result.error}",
                                           retry_after=getattr(result.error, "retry_after", None), outcome_unknown=True)
                # LOST: the record changed under us. Same version (its events were rewritten):
                # try again over it; another version: the next round supersedes.
                contention.lost(current, result)
            else:
                raise UploadConflict(f"upload {record.id}: the object kept changing while it was being committed")
        await self._mark_complete(durable, lease)

    def _announcement(self, record: UploadRecord, manifest: Manifest) -> Event:
        return self.store.announcement({"type": "post-finish", "metadata": dict(record.meta)}, manifest,
                                       upload_id=record.id)

    async def _supersede(self, durable: _Durable, lease: Any, current: str | None) -> None:
        record = durable.record
        log.warning("upload %s completes without its own commit: %r is now version %s, not the %s it was to "
                    "replace (a later write came first)", record.id, record.key, current, record.replaces)
        record.superseded = True
        await self._mark_complete(durable, lease)
        # Unreferenced now (or soon: readers of it, had it been current, get the grace period).
        self.store.delete_version_later(record.key, record.version, len(durable.chunks))

    async def _abort(self, durable: _Durable, lease: Any, why: str) -> None:
        record = durable.record
        # After ``committing``, a manifest naming the chunks may still land (an earlier commit
        # whose outcome was unknown): then they are left for gc, which judges by the manifests.
        may_be_named = record.state is UploadState.COMMITTING
        record.state = UploadState.ABORTED
        record.finished = self._clock()
        await self._put_record(durable, lease)
        self._live.discard(record.id)
        self.stats.aborted += 1
        log.warning("upload %s aborted: %s", record.id, why)
        if may_be_named:
            await self._remove([k async for k in self._keys(tail_prefix(record.id))], lease)
        else:
            await self._delete_data(record, lease)

    async def _mark_complete(self, durable: _Durable, lease: Any) -> None:
        record = durable.record
        record.state = UploadState.COMPLETE
        record.finished = self._clock()
        await self._put_record(durable, lease)
        self.stats.completed += 1
        self._live.discard(record.id)
        # Tails only: the version's chunks are the object's now (or were, and are deleted with
        # it), and chunks left beyond them by a stale writer are unreferenced: gc takes them.
        await self._remove([k async for k in self._keys(tail_prefix(record.id))], lease)
        durable.debris = []
        durable.tail = None


class _Append:
    """One PATCH's bytes on their way into the store: full chunks go to a ``ChunkWriter`` as
    they fill; the partly filled rest is saved as the tail at the end (and at checkpoints)."""

    def __init__(self, sessions: UploadSessions, durable: _Durable, lease: Any, tail: bytes) -> None:
        self.sessions = sessions
        self.durable = durable
        self.lease = lease
        record = durable.record
        self.cs = record.chunk_size
        self.first_index = len(durable.chunks)
        self.writer = ChunkWriter(sessions.store, record.key, record.version, first_index=self.first_index,
                                  first_offset=self.first_index * self.cs, fence=lease.check)
        # Reused buffers where the upload's chunk size is the store's (storage.chunker).
        self.chunker = Chunker(self.cs, sessions.store.buffers)
        for _ in self.chunker.feed(tail):  # shorter than a chunk: it only refills the rest
            pass
        self.saved_tail = len(tail)  # bytes of the current partial chunk already durable as a tail
        self.received = 0
        self.handed = 0  # full chunks handed to the writer
        self.held: list[bytes] = []  # checksummed body, kept until verified
        self.last_checkpoint = self.sessions._monotonic()
        self.error: BaseException | None = None

    def hold(self, piece: bytes) -> None:
        self.held.append(piece)
        self.received += len(piece)

    def discard(self) -> None:
        self.held = []
        self.chunker.close()

    @property
    def filled(self) -> int:
        return self.chunker.filled

    async def release_held(self) -> None:
        held, self.held = self.held, []
        self.received -= sum(len(p) for p in held)
        for piece in held:
            await self.feed(piece)

    async def feed(self, piece: bytes) -> None:
        self.received += len(piece)
        for chunk in self.chunker.feed(piece):
            self.saved_tail = 0
            await self.writer.add(chunk)
            self.handed += 1

    async def maybe_checkpoint(self) -> None:
        """On a slow stream, make the partly filled chunk durable now and then."""
        if self.filled <= self.saved_tail or self.sessions._monotonic() - self.last_checkpoint < self.sessions.options.checkpoint_seconds:
            return
        self.last_checkpoint = self.sessions._monotonic()
        if not await self._settle_chunks():
            raise self.error  # type: ignore[misc]
        await self._save_tail()

    async def _settle_chunks(self) -> bool:
        """Wait for the chunk writes; keep the contiguous run that succeeded. True if all did."""
        results = await self.writer.results()
        ok = True
        written_after_gap: list[int] = []
        for n, result in enumerate(results):
            index = self.first_index + n
            if isinstance(result, ChunkRef) and ok:
                if index >= len(self.durable.chunks):
                    self.durable.record.hashes[index] = result.sha256 or ""
                    if result.blocks is not None:
                        self.durable.record.blocks[index] = list(result.blocks)
                    ck = keys.chunk_key(self.durable.record.key, self.durable.record.version, index)
                    self.durable.chunks.append(ObjectInfo(ck, result.size, "", datetime.now(timezone.utc)))
            elif isinstance(result, ChunkRef):
                written_after_gap.append(index)
            else:
                if ok:
                    log.warning("upload %s: chunk %d was not stored: %s", self.durable.record.id, index, result)
                    self.error = result
                ok = False
        if written_after_gap:
            # Beyond a gap they are not part of the offset, and would collide with the rewrite.
            await self.sessions._remove(
                [keys.chunk_key(self.durable.record.key, self.durable.record.version, i) for i in written_after_gap], self.lease)
        return ok

    async def _save_tail(self) -> None:
        durable, lease = self.durable, self.lease
        index = len(durable.chunks)
        data = self.chunker.partial()
        old = durable.tail
        if not data or (old is not None and _index_of(old.key) == index and old.size == len(data)):
            return
        key = tail_key(durable.record.id, index)
        lease.check()
        try:
            if old is not None and _index_of(old.key) == index:
                etag = await _guard("saving the upload's last chunk", self.sessions.backend.put(key, data, if_match=old.etag))
            else:
                etag = await _guard("saving the upload's last chunk", self.sessions.backend.put(key, data, if_none_match=True))
        except PreconditionFailed:
            raise UploadConflict("the upload changed underneath this request; ask HEAD for the offset") from None
        durable.tail = ObjectInfo(key, len(data), etag, datetime.now(timezone.utc))
        self.saved_tail = len(data)
        if old is not None and old.key != key:
            await self.sessions._remove([old.key], lease)

    async def save(self, *, lost: bool) -> None:
        """Make everything received durable: the final short chunk as a chunk when the upload
        is now complete, else the partly filled chunk as the tail; then the record."""
        try:
            await self._save(lost=lost)
        finally:
            self.chunker.close()  # a partly filled reused buffer goes back (its bytes are the tail)

    async def _save(self, *, lost: bool) -> None:
        durable = self.durable
        record = durable.record
        if lost:
            # Our lease was cleared: whoever holds it now owns the state. Write nothing more.
            await self.writer.results()
            return
        total = self.first_index * self.cs + self.handed * self.cs + self.filled
        if record.length is not None and total == record.length and self.filled:
            last = self.chunker.flush()
            if last is not None:
                await self.writer.add(last)
                self.handed += 1
        all_ok = await self._settle_chunks()
        if all_ok:
            if durable.tail is not None and _index_of(durable.tail.key) < len(durable.chunks):
                durable.debris.append(durable.tail.key)  # its bytes are in a full chunk now
                durable.tail = None
            await self._save_tail()
        if self.received or durable.debris:
            await self.sessions._remove(durable.debris, self.lease)
            durable.debris = []
        if record.state is UploadState.PENDING and self.received:
            record.state = UploadState.RECEIVING
        record.expires = self.sessions._clock() + self.sessions.options.expiry
        await self.sessions._put_record(durable, self.lease)
        if self.error is not None:
            raise self.error


# ------------------------------------------------------------------------------------ gc
class UploadsGcHook:
    """What ``storage.gc`` needs from upload sessions, for ``chunkgate gc`` (a separate process,
    so no lock manager is shared): which versions live uploads are still writing, and expiry.
    Expiring is a conditional write on the record, so a gateway that renews the same record
    meanwhile wins and the upload stays."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    async def _records(self) -> list[tuple[UploadRecord, str]]:
        found: list[tuple[UploadRecord, str]] = []
        async for info in self.backend.list(keys.UPLOAD_PREFIX):
            upload_id, _, rest = info.key[len(keys.UPLOAD_PREFIX):].partition("/")
            if rest != "info" or not valid_upload_id(upload_id):
                continue
            try:
                blob = await self.backend.get(info.key)
                found.append((UploadRecord.from_json(blob.data), blob.etag))
            except (NotFound, StoreFailed):
                continue
        return found

    async def protected_versions(self) -> set[tuple[str, str]]:
        # Lenient on purpose: a record this version cannot fully parse (older, newer, damaged)
        # still protects the version it names unless it says it is finished. Keeping garbage a
        # while is cheap; deleting an upload's chunks is not.
        terminal = {UploadState.COMPLETE.value, UploadState.ABORTED.value, UploadState.EXPIRED.value}
        found: set[tuple[str, str]] = set()
        async for info in self.backend.list(keys.UPLOAD_PREFIX):
            if not info.key.endswith("/info"):
                continue
            try:
                doc = json.loads((await self.backend.get(info.key)).data)
            except (NotFound, ValueError):
                continue
            if isinstance(doc, dict) and doc.get("state") not in terminal \
                    and isinstance(doc.get("key"), str) and isinstance(doc.get("version"), str):
                found.add((doc["key"], doc["version"]))
        return found

    async def sweep_expired(self, now: float, *, dry_run: bool) -> int:
        expired = 0
        for record, etag in await self._records():
            if record.state not in (UploadState.PENDING, UploadState.RECEIVING) or record.expires > now:
                continue
            expired += 1
            if dry_run:
                continue
            record.state, record.finished = UploadState.EXPIRED, now
            try:
                await self.backend.put(info_key(record.id), record.to_json(), if_match=etag)
            except PreconditionFailed:
                expired -= 1  # a gateway touched it meanwhile: not expired after all
                continue
            doomed = [i.key async for i in self.backend.list(keys.chunk_prefix(record.key, record.version))]
            doomed += [i.key async for i in self.backend.list(tail_prefix(record.id))]
            for k in doomed:
                await self.backend.delete(k)
        return expired


def gc_hook(backend: Any) -> UploadsGcHook:
    """``storage.gc``'s entry point (see ``storage.gc.UploadsHook``)."""
    return UploadsGcHook(backend)
