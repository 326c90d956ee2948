"""The commit protocol of a tus upload (``UploadCommitter``, for ``storage.uploads``; README,
"Commits and their outcomes"): the manifest from the upload's durable chunks, committed under the
object key's lock only over what the upload was to replace; ``committing`` recorded first, so a
crash between the two is finished by the next request; superseded, never committed over a later
write; aborted when the key can never be committed.

Must never: import aiohttp or ``gateway``; let an object appear at its key before the last byte
is in; commit an older upload over a write that came after its last bytes; delete the chunks of an
upload whose manifest may be committed.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Awaitable

from storage import keys
from storage.backends.base import ObjectInfo
from storage.errors import StoreFailed, StoreUnavailable, UploadConflict
from storage.keys import BadKey
from storage.locks import Lease
from storage.manifest import ChunkRef, Manifest, block_count
from storage.manifests import Contention, Event, Outcome, identity, version_of
from storage.objects import ChunkWriter, CommitAttempt, sha256_hex
from storage.upload_layout import Digests, DurableUpload, digests_prefix, guarded, parse_digests
from storage.upload_record import UploadRecord, UploadState

if TYPE_CHECKING:
    from storage.uploads import UploadSessions

log = logging.getLogger("chunkgate.uploads")


class UploadCommitter:
    """Completes the uploads of one ``UploadSessions``; the caller holds the upload's lease."""

    def __init__(self, sessions: UploadSessions) -> None:
        self.sessions = sessions

    async def complete(self, durable: DurableUpload, lease: Lease, *, inline: bool = False) -> None:
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

    async def _check_stored(self, durable: DurableUpload, lease: Lease) -> None:
        """Every chunk the manifest is to name is in the store, at its size: one listing per
        commit. Other requests take the record's word for the chunks it recorded
        (``recorded_chunks``); a chunk deleted behind the upload's back is found here, before a
        manifest names it. Still receiving: the record forgets it and everything after it, and
        the client is asked to send from there (409; HEAD gives the offset). In ``committing``
        no more bytes can come: the upload is aborted."""
        record = durable.record
        prefix = keys.chunk_prefix(record.key, record.version)
        stored = {info.key: info.size async for info in self.sessions.listing(prefix)}
        for index, info in enumerate(durable.chunks):
            if stored.get(info.key) == info.size:
                continue
            log.error("upload %s: chunk %d (%s) is not in the store as recorded", record.id, index, info.key)
            if record.state is UploadState.COMMITTING:
                await self._abort(durable, lease, f"chunk {index} was lost before it could be committed")
                raise StoreFailed(f"upload {record.id} lost data before it could be committed")
            record.hashes = {i: h for i, h in record.hashes.items() if i < index}
            record.blocks = {i: b for i, b in record.blocks.items() if i < index}
            await self.sessions.put_record(durable, lease)
            raise UploadConflict(f"chunk {index} of upload {record.id} is missing from the store; "
                                 f"ask HEAD for the offset and send the rest again")

    async def _digest_segments(self, record: UploadRecord) -> dict[tuple[int, str], list[str]]:
        """The block digests the upload's requests saved beside its record (``Appender``), by
        chunk index and SHA-256; read once, 16 at a time."""
        found: dict[tuple[int, str], list[str]] = {}
        slots = asyncio.Semaphore(16)

        async def read(key: str) -> Digests:
            async with slots:
                return parse_digests((await guarded("reading the upload's block digests", self.sessions.backend.get(key))).data)

        segment_keys = [k async for k in self.sessions.store_keys(digests_prefix(record.id))]
        for entries in await asyncio.gather(*(read(k) for k in segment_keys)):
            for index, (sha256, blocks) in entries.items():
                found[(index, sha256)] = blocks
        return found

    async def _manifest(self, durable: DurableUpload, lease: Lease,
                        digests: Awaitable[dict[tuple[int, str], list[str]]]) -> Manifest:
        """The manifest of the upload's version from its durable chunks: the saved tail becomes
        the final chunk, and chunks a dead request wrote without recording are hashed once."""
        record = durable.record
        if record.state is not UploadState.COMMITTING:
            # Before ``committing`` no manifest can name them; after, chunks are only ever
            # removed by what replaces the version, or by gc (which reads the manifests).
            await self.sessions.remove(durable.debris, lease)
            durable.debris = []
        if durable.tail is not None:
            # The last bytes were saved as a tail (a checkpoint, or the length was deferred):
            # they become the final chunk.
            blob = await guarded("reading the upload's last chunk", self.sessions.backend.get(durable.tail.key))
            writer = ChunkWriter(self.sessions.store, record.key, record.version, first_index=len(durable.chunks),
                                 first_offset=durable.offset - durable.tail.size, fence=lease.check)
            await writer.add(blob.data)
            (ref,) = await writer.finish()
            record.hashes[ref.index] = ref.sha256 or ""
            if ref.blocks is not None:
                record.blocks[ref.index] = list(ref.blocks)
            durable.debris.append(durable.tail.key)
            ck = keys.chunk_key(record.key, record.version, ref.index)
            durable.chunks.append(ObjectInfo(ck, ref.size, "", datetime.now(timezone.utc)))
            durable.tail = None
        segments = await digests
        refs: list[ChunkRef] = []
        offset = 0
        for index, info in enumerate(durable.chunks):
            digest = record.hashes.get(index)
            if not digest:
                # Written by a request that died before recording it: read it back once.
                blob = await guarded("reading back a chunk", self.sessions.backend.get(info.key))
                if len(blob.data) != info.size:
                    raise StoreUnavailable(f"short read of {info.key}")
                digest = await sha256_hex(blob.data)
                record.hashes[index] = digest
            blocks = record.blocks.get(index)  # inline: records of earlier releases, and the final chunk
            if blocks is None:
                # By the chunk's SHA-256 too: a segment of a request whose client sent other bytes
                # for this offset (the chunk was replaced since) does not count.
                blocks = segments.get((index, digest))
            block_size = self.sessions.store.options.block_size
            if blocks is not None and len(blocks) != block_count(info.size, block_size):
                blocks = None  # recorded under another block size: seeks fall back to the whole chunk
            refs.append(ChunkRef(index, offset, info.size, digest, tuple(blocks) if blocks is not None else None))
            offset += info.size
        return Manifest(
            key=record.key, version=record.version, size=offset, content_type=record.content_type,
            created=datetime.fromtimestamp(self.sessions.clock(), timezone.utc).replace(microsecond=0),
            chunk_size=record.chunk_size, chunks=tuple(refs), extra={"upload": record.id},
            block_size=self.sessions.store.options.block_size,
        )

    async def _commit(self, durable: DurableUpload, lease: Lease, *, inline: bool) -> None:
        """The commit protocol of an upload (README, "Commits"): under the object key's lock,
        read the key's record. Already ours: complete. Then the record to commit over: by the
        request that carried the last bytes (``inline``), whatever is current; by any later
        one, only what the last writing request saw (``UploadSessions.expect``) or what ``committing``
        recorded. Anything else means a later write came first, and the upload completes as
        superseded, never committed over it. ``committing`` is recorded, with what it
        replaces, durably before the manifest is written by a conditional write over it."""
        record = durable.record
        manifest: Manifest | None = None
        owner, timeout = f"tus-commit {record.id}", self.sessions.options.lock_timeout
        async with self.sessions.locks.hold(record.key, owner=owner, timeout=timeout) as key_lease:
            contention = Contention()
            for _ in contention:
                lease.check()
                current = await self.sessions.store.record(record.key)
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
                    # The block digests are read while the chunks are checked: both are listings
                    # that grow with the upload, and neither needs the other.
                    segments = asyncio.ensure_future(self._digest_segments(record))
                    try:
                        await self._check_stored(durable, lease)
                        manifest = await self._manifest(durable, lease, segments)
                    finally:
                        if not segments.done():
                            segments.cancel()
                        await asyncio.gather(segments, return_exceptions=True)
                if not (record.state is UploadState.COMMITTING and record.replaces_known):
                    record.enter(UploadState.COMMITTING, self.sessions.clock())
                    record.replaces, record.replaces_known = identity(current), True
                    await self.sessions.put_record(durable, lease)
                events = (self._announcement(record, manifest),) if self.sessions.announce else ()
                result = await self.sessions.store.commit_record(record.key, manifest, current, key_lease, CommitAttempt(),
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
        return self.sessions.store.announcement({"type": "post-finish", "metadata": dict(record.meta)}, manifest,
                                       upload_id=record.id)

    async def _supersede(self, durable: DurableUpload, lease: Lease, current: str | None) -> None:
        record = durable.record
        log.warning("upload %s completes without its own commit: %r is now version %s, not the %s it was to "
                    "replace (a later write came first)", record.id, record.key, current, record.replaces)
        record.superseded = True
        await self._mark_complete(durable, lease)
        # Unreferenced now (or soon: readers of it, had it been current, get the grace period).
        self.sessions.store.delete_version_later(record.key, record.version, len(durable.chunks))

    async def _abort(self, durable: DurableUpload, lease: Lease, why: str) -> None:
        record = durable.record
        # After ``committing``, a manifest naming the chunks may still land (an earlier commit
        # whose outcome was unknown): then they are left for gc, which judges by the manifests.
        may_be_named = record.state is UploadState.COMMITTING
        record.enter(UploadState.ABORTED, self.sessions.clock())
        await self.sessions.put_record(durable, lease)
        self.sessions.stats.aborted += 1
        log.warning("upload %s aborted: %s", record.id, why)
        if may_be_named:
            await self.sessions.remove(await self.sessions.leftovers(record.id), lease)
        else:
            await self.sessions.delete_data(record, lease)

    async def _mark_complete(self, durable: DurableUpload, lease: Lease) -> None:
        record = durable.record
        record.enter(UploadState.COMPLETE, self.sessions.clock())
        await self.sessions.put_record(durable, lease)
        self.sessions.stats.completed += 1
        # Tails and digest segments only: the version's chunks are the object's now (or were,
        # and are deleted with it), and chunks left beyond them by a stale writer are
        # unreferenced: gc takes them.
        await self.sessions.remove(await self.sessions.leftovers(record.id), lease)
        durable.debris = []
        durable.tail = None
