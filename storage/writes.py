"""The write path: a PUT's body cut into chunks, each stored create-only under a version id no
other upload uses, read back for its size, its SHA-256 recorded; then the manifest committed
last, under the key's lock (``ObjectStore.commit_latest``).

Must never: import aiohttp or ``gateway``; overwrite a chunk; reuse a buffer a put may still be
sending from; delete chunks a commit whose outcome is unknown may name.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from contextlib import contextmanager
from typing import TYPE_CHECKING, AsyncIterable, AsyncIterator, Callable, Iterator, Protocol, Union, cast, runtime_checkable

from storage import hashing, intents, keys
from storage.backends.base import NotFound, PermanentError, PreconditionFailed, TransientError
from storage.buffers import ChunkBuffers
from storage.chunker import Chunk, Chunker
from storage.errors import BodyTooLarge, ChecksumMismatch, IncompleteBody, LockLapsed, StoreFailed, from_backend
from storage.locks import LeaseLost
from storage.manifest import ChunkRef, Manifest
from storage.manifests import Event

log = logging.getLogger("chunkgate.writes")

if TYPE_CHECKING:
    from storage.objects import ObjectStore

Check = Callable[[str | None], None]  # a request's preconditions, given the current ETag (or None)


@runtime_checkable
class BodyInto(Protocol):
    """A body that writes itself into the caller's buffer (gateway.body receives a socket's bytes
    straight into it), sparing the copies and per-piece work of a stream of ``bytes``."""

    async def readinto(self, buf: memoryview) -> int:
        """Fill ``buf`` with the next bytes of the body; fewer than ``len(buf)`` only when the
        body ends there, 0 once it has ended. Raises when the body cannot be had whole."""
        ...


@runtime_checkable
class BodyIntoSome(Protocol):
    """A body that writes itself into the caller's buffer and keeps no byte back: what a tus PATCH
    reads, which keeps every byte that arrived, also of a body that then failed."""

    @property
    def ended(self) -> bool:
        """Every byte of the body was handed over."""
        ...

    async def readinto_some(self, buf: memoryview, within: float | None = None) -> int:
        """Write into ``buf`` what the body brings within ``within`` seconds (maybe nothing), at
        most ``len(buf)``. Raises when the body failed, once the bytes before the failure were
        handed over."""
        ...


Body = Union[AsyncIterable[bytes], BodyInto]


@dataclass
class CommitAttempt:
    """Where a writer stands with its commit, for deciding what its chunks may become on failure:
    ``in_doubt`` while a record write may have landed, ``committed`` once one has."""

    in_doubt: bool = False
    committed: bool = False

    @property
    def may_have_landed(self) -> bool:
        return self.in_doubt or self.committed


@contextmanager
def lapse_means_retry(attempt: CommitAttempt, doing: str) -> Iterator[None]:
    """A ``LeaseLost`` before the write was sent (``commit_record`` checks the lease first) is
    ``LockLapsed``: nothing was committed, and sending the request again can succeed. Once the
    write may have landed, the error stays what it is."""
    try:
        yield
    except LeaseLost as exc:
        if attempt.may_have_landed:
            raise
        raise LockLapsed(f"the key's lock lapsed before {doing} could commit ({exc}); nothing was committed",
                         retry_after=1) from exc


@dataclass(frozen=True)
class BodyChecks:
    """What the client said its body is: checked once the whole body has been stored."""

    content_length: int | None = None
    content_md5: str | None = None
    sha256_hex: str | None = None


async def put(store: ObjectStore, key: str, body: Body, *, content_type: str, claims: BodyChecks,
              check: Check | None, owner: str, event: Event | None) -> Manifest:
    """``ObjectStore.put``'s pipeline (its docstring is the contract): intent, chunks, commit."""
    version = keys.new_version(store.clock())
    # The intent first, so gc in any process leaves this version's chunks alone until we
    # have committed or cleaned up (see storage.intents).
    await intents.begin(store.backend, key, version, expires=store.clock() + store.options.intent_seconds)
    writer = ChunkWriter(store, key, version)
    attempt = CommitAttempt()
    try:
        chunks = await store_body(writer, body, claims, store.options.max_object_size)
        manifest = Manifest(
            key=key,
            version=version,
            size=sum(c.size for c in chunks),
            content_type=content_type,
            created=datetime.fromtimestamp(store.clock(), timezone.utc).replace(microsecond=0),
            chunk_size=store.options.chunk_size,
            chunks=tuple(chunks),
            block_size=store.options.block_size,
        )
        announce = (store.announcement(event, manifest),) if event is not None else ()
        with lapse_means_retry(attempt, f"the PUT of {key!r}"):
            async with store.locks.hold(key, owner=owner, timeout=store.options.lock_timeout) as lease:
                await store.commit_latest(manifest, lease, attempt, check, announce)
    except BaseException:
        if attempt.in_doubt and not attempt.committed:
            # The manifest may still land and name these chunks: keep them and the intent,
            # which protects them from gc until it expires; then gc judges by the manifest.
            raise
        committed = attempt.committed

        async def clean_up() -> None:
            # The chunks first, then the intent: gc leaves them alone until the intent ends (or
            # expires, if this process dies first; gc then judges by the manifest).
            if not committed:
                await writer.abort()
            try:
                await intents.end(store.backend, version)
            except Exception as exc:  # noqa: BLE001 - it expires; gc then judges by the manifest
                log.warning("could not end the intent of %r version %s: %s", key, version, exc)

        # Not awaited here: on a stalled store each of these calls may take --store-timeout, and
        # the client's 504 is promised within it (README "A store that stalls").
        store.clean_up_later(clean_up())
        raise
    await asyncio.shield(intents.end(store.backend, version))
    return manifest


async def store_body(writer: ChunkWriter, body: Body, claims: BodyChecks,
                     limit: int | None) -> list[ChunkRef]:
    """Every chunk of ``body`` stored by ``writer``; raises if the body is not what ``claims`` say."""
    md5 = hashlib.md5() if claims.content_md5 else None
    whole_sha = hashlib.sha256() if claims.sha256_hex else None
    cs, buffers = writer.store.options.chunk_size, writer.store.buffers
    pieces = fill_chunks(body, cs, limit, buffers) if isinstance(body, BodyInto) else rechunk(body, cs, limit, buffers)
    async for piece in pieces:
        if md5:
            md5.update(piece)
        if whole_sha:
            whole_sha.update(piece)
        await writer.add(piece)
    chunks = await writer.finish()
    size = sum(c.size for c in chunks)
    if claims.content_length is not None and size != claims.content_length:
        raise IncompleteBody(f"the body ended after {size} of {claims.content_length} bytes")
    if md5 is not None:
        verify_md5(claims.content_md5 or "", md5.digest())
    if whole_sha is not None and whole_sha.hexdigest() != (claims.sha256_hex or "").lower():
        raise ChecksumMismatch("the body's SHA-256 does not match X-Checksum-SHA256")
    return chunks


class ChunkWriter:
    """Writes one version's chunks: each in a buffer of its own, at most N in flight.

    The bounded number of in-flight chunk uploads is what keeps memory at about
    (N + 1) x chunk size whatever the object size, and makes a slow store slow the client
    down (``add`` waits for a slot) instead of growing memory."""

    def __init__(self, store: ObjectStore, key: str, version: str, *, first_index: int = 0, first_offset: int = 0,
                 fence: Callable[[], None] | None = None, adopt: bool = False) -> None:
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
        # adopt: a tus upload's chunk key may already hold a copy a crashed or stale writer left
        # (``_adopt_existing``); a PUT's version is its own, so there a collision stays an error.
        self._adopt = adopt

    async def add(self, data: Chunk) -> None:
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

    async def _write(self, index: int, offset: int, data: Chunk) -> ChunkRef:
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
                # create-only: a PUT's chunk key is written once, ever, and a collision is a bug; a
                # tus upload's key may hold an earlier request's copy (adopt). A read-only view of a
                # lent buffer is bytes to every backend: they only read it.
                try:
                    await backend.put(ck, cast(bytes, data), if_none_match=True)
                except PreconditionFailed:
                    if not self._adopt:
                        raise
                    await self._adopt_existing(ck, data, digest)
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

    async def _adopt_existing(self, ck: str, data: Chunk, digest: str) -> None:
        """The key already holds a chunk: a copy an earlier request of the same upload wrote
        beyond a gap, or a crashed one left. Holding exactly these bytes, it is this chunk, and
        stays as it is. Nothing in a live upload deletes a chunk key the next writer may write
        again: a delete sent by a holder that then went stale can land late, after the next
        holder wrote and acknowledged the key. Only bytes that differ (the client sent others
        for this offset since) are replaced."""
        backend = self.store.backend
        stored = await backend.get(ck)
        if len(stored.data) == len(data) and await sha256_hex(stored.data) == digest:
            return
        if self._fence is not None:
            self._fence()
        await backend.delete(ck)
        if self._fence is not None:
            self._fence()
        await backend.put(ck, cast(bytes, data), if_none_match=True)

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


async def rechunk(body: AsyncIterable[bytes], chunk_size: int, limit: int | None,
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


async def fill_chunks(body: BodyInto, chunk_size: int, limit: int | None,
                      buffers: ChunkBuffers | None = None) -> AsyncIterator[Chunk]:
    """``body``'s chunks, each read straight into a buffer lent by ``buffers`` and handed on as a
    read-only view the writer gives back (the same rule as storage.chunker); the last may be
    short. Refuses a body past ``limit`` bytes."""
    pooled = buffers is not None and buffers.size == chunk_size
    total = 0
    while True:
        buf = buffers.take() if buffers is not None and pooled else bytearray(chunk_size)
        try:
            n = await body.readinto(memoryview(buf))
            total += n
            if limit is not None and total > limit:
                raise BodyTooLarge(f"the body passed the limit of {limit} bytes")
        except BaseException:
            if buffers is not None:
                buffers.give_back(buf)
            raise
        if not n:
            if buffers is not None:
                buffers.give_back(buf)
            return
        yield memoryview(buf)[:n].toreadonly()  # the writer now holds the buffer and gives it back
        if n < chunk_size:
            return


# Above this, hashing runs in a worker thread (hashlib and xxhash release the GIL): on the event
# loop an 8 MiB chunk stalled every response in flight for ~5 ms. Below it a thread hop costs more.
_HASH_OFF_LOOP_BYTES = 1 << 20


async def sha256_hex(data: bytes) -> str:
    """The SHA-256 of ``data``, off the event loop when it is large."""
    if len(data) > _HASH_OFF_LOOP_BYTES:
        return await asyncio.to_thread(hashing.sha256_hex, data)
    return hashing.sha256_hex(data)


async def digests(data: Chunk, block_size: int) -> tuple[str, tuple[str, ...] | None]:
    """The chunk's SHA-256 and its block digests in one sweep (``hashing.hash_chunk``), off the
    event loop when ``data`` is large."""
    if len(data) > _HASH_OFF_LOOP_BYTES:
        return await asyncio.to_thread(hashing.hash_chunk, data, block_size)
    return hashing.hash_chunk(data, block_size)


def verify_md5(header: str, digest: bytes) -> None:
    try:
        expected = base64.b64decode(header.strip(), validate=True)
    except ValueError:
        raise ChecksumMismatch("Content-MD5 is not valid base64") from None
    if expected != digest:
        raise ChecksumMismatch("the body's MD5 does not match Content-MD5")
