"""Garbage collection of the store: chunks no committed manifest references, and expired uploads.

What is garbage: chunks of replaced or deleted versions, chunks orphaned by uploads that crashed
before their commit, and expired tus upload sessions. A chunk is deleted only when (a) no record
read *after* the chunk listing references it, (b) no writer that may still commit its version
exists: no live tus session (``UploadsHook``) and no live write intent of a PUT
(``storage.intents``), read both before and after the records, (c) its version is older than
the grace period (version ids encode their creation time, ``storage.keys.version_time``), and
(d) when its object has a record, that record last changed more than the grace period ago,
because a version's replacement time is bounded by it: readers that fetched the old manifest
just before the replacement get that long to finish.

Races it is built around: a manifest committed during the walk references chunks that were
listed before it, so records are read after the chunk listing; a chunk written after the listing
is simply not seen. A writer writes its intent or session record before its first chunk and
clears it only once its commit landed (or it cleaned up), so a chunk gc listed either belongs to
a writer whose record gc reads next (protected), or to a commit that landed before that read
(referenced by the records read after), or to nobody. Reading the protected set only after the
records (as before) lost a tus upload that committed in between: it was in neither set.

Must never: delete a chunk a committed manifest references or a writer may still commit; delete
a lease record (storage.leases removes its own); remove a record unconditionally; import aiohttp or
``gateway``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from storage import intents, keys
from storage.backends.base import Backend
from storage.errors import CorruptManifest

if TYPE_CHECKING:  # storage.objects imports this module's neighbours; only the type is needed
    from storage.objects import ObjectStore

log = logging.getLogger("chunkgate.gc")

_DELETE_CONCURRENCY = 16
_READ_CONCURRENCY = 16


class UploadsHook(Protocol):
    """What gc needs from the tus upload sessions (``storage.uploads``), which own the format of
    the ``u/<id>/...`` records. ``storage.uploads.gc_hook(backend)`` returns one when present."""

    async def protected_versions(self) -> set[tuple[str, str]]:
        """(object key, version) of every upload session that may still commit."""
        ...

    async def sweep_expired(self, now: float, *, dry_run: bool) -> int:
        """Expire and remove sessions past their expiry (and their chunks); return how many."""
        ...


@dataclass
class GcReport:
    chunks_seen: int = 0
    chunks_referenced: int = 0
    chunks_deleted: int = 0
    bytes_deleted: int = 0
    versions_deleted: int = 0
    kept_in_grace: int = 0
    manifests: int = 0
    unreadable_manifests: list[str] = field(default_factory=list)
    uploads_expired: int = 0
    delete_errors: int = 0
    dry_run: bool = False

    def summary(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        return (
            f"gc: {self.manifests} manifests, {self.chunks_seen} chunks seen, {self.chunks_referenced} referenced, "
            f"{verb} {self.chunks_deleted} chunks ({self.bytes_deleted} bytes, {self.versions_deleted} versions), "
            f"{self.kept_in_grace} kept within grace, {self.uploads_expired} uploads expired, "
            f"{self.delete_errors} delete errors, {len(self.unreadable_manifests)} unreadable manifests"
        )


@dataclass(frozen=True, slots=True)
class _Chunk:
    store_key: str
    kid: str
    version: str
    size: int


def parse_chunk_key(store_key: str) -> tuple[str, str, int] | None:
    """``c/<kid[:2]>/<kid>/<version>/<index>`` -> (kid, version, index); None if not a chunk key."""
    parts = store_key.split("/")
    if len(parts) != 5 or parts[0] + "/" != keys.CHUNK_PREFIX or not parts[4].isdigit():
        return None
    if parts[2][:2] != parts[1] or len(parts[3]) < 13:
        return None
    try:
        keys.version_time(parts[3])
    except ValueError:
        return None
    return parts[2], parts[3], int(parts[4])


def default_uploads_hook(backend: Backend) -> UploadsHook:
    """The tus sessions' hook (``storage.uploads`` owns the format of its records)."""
    from storage.uploads import gc_hook

    return gc_hook(backend)


async def _protected(backend: Backend, hook: UploadsHook | None, now: float) -> set[tuple[str, str]]:
    """(key id, version) of every version whose writer may still commit: live tus sessions and
    live write intents of PUTs (``storage.intents``)."""
    found = {(keys.key_id(k), v) for k, v in await hook.protected_versions()} if hook is not None else set()
    for intent in await intents.scan(backend):
        if intent.key and intent.expires > now:
            found.add((keys.key_id(intent.key), intent.version))
    return found


@dataclass
class _Referenced:
    """What the manifest records say, read after the chunk listing."""

    chunks: set[str] = field(default_factory=set)
    committed_at: dict[str, float] = field(default_factory=dict)  # key id -> last change of its record
    damaged: set[str] = field(default_factory=set)  # key ids whose record cannot be read
    tombstones: list[Any] = field(default_factory=list)  # storage.manifests.Current of tombstones


async def _read_records(backend: Backend, report: GcReport) -> _Referenced:
    from storage.manifests import ManifestStore

    records = ManifestStore(backend)
    seen = _Referenced()
    names = [name async for name in records.scan()]
    sem = asyncio.Semaphore(_READ_CONCURRENCY)

    async def read(name: str) -> None:
        async with sem:
            try:
                current = await records.read(name)
            except CorruptManifest:
                report.unreadable_manifests.append(keys.manifest_key(name))
                seen.damaged.add(keys.key_id(name))
                return
            if current is None:
                return  # deleted during the walk: its chunks are garbage after grace
            kid = keys.key_id(name)
            manifest = current.manifest
            if manifest is None:
                changed = current.deleted_at or 0.0
                seen.tombstones.append(current)
            else:
                report.manifests += 1
                for ref in manifest.chunks:
                    seen.chunks.add(keys.chunk_key(name, manifest.version, ref.index))
                changed = max(manifest.created.timestamp(), keys.version_time(manifest.version))
            seen.committed_at[kid] = max(seen.committed_at.get(kid, 0.0), changed)

    await asyncio.gather(*(read(n) for n in names))
    return seen


def doomed_chunks(chunks: Iterable[_Chunk], seen: _Referenced, protected: set[tuple[str, str]], *,
                  now: float, grace: float) -> tuple[list[_Chunk], int, int]:
    """Pure: which unreferenced chunks may go (see the module docstring), and how many chunks
    were referenced and kept. Never a referenced chunk, a protected version, a young version,
    an object whose record changed within ``grace``, or any chunk of a damaged record's object."""
    doomed: list[_Chunk] = []
    referenced = kept = 0
    for c in chunks:
        if c.store_key in seen.chunks:
            referenced += 1
            continue
        young = now - keys.version_time(c.version) < grace or now - seen.committed_at.get(c.kid, 0.0) < grace
        if young or (c.kid, c.version) in protected or c.kid in seen.damaged:
            kept += 1
            continue
        doomed.append(c)
    return doomed, referenced, kept


async def collect(
    backend: Backend,
    *,
    grace: float,
    dry_run: bool = False,
    now: float | None = None,
    uploads: UploadsHook | None | str = "auto",
    progress: Callable[[int], None] | None = None,
    conditional_deletes: bool = True,
) -> GcReport:
    """One gc pass over the store behind ``backend``; see the module docstring for the rules.

    ``progress(n)`` is called as chunks are listed and deleted (for a progress bar).
    ``conditional_deletes``: what ``storage.probe`` found; without them tombstones are kept."""
    report = GcReport(dry_run=dry_run)
    hook = default_uploads_hook(backend) if uploads == "auto" else uploads
    assert not isinstance(hook, str)
    now = time.time() if now is None else now
    if hook is not None:
        report.uploads_expired = await hook.sweep_expired(now, dry_run=dry_run)

    # 1. Chunks first (see the module docstring: manifests are read after this).
    chunks: list[_Chunk] = []
    async for info in backend.list(keys.CHUNK_PREFIX):
        parsed = parse_chunk_key(info.key)
        if parsed is None:
            log.warning("gc: ignoring unexpected key %r under %s", info.key, keys.CHUNK_PREFIX)
            continue
        chunks.append(_Chunk(info.key, parsed[0], parsed[1], info.size))
        if progress is not None:
            progress(1)
    report.chunks_seen = len(chunks)

    # 2. The versions whose writers may still commit, then every record, then those versions
    #    again: a writer that commits while the records are read was protected before, and one
    #    that starts protecting while they are read is caught after.
    protected = await _protected(backend, hook, now)
    seen = await _read_records(backend, report)
    protected |= await _protected(backend, hook, now)
    if seen.damaged:
        log.error("gc: %d manifests are unreadable (run chunkgate fsck); keeping all their objects' chunks",
                  len(seen.damaged))

    # 3. Decide and delete.
    doomed, report.chunks_referenced, report.kept_in_grace = doomed_chunks(chunks, seen, protected, now=now, grace=grace)
    report.versions_deleted = len({(c.kid, c.version) for c in doomed})
    report.chunks_deleted = len(doomed)
    report.bytes_deleted = sum(c.size for c in doomed)
    if dry_run:
        return report
    await _delete(backend, doomed, report, progress)
    await _sweep_leftovers(backend, seen, {kid for kid, _ in protected}, now=now, grace=grace,
                           conditional_deletes=conditional_deletes)
    return report


async def _delete(backend: Backend, doomed: list[_Chunk], report: GcReport,
                  progress: Callable[[int], None] | None) -> None:
    del_sem = asyncio.Semaphore(_DELETE_CONCURRENCY)
    by_version: dict[tuple[str, str], list[_Chunk]] = {}
    for c in doomed:
        by_version.setdefault((c.kid, c.version), []).append(c)

    async def delete(version_chunks: list[_Chunk]) -> None:
        # One version's chunks one after another (versions in parallel): siblings share a
        # directory on the fs store, whose pruning of emptied directories races with a
        # concurrent delete next to it.
        async with del_sem:
            for c in version_chunks:
                try:
                    await backend.delete(c.store_key)
                except Exception as exc:  # noqa: BLE001 - one failure must not stop the sweep; next gc retries
                    report.delete_errors += 1
                    log.warning("gc: could not delete %s: %s", c.store_key, exc)
                if progress is not None:
                    progress(1)

    await asyncio.gather(*(delete(v) for v in by_version.values()))
    report.chunks_deleted -= report.delete_errors


async def _sweep_leftovers(backend: Backend, seen: _Referenced, busy_kids: set[str], *, now: float,
                           grace: float, conditional_deletes: bool) -> None:
    """Tombstones older than the grace period whose key no writer may still commit over (each
    removed by a conditional delete, so a commit over it since is never taken along; see
    storage.manifests on why a live upload keeps its key's tombstone), and expired intents."""
    from storage.manifests import ManifestStore

    records = ManifestStore(backend)
    records.conditional_deletes = conditional_deletes
    for tomb in seen.tombstones:
        if now - (tomb.deleted_at or 0.0) >= grace and keys.key_id(tomb.key) not in busy_kids:
            await records.remove_tombstone(tomb)
    for intent in await intents.scan(backend):
        if intent.expires <= now:
            await intents.end(backend, intent.version)


async def collect_store(store: ObjectStore, *, grace: float, dry_run: bool = False,
                        progress: Callable[[int], None] | None = None) -> GcReport:
    """``collect`` over the store an ObjectStore sits on, removing tombstones only where the
    store honours conditional deletes (its probe said so)."""
    return await collect(store.backend, grace=grace, dry_run=dry_run, progress=progress,
                         conditional_deletes=store.manifests.conditional_deletes)


async def run_periodically(store: ObjectStore, interval: float, grace: float,
                           on_report: Callable[[GcReport], None] | None = None) -> None:
    """Run ``collect_store`` every ``interval`` seconds (jittered, so gateways
    sharing a store do not all sweep at once) until cancelled. Failures are logged, never
    raised: gc is housekeeping and must not take the gateway down. Several gateways sweeping
    the same store at once is safe (deletes are idempotent), just wasted work."""
    if interval <= 0:
        return
    while True:
        await asyncio.sleep(random.uniform(0.5, 1.0) * interval)
        try:
            report = await collect_store(store, grace=grace)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("periodic gc failed")
            continue
        log.info("%s", report.summary())
        if on_report is not None:
            on_report(report)
