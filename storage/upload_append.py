"""One PATCH's bytes on their way into the store (``Appender``), for ``storage.uploads``.

Full chunks go to a ``ChunkWriter`` (bounded in flight) as they fill, through the shared
``storage.chunker``; the partly filled rest is saved as the tail at the end and at checkpoints.
A checksummed body is held in memory until the whole of it verified. A body that writes itself
into buffers (``BodyIntoSome``: a large plain PATCH, received straight from the socket) is
read into the chunk being filled, sparing a copy and the per-piece work (``receive_into``).

Must never: import aiohttp or ``gateway``; make a byte of a checksummed body durable before it
verified; count a chunk that follows a failed one; write after the lease was lost; delete a chunk
key that a later request may write again (a late delete would remove what that request stored).
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timezone
from typing import TYPE_CHECKING, AsyncIterable

from storage import keys
from storage.backends.base import ObjectInfo, PreconditionFailed
from storage.chunker import Chunk, Chunker
from storage.errors import UploadConflict, UploadTooLarge
from storage.locks import Lease
from storage.manifest import ChunkRef
from storage.objects import ChunkWriter
from storage.upload_layout import Digests, DurableUpload, digests_doc, digests_key, guarded, index_of, tail_key
from storage.upload_record import UploadState
from storage.writes import BodyIntoSome

if TYPE_CHECKING:
    from storage.uploads import UploadSessions

log = logging.getLogger("chunkgate.uploads")

# receive_into returns to renew the lease and checkpoint at least this often while bytes flow
# (a read straight into an 8 MiB chunk can take long at a slow client's rate), and at least four
# times within the lock's stale time.
_RENEW_EVERY = 1.0  # seconds


class Appender:
    """One PATCH's bytes on their way into the store: full chunks go to a ``ChunkWriter`` as
    they fill; the partly filled rest is saved as the tail at the end (and at checkpoints)."""

    def __init__(self, sessions: UploadSessions, durable: DurableUpload, lease: Lease, tail: bytes, *,
                 expected: str | None) -> None:
        self.sessions = sessions
        self.durable = durable
        self.lease = lease
        record = durable.record
        self.cs = record.chunk_size
        self.first_index = len(durable.chunks)
        self.writer = ChunkWriter(sessions.store, record.key, record.version, first_index=self.first_index,
                                  first_offset=self.first_index * self.cs, fence=lease.check, adopt=True)
        # Reused buffers where the upload's chunk size is the store's (storage.chunker).
        self.chunker = Chunker(self.cs, sessions.store.buffers)
        for _ in self.chunker.feed(tail):  # shorter than a chunk: it only refills the rest
            pass
        self.saved_tail = len(tail)  # bytes of the current partial chunk already durable as a tail
        self.received = 0
        self.handed = 0  # full chunks handed to the writer
        self.held: list[bytes] = []  # checksummed body, kept until verified
        self.last_checkpoint = self.sessions.monotonic()
        self.error: BaseException | None = None
        self.expected = expected  # what the key held when this PATCH started: recorded at its first byte
        self.recorded = False
        self.new_digests: Digests = {}  # block digests of the chunks this request recorded

    async def receive(self, body: AsyncIterable[bytes], *, offset: int, limit: int,
                      hasher: hashlib._Hash | None) -> BaseException | None:
        """Take ``body`` (which starts at ``offset``; the upload ends at ``limit``): into the
        store as it comes, or held for ``hasher`` to verify. Returns how the body ended: None,
        or the error (also a cancellation), so the caller saves what arrived first."""
        options = self.sessions.options
        try:
            async for piece in body:
                if not piece:
                    continue
                await self._arriving(len(piece), offset, limit)
                if hasher is not None:
                    hasher.update(piece)
                    if self.received + len(piece) > options.checksum_body_limit:
                        raise UploadTooLarge(f"a PATCH with Upload-Checksum may carry at most {options.checksum_body_limit} bytes")
                    self.hold(piece)
                else:
                    await self.feed(piece)
                    await self.maybe_checkpoint()
        except BaseException as exc:  # noqa: BLE001 - every ending saves first, then re-raises
            return exc
        return None

    async def receive_into(self, body: BodyIntoSome, *, offset: int, limit: int) -> BaseException | None:
        """``receive`` for a body that writes itself into the chunk being filled (never a
        checksummed one: that is held). Returns how the body ended, as ``receive`` does."""
        renew_every = min(_RENEW_EVERY, self.sessions.locks.stale_after / 4)
        try:
            while not body.ended:
                # Back by the next checkpoint, if one is due at all (with nothing new to make
                # durable, none is: a stalled client costs a wake-up per renewal).
                due = self._checkpoint_due_in()
                within = max(0.01, min(renew_every, renew_every if due is None else due))
                n = await body.readinto_some(self.chunker.room(), within)
                if n:
                    await self._arriving(n, offset, limit)
                    self.received += n
                    chunk = self.chunker.advance(n)
                    if chunk is not None:
                        await self._hand(chunk)
                await self.maybe_checkpoint()
        except BaseException as exc:  # noqa: BLE001 - every ending saves first, then re-raises
            return exc
        return None

    async def _arriving(self, n: int, offset: int, limit: int) -> None:
        """``n`` more bytes arrived, not yet counted: they count only if this returns."""
        self.lease.renew()  # progress keeps the lock ours; raises LeaseLost if it was cleared
        if not self.recorded:
            await self.sessions.expect(self.durable, self.lease, self.expected)
            self.recorded = True
        if offset + self.received + n > limit:
            raise UploadTooLarge(f"the body goes past the upload's end at byte {limit}")
        self.sessions.stats.bytes_received += n

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
            await self._hand(chunk)

    async def _hand(self, chunk: Chunk) -> None:
        self.saved_tail = 0
        await self.writer.add(chunk)
        self.handed += 1

    def _checkpoint_due_in(self) -> float | None:
        """Seconds until the partly filled chunk is to be made durable (0 or less: now); None
        while nothing arrived since it last was."""
        if self.filled <= self.saved_tail:
            return None
        return self.sessions.options.checkpoint_seconds - (self.sessions.monotonic() - self.last_checkpoint)

    async def maybe_checkpoint(self) -> None:
        """On a slow stream, make the partly filled chunk durable now and then."""
        due = self._checkpoint_due_in()
        if due is None or due > 0:
            return
        self.last_checkpoint = self.sessions.monotonic()
        if not await self._settle_chunks():
            raise self.error  # type: ignore[misc]
        await self._save_tail()

    async def _settle_chunks(self) -> bool:
        """Wait for the chunk writes; keep the contiguous run that succeeded. True if all did."""
        results = await self.writer.results()
        ok = True
        # A chunk stored beyond a gap is not part of the offset, and stays where it is: the
        # rewrite adopts it (ChunkWriter adopt), and a delete of it could land after that rewrite.
        for n, result in enumerate(results):
            index = self.first_index + n
            if isinstance(result, ChunkRef) and ok:
                if index >= len(self.durable.chunks):
                    self.durable.record.hashes[index] = result.sha256 or ""
                    if result.blocks is not None:
                        self.new_digests[index] = (result.sha256 or "", list(result.blocks))
                    ck = keys.chunk_key(self.durable.record.key, self.durable.record.version, index)
                    self.durable.chunks.append(ObjectInfo(ck, result.size, "", datetime.now(timezone.utc)))
            elif not isinstance(result, ChunkRef):
                if ok:
                    log.warning("upload %s: chunk %d was not stored: %s", self.durable.record.id, index, result)
                    self.error = result
                ok = False
        return ok

    async def _save_tail(self) -> None:
        durable, lease = self.durable, self.lease
        index = len(durable.chunks)
        data = self.chunker.partial()
        old = durable.tail
        if not data or (old is not None and index_of(old.key) == index and old.size == len(data)):
            return
        key = tail_key(durable.record.id, index)
        lease.check()
        try:
            if old is not None and index_of(old.key) == index:
                etag = await guarded("saving the upload's last chunk", self.sessions.backend.put(key, data, if_match=old.etag))
            else:
                etag = await guarded("saving the upload's last chunk", self.sessions.backend.put(key, data, if_none_match=True))
        except PreconditionFailed:
            raise UploadConflict("the upload changed underneath this request; ask HEAD for the offset") from None
        durable.tail = ObjectInfo(key, len(data), etag, datetime.now(timezone.utc))
        self.saved_tail = len(data)
        if old is not None and old.key != key:
            await self.sessions.remove([old.key], lease)

    async def _save_digests(self) -> None:
        """The block digests of the chunks this request recorded go into a segment of their own,
        before the record that records the chunks: the record, which every request reads and
        rewrites, stays small (inline, the digests made it ~1.2 KB per 8 MiB chunk: 1.2 MB at
        1,000 chunks, 15 ms to parse), and the commit reads the segments once."""
        if not self.new_digests:
            return
        key = digests_key(self.durable.record.id, min(self.new_digests))
        self.lease.check()
        await guarded("saving the upload's block digests", self.sessions.backend.put(key, digests_doc(self.new_digests)))
        self.new_digests = {}

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
            if durable.tail is not None and index_of(durable.tail.key) < len(durable.chunks):
                durable.debris.append(durable.tail.key)  # its bytes are in a full chunk now
                durable.tail = None
            await self._save_tail()
        if self.received or durable.debris:
            await self.sessions.remove(durable.debris, self.lease)
            durable.debris = []
        await self._save_digests()
        now = self.sessions.clock()
        if record.state is UploadState.PENDING and self.received:
            record.enter(UploadState.RECEIVING, now)
        record.expires = now + self.sessions.options.expiry
        await self.sessions.put_record(durable, self.lease)
        if self.error is not None:
            raise self.error
