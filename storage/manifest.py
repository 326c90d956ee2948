"""The manifest: the list of an object's chunks with their sizes and SHA-256, and its JSON form.

Pure: parsing, validation, ETag derivation and chunk arithmetic.

Block digests are versioned by the top-level ``block_hash`` field (storage.hashing): absent, the
chunks' ``blocks`` are hex SHA-256 lists (what earlier releases wrote, still read and verified);
``"xxh3-128"``, each chunk's ``block_digests`` is its blocks' XXH3-128 digests, concatenated
and base64-encoded (what this release writes). The new field names were chosen so an earlier
release reads a new manifest too: it ignores them and verifies whole chunks by SHA-256. A manifest read from the store
is hostile input until ``Manifest.from_json`` has validated it: a malformed one raises
``ManifestError`` and is never used to compute a read outside the object.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Iterator

from storage import hashing

FORMAT = "chunkgate.manifest/1"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ValueError):
    """A manifest that does not satisfy the format's invariants."""


@dataclass(frozen=True, slots=True)
class ChunkRef:
    index: int
    offset: int
    size: int
    sha256: str | None  # None only for manifests imported from systems that kept sizes only
    # Digest (``Manifest.block_hash``, hex) of each ``Manifest.block_size`` slice of the chunk,
    # when recorded: lets a small read (a player's seek) fetch and verify one block instead of
    # the whole chunk.
    blocks: tuple[str, ...] | None = None

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True, slots=True)
class Manifest:
    key: str
    version: str
    size: int
    content_type: str
    created: datetime
    chunk_size: int
    chunks: tuple[ChunkRef, ...]
    etag: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    block_size: int = 0  # 0: no block hashes recorded
    block_hash: str = hashing.BLOCK_HASH  # how ``ChunkRef.blocks`` were computed

    def __post_init__(self) -> None:
        width = 2 * hashing.DIGEST_BYTES.get(self.block_hash, 0)
        if not all(c.blocks is None or all(map(width.__eq__, map(len, c.blocks))) for c in self.chunks):
            # Digests of another scheme (a tus upload recorded by an earlier release): drop them,
            # so the chunk is verified whole instead of by blocks that would never match.
            object.__setattr__(self, "chunks", tuple(
                c if c.blocks is None or all(len(b) == width for b in c.blocks)
                else ChunkRef(c.index, c.offset, c.size, c.sha256, None) for c in self.chunks))
        if not self.etag:
            object.__setattr__(self, "etag", compute_etag(self.version, self.size, self.chunks))

    # -- arithmetic ------------------------------------------------------------------------
    def chunks_for(self, start: int, end: int) -> Iterator[ChunkRef]:
        """The chunks overlapping bytes ``[start, end)``, in order."""
        if start >= end:
            return
        # Bisect on offsets rather than start // chunk_size: a chunk re-recorded after tolerated
        # size drift (or a hostile manifest) need not be exactly chunk_size long.
        first = max(0, bisect.bisect_right(self.chunks, start, key=lambda c: c.offset) - 1)
        for ref in self.chunks[first:]:
            if ref.offset >= end:
                break
            if ref.end > start:
                yield ref

    @property
    def last_modified(self) -> datetime:
        return self.created

    def with_chunk(self, ref: ChunkRef) -> "Manifest":
        """A copy with chunk ``ref.index`` replaced (sizes re-summed, offsets recomputed, ETag
        recomputed): how a tolerated size drift is recorded."""
        chunks = list(self.chunks)
        chunks[ref.index] = ref
        offset = 0
        fixed = []
        for c in chunks:
            fixed.append(ChunkRef(c.index, offset, c.size, c.sha256, c.blocks))
            offset += c.size
        return replace(self, chunks=tuple(fixed), size=offset, etag="")

    # -- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = dict(self.extra)
        doc.update(
            {
                "format": FORMAT,
                "key": self.key,
                "version": self.version,
                "size": self.size,
                "content_type": self.content_type,
                "etag": self.etag,
                "created": self.created.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "chunk_size": self.chunk_size,
                "chunks": [_chunk_dict(c, self.block_hash) for c in self.chunks],
            }
        )
        if self.block_size:
            doc["block_size"] = self.block_size
        if self.block_hash != hashing.SHA256 and any(c.blocks is not None for c in self.chunks):
            doc["block_hash"] = self.block_hash
        return doc

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, raw: bytes, *, expect_key: str | None = None) -> "Manifest":
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ManifestError(f"manifest is not JSON: {type(exc).__name__}: {exc}") from None
        return cls.from_dict(doc, expect_key=expect_key)

    @classmethod
    def from_dict(cls, doc: Any, *, expect_key: str | None = None) -> "Manifest":
        if not isinstance(doc, dict):
            raise ManifestError("manifest is not a JSON object")
        if doc.get("format") != FORMAT:
            raise ManifestError(f"unknown manifest format {doc.get('format')!r}")
        key = _req(doc, "key", str)
        if expect_key is not None and key != expect_key:
            raise ManifestError(f"manifest names key {key!r}, expected {expect_key!r}")
        version = _req(doc, "version", str)
        if not re.fullmatch(r"[0-9a-zA-Z_-]{1,64}", version):
            raise ManifestError("manifest version id is malformed")
        size = _nonneg(doc, "size")
        chunk_size = _nonneg(doc, "chunk_size")
        content_type = doc.get("content_type") or "application/octet-stream"
        if not isinstance(content_type, str) or any(ord(c) < 0x20 for c in content_type):
            raise ManifestError("manifest content_type is malformed")
        created = _parse_time(doc.get("created"))
        block_size = doc.get("block_size", 0)
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 0:
            raise ManifestError("manifest field 'block_size' must be a non-negative integer")
        block_hash = doc.get("block_hash", hashing.SHA256)
        if not isinstance(block_hash, str):
            raise ManifestError("manifest field 'block_hash' must be a string")
        raw_chunks = doc.get("chunks")
        if not isinstance(raw_chunks, list):
            raise ManifestError("manifest chunks is not a list")
        chunks = []
        offset = 0
        for i, c in enumerate(raw_chunks):
            if not isinstance(c, dict):
                raise ManifestError(f"chunk {i} is not an object")
            index = c.get("index", i)
            if index != i:
                raise ManifestError(f"chunk {i} has index {index!r}")
            csize = _nonneg(c, "size", where=f"chunk {i}")
            if "offset" in c and c["offset"] != offset:
                raise ManifestError(f"chunk {i} offset {c['offset']!r} is not the running sum {offset}")
            sha = c.get("sha256")
            if sha is not None and (not isinstance(sha, str) or not _HEX64.match(sha)):
                raise ManifestError(f"chunk {i} sha256 is not 64 lowercase hex digits")
            blocks = c.get("blocks") if block_hash == hashing.SHA256 else None
            if block_hash == hashing.XXH3_128 and c.get("block_digests") is not None:
                blocks = _packed_blocks(c["block_digests"], csize, block_size, i)
            elif blocks is not None:
                if (not block_size or not isinstance(blocks, list) or len(blocks) != block_count(csize, block_size)
                        or not all(isinstance(b, str) and _HEX64.match(b) for b in blocks)):
                    raise ManifestError(f"chunk {i} blocks do not match its size and the block_size")
                blocks = tuple(blocks)
            chunks.append(ChunkRef(i, offset, csize, sha, blocks))
            offset += csize
        if offset != size:
            raise ManifestError(f"chunk sizes add up to {offset}, manifest says {size}")
        if chunks and chunk_size <= 0:
            raise ManifestError("manifest chunk_size must be positive")
        known = {"format", "key", "version", "size", "content_type", "etag", "created", "chunk_size", "chunks", "block_size",
                 "block_hash"}
        extra = {k: v for k, v in doc.items() if k not in known}
        etag = doc.get("etag") if isinstance(doc.get("etag"), str) else ""
        # A block hash of a later release is not understood here: its chunks are verified whole.
        scheme = block_hash if block_hash in hashing.DIGEST_BYTES else hashing.SHA256
        m = cls(key, version, size, content_type, created, chunk_size, tuple(chunks), "", extra, block_size, scheme)
        if etag and etag != m.etag and _is_strong_etag(etag):
            # Keep a stored ETag the format can vouch for (sizes-only imports keep theirs).
            object.__setattr__(m, "etag", etag)
        return m


def _packed_blocks(raw: Any, size: int, block_size: int, i: int) -> tuple[str, ...]:
    width = hashing.DIGEST_BYTES[hashing.XXH3_128]
    if not isinstance(raw, str) or not block_size:
        raise ManifestError(f"chunk {i} block_digests must be a base64 string, with a block_size")
    try:
        packed = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise ManifestError(f"chunk {i} block_digests are not valid base64") from None
    if len(packed) != width * block_count(size, block_size):
        raise ManifestError(f"chunk {i} block_digests do not match its size and the block_size")
    return tuple(packed.hex(" ", width).split()) if packed else ()  # C speed: 16k blocks in ~1 ms


def _chunk_dict(c: ChunkRef, block_hash: str) -> dict[str, Any]:
    doc: dict[str, Any] = {"index": c.index, "offset": c.offset, "size": c.size, "sha256": c.sha256}
    if c.blocks is not None:
        if block_hash == hashing.SHA256:
            doc["blocks"] = list(c.blocks)
        else:
            doc["block_digests"] = base64.b64encode(bytes.fromhex("".join(c.blocks))).decode()
    return doc


def block_count(size: int, block_size: int) -> int:
    return -(-size // block_size) if block_size else 0


def compute_etag(version: str, size: int, chunks: tuple[ChunkRef, ...] | list[ChunkRef]) -> str:
    """A strong ETag. From content when every chunk has a SHA-256 (the same bytes give the same
    ETag on every gateway), else from the version id."""
    if chunks and all(c.sha256 for c in chunks):
        h = hashlib.sha256(str(size).encode())
        for c in chunks:
            h.update(bytes.fromhex(c.sha256))  # type: ignore[arg-type]
        return f'"{h.hexdigest()[:32]}"'
    if not chunks:
        return '"' + hashlib.sha256(b"").hexdigest()[:32] + '"'
    return f'"v-{version}"'


def _is_strong_etag(value: str) -> bool:
    return len(value) >= 2 and value[0] == '"' and value[-1] == '"' and '"' not in value[1:-1]


def _req(doc: dict[str, Any], name: str, typ: type) -> Any:
    value = doc.get(name)
    if not isinstance(value, typ):
        raise ManifestError(f"manifest field {name!r} is missing or not a {typ.__name__}")
    return value


def _nonneg(doc: dict[str, Any], name: str, *, where: str = "manifest") -> int:
    value = doc.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ManifestError(f"{where} field {name!r} must be a non-negative integer")
    return value


def _parse_time(value: Any) -> datetime:
    if value is None:
        return datetime.now(timezone.utc).replace(microsecond=0)
    if not isinstance(value, str):
        raise ManifestError("manifest created is not a string")
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ManifestError(f"manifest created {value!r} is not an ISO 8601 time") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt
