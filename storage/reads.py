"""The read path: chunks fetched through the single-flight ``ChunkCache``, each checked against
its manifest before a byte of it is handed out, with read-ahead for sequential readers and block
reads for small cold ones.

Verification (``verify_chunk``) is a pure verdict; ``ChunkReader`` acts on it: it counts, logs,
and on tolerated size drift asks for a repair (``repair``, given by ``ObjectStore``) before
raising ``ChunkSizeDrift``.

Must never: import aiohttp or ``gateway``; skip, pad or truncate a chunk; hand out bytes of a
chunk that has not been checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncGenerator, AsyncIterator, Awaitable, Callable, Generic, Iterator, Protocol, Sequence, TypeVar

from storage import hashing, keys, readplan
from storage.backends.base import Backend, Blob, NotFound, PermanentError, TransientError
from storage.cache import ChunkCache, Loan
from storage.errors import ChunkRejected, ChunkSizeDrift, StoreFailed, StoreUnavailable, from_backend
from storage.manifest import ChunkRef, Manifest
from storage.tolerance import SizeTolerance, Verdict

if TYPE_CHECKING:
    from storage.objects import IntegrityStats, StoreOptions

log = logging.getLogger("chunkgate.objects")


@dataclass(frozen=True, slots=True)
class StoredChunk:
    """A chunk as fetched from the store: its bytes and the SHA-256 computed once at fetch."""

    data: bytes
    sha256: str | None


# ---------------------------------------------------------------------------------- verification
class Finding(enum.Enum):
    """What a chunk's stored size (and digest) say about it, against its manifest entry."""

    GOOD = "good"
    DRIFTED = "drifted"  # the size differs within tolerance: the manifest wants repairing
    WRONG_SIZE = "wrong_size"  # beyond tolerance: never served
    WRONG_DIGEST = "wrong_digest"  # the right size, other bytes: never served


def verify_chunk(tolerance: SizeTolerance, ref: ChunkRef, actual: int, sha256: str | None) -> Finding:
    """The verdict on a chunk of ``actual`` bytes whose digest is ``sha256`` (None: not computed)."""
    verdict = tolerance.verdict(ref.size, actual)
    if verdict is Verdict.EXACT:
        if sha256 is not None and ref.sha256 is not None and sha256 != ref.sha256:
            return Finding.WRONG_DIGEST
        return Finding.GOOD
    return Finding.WRONG_SIZE if verdict is Verdict.REJECTED else Finding.DRIFTED


def whole_chunk_digest(data: Any, manifest: Manifest, ref: ChunkRef, strict: bool = False) -> str:
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


def cache_key(manifest: Manifest, ref: ChunkRef, block: int | None = None) -> str:
    """The chunk cache's key for chunk ``ref`` of ``manifest`` (or for one of its verified
    blocks): the chunk's store key plus what its bytes are checked against (digest and size).
    Bytes cached under one manifest are then never served for another that records other bytes
    at the same store key: a chunk whose size drifted, its manifest repaired since (maybe by
    another gateway), must not be answered from the bytes cached before (the simulator's seeds
    36046 and 45502: a range served short of the length its headers promised)."""
    ck = keys.chunk_key(manifest.key, manifest.version, ref.index)
    if block is None:
        return f"{ck}@{ref.sha256 or ''}:{ref.size}"
    digest = ref.blocks[block] if ref.blocks is not None and block < len(ref.blocks) else ""
    return f"{ck}#{block}@{digest}:{ref.size}"


def cost(size: int) -> int:
    """What a cached chunk or block of ``size`` bytes is charged against the cache budget."""
    return size + 64


@contextlib.contextmanager
def chunk_errors(ck: str, doing: str, missing: str = "referenced by a committed manifest is missing") -> Iterator[None]:
    """The object-layer errors for a backend call on chunk ``ck``: a missing chunk is the store's
    failure (a committed manifest names it), anything else is translated by ``from_backend``."""
    try:
        yield
    except NotFound:
        raise StoreFailed(f"chunk {ck} {missing}") from None
    except (TransientError, PermanentError) as exc:
        raise from_backend(exc, doing) from exc


# ---------------------------------------------------------------------------------- pieces
class ChunkPiece:
    """Bytes ``[lo, hi)`` of one chunk, lent by the cache to the response sending them.

    ``view()`` is the bytes (fetched and checked again if the cache took the chunk back while
    the piece was idle); ``idle()`` says the holder keeps no reference into them for now (its
    client is not reading), so the cache may take the chunk back for a reader that waits for room.
    A piece is only valid until its reader asks for the next one."""

    __slots__ = ("_reader", "_manifest", "_ref", "lo", "hi", "_loan", "_data", "_on_idle")

    def __init__(self, reader: ChunkReader | None, manifest: Manifest | None, ref: ChunkRef | None, lo: int, hi: int,
                 loan: Loan[StoredChunk] | None, on_idle: Callable[[], None] | None = None, data: Any = None) -> None:
        self._reader, self._manifest, self._ref = reader, manifest, ref
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
        assert loan is not None and self._reader is not None and self._manifest is not None and self._ref is not None
        if loan.reclaimed:
            # Taken back while idle: borrow again (a cache hit, or a fetch that waits for room
            # like any other and is verified like any other).
            loan = self._loan = await self._reader.borrow(self._manifest, self._ref)
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


class ReadPlan(Protocol):
    """What a reader of an object decided from its manifest: the byte ranges to read (none:
    headers only). ``ObjectStore.open`` asks for a plan again when the manifest changes."""

    @property
    def spans(self) -> Sequence[tuple[int, int]]: ...


P = TypeVar("P", bound=ReadPlan)


@dataclass
class ObjectRead(Generic[P]):
    """An object opened for reading (``ObjectStore.open``): the manifest to answer from, the plan
    made from it, one stream of pieces per span, and the first piece, fetched and checked."""

    manifest: Manifest
    plan: P
    streams: list[AsyncGenerator[ChunkPiece, None]] = field(default_factory=list)
    first: ChunkPiece | None = None

    def take_first(self) -> ChunkPiece | None:
        """The first piece, now the caller's to release."""
        first, self.first = self.first, None
        return first

    async def views(self) -> AsyncIterator[Any]:
        """Every span's bytes in order, as bytes-like views (each valid until the next)."""
        for i, stream in enumerate(self.streams):
            first = self.take_first() if i == 0 else None
            if first is not None:
                try:
                    yield await first.view()
                finally:
                    first.release()
            async for piece in stream:
                yield await piece.view()

    async def aclose(self) -> None:
        """Give up what is left: the first piece's loan, every stream's read-ahead."""
        first = self.take_first()
        if first is not None:
            first.release()
        for stream in self.streams:
            await stream.aclose()


# ---------------------------------------------------------------------------------- reading
class ChunkReader:
    """Reads chunks of committed versions through ``cache``, checking each against its manifest."""

    def __init__(self, backend: Backend, cache: ChunkCache[StoredChunk], options: StoreOptions, stats: IntegrityStats,
                 repair: Callable[[Manifest], object]) -> None:
        self.backend, self.cache, self.options, self.stats = backend, cache, options, stats
        self._repair = repair

    async def open(self, manifest: Manifest, plan: P) -> ObjectRead[P]:
        """``plan``'s spans of ``manifest`` as streams, the first piece pulled (and so checked)
        before anything is sent. Raises what that first piece raises, with nothing left open."""
        read = ObjectRead(manifest, plan, [self.pieces(manifest, lo, hi) for lo, hi in plan.spans])
        try:
            spans = plan.spans
            if spans and spans[0][1] > spans[0][0]:
                read.first = await read.streams[0].__anext__()
        except BaseException:
            await read.aclose()
            raise
        return read

    async def pieces(self, manifest: Manifest, start: int, end: int) -> AsyncGenerator[ChunkPiece, None]:
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
        ) and cache_key(manifest, refs[0]) not in self.cache:
            yield ChunkPiece.of_bytes(await self._read_small(manifest, refs[0], start, end))
            return
        ahead = _ReadAhead(self, manifest)
        piece: ChunkPiece | None = None
        try:
            for n, ref in enumerate(refs):
                # The window opens as the reader proves it is still there (each chunk it took
                # widens it by one): a GET abandoned at once costs two chunks, not 1 + readahead.
                ahead.claim(refs[n + 1 : n + 1 + min(self.options.readahead, n + 1)])
                ahead.taking(ref)
                loan = await self.borrow(manifest, ref, owner=ahead.owner)
                lo = max(start, ref.offset) - ref.offset
                hi = min(end, ref.end) - ref.offset
                piece = ChunkPiece(self, manifest, ref, lo, hi, loan, ahead.give_up)
                yield piece
                piece.release()
                piece = None
        finally:
            if piece is not None:
                piece.release()
            ahead.give_up()

    async def borrow(self, manifest: Manifest, ref: ChunkRef, *, owner: object | None = None) -> Loan[StoredChunk]:
        """A loan of one chunk, from the cache or the store (single-flight), checked against ``ref``."""
        ck = keys.chunk_key(manifest.key, manifest.version, ref.index)
        loan = await self.cache.borrow(cache_key(manifest, ref), self.fetcher(ck, manifest, ref), size=cost(ref.size),
                                       owner=owner)
        try:
            stored = loan.value
            assert stored is not None
            self._checked(manifest, ref, len(stored.data), stored.sha256)
        except BaseException:
            loan.release()
            raise
        return loan

    async def chunk(self, manifest: Manifest, ref: ChunkRef, *, owner: object | None = None) -> StoredChunk:
        """One chunk, from the cache or the store (single-flight), checked against ``ref``."""
        ck = keys.chunk_key(manifest.key, manifest.version, ref.index)
        stored = await self.cache.get(cache_key(manifest, ref), self.fetcher(ck, manifest, ref), size=cost(ref.size),
                                      owner=owner)
        self._checked(manifest, ref, len(stored.data), stored.sha256)
        return stored

    def fetcher(self, ck: str, manifest: Manifest, ref: ChunkRef) -> Callable[[], Awaitable[StoredChunk]]:
        return lambda: self._fetch_chunk(ck, manifest, ref)

    async def _fetch_chunk(self, ck: str, manifest: Manifest, ref: ChunkRef) -> StoredChunk:
        with chunk_errors(ck, "reading a chunk"):
            blob = await self.backend.get(ck, view=True)  # read-only and never mutated: no copy needed
        if len(blob.data) != blob.size:
            raise StoreUnavailable(f"short read of {ck}: {len(blob.data)} of {blob.size} bytes")
        digest = None
        if self.options.verify_reads:
            # Off the event loop, as on the write path: hashing an 8 MiB chunk takes ~5 ms, and on
            # the loop it stalled every response in flight (21% of the gateway's samples in a cold
            # GET profile, ops/bench); hashlib and xxhash release the GIL meanwhile.
            check = functools.partial(whole_chunk_digest, blob.data, manifest, ref, self.options.verify_sha256)
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
            self.cache.get(cache_key(manifest, ref, b), self._block_fetcher(manifest, ref, ck, b),
                           size=cost(min(bs, ref.size - b * bs)))
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
        with chunk_errors(ck, "reading a chunk"):
            blob = await self.backend.get(ck, start=lo, end=hi, view=True)
        self._checked(manifest, ref, blob.size, None)
        if len(blob.data) != hi - lo:
            raise StoreUnavailable(f"short read of {ck}: {len(blob.data)} of {hi - lo} bytes")
        return blob

    def _checked(self, manifest: Manifest, ref: ChunkRef, actual: int, sha256: str | None) -> None:
        """Act on ``verify_chunk``'s verdict: count it, log it, and raise unless the chunk is good;
        on drift, ask for the manifest's repair first (the reader decides; the verdict is pure)."""
        finding = verify_chunk(self.options.tolerance, ref, actual, sha256)
        if finding is Finding.GOOD:
            return
        where: dict[str, Any] = dict(key=manifest.key, index=ref.index, expected=ref.size, actual=actual)
        if finding is Finding.WRONG_DIGEST:
            self.stats.checksum_mismatch += 1
            self.stats.size_rejected += 1
            log.error("chunk checksum mismatch: key=%r chunk=%d size=%d (same length, other bytes)", manifest.key, ref.index, actual)
            raise ChunkRejected(f"chunk {ref.index} of {manifest.key!r} has the right size but the wrong digest", **where)
        if finding is Finding.WRONG_SIZE:
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
        self._repair(manifest)
        raise ChunkSizeDrift(f"chunk {ref.index} of {manifest.key!r} is {actual} bytes, the manifest said {ref.size}", **where)


class _ReadAhead:
    """One sequential read's read-ahead claims in the cache."""

    def __init__(self, reader: ChunkReader, manifest: Manifest) -> None:
        self.reader, self.manifest = reader, manifest
        self.owner = object()
        self.claimed: list[str] = []

    def claim(self, refs: Sequence[ChunkRef]) -> None:
        cache = self.reader.cache
        for ahead in refs:
            name = cache_key(self.manifest, ahead)
            if name in self.claimed:
                continue
            fetch = self.reader.fetcher(keys.chunk_key(self.manifest.key, self.manifest.version, ahead.index),
                                        self.manifest, ahead)
            if not cache.prefetch(name, fetch, size=cost(ahead.size), owner=self.owner):
                break  # no free room: read on demand rather than evict someone's read-ahead
            self.claimed.append(name)

    def taking(self, ref: ChunkRef) -> None:
        """The reader now borrows ``ref``'s chunk itself: no longer a claim to give up."""
        name = cache_key(self.manifest, ref)
        if name in self.claimed:
            self.claimed.remove(name)

    def give_up(self) -> None:
        # Also when the reader stalled (a client that stopped reading): read-ahead is for readers
        # that keep up, and held for a stalled one it would keep others waiting for room.
        if self.claimed:
            self.reader.cache.release(self.owner, list(self.claimed))
            self.claimed.clear()
