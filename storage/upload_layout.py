"""Where an upload lives in the store, and what of it is durable.

Layout (under ``keys.UPLOAD_PREFIX``)::

    u/<id>/info                 the session record (``storage.upload_record``)
    u/<id>/t/<index:08d>        the partly filled chunk ``index`` (the "tail"), bytes only
    u/<id>/b/<first:08d>-<rand> the block digests of the chunks one request recorded (a "digest
                                segment", ``digests_doc``), read once by the commit
    c/.../<key id>/<version>/<index:08d>
                                full chunks, written create-only as the chunks of the object
                                version the upload will commit (``keys.chunk_key``)

The offset of an upload is *derived from what the store holds* (``durable_layout``): the
contiguous full chunks from index 0, plus the tail that continues them. There is no counter
anywhere, so whatever a crash leaves behind, the next request reports exactly the bytes that are
durable and accepts the rest.

Which chunks are stored is read from the record as far as it vouches for them
(``recorded_chunks``), and from a listing past them: a chunk gets into the record's ``hashes``
only after it was written and read back, and a chunk key below the offset is deleted only once
the record is in a terminal state (a request's own rewrite, ``ChunkWriter`` adopt, touches only
keys at or above the offset it loaded; gc spares the versions of live uploads). Listing
every chunk instead made each PATCH and HEAD cost time in proportion to the upload so far: on
SeaweedFS a listing of 1,000 chunk keys (an 8 GiB upload) took 136 ms, one past the recorded
chunks 2 ms (ops/bench, issue 15).

Must never: import aiohttp or ``gateway``; count a byte in an offset that is not in the store.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Awaitable, TypeVar

from storage import keys
from storage.backends.base import ObjectInfo, PermanentError, TransientError
from storage.errors import from_backend
from storage.quota import UploadSummary
from storage.upload_record import UploadRecord, UploadState

_ID = re.compile(r"^[0-9a-f]{32}$")
T = TypeVar("T")


@dataclass
class DurableUpload:
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


def summary(record: UploadRecord, etag: str) -> UploadSummary:
    return UploadSummary(record.id, record.client, record.state.value, record.created, record.expires,
                         record.finished, etag)


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


def digests_prefix(upload_id: str) -> str:
    return f"{keys.UPLOAD_PREFIX}{upload_id}/b/"


def digests_key(upload_id: str, first: int) -> str:
    """A new digest segment's key: never written twice (a retry of the same chunks writes another)."""
    return f"{digests_prefix(upload_id)}{first:08d}-{os.urandom(4).hex()}"


def leftover_prefixes(upload_id: str) -> tuple[str, str]:
    """Where an upload keeps what is neither its record nor its chunks (tails, digest segments):
    all of it goes when the upload ends."""
    return tail_prefix(upload_id), digests_prefix(upload_id)


Digests = dict[int, tuple[str, list[str]]]  # chunk index -> (its SHA-256, its block digests)


def digests_doc(entries: Digests) -> bytes:
    """Pure: a digest segment's bytes."""
    doc = {"chunks": {str(i): {"sha256": h, "blocks": b} for i, (h, b) in sorted(entries.items())}}
    return json.dumps(doc, separators=(",", ":")).encode()


def parse_digests(data: bytes) -> Digests:
    """Pure: a digest segment's entries; a damaged one yields none (its chunks' seeks then
    verify whole chunks, as for chunks a killed request stored unrecorded)."""
    try:
        doc = json.loads(data)
        return {int(i): (str(e["sha256"]), [str(h) for h in e["blocks"]]) for i, e in doc["chunks"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}


def lock_key(upload_id: str) -> str:
    return f"upload:{upload_id}"


def recorded_chunks(record: UploadRecord) -> list[ObjectInfo]:
    """Pure: the chunks the record vouches for, from index 0 while each has a recorded hash (a
    chunk is recorded only once stored and read back): full chunks, and a short final one where
    the declared length ends inside it. A listing past the last of them finds the rest."""
    out: list[ObjectInfo] = []
    cs, length = record.chunk_size, record.length
    when = datetime.fromtimestamp(record.created, timezone.utc)
    while len(out) in record.hashes:
        index = len(out)
        size = cs if length is None else min(cs, length - index * cs)
        if size <= 0:
            break
        out.append(ObjectInfo(keys.chunk_key(record.key, record.version, index), size, "", when))
        if size < cs:
            break
    return out


def durable_layout(record: UploadRecord, chunks: list[ObjectInfo],
                   tails: list[ObjectInfo]) -> tuple[list[ObjectInfo], ObjectInfo | None, list[str]]:
    """Pure: which stored chunks and tail make up the durable offset, and what is debris.

    Chunks count from index 0 while each is a full ``chunk_size`` (or the final short one ending
    exactly at a known length); the first gap or misfit ends the run. A tail counts only if it
    continues that run -- whatever lies beyond it: one PATCH hands several chunks to the writer
    at once, so a crash can leave chunk N+1 stored and chunk N not, and the tail saved for index N
    (acknowledged, durable) still holds the offset. Everything else is left over from a crash or
    a stale writer: ``removable`` says which of it may be deleted."""
    cs = record.chunk_size
    good: list[ObjectInfo] = []
    debris: list[str] = []
    offset = 0
    final = broken = False
    for info in sorted(chunks, key=lambda i: i.key):
        index = index_of(info.key)
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
        # Not ``broken``: that concerns only chunks past the run, which the tail comes before.
        fits = not final and tail is None and index_of(info.key) == len(good)
        if fits and 0 < info.size < cs and (record.length is None or offset + info.size <= record.length):
            tail = info
        else:
            debris.append(info.key)
    return good, tail, debris


def removable(durable: DurableUpload) -> list[str]:
    """Pure: the debris a request may delete before it writes. Tails, and chunks at an index no
    request of this upload can write again (past its declared end). Not chunks it may write
    again: ``storage.writes.ChunkWriter`` adopts an identical copy, and a delete that a holder
    sent before it went stale could land after the next holder stored and acknowledged the key."""
    record = durable.record
    last = -(-record.length // record.chunk_size) if record.length is not None else None
    chunk_prefix = keys.chunk_prefix(record.key, record.version)
    out = []
    for k in durable.debris:
        if not k.startswith(chunk_prefix):
            out.append(k)  # a tail
        elif last is not None and not 0 <= index_of(k) < last:
            out.append(k)
    return out


def index_of(store_key: str) -> int:
    try:
        return int(store_key.rsplit("/", 1)[1])
    except ValueError:
        return -1


async def guarded(what: str, call: Awaitable[T]) -> T:
    """``call``'s backend failures as storage errors (``storage.errors.from_backend``, the one
    place they are translated); ``NotFound`` and ``PreconditionFailed`` pass through: they are
    answers the caller handles."""
    try:
        return await call
    except (TransientError, PermanentError) as exc:
        raise from_backend(exc, what) from exc
