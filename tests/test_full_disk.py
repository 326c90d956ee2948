"""A full disk under the fs store, for real: an 8 MiB tmpfs mounted as the store of a real
``chunkgate serve`` process, filled with PUTs until the store refuses.

What a user must see: a 507 ``store_full`` JSON error without Retry-After (retrying cannot help
until space is freed), never a 500 or a 503; everything stored before still reads byte-exact;
no temp file or chunk of a refused write left behind; fsck clean; after deleting objects a new
PUT works, and a tus upload refused with 507 mid-way resumes from its offset and completes.

Needs root (mount); skips with the reason otherwise.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gateway import GatewayProcess

pytestmark = pytest.mark.timeout(180)

KIB = 1024
MIB = 1024 * KIB
CHUNK = 256 * KIB
TUS = {"Tus-Resumable": "1.0.0"}


REPO = Path(__file__).resolve().parent.parent


def _small_tmpfs(options: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a real full disk) needs root")
    path = Path(tempfile.mkdtemp(prefix="chunkgate-full-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                             check=False, capture_output=True, text=True)
    if mounted.returncode != 0:
        path.rmdir()
        pytest.skip(f"mount -t tmpfs failed: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
        path.rmdir()


@pytest.fixture
def full_disk_dir() -> Iterator[Path]:
    yield from _small_tmpfs("size=8m")


@pytest.fixture
def full_disk_inodes() -> Iterator[Path]:
    """Room for bytes, but only a few dozen files and directories."""
    yield from _small_tmpfs("size=8m,nr_inodes=48")


@pytest.fixture(params=["local", "store"])
def gateway(full_disk_dir: Path, request: pytest.FixtureRequest) -> Iterator[GatewayProcess]:
    # --locks store: every write also rewrites a lease record in the (full) store.
    gw = GatewayProcess(["--store", str(full_disk_dir), "--chunk-size", str(CHUNK), "--grace", "0s",
                         "--locks", request.param, "--log-level", "warning"], env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    gw.locks = request.param  # type: ignore[attr-defined]
    try:
        yield gw
    finally:
        gw.stop()


def chunkgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], check=False, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})


def temp_files(root: Path) -> list[str]:
    return [os.path.join(d, n) for d, _, names in os.walk(root) for n in names if n.startswith(".tmp-")]


def chunk_files(root: Path) -> int:
    return sum(len(names) for _, _, names in os.walk(root / "c"))


def assert_store_full(r: requests.Response) -> None:
    assert r.status_code == 507, (r.status_code, r.text)
    assert r.headers["Content-Type"].startswith("application/json")
    assert "Retry-After" not in r.headers
    if r.request.method != "HEAD":
        assert r.json()["error"] == "store_full"
        assert r.json()["message"]


def meta(**pairs: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in pairs.items())


def status_counts(url: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(requests.get(url + "/metrics", timeout=10).text):
        if family.name == "chunkgate_http_requests":
            for s in family.samples:
                if s.name.endswith("_total"):
                    counts[s.labels["status"]] = counts.get(s.labels["status"], 0) + s.value
    return counts


def test_full_disk_is_507_reads_go_on_and_writes_recover_once_space_is_freed(full_disk_dir: Path,
                                                                             gateway: GatewayProcess) -> None:
    url = gateway.url
    http = requests.Session()
    stored: dict[str, bytes] = {}

    # A tus upload started while there is room: its first bytes are in.
    upload = os.urandom(CHUNK + 100 * KIB)
    r = http.post(url + "/uploads/", headers={**TUS, "Upload-Length": str(len(upload)),
                                              "Upload-Metadata": meta(key="tus/resumed.bin")}, timeout=30)
    assert r.status_code == 201, r.text
    location = r.headers["Location"]
    r = http.patch(location, data=upload[:64 * KIB], timeout=30,
                   headers={**TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"})
    assert r.status_code == 204, r.text

    # Fill with 1 MiB objects until the store refuses, then with 64 KiB ones until it refuses
    # again: the disk is as full as PUTs can make it.
    refused: list[requests.Response] = []
    written = 0
    for size in (MIB, 64 * KIB):
        for n in range(200):
            data = os.urandom(size)
            key = f"fill/{size}-{n}.bin"
            r = http.put(f"{url}/objects/{key}", data=data, timeout=30)
            if r.status_code == 201:
                stored[key] = data
                written += 1
                continue
            refused.append(r)
            break
        else:
            pytest.fail(f"an 8 MiB disk took 200 objects of {size} bytes")
    assert len(stored) >= 4, "the disk filled before a few objects were in"
    # More writes of every kind: all refused the same way, none half-done.
    refused.append(http.put(f"{url}/objects/fill/again.bin", data=os.urandom(MIB), timeout=30))
    refused.append(http.post(url + "/uploads/", data=os.urandom(512 * KIB), timeout=30,
                             headers={**TUS, "Upload-Length": str(512 * KIB), "Upload-Metadata": meta(key="tus/cwu.bin"),
                                      "Content-Type": "application/offset+octet-stream"}))
    r = http.patch(location, data=upload[64 * KIB:], timeout=30,
                   headers={**TUS, "Upload-Offset": str(64 * KIB), "Content-Type": "application/offset+octet-stream"})
    refused.append(r)
    for r in refused:
        assert_store_full(r)
    assert refused[-1].headers["Tus-Resumable"] == "1.0.0"

    # Reads go on, byte-exact; the upload still reports where it stands.
    for key, data in stored.items():
        got = http.get(f"{url}/objects/{key}", timeout=30)
        assert got.status_code == 200 and hashlib.sha256(got.content).digest() == hashlib.sha256(data).digest(), key
    key0, data0 = next(iter(stored.items()))
    part = http.get(f"{url}/objects/{key0}", headers={"Range": "bytes=1000-300000"}, timeout=30)
    assert part.status_code == 206 and part.content == data0[1000:300001]
    r = http.head(location, headers=TUS, timeout=30)
    assert r.status_code == 200
    offset = int(r.headers["Upload-Offset"])
    assert 64 * KIB <= offset < len(upload)

    # Another process takes the last bytes: now even a DELETE (its tombstone, its lease) has no
    # room, and is refused the same way; reads still go on. Freeing that space is the way out.
    filler = full_disk_dir / ".filler"  # a name the fs store never lists
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass  # ENOSPC: the disk is full to the last page
    finally:
        os.close(fd)
    r = http.delete(f"{url}/objects/{key0}", timeout=30)
    assert_store_full(r)
    refused.append(r)
    r = http.post(url + "/uploads/", headers={**TUS, "Upload-Length": "1000", "Upload-Metadata": meta(key="tus/new.bin")},
                  timeout=30)  # a tus creation: its record has no room either
    assert_store_full(r)
    refused.append(r)
    assert http.get(f"{url}/objects/{key0}", timeout=30).content == data0
    r = http.head(location, headers=TUS, timeout=30)
    if gateway.locks == "local":
        assert r.status_code == 200 and r.headers["Upload-Offset"] == str(offset)
    else:
        assert_store_full(r)  # a HEAD takes the upload's lease, a record in the store: no room for it
        refused.append(r)
    # A gateway (re)started on the full disk comes up and serves reads, is ready, says the store
    # is full, and refuses writes the same way; fsck runs on the full disk too.
    second = GatewayProcess(["--store", str(full_disk_dir), "--chunk-size", str(CHUNK), "--locks", gateway.locks,
                             "--log-level", "error"], env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    try:
        assert http.get(f"{second.url}/objects/{key0}", timeout=30).content == data0
        ready = http.get(f"{second.url}/readyz", timeout=30)
        assert ready.status_code == 200 and ready.json()["store_full"] is True, ready.text
        assert_store_full(http.put(f"{second.url}/objects/fill/second.bin", data=b"x" * 5000, timeout=30))
    finally:
        second.stop()
    fsck = chunkgate("fsck", "--store", str(full_disk_dir), "--quiet")
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    filler.unlink()

    # Nothing of the refused writes is left: no temp file, no chunk beyond the stored objects'
    # and the upload's durable ones; fsck finds every object whole.
    assert temp_files(full_disk_dir) == []
    expected_chunks = sum(-(-len(d) // CHUNK) for d in stored.values()) + offset // CHUNK
    assert chunk_files(full_disk_dir) == expected_chunks
    fsck = chunkgate("fsck", "--store", str(full_disk_dir), "--quiet")
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    # Free space: delete the big objects (their chunks go at once: --grace 0s), then write again.
    freed_at = time.monotonic()
    for key in [k for k in stored if k.startswith(f"fill/{MIB}-")][:3]:
        assert http.delete(f"{url}/objects/{key}", timeout=30).status_code == 204
        del stored[key]
    gc = chunkgate("gc", "--store", str(full_disk_dir), "--grace", "0s")
    assert gc.returncode == 0, gc.stdout + gc.stderr
    data = os.urandom(MIB)
    r = http.put(f"{url}/objects/after/full.bin", data=data, timeout=30)
    assert r.status_code == 201, r.text
    stored["after/full.bin"] = data
    # The refused upload resumes from its offset and completes.
    r = http.patch(location, data=upload[offset:], timeout=30,
                   headers={**TUS, "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"})
    assert r.status_code == 204, r.text
    recovered = time.monotonic() - freed_at
    got = http.get(f"{url}/objects/tus/resumed.bin", timeout=30)
    assert got.status_code == 200 and got.content == upload
    for key, data in stored.items():
        assert http.get(f"{url}/objects/{key}", timeout=30).content == data, key

    assert temp_files(full_disk_dir) == []
    fsck = chunkgate("fsck", "--store", str(full_disk_dir), "--quiet")
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    statuses = status_counts(url)
    assert not any(s.startswith("5") and s != "507" for s in statuses), statuses
    assert statuses.get("507") == len(refused)
    print(f"\nfull disk: {written} objects written before full, {len(refused)} writes refused "
          f"(all 507), 0 temp files, reads OK, recovered {recovered:.2f} s after freeing space")


# --------------------------------------------------------------------- the two kinds of failure
# A write refused for want of room landed nothing, so what it would have named may be cleaned
# up; a write that landed and failed afterwards has an unknown outcome. Confusing the two would
# delete the chunks of a committed manifest.

@pytest.mark.parametrize("code", ["ENOSPC", "EINVAL"])
def test_fs_put_that_fails_after_its_rename_is_unknown_not_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   code: str) -> None:
    import asyncio
    import errno

    from storage.backends import fs
    from storage.backends.base import PermanentError, TransientError

    def no_room(dirpath: str) -> None:
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    async def main() -> None:
        backend = fs.FsBackend(tmp_path)
        try:
            monkeypatch.setattr(fs, "_fsync_dir", no_room)
            for condition in ({}, {"if_none_match": True}):
                with pytest.raises(TransientError) as caught:
                    await backend.put(f"m/landed-{len(condition)}", b"record", **condition)
                assert not isinstance(caught.value, PermanentError)  # StoreFull is one
                assert (await backend.get(f"m/landed-{len(condition)}")).data == b"record"  # it did land
            monkeypatch.undo()
        finally:
            await backend.close()
        assert temp_files(tmp_path) == []

    asyncio.run(main())


def test_manifest_refused_for_want_of_room_cleans_up_the_chunks_it_would_have_named() -> None:
    import asyncio

    from storage import keys
    from storage.backends.base import StoreFull as BackendStoreFull
    from storage.backends.memory import MemoryBackend
    from storage.errors import StoreFull
    from storage.locks import LockManager
    from storage.objects import ObjectStore, StoreOptions

    class NoRoomForRecords(MemoryBackend):
        async def put(self, key: str, data: bytes, **kw: Any) -> str:
            if key.startswith(keys.MANIFEST_PREFIX):
                raise BackendStoreFull("no space left on device")
            return await super().put(key, data, **kw)

    async def body() -> Any:
        yield os.urandom(3 * 1024)

    async def main() -> None:
        backend = NoRoomForRecords()
        store = ObjectStore(backend, LockManager(), StoreOptions(chunk_size=1024))
        with pytest.raises(StoreFull):
            await store.put("videos/a.bin", body(), content_type="application/octet-stream")
        await store.close()  # waits for the failed PUT's cleanup, which its answer did not wait for
        left = [i.key async for i in backend.list("")]
        assert left == [], left  # chunks and the PUT's intent: the manifest never landed

    asyncio.run(main())


def test_no_inode_left_is_507_too_and_a_gateway_still_starts_and_reads(full_disk_inodes: Path) -> None:
    root = full_disk_inodes
    gw = GatewayProcess(["--store", str(root), "--log-level", "error"], env={"PYTHONPATH": str(REPO)})
    stored: dict[str, bytes] = {}
    try:
        for n in range(100):
            data = os.urandom(100)
            r = requests.put(f"{gw.url}/objects/small/{n}", data=data, timeout=30)
            if r.status_code != 201:
                assert_store_full(r)
                break
            stored[f"small/{n}"] = data
        else:
            pytest.fail("100 objects fitted in a few dozen inodes")
        assert stored
        # Whichever file found no inode (intent, chunk or manifest), nothing of that PUT is left.
        assert temp_files(root) == [] and chunk_files(root) == len(stored)
    finally:
        gw.stop()
    # Something else takes the last inodes; a gateway started now still comes up and reads.
    fillers: list[Path] = []
    try:
        while True:
            fillers.append(root / f".filler-{len(fillers)}")
            fillers[-1].touch()
    except OSError:
        fillers.pop()
    gw = GatewayProcess(["--store", str(root), "--grace", "0s", "--log-level", "error"], env={"PYTHONPATH": str(REPO)})
    try:
        for key, data in stored.items():
            assert requests.get(f"{gw.url}/objects/{key}", timeout=30).content == data
        assert requests.get(f"{gw.url}/readyz", timeout=30).json()["store_full"] is True
        assert_store_full(requests.put(f"{gw.url}/objects/small/more", data=b"x", timeout=30))
        for f in fillers:
            f.unlink()
        for key in list(stored)[:3]:  # their chunks and directories go at once (--grace 0s)
            assert requests.delete(f"{gw.url}/objects/{key}", timeout=30).status_code == 204
            del stored[key]
        assert requests.put(f"{gw.url}/objects/small/more", data=b"x", timeout=30).status_code == 201
        stored["small/more"] = b"x"
        for key, data in stored.items():
            assert requests.get(f"{gw.url}/objects/{key}", timeout=30).content == data
    finally:
        gw.stop()
    assert temp_files(root) == []
    fsck = chunkgate("fsck", "--store", str(root), "--quiet")
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
