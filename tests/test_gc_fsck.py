"""``storage.gc``, ``storage.fsck`` and the ``chunkgate gc`` / ``chunkgate fsck`` commands.

gc: deletes chunks of replaced and deleted versions and crash orphans once past the grace
period, keeps everything a manifest references (also one committed during the walk), keeps
young chunks, chunks of live uploads and of unreadable manifests, and never touches leases.
fsck: reports each kind of damage per object, repairs tolerated drift, exits non-zero on damage.
The commands run as real processes on an fs store."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from storage import keys
from storage.backends.base import Backend
from storage.backends.fs import FsBackend
from storage.backends.memory import MemoryBackend
from storage.fsck import DAMAGED, OK, REPAIRED, fsck
from storage.gc import collect, parse_chunk_key
from storage.locks import LockManager
from storage.manifest import ChunkRef, Manifest
from storage.objects import ObjectStore, StoreOptions

pytestmark = pytest.mark.timeout(120)

CHUNK = 1024
HOUR = 3600.0
REPO = Path(__file__).resolve().parent.parent


def new_store(backend: Backend | None = None) -> ObjectStore:
    # A long grace in the store itself, so only gc removes replaced versions in these tests.
    return ObjectStore(backend or MemoryBackend(), LockManager(), StoreOptions(chunk_size=CHUNK, grace_seconds=10 * HOUR))


async def body(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def put(store: ObjectStore, key: str, data: bytes) -> Manifest:
    return await store.put(key, body(data), content_type="application/octet-stream")


async def chunk_keys(backend: Backend) -> set[str]:
    return {i.key async for i in backend.list(keys.CHUNK_PREFIX)}


def chunks_of(m: Manifest) -> set[str]:
    return {keys.chunk_key(m.key, m.version, r.index) for r in m.chunks}


async def orphan(backend: Backend, key: str, n: int, *, age: float = 0.0) -> set[str]:
    """Chunks of an upload that crashed before its commit, ``age`` seconds ago."""
    ms = int((time.time() - age) * 1000)
    version = f"{ms:013x}{os.urandom(8).hex()}"
    made = set()
    for i in range(n):
        ck = keys.chunk_key(key, version, i)
        await backend.put(ck, b"x" * CHUNK, if_none_match=True)
        made.add(ck)
    return made


@pytest.mark.parametrize(
    ("store_key", "expected"),
    [
        ("c/ab/abcdef/0190a0b0c0d0e1234567890abcdef/00000003", ("abcdef", "0190a0b0c0d0e1234567890abcdef", 3)),
        ("c/ab/abcdef/0190a0b0c0d0e1234567890abcdef/notanumber", None),
        ("c/xx/abcdef/0190a0b0c0d0e1234567890abcdef/00000000", None),  # fan-out does not match
        ("c/ab/abcdef/short/00000000", None),
        ("c/ab/abcdef/zzzzzzzzzzzzzzzz/00000000", None),
        ("m/c/ab/abcdef/0190a0b0c0d0e/00000000", None),
        ("c/ab/abcdef/0190a0b0c0d0e/00000000/extra", None),
    ],
)
def test_parse_chunk_key(store_key: str, expected: Any) -> None:
    assert parse_chunk_key(store_key) == expected


async def test_gc_removes_replaced_deleted_and_orphaned_chunks_and_keeps_referenced_ones() -> None:
    store = new_store()
    backend = store.backend
    v1 = await put(store, "a", b"1" * 3000)
    v2 = await put(store, "a", b"2" * 2500)  # replaces v1
    gone = await put(store, "b", b"b" * 2048)
    await store.delete("b")
    crashed = await orphan(backend, "c", 2)
    lease = keys.lease_key("a")
    await backend.put(lease, b'{"format": "chunkgate.lease/1", "token": 3}')
    before = await chunk_keys(backend)
    assert chunks_of(v1) | chunks_of(v2) | chunks_of(gone) | crashed == before

    report = await collect(backend, grace=HOUR, now=time.time() + 2 * HOUR)

    assert await chunk_keys(backend) == chunks_of(v2)
    assert report.chunks_deleted == len(before) - len(chunks_of(v2))
    assert report.versions_deleted == 3
    assert report.chunks_referenced == len(chunks_of(v2))
    assert (await backend.get(lease)).data  # leases are never collected
    assert (await store.head("a")).version == v2.version


async def test_gc_keeps_young_chunks_and_recently_replaced_versions() -> None:
    store = new_store()
    backend = store.backend
    await put(store, "a", b"1" * 3000)
    v2 = await put(store, "a", b"2" * 3000)
    young = await orphan(backend, "upload-in-progress", 2)  # written a moment ago
    old = await orphan(backend, "crashed-long-ago", 2, age=3 * HOUR)
    report = await collect(backend, grace=HOUR)
    left = await chunk_keys(backend)
    # v1 was replaced just now: readers that fetched its manifest still get the grace period.
    assert len(left) == 3 + 3 + 2 and young <= left and chunks_of(v2) <= left
    assert not (old & left)
    assert report.kept_in_grace == 5 and report.chunks_deleted == 2


async def test_gc_dry_run_reports_and_deletes_nothing() -> None:
    store = new_store()
    await put(store, "a", b"1" * 3000)
    await put(store, "a", b"2" * 3000)
    before = await chunk_keys(store.backend)
    report = await collect(store.backend, grace=0, dry_run=True)
    assert report.chunks_deleted == 3 and report.dry_run
    assert "would delete 3 chunks" in report.summary()
    assert await chunk_keys(store.backend) == before


class CommitDuringWalk:
    """A backend view that commits a manifest right after gc has listed the chunks."""

    def __init__(self, inner: Backend, commit: Any) -> None:
        self.inner, self.name, self._commit = inner, inner.name, commit

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def list(self, prefix: str = "", *, start_after: str | None = None) -> AsyncIterator[Any]:
        async for info in self.inner.list(prefix, start_after=start_after):
            yield info
        if prefix == keys.CHUNK_PREFIX and self._commit is not None:
            commit, self._commit = self._commit, None
            await commit()


async def test_gc_keeps_chunks_of_a_manifest_committed_during_the_walk() -> None:
    store = new_store()
    backend = store.backend
    # An old upload whose chunks are all stored but whose manifest is not committed yet.
    data = b"z" * 1500
    version = f"{int((time.time() - 2 * HOUR) * 1000):013x}{os.urandom(8).hex()}"
    refs = []
    for i, off in enumerate(range(0, len(data), CHUNK)):
        piece = data[off:off + CHUNK]
        await backend.put(keys.chunk_key("late", version, i), piece, if_none_match=True)
        refs.append(ChunkRef(i, off, len(piece), hashlib.sha256(piece).hexdigest()))
    manifest = Manifest(key="late", version=version, size=len(data), content_type="x/y",
                        created=datetime.now(UTC).replace(microsecond=0),
                        chunk_size=CHUNK, chunks=tuple(refs))

    async def commit() -> None:
        await store.commit(manifest)

    report = await collect(CommitDuringWalk(backend, commit), grace=0)  # type: ignore[arg-type]
    assert report.chunks_deleted == 0
    assert await chunk_keys(backend) == chunks_of(manifest)
    got = b"".join([bytes(p) async for p in store.read(await store.head("late"), 0, len(data))])
    assert got == data


async def test_gc_keeps_everything_of_an_object_whose_manifest_is_unreadable() -> None:
    store = new_store()
    backend = store.backend
    await put(store, "bad", b"1" * 3000)
    await put(store, "bad", b"2" * 3000)
    await put(store, "good", b"g" * 2000)
    await put(store, "good", b"h" * 2000)
    await backend.put(keys.manifest_key("bad"), b"{not json")
    report = await collect(backend, grace=0)
    assert report.unreadable_manifests == [keys.manifest_key("bad")]
    left = await chunk_keys(backend)
    assert sum(1 for k in left if k.startswith(keys.chunk_prefix("bad", "")[:-1])) == 6
    assert report.chunks_deleted == 2  # the replaced version of "good" only


async def test_gc_without_an_uploads_module_protects_versions_named_by_upload_records() -> None:
    store = new_store()
    backend = store.backend
    live = await orphan(backend, "big.mp4", 2, age=5 * HOUR)
    version = next(iter(live)).split("/")[3]
    await backend.put("u/abc123/info", json.dumps({"key": "big.mp4", "version": version, "state": "receiving"}).encode())
    await backend.put("u/abc123/t/00000002", b"partial chunk bytes")
    dead = await orphan(backend, "dead.mp4", 2, age=5 * HOUR)
    dead_version = next(iter(dead)).split("/")[3]
    await backend.put("u/def456/info", json.dumps({"key": "dead.mp4", "version": dead_version, "state": "aborted"}).encode())
    report = await collect(backend, grace=HOUR)
    left = await chunk_keys(backend)
    assert live <= left and not (dead & left)
    assert report.chunks_deleted == 2


class FakeUploads:
    def __init__(self, protected: set[tuple[str, str]]) -> None:
        self.protected, self.swept = protected, []

    async def protected_versions(self) -> set[tuple[str, str]]:
        return self.protected

    async def sweep_expired(self, now: float, *, dry_run: bool) -> int:
        self.swept.append((now, dry_run))
        return 4


async def test_gc_asks_the_uploads_hook_what_to_keep_and_to_sweep_expired_sessions() -> None:
    store = new_store()
    backend = store.backend
    live = await orphan(backend, "tus.mp4", 3, age=5 * HOUR)
    version = next(iter(live)).split("/")[3]
    hook = FakeUploads({("tus.mp4", version)})
    report = await collect(backend, grace=HOUR, uploads=hook)
    assert live <= await chunk_keys(backend)
    assert report.uploads_expired == 4 and hook.swept and hook.swept[0][1] is False


# ------------------------------------------------------------------------------------ fsck

async def damaged_store() -> tuple[ObjectStore, dict[str, Manifest]]:
    store = new_store()
    b = store.backend
    made = {name: await put(store, name, bytes([n]) * 3000) for n, name in enumerate(
        ["fine", "missing", "bitrot", "drift", "toolong"])}
    m = made["missing"]
    await b.delete(keys.chunk_key("missing", m.version, 1))
    m = made["bitrot"]
    await b.delete(keys.chunk_key("bitrot", m.version, 0))
    await b.put(keys.chunk_key("bitrot", m.version, 0), b"\xff" * CHUNK)
    m = made["drift"]  # last chunk 952 bytes; within the 2048-byte tolerance
    await b.delete(keys.chunk_key("drift", m.version, 2))
    await b.put(keys.chunk_key("drift", m.version, 2), b"\x03" * 950)
    m = made["toolong"]
    await b.delete(keys.chunk_key("toolong", m.version, 2))
    await b.put(keys.chunk_key("toolong", m.version, 2), b"\x04" * 9000)
    await put(store, "unreadable", b"u" * 10)
    await b.put(keys.manifest_key("unreadable"), b"[]")
    return store, made


@pytest.mark.parametrize(
    ("key", "status", "problem"),
    [
        ("fine", OK, ""),
        ("missing", DAMAGED, "chunk 1 is missing"),
        ("bitrot", DAMAGED, "chunk 0 has the right size but the wrong SHA-256"),
        ("drift", DAMAGED, "chunk 2 is 950 bytes, the manifest says 952 (within tolerance)"),
        ("toolong", DAMAGED, "chunk 2 is 9000 bytes, the manifest says 952 (beyond tolerance)"),
        ("unreadable", DAMAGED, "the manifest is unreadable"),
    ],
)
async def test_fsck_reports_each_kind_of_damage(key: str, status: str, problem: str) -> None:
    store, _ = await damaged_store()
    report = await fsck(store)
    (result,) = [o for o in report.objects if o.key == key]
    assert result.status == status
    assert problem in result.line()
    assert not report.clean and len(report.damaged) == 5


async def test_fsck_repair_fixes_tolerated_drift_and_reports_the_rest() -> None:
    store, _ = await damaged_store()
    report = await fsck(store, repair=True)
    by_key = {o.key: o for o in report.objects}
    assert by_key["drift"].status == REPAIRED and "952 -> 950" in by_key["drift"].line()
    assert {o.key for o in report.damaged} == {"missing", "bitrot", "toolong", "unreadable"}
    data = b"".join([bytes(p) async for p in store.read(await store.head("drift"), 0, 2998)])
    assert data == b"\x03" * 2998  # taken as stored: 2 full chunks + the 950-byte last one
    again = await fsck(store)
    assert {o.key for o in again.damaged} == {"missing", "bitrot", "toolong", "unreadable"}


async def test_fsck_sample_checks_only_that_many_objects() -> None:
    store, _ = await damaged_store()
    report = await fsck(store, sample=2)
    assert len(report.objects) == 2 and report.total_objects == 6
    assert "a sample of 6" in report.summary()


async def test_fsck_of_a_healthy_store_is_clean() -> None:
    store = new_store()
    for n in range(5):
        await put(store, f"k{n}", os.urandom(2500))
    report = await fsck(store)
    assert report.clean and [o.status for o in report.objects] == [OK] * 5


# ------------------------------------------------------------------------------------ CLI

def chunkgate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, check=False,
                          env=full_env, cwd=REPO, timeout=60)


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["gc", "--grace", "soon"], "--grace"),
        (["gc", "--store", "s3://Bad_Bucket"], "--store"),
        (["fsck", "--sample", "-3"], "--sample"),
        (["fsck", "--locks", "sometimes"], "--locks"),
        (["fsck", "--size-tolerance-ratio", "7"], "--size-tolerance-ratio"),
        (["gc", "--lock-stale-after", "0"], "--lock-stale-after"),
    ],
)
def test_bad_configuration_is_one_line_and_exit_2(args: list[str], flag: str, tmp_path: Path) -> None:
    done = chunkgate(*args, env={"CHUNKGATE_STORE": str(tmp_path / "store")})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], done.stderr


def test_bad_grace_from_the_environment_is_exit_2(tmp_path: Path) -> None:
    done = chunkgate("gc", "--store", str(tmp_path), env={"CHUNKGATE_GRACE": "later"})
    assert done.returncode == 2 and "--grace" in done.stderr and "Traceback" not in done.stderr


async def test_commands_on_an_fs_store(tmp_path: Path) -> None:
    root = tmp_path / "store"
    backend = FsBackend(root)
    store = new_store(backend)
    await put(store, "videos/a.mp4", b"1" * 3000)
    keep = await put(store, "videos/a.mp4", b"2" * 3000)
    m = await put(store, "videos/b.mp4", b"b" * 2500)
    await backend.delete(keys.chunk_key("videos/b.mp4", m.version, 0))
    await backend.put(keys.chunk_key("videos/b.mp4", m.version, 0), b"b" * (CHUNK - 10))

    checked = chunkgate("fsck", "--store", str(root))
    assert checked.returncode == 1
    assert "damaged   videos/b.mp4: chunk 0 is 1014 bytes" in checked.stdout
    assert "ok        videos/a.mp4 (3 chunks)" in checked.stdout
    assert "fsck: 2 objects checked: 1 ok, 0 repaired, 1 damaged" in checked.stdout

    repaired = chunkgate("fsck", "--repair", env={"CHUNKGATE_STORE": str(root)})
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "repaired  videos/b.mp4: chunk 0: 1024 -> 1014 bytes" in repaired.stdout
    assert chunkgate("fsck", "--store", str(root), "--quiet").stdout.strip().splitlines() == [
        "fsck: 2 objects checked: 2 ok, 0 repaired, 0 damaged"]

    dry = chunkgate("gc", "--store", str(root), "--grace", "0", "--dry-run")
    assert dry.returncode == 0 and "would delete 3 chunks" in dry.stdout
    kept = chunkgate("gc", "--store", str(root))  # default grace 1h: everything is young
    assert kept.returncode == 0 and "deleted 0 chunks" in kept.stdout
    swept = chunkgate("gc", "--store", str(root), "--grace", "0")
    assert swept.returncode == 0 and "deleted 3 chunks" in swept.stdout, swept.stdout + swept.stderr
    left = await chunk_keys(FsBackend(root))
    assert chunks_of(keep) <= left and len(left) == 3 + 3


async def test_serve_runs_gc_periodically_and_counts_what_it_deleted() -> None:
    import aiohttp

    from gateway.config import ServeConfig
    from storage import keys
    from storage.backends.memory import MemoryBackend
    from tests.support.gateway import in_process_gateway

    backend = MemoryBackend()
    orphan = keys.chunk_key("crashed/upload.mp4", "0000000000001" + "00" * 8, 0)  # a version from 1970
    await backend.put(orphan, b"left behind by a crash")
    async with in_process_gateway(ServeConfig(gc_interval=0.2, grace=0), backend=backend) as (url, _app):
        async with aiohttp.ClientSession() as s:
            for _ in range(50):
                await asyncio.sleep(0.1)
                async with s.get(f"{url}/metrics") as r:
                    text = await r.text()
                if 'chunkgate_gc_deleted_total{kind="chunk"} 1.0' in text:
                    break
            assert 'chunkgate_gc_deleted_total{kind="chunk"} 1.0' in text
            assert "chunkgate_gc_runs_total" in text
        assert [i.key async for i in backend.list(keys.CHUNK_PREFIX)] == []


async def test_gc_never_takes_the_chunks_of_a_put_still_running_anywhere() -> None:
    # The PUT's write intent (storage.intents) protects its chunks from a gc in any process,
    # however long the upload takes within the intent's lifetime; age alone would not.
    from storage.objects import ObjectStore, StoreOptions

    backend = MemoryBackend()
    store = ObjectStore(backend, LockManager(), StoreOptions(chunk_size=1024, grace_seconds=60))
    release = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield os.urandom(3000)  # two whole chunks get written...
        await release.wait()  # ...then the client is slow
        yield os.urandom(100)

    put = asyncio.ensure_future(store.put("slow/video.mp4", slow_body(), content_type="video/mp4"))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if len([i async for i in backend.list(keys.CHUNK_PREFIX)]) >= 2:
            break
    hours_later = time.time() + 2 * 3600  # the version is 2 h old: beyond a 1 h grace
    report = await collect(backend, grace=3600, now=hours_later, uploads=None)
    assert report.chunks_deleted == 0 and report.kept_in_grace >= 2
    release.set()
    manifest = await put
    data = b"".join([bytes(p) async for p in store.read(manifest, 0, manifest.size)])
    assert len(data) == 3100
    # Once committed, the intent is gone and the chunks are referenced: still nothing to delete.
    assert [i.key async for i in backend.list(keys.INTENT_PREFIX)] == []
    report = await collect(backend, grace=3600, now=hours_later, uploads=None)
    assert report.chunks_deleted == 0


async def test_gc_takes_the_chunks_of_a_crashed_put_once_its_intent_expired() -> None:
    from storage import intents

    backend = MemoryBackend()
    version = keys.new_version(time.time() - 3 * 86400)
    await intents.begin(backend, "crashed.mp4", version, expires=time.time() - 86400)
    await backend.put(keys.chunk_key("crashed.mp4", version, 0), b"orphan", if_none_match=True)
    report = await collect(backend, grace=3600, uploads=None)
    assert report.chunks_deleted == 1
    assert [i.key async for i in backend.list("")] == []  # the expired intent went too


async def test_a_replaced_version_committed_again_is_not_deleted_after_the_grace() -> None:
    from storage.objects import ObjectStore, StoreOptions

    async def body(data: bytes) -> AsyncIterator[bytes]:
        yield data

    backend = MemoryBackend()
    store = ObjectStore(backend, LockManager(), StoreOptions(chunk_size=1024, grace_seconds=0.1))
    first = await store.put("k", body(b"a" * 2000), content_type="x/y")
    await store.put("k", body(b"b" * 10), content_type="x/y")  # schedules deletion of `first`
    await store.commit(first)  # ...which becomes current again (a resumed commit, say)
    await asyncio.sleep(0.4)
    data = b"".join([bytes(p) async for p in store.read(await store.head("k"), 0, 2000)])
    assert data == b"a" * 2000
