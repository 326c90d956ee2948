"""Garbage collection of the store: chunks no committed manifest references, and expired uploads.

What is garbage: chunks of replaced or deleted versions, chunks orphaned by uploads that crashed
before their commit, and expired tus upload sessions. A chunk is deleted only when (a) no
manifest read *after* the chunk listing references it, (b) its version is older than the grace
period (version ids encode their creation time, ``storage.keys.version_time``) -- which protects
uploads still writing chunks that have no manifest yet -- and (c) when its object still has a
manifest, that manifest was committed more than the grace period ago too, because a version's
replacement time is not recorded anywhere and the current manifest's commit bounds it; readers
that fetched the old manifest just before the replacement get that long to finish.
Chunks of live upload sessions are protected by the uploads hook (``UploadsHook``).

Races it is built around: a manifest committed during the walk references chunks that were
listed before it, so manifests are read after the chunk listing; a chunk written after the
listing is simply not seen. An upload or PUT whose commit comes later than ``grace`` after its
version was created could lose chunks; choose ``grace`` longer than any upload takes.

Must never: delete a chunk a committed manifest references; delete a lease record (fencing
tokens rely on them); import aiohttp or ``gateway``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from storage import keys
from storage.backends.base import Backend, NotFound
from storage.manifest import Manifest, ManifestError

log = logging.getLogger("chunkgate.gc")

_DELETE_CONCURRENCY = 16
_READ_CONCURRENCY = 16
_TERMINAL_UPLOAD_STATES = frozenset({"complete", "aborted", "expired"})


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


async def _fallback_uploads(backend: Backend) -> set[tuple[str, str]]:
    """Without a hook from ``storage.uploads``: protect every (key, version) named by a session
    record (``u/<id>/info``, JSON) that is not in a terminal state, rather than risk an upload
    in progress."""
    found: set[tuple[str, str]] = set()
    async for info in backend.list(keys.UPLOAD_PREFIX):
        if not info.key.endswith("/info"):
            continue  # partial chunk bytes ("tails"), not records
        try:
            doc = json.loads((await backend.get(info.key)).data)
        except (NotFound, ValueError):
            continue
        if not isinstance(doc, dict) or doc.get("state") in _TERMINAL_UPLOAD_STATES:
            continue
        if isinstance(doc.get("key"), str) and isinstance(doc.get("version"), str):
            found.add((doc["key"], doc["version"]))
    return found


def default_uploads_hook(backend: Backend) -> UploadsHook | None:
    """The tus sessions' hook, when that module provides one (``storage.uploads.gc_hook``)."""
    try:
        from storage import uploads  # type: ignore[attr-defined]
    except ImportError:
        return None
    make = getattr(uploads, "gc_hook", None)
    return make(backend) if make is not None else None


async def collect(
    backend: Backend,
    *,
    grace: float,
    dry_run: bool = False,
    now: float | None = None,
    uploads: UploadsHook | None | str = "auto",
    progress: Callable[[int], None] | None = None,
    busy: Callable[[], Iterable[tuple[str, str]]] | None = None,
) -> GcReport:
    """One gc pass over the store behind ``backend``; see the module docstring for the rules.

    ``progress(n)`` is called as chunks are listed and deleted (for a progress bar).
    ``busy()``: (key, version) pairs being written right now in this process (PUTs in
    flight), kept whatever their age; asked right after the chunk listing, before the manifests
    are read (a PUT that commits during the walk was busy then), and again before deciding."""
    report = GcReport(dry_run=dry_run)
    hook = default_uploads_hook(backend) if uploads == "auto" else uploads
    assert not isinstance(hook, str)
    now = time.time() if now is None else now

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
    writing = set(busy()) if busy is not None else set()

    # 2. Then every committed manifest: what is referenced, and when each object last changed.
    referenced: set[str] = set()
    committed_at: dict[str, float] = {}
    manifest_keys = [info.key async for info in backend.list(keys.MANIFEST_PREFIX)]
    sem = asyncio.Semaphore(_READ_CONCURRENCY)

    async def read(store_key: str) -> None:
        async with sem:
            try:
                blob = await backend.get(store_key)
            except NotFound:
                return  # deleted during the walk: its chunks are garbage after grace
            try:
                manifest = Manifest.from_json(blob.data, expect_key=keys.object_key_of_manifest(store_key))
            except ManifestError:
                report.unreadable_manifests.append(store_key)
                return
            report.manifests += 1
            kid = keys.key_id(manifest.key)
            for ref in manifest.chunks:
                referenced.add(keys.chunk_key(manifest.key, manifest.version, ref.index))
            committed = max(manifest.created.timestamp(), keys.version_time(manifest.version))
            committed_at[kid] = max(committed_at.get(kid, 0.0), committed)

    await asyncio.gather(*(read(k) for k in manifest_keys))
    # We cannot know what a damaged manifest references: keep every chunk of its object.
    damaged = {keys.key_id(keys.object_key_of_manifest(k)) for k in report.unreadable_manifests}
    if damaged:
        log.error("gc: %d manifests are unreadable (run chunkgate fsck); keeping all their objects' chunks",
                  len(damaged))

    protected: set[tuple[str, str]] = set()
    if hook is not None:
        report.uploads_expired = await hook.sweep_expired(now, dry_run=dry_run)
        protected = {(keys.key_id(k), v) for k, v in await hook.protected_versions()}
    else:
        protected = {(keys.key_id(k), v) for k, v in await _fallback_uploads(backend)}
    if busy is not None:
        writing |= set(busy())
    protected |= {(keys.key_id(k), v) for k, v in writing}

    # 3. Decide and delete.
    doomed: list[_Chunk] = []
    for c in chunks:
        if c.store_key in referenced:
            report.chunks_referenced += 1
            continue
        young = now - keys.version_time(c.version) < grace or now - committed_at.get(c.kid, 0.0) < grace
        if young or (c.kid, c.version) in protected or c.kid in damaged:
            report.kept_in_grace += 1
            continue
        doomed.append(c)
    report.versions_deleted = len({(c.kid, c.version) for c in doomed})
    report.chunks_deleted = len(doomed)
    report.bytes_deleted = sum(c.size for c in doomed)
    if dry_run:
        return report
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
                except Exception as exc:  # one failure must not stop the sweep; next gc retries
                    report.delete_errors += 1
                    log.warning("gc: could not delete %s: %s", c.store_key, exc)
                if progress is not None:
                    progress(1)

    await asyncio.gather(*(delete(v) for v in by_version.values()))
    report.chunks_deleted -= report.delete_errors
    return report


async def run_periodically(store: Any, interval: float, grace: float,
                           on_report: Callable[[GcReport], None] | None = None) -> None:
    """Run ``collect`` on ``store.backend`` every ``interval`` seconds (jittered, so gateways
    sharing a store do not all sweep at once) until cancelled. Failures are logged, never
    raised: gc is housekeeping and must not take the gateway down. Several gateways sweeping
    the same store at once is safe (deletes are idempotent), just wasted work."""
    if interval <= 0:
        return
    while True:
        await asyncio.sleep(random.uniform(0.5, 1.0) * interval)
        try:
            report = await collect(store.backend, grace=grace, busy=getattr(store, "writing_versions", None))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("periodic gc failed")
            continue
        log.info("%s", report.summary())
        if on_report is not None:
            on_report(report)
