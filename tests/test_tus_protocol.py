"""tus 1.0 at /uploads/ with aiohttp's client against an in-process gateway: header parsing
(table-driven), each verb's statuses and headers, checksums, deferred length, termination,
expiry, release requests and lease fencing."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from typing import Any, AsyncIterator

import aiohttp
import pytest

from gateway.config import ServeConfig
from gateway.errors import HTTPError
from gateway.tus import parse_checksum, parse_metadata, parse_uint
from storage import keys as keys_mod
from storage.backends.memory import MemoryBackend
from storage.locks import LeaseLost, LockManager
from storage.objects import ObjectStore, StoreOptions
from storage.uploads import UploadChecksumMismatch, UploadOptions, UploadSessions
from tests.support.gateway import in_process_gateway

pytestmark = pytest.mark.timeout(60)

TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = "application/offset+octet-stream"
CHUNK = 1024


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def meta(**pairs: str) -> str:
    return ",".join(f"{k.replace('_', '-')} {b64(v)}" for k, v in pairs.items())


def patch_headers(offset: int, **extra: str) -> dict[str, str]:
    return {**TUS, "Upload-Offset": str(offset), "Content-Type": OCTETS, **extra}


def payload(n: int) -> bytes:
    return hashlib.sha256(str(n).encode()).digest() * (n // 32) + b"x" * (n % 32)


# ------------------------------------------------------------------------------ pure parsing
@pytest.mark.parametrize(
    "header, expected",
    [
        (None, {}),
        ("", {}),
        (f"key {b64('videos/a.mp4')}", {"key": "videos/a.mp4"}),
        (f"key {b64('a')},filetype {b64('video/mp4')}", {"key": "a", "filetype": "video/mp4"}),
        (f"key {b64('a')}, flag", {"key": "a", "flag": None}),
        (f"key {b64('ü/ä')}", {"key": "ü/ä"}),
    ],
)
def test_parse_metadata_accepts_tus_pairs(header: str | None, expected: dict[str, Any]) -> None:
    assert parse_metadata(header) == expected


@pytest.mark.parametrize("header", ["key not*base64", f"key {b64('a')},key {b64('b')}", "key a b c", f",key {b64('a')}"])
def test_parse_metadata_rejects_malformed_pairs(header: str) -> None:
    with pytest.raises(HTTPError) as info:
        parse_metadata(header)
    assert info.value.status == 400


@pytest.mark.parametrize(
    "header, expected",
    [
        (None, None),
        (f"sha1 {base64.b64encode(hashlib.sha1(b'x').digest()).decode()}", ("sha1", hashlib.sha1(b"x").digest())),
        (f"sha256 {base64.b64encode(hashlib.sha256(b'x').digest()).decode()}", ("sha256", hashlib.sha256(b"x").digest())),
        (f"md5 {base64.b64encode(hashlib.md5(b'x').digest()).decode()}", ("md5", hashlib.md5(b"x").digest())),
    ],
)
def test_parse_checksum_supported_algorithms(header: str | None, expected: Any) -> None:
    assert parse_checksum(header) == expected


@pytest.mark.parametrize(
    "header, code",
    [
        ("crc32 AAAAAA==", "unsupported_checksum"),
        ("sha1", "bad_checksum"),
        ("sha1 ***", "bad_checksum"),
        (f"sha1 {base64.b64encode(b'short').decode()}", "bad_checksum"),
    ],
)
def test_parse_checksum_rejects_unsupported_or_malformed(header: str, code: str) -> None:
    with pytest.raises(HTTPError) as info:
        parse_checksum(header)
    assert (info.value.status, info.value.code) == (400, code)


@pytest.mark.parametrize("value, expected", [(None, None), ("0", 0), (" 42 ", 42)])
def test_parse_uint(value: str | None, expected: int | None) -> None:
    assert parse_uint(value, "Upload-Offset") == expected


@pytest.mark.parametrize("value", ["-1", "1.5", "abc", "", "1e3"])
def test_parse_uint_rejects_non_integers(value: str) -> None:
    with pytest.raises(HTTPError):
        parse_uint(value, "Upload-Offset")


# ------------------------------------------------------------------------------ HTTP fixtures
@pytest.fixture
async def gw() -> AsyncIterator[tuple[str, Any, aiohttp.ClientSession]]:
    cfg = ServeConfig(chunk_size=CHUNK, max_upload_size=1 << 20, lock_timeout=5.0, lock_stale_after=2.0, body_timeout=10.0)
    async with in_process_gateway(cfg) as (url, app):
        async with aiohttp.ClientSession() as session:
            yield url, app, session


async def create(session: aiohttp.ClientSession, url: str, length: int | None, key: str = "videos/clip.mp4",
                 **extra: str) -> str:
    headers = {**TUS, "Upload-Metadata": meta(key=key)}
    headers.update({"Upload-Length": str(length)} if length is not None else {"Upload-Defer-Length": "1"})
    headers.update(extra)
    async with session.post(url + "/uploads/", headers=headers) as r:
        assert r.status == 201, await r.text()
        return r.headers["Location"]


async def offset_of(session: aiohttp.ClientSession, location: str) -> int:
    async with session.head(location, headers=TUS) as r:
        assert r.status == 200
        assert r.headers["Cache-Control"] == "no-store"
        return int(r.headers["Upload-Offset"])


async def store_keys(app: Any, prefix: str = "") -> list[str]:
    return [i.key async for i in app["store"].backend.list(prefix)]


# ------------------------------------------------------------------------------ OPTIONS / POST
async def test_options_advertises_version_extensions_max_size_and_checksums(gw: Any) -> None:
    url, _app, s = gw
    async with s.options(url + "/uploads/") as r:
        assert r.status == 204
        assert r.headers["Tus-Version"] == "1.0.0"
        assert set(r.headers["Tus-Extension"].split(",")) >= {
            "creation", "creation-with-upload", "expiration", "checksum", "termination"}
        assert r.headers["Tus-Max-Size"] == str(1 << 20)
        assert set(r.headers["Tus-Checksum-Algorithm"].split(",")) == {"sha1", "sha256", "md5"}


@pytest.mark.parametrize(
    "headers, status, code",
    [
        ({"Upload-Length": "10", "Upload-Metadata": meta(key="a")}, 412, "unsupported_version"),
        ({**TUS, "Upload-Metadata": meta(key="a")}, 400, "bad_header"),
        ({**TUS, "Upload-Length": "10", "Upload-Defer-Length": "1", "Upload-Metadata": meta(key="a")}, 400, "bad_header"),
        ({**TUS, "Upload-Length": "-3", "Upload-Metadata": meta(key="a")}, 400, "bad_header"),
        ({**TUS, "Upload-Length": str((1 << 20) + 1), "Upload-Metadata": meta(key="a")}, 413, "too_large"),
        ({**TUS, "Upload-Length": "10"}, 400, "missing_key"),
        ({**TUS, "Upload-Length": "10", "Upload-Metadata": meta(filetype="video/mp4")}, 400, "missing_key"),
        ({**TUS, "Upload-Length": "10", "Upload-Metadata": meta(key="a/../b")}, 400, "bad_key"),
        ({**TUS, "Upload-Length": "10", "Upload-Metadata": meta(key="/abs")}, 400, "bad_key"),
        ({"Tus-Resumable": "0.2.2", "Upload-Length": "10", "Upload-Metadata": meta(key="a")}, 412, "unsupported_version"),
    ],
)
async def test_post_rejects_bad_creation_requests(gw: Any, headers: dict[str, str], status: int, code: str) -> None:
    url, app, s = gw
    async with s.post(url + "/uploads/", headers=headers) as r:
        assert r.status == status
        assert (await r.json())["error"] == code
        assert r.headers["Tus-Resumable"] == "1.0.0"
        if status == 412:
            assert r.headers["Tus-Version"] == "1.0.0"
    assert await store_keys(app, "u/") == []


async def test_post_creates_an_upload_with_location_and_expiry(gw: Any) -> None:
    url, _app, s = gw
    async with s.post(url + "/uploads/", headers={**TUS, "Upload-Length": "100", "Upload-Metadata": meta(key="a/b.mp4")}) as r:
        assert r.status == 201
        assert r.headers["Location"].startswith(url + "/uploads/")
        assert "GMT" in r.headers["Upload-Expires"]
    async with s.head(r.headers["Location"], headers=TUS) as h:
        assert h.status == 200
        assert h.headers["Upload-Offset"] == "0"
        assert h.headers["Upload-Length"] == "100"
        assert h.headers["Upload-Metadata"] == meta(key="a/b.mp4")


async def test_zero_length_upload_is_complete_at_creation(gw: Any) -> None:
    url, _app, s = gw
    await create(s, url, 0, key="empty.bin")
    async with s.get(url + "/objects/empty.bin") as r:
        assert r.status == 200
        assert await r.read() == b""


async def test_creation_with_upload_stores_the_first_bytes(gw: Any) -> None:
    url, _app, s = gw
    data = payload(3000)
    headers = {**TUS, "Upload-Length": str(len(data)), "Upload-Metadata": meta(key="cwu.bin"), "Content-Type": OCTETS}
    async with s.post(url + "/uploads/", headers=headers, data=data[:1500]) as r:
        assert r.status == 201
        assert r.headers["Upload-Offset"] == "1500"
        location = r.headers["Location"]
    async with s.patch(location, headers=patch_headers(1500), data=data[1500:]) as r:
        assert r.status == 204
    async with s.get(url + "/objects/cwu.bin") as r:
        assert await r.read() == data


# ------------------------------------------------------------------------------ HEAD / PATCH
@pytest.mark.parametrize(
    "headers, status, code",
    [
        ({"Upload-Offset": "0", "Content-Type": OCTETS}, 412, "unsupported_version"),
        ({**TUS, "Upload-Offset": "0", "Content-Type": "application/octet-stream"}, 415, "unsupported_media_type"),
        ({**TUS, "Content-Type": OCTETS}, 400, "bad_header"),
        ({**TUS, "Upload-Offset": "x", "Content-Type": OCTETS}, 400, "bad_header"),
        ({**TUS, "Upload-Offset": "5", "Content-Type": OCTETS}, 409, "offset_mismatch"),
        ({**TUS, "Upload-Offset": "0", "Content-Type": OCTETS, "Upload-Checksum": "crc32 AAAAAA=="}, 400, "unsupported_checksum"),
        ({**TUS, "Upload-Offset": "0", "Content-Type": OCTETS,
          "Upload-Checksum": "sha1 " + base64.b64encode(hashlib.sha1(b"other").digest()).decode()}, 460, "checksum_mismatch"),
        ({**TUS, "Upload-Offset": "0", "Content-Type": OCTETS, "Upload-Length": "99"}, 400, "bad_request"),
    ],
)
async def test_patch_refusals_change_nothing(gw: Any, headers: dict[str, str], status: int, code: str) -> None:
    url, app, s = gw
    location = await create(s, url, 2000)
    async with s.patch(location, headers=patch_headers(0), data=payload(2000)[:1500]) as r:
        assert r.status == 204
    before = sorted(await store_keys(app))
    headers = {**headers, "Upload-Offset": headers["Upload-Offset"].replace("0", "1500")} if headers.get("Upload-Offset") == "0" else headers
    async with s.patch(location, headers=headers, data=payload(2000)[1500:]) as r:
        assert r.status == status, await r.text()
        assert (await r.json())["error"] == code
        assert r.headers["Tus-Resumable"] == "1.0.0"
        if status == 409:
            assert r.headers["Upload-Offset"] == "1500"
    assert await offset_of(s, location) == 1500
    assert sorted(await store_keys(app)) == before


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "md5"])
async def test_patch_with_matching_checksum_is_accepted(gw: Any, algorithm: str) -> None:
    url, _app, s = gw
    data = payload(2500)
    location = await create(s, url, len(data), key=f"sum-{algorithm}.bin")
    for start, end in ((0, 1100), (1100, 2500)):
        digest = base64.b64encode(hashlib.new(algorithm, data[start:end]).digest()).decode()
        async with s.patch(location, headers=patch_headers(start, **{"Upload-Checksum": f"{algorithm} {digest}"}),
                           data=data[start:end]) as r:
            assert r.status == 204
            assert r.headers["Upload-Offset"] == str(end)
    async with s.get(url + f"/objects/sum-{algorithm}.bin") as r:
        assert await r.read() == data


async def test_checksum_mismatch_after_a_full_chunk_discards_the_whole_patch(gw: Any) -> None:
    url, app, s = gw
    data = payload(3 * CHUNK + 10)
    location = await create(s, url, len(data))
    wrong = base64.b64encode(hashlib.sha256(b"nope").digest()).decode()
    async with s.patch(location, headers=patch_headers(0, **{"Upload-Checksum": f"sha256 {wrong}"}), data=data) as r:
        assert r.status == 460
    assert await offset_of(s, location) == 0
    assert [k for k in await store_keys(app) if k.startswith("c/")] == []


async def test_object_appears_only_when_the_last_byte_is_in(gw: Any) -> None:
    url, _app, s = gw
    data = payload(5 * CHUNK + 123)
    location = await create(s, url, len(data), key="late/visible.mp4")
    pos = 0
    for step in (700, 2000, 1, 2500):
        async with s.patch(location, headers=patch_headers(pos), data=data[pos:pos + step]) as r:
            assert r.status == 204
            pos += step
            assert r.headers["Upload-Offset"] == str(pos)
        async with s.get(url + "/objects/late/visible.mp4") as g:
            assert g.status == 404
        assert await offset_of(s, location) == pos
    async with s.patch(location, headers=patch_headers(pos), data=data[pos:]) as r:
        assert r.status == 204
    async with s.get(url + "/objects/late/visible.mp4") as g:
        assert g.status == 200
        assert g.headers["Content-Type"] == "video/mp4"
        assert await g.read() == data
    async with s.get(url + "/objects/late/visible.mp4?manifest") as g:
        m = await g.json()
    assert m["size"] == len(data)
    assert [c["sha256"] for c in m["chunks"]] == [
        hashlib.sha256(data[i:i + CHUNK]).hexdigest() for i in range(0, len(data), CHUNK)]
    async with s.patch(location, headers=patch_headers(len(data)), data=b"more") as r:
        assert r.status == 413


async def test_metadata_content_type_is_used(gw: Any) -> None:
    url, _app, s = gw
    headers = {**TUS, "Upload-Length": "4", "Upload-Metadata": meta(key="noext", filetype="video/webm")}
    async with s.post(url + "/uploads/", headers=headers) as r:
        location = r.headers["Location"]
    async with s.patch(location, headers=patch_headers(0), data=b"abcd") as r:
        assert r.status == 204
    async with s.get(url + "/objects/noext") as g:
        assert g.headers["Content-Type"] == "video/webm"


async def test_deferred_length_is_set_by_a_later_patch(gw: Any) -> None:
    url, _app, s = gw
    data = payload(2 * CHUNK + 77)
    location = await create(s, url, None, key="deferred.bin")
    async with s.head(location, headers=TUS) as h:
        assert h.headers["Upload-Defer-Length"] == "1"
        assert "Upload-Length" not in h.headers
    async with s.patch(location, headers=patch_headers(0), data=data) as r:
        assert r.status == 204
    async with s.get(url + "/objects/deferred.bin") as g:
        assert g.status == 404
    async with s.patch(location, headers=patch_headers(len(data), **{"Upload-Length": str(len(data))}), data=b"") as r:
        assert r.status == 204
    async with s.get(url + "/objects/deferred.bin") as g:
        assert await g.read() == data


async def test_unknown_upload_is_404(gw: Any) -> None:
    url, _app, s = gw
    for path in ("/uploads/" + "0" * 32, "/uploads/not-an-id"):
        async with s.head(url + path, headers=TUS) as r:
            assert r.status == 404
        async with s.patch(url + path, headers=patch_headers(0), data=b"x") as r:
            assert r.status == 404
            assert (await r.json())["error"] == "not_found"


async def test_method_override_header_works_for_patch(gw: Any) -> None:
    url, _app, s = gw
    location = await create(s, url, 3, key="override.bin")
    async with s.post(location, headers=patch_headers(0, **{"X-HTTP-Method-Override": "PATCH"}), data=b"abc") as r:
        assert r.status == 204
    async with s.get(url + "/objects/override.bin") as g:
        assert await g.read() == b"abc"


# ------------------------------------------------------------------------------ DELETE / expiry
async def test_termination_removes_data_and_later_requests_get_410(gw: Any) -> None:
    url, app, s = gw
    location = await create(s, url, 4 * CHUNK, key="term.bin")
    async with s.patch(location, headers=patch_headers(0), data=payload(2 * CHUNK + 5)) as r:
        assert r.status == 204
    assert any(k.startswith("c/") for k in await store_keys(app))
    async with s.delete(location, headers=TUS) as r:
        assert r.status == 204
    keys_left = await store_keys(app)
    assert [k for k in keys_left if k.startswith("c/") or "/t/" in k or "/b/" in k] == []
    async with s.head(location, headers=TUS) as r:
        assert r.status == 410
    async with s.patch(location, headers=patch_headers(2 * CHUNK + 5), data=b"x") as r:
        assert r.status == 410
    async with s.get(url + "/objects/term.bin") as g:
        assert g.status == 404


async def test_expired_upload_is_410_and_the_sweep_removes_its_data() -> None:
    cfg = ServeConfig(chunk_size=CHUNK, upload_expiry=1.0)
    async with in_process_gateway(cfg) as (url, app):
        async with aiohttp.ClientSession() as s:
            a = await create(s, url, 4 * CHUNK, key="exp/a.bin")
            b = await create(s, url, 4 * CHUNK, key="exp/b.bin")
            for loc in (a, b):
                async with s.patch(loc, headers=patch_headers(0), data=payload(CHUNK + 10)) as r:
                    assert r.status == 204
                    assert "GMT" in r.headers["Upload-Expires"]
            await asyncio.sleep(1.3)
            async with s.head(a, headers=TUS) as r:  # a request notices expiry itself
                assert r.status == 410
            assert await app["uploads"].sweep() == 1  # b, found by the sweep
            async with s.head(b, headers=TUS) as r:
                assert r.status == 410
            assert [k for k in await store_keys(app) if k.startswith("c/") or "/t/" in k or "/b/" in k] == []
            metrics = await (await s.get(url + "/metrics")).text()
            assert "chunkgate_uploads_expired_total 2.0" in metrics
            assert "chunkgate_uploads_created_total 2.0" in metrics


# ------------------------------------------------------------------------------ locks
async def test_new_request_makes_a_stalled_patch_let_go_and_keeps_its_bytes(gw: Any) -> None:
    url, app, s = gw
    data = payload(6 * CHUNK)
    location = await create(s, url, len(data), key="stalled.bin")
    gate = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield data[: 2 * CHUNK + 100]
        await gate.wait()  # the connection goes quiet, as a dead one would
        yield data[2 * CHUNK + 100:]

    async def stalled_patch() -> int:
        async with aiohttp.ClientSession() as other:
            try:
                async with other.patch(location, headers=patch_headers(0), data=slow_body()) as r:
                    return r.status
            except aiohttp.ClientError:
                return -1

    task = asyncio.ensure_future(stalled_patch())
    for _ in range(200):
        await asyncio.sleep(0.02)
        if len([k for k in await store_keys(app) if k.startswith("c/")]) == 2:
            break
    await asyncio.sleep(0.1)
    # The resuming client's HEAD must not wait for the body timeout (10 s) or the stale limit.
    offset = await asyncio.wait_for(offset_of(s, location), timeout=4)
    assert offset == 2 * CHUNK + 100
    async with s.patch(location, headers=patch_headers(offset), data=data[offset:]) as r:
        assert r.status == 204
    gate.set()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    async with s.get(url + "/objects/stalled.bin") as g:
        assert await g.read() == data
    assert app["store"].locks.stats.release_requests >= 1


async def test_a_holder_cleared_as_stale_cannot_write() -> None:
    backend = MemoryBackend()
    locks = LockManager(stale_after=0.2, timeout=5.0)
    store = ObjectStore(backend, locks, StoreOptions(chunk_size=CHUNK))
    sessions = UploadSessions(store, UploadOptions(chunk_size=CHUNK, lock_timeout=5.0))
    status = await sessions.create("fenced.bin", length=3 * CHUNK, metadata="", content_type="application/octet-stream")
    frozen = await locks.acquire(f"upload:{status.id}", owner="frozen")
    await asyncio.sleep(0.3)  # it neither renews nor releases
    async with sessions.lock(status.id, owner="next") as lease:  # clears the stale holder
        assert lease.token > frozen.token

    async def body() -> AsyncIterator[bytes]:
        yield payload(2 * CHUNK)

    with pytest.raises(LeaseLost):
        await sessions.append(status.id, frozen, offset=0, body=body())
    assert [i.key async for i in backend.list("c/")] == []
    assert [i.key async for i in backend.list(f"u/{status.id}/t/")] == []
    assert locks.stats.stale_cleared == 1
    await store.close()


class StallsTailListing(MemoryBackend):
    """The next listing of an upload's tails waits for ``gate`` once ``armed``: a HEAD that
    stalls between its two listings (long enough for its lease to go stale)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.stalled = asyncio.Event()
        self.gate = asyncio.Event()

    async def list(self, prefix: str = "", *, start_after: str | None = None) -> AsyncIterator[Any]:
        if self.armed and prefix.startswith("u/") and "/t/" in prefix:
            self.armed = False
            self.stalled.set()
            await self.gate.wait()
        async for info in super().list(prefix, start_after=start_after):
            yield info


async def test_a_head_whose_lease_was_cleared_while_it_read_answers_503_not_409() -> None:
    """A HEAD that lost its lease mid-read cannot report an offset (what it read may be torn),
    but it must not answer 4xx either: a 4xx to HEAD says the upload cannot be resumed
    (tus-js-client removes it from its URL storage). 503 with Retry-After: it is there, ask again."""
    backend = StallsTailListing()
    cfg = ServeConfig(chunk_size=CHUNK, max_upload_size=1 << 20, lock_timeout=5.0, lock_stale_after=0.3, body_timeout=10.0)
    async with in_process_gateway(cfg, backend=backend) as (url, _app), aiohttp.ClientSession() as s:
        location = await create(s, url, 3 * CHUNK, key="videos/head.bin")
        data = payload(3 * CHUNK)
        async with s.patch(location, headers=patch_headers(0), data=data[:CHUNK + 10]) as r:
            assert r.status == 204
        backend.armed = True
        stalled_head = asyncio.ensure_future(s.head(location, headers=TUS))
        await asyncio.wait_for(backend.stalled.wait(), timeout=5)
        # Another client's HEAD clears the stalled one's lease as stale, then answers.
        assert await asyncio.wait_for(offset_of(s, location), timeout=4) == CHUNK + 10
        backend.gate.set()
        r = await asyncio.wait_for(stalled_head, timeout=5)
        assert r.status == 503, r.status
        assert r.headers["Retry-After"] == "1"
        assert "Upload-Offset" not in r.headers
        r.release()
        # Nothing was lost or changed: the upload goes on from where it was.
        assert await offset_of(s, location) == CHUNK + 10
        async with s.patch(location, headers=patch_headers(CHUNK + 10), data=data[CHUNK + 10:]) as r:
            assert r.status == 204
        async with s.get(url + "/objects/videos/head.bin") as g:
            assert await g.read() == data


async def test_gc_hook_protects_live_uploads_and_expires_stale_ones() -> None:
    from storage.uploads import gc_hook

    backend = MemoryBackend()
    store = ObjectStore(backend, LockManager(), StoreOptions(chunk_size=CHUNK))
    now = [1000.0]
    sessions = UploadSessions(store, UploadOptions(chunk_size=CHUNK, expiry=100.0), clock=lambda: now[0])

    async def started(key: str) -> str:
        st = await sessions.create(key, length=4 * CHUNK, metadata="", content_type="application/octet-stream")

        async def body() -> AsyncIterator[bytes]:
            yield payload(CHUNK + 7)

        async with sessions.lock(st.id, owner="t") as lease:
            await sessions.append(st.id, lease, offset=0, body=body())
        return st.id

    await started("gc/old.bin")  # expires at 1100
    now[0] = 1500.0
    await started("gc/live.bin")  # expires at 1600
    hook = gc_hook(backend)
    assert {k for k, _ in await hook.protected_versions()} == {"gc/live.bin", "gc/old.bin"}
    assert await hook.sweep_expired(1300.0, dry_run=True) == 1
    assert {k for k, _ in await hook.protected_versions()} == {"gc/live.bin", "gc/old.bin"}  # a dry run changes nothing
    assert await hook.sweep_expired(1300.0, dry_run=False) == 1
    assert {k for k, _ in await hook.protected_versions()} == {"gc/live.bin"}
    chunk_keys = [i.key async for i in backend.list("c/")]
    assert len(chunk_keys) == 1 and all(keys_mod.key_id("gc/live.bin") in k for k in chunk_keys)
    await store.close()


async def test_patches_cut_through_reused_buffers_keep_the_upload_intact_and_give_them_back() -> None:
    """tus PATCH bodies go through the same chunker as PUT, into the store's reused chunk
    buffers: odd-sized PATCHes (tails saved and refilled), a checksum that fails and a PATCH that
    fails mid-body leave the object byte-exact and no buffer lent out."""
    backend = MemoryBackend()
    store = ObjectStore(backend, LockManager(), StoreOptions(chunk_size=CHUNK))
    sessions = UploadSessions(store, UploadOptions(chunk_size=CHUNK))
    data = payload(7 * CHUNK + 333)
    status = await sessions.create("reused.bin", length=len(data), metadata="", content_type="application/octet-stream")

    async def pieces(part: bytes, size: int, fail_after: int | None = None) -> AsyncIterator[bytes]:
        for n, at in enumerate(range(0, len(part), size)):
            if fail_after is not None and n == fail_after:
                raise ConnectionResetError("client went away")
            yield part[at:at + size]

    offset = 0
    for n, end in enumerate((CHUNK // 3, 2 * CHUNK + 17, 2 * CHUNK + 18, 5 * CHUNK - 1, len(data))):
        async with sessions.lock(status.id, owner="w") as lease:
            if n == 1:  # a checksummed PATCH whose checksum is wrong keeps nothing
                with pytest.raises(UploadChecksumMismatch):
                    await sessions.append(status.id, lease, offset=offset, body=pieces(data[offset:end], 100),
                                          checksum=("sha1", b"\0" * 20))
                assert store.buffers.lent == 0
            if n == 3:  # a body cut off mid-way keeps what arrived
                with pytest.raises(ConnectionResetError):
                    await sessions.append(status.id, lease, offset=offset, body=pieces(data[offset:end], 500, fail_after=3))
                assert store.buffers.lent == 0
                offset = (await sessions.status(status.id, lease)).offset
            result = await sessions.append(status.id, lease, offset=offset, body=pieces(data[offset:end], 257))
            offset = result.offset
            assert store.buffers.lent == 0
    assert offset == len(data)
    m = await store.head("reused.bin")
    assert b"".join([bytes(p) async for p in store.read(m, 0, m.size)]) == data
    await store.close()


async def test_a_patch_stopped_before_its_first_byte_leaves_what_the_upload_replaces_alone() -> None:
    """Found by the simulator (seed 11472): a PATCH carried an upload's last bytes before a PUT
    of the same key; its tail write was delayed past its lease; a second PATCH, asked to stop
    before it read a byte, recorded the PUT as what the upload replaces; the delayed bytes then
    landed and a HEAD committed the old upload over the acknowledged PUT. Only a PATCH that
    brings bytes may move that record."""
    from storage.uploads import BodyInterrupted

    backend = MemoryBackend()
    store = ObjectStore(backend, LockManager(), StoreOptions(chunk_size=CHUNK))
    sessions = UploadSessions(store, UploadOptions(chunk_size=CHUNK))
    status = await sessions.create("late.bin", length=3 * CHUNK, metadata="", content_type="application/octet-stream")

    async def body(data: bytes, *, stop_first: bool = False) -> AsyncIterator[bytes]:
        if stop_first:
            raise BodyInterrupted("another request asked for the upload")
        yield data

    async def replaces() -> tuple[str | None, bool]:
        doc = json.loads((await backend.get(f"u/{status.id}/info")).data)  # what a later request reads
        return doc["replaces"], doc["replaces_known"]

    async with sessions.lock(status.id, owner="first") as lease:
        first = await sessions.append(status.id, lease, offset=0, body=body(payload(CHUNK)))
    assert await replaces() == (None, True)  # the key held nothing when the first bytes came
    await store.put("late.bin", body(b"a newer PUT"), content_type="text/plain")
    async with sessions.lock(status.id, owner="second") as lease:
        stopped = await sessions.append(status.id, lease, offset=first.offset, body=body(b"", stop_first=True))
    assert stopped.offset == first.offset
    assert await replaces() == (None, True)  # unchanged: this PATCH brought nothing
    async with sessions.lock(status.id, owner="third") as lease:
        await sessions.append(status.id, lease, offset=first.offset, body=body(payload(CHUNK)[:10]))
    assert (await replaces())[0] is not None  # a PATCH that brings bytes after the PUT records it
    await store.close()


class CountsChunkListing(MemoryBackend):
    """Counts the chunk keys its listings yield (the store's work a PATCH or HEAD asks for)."""

    def __init__(self) -> None:
        super().__init__()
        self.chunk_keys_listed = 0

    async def list(self, prefix: str = "", *, start_after: str | None = None) -> AsyncIterator[Any]:
        async for info in super().list(prefix, start_after=start_after):
            if prefix.startswith(keys_mod.CHUNK_PREFIX):
                self.chunk_keys_listed += 1
            yield info


async def test_a_patch_late_in_a_long_upload_lists_only_the_chunks_past_those_recorded() -> None:
    """A PATCH or HEAD reads which chunks are stored from the record as far as it vouches for
    them, and lists only past them: it costs the same at chunk 40 as at chunk 1 (a listing of
    every chunk took 136 ms for 1,000 keys on SeaweedFS). Chunks a crashed request stored
    without recording them still count, as long as they continue the recorded ones."""
    backend = CountsChunkListing()
    cfg = ServeConfig(chunk_size=CHUNK, max_upload_size=1 << 20, body_timeout=10.0)
    async with in_process_gateway(cfg, backend=backend) as (url, _app), aiohttp.ClientSession() as s:
        location = await create(s, url, 48 * CHUNK, key="videos/long.bin")
        data = payload(48 * CHUNK)
        async with s.patch(location, headers=patch_headers(0), data=data[:40 * CHUNK]) as r:
            assert r.status == 204
        backend.chunk_keys_listed = 0
        async with s.patch(location, headers=patch_headers(40 * CHUNK), data=data[40 * CHUNK:41 * CHUNK]) as r:
            assert r.status == 204 and r.headers["Upload-Offset"] == str(41 * CHUNK)
        assert await offset_of(s, location) == 41 * CHUNK
        assert backend.chunk_keys_listed == 0  # was 40 + 41: every chunk, on each request

        # A request that died after storing chunks 41 and 42 (and 44, past a gap) but before
        # recording them: 41 and 42 are durable and count; 44 does not.
        upload_id = location.rsplit("/", 1)[1]
        record = json.loads((await backend.get(f"u/{upload_id}/info")).data)
        for index in (41, 42, 44):
            ck = keys_mod.chunk_key("videos/long.bin", record["version"], index)
            await backend.put(ck, data[index * CHUNK:(index + 1) * CHUNK])
        assert await offset_of(s, location) == 43 * CHUNK
        async with s.patch(location, headers=patch_headers(43 * CHUNK), data=data[43 * CHUNK:]) as r:
            assert r.status == 204 and r.headers["Upload-Offset"] == str(48 * CHUNK)
        async with s.get(url + "/objects/videos/long.bin") as r:
            assert r.status == 200 and await r.read() == data


async def test_a_chunk_deleted_behind_an_uploads_back_is_sent_again_not_named_by_its_manifest() -> None:
    """Requests take the record's word for the chunks it recorded; the commit checks them
    against the store once. A recorded chunk gone from the store (deleted by hand, or by a bug
    elsewhere) makes the last PATCH answer 409 instead of committing a manifest that names it;
    HEAD then gives the offset where the lost chunk began, and sending from there completes the
    upload with every byte."""
    cfg = ServeConfig(chunk_size=CHUNK, max_upload_size=1 << 20, body_timeout=10.0)
    async with in_process_gateway(cfg) as (url, app), aiohttp.ClientSession() as s:
        location = await create(s, url, 4 * CHUNK + 100, key="videos/lost.bin")
        data = payload(4 * CHUNK + 100)
        async with s.patch(location, headers=patch_headers(0), data=data[:3 * CHUNK]) as r:
            assert r.status == 204
        upload_id = location.rsplit("/", 1)[1]
        backend = app["store"].backend
        record = json.loads((await backend.get(f"u/{upload_id}/info")).data)
        await backend.delete(keys_mod.chunk_key("videos/lost.bin", record["version"], 1))
        async with s.patch(location, headers=patch_headers(3 * CHUNK), data=data[3 * CHUNK:]) as r:
            assert r.status == 409, await r.text()
        async with s.get(url + "/objects/videos/lost.bin") as r:
            assert r.status == 404  # nothing committed
        assert await offset_of(s, location) == CHUNK
        async with s.patch(location, headers=patch_headers(CHUNK), data=data[CHUNK:]) as r:
            assert r.status == 204 and r.headers["Upload-Offset"] == str(len(data))
        async with s.get(url + "/objects/videos/lost.bin") as r:
            assert r.status == 200 and await r.read() == data


MiB = 1 << 20


async def test_a_long_uploads_record_stays_small_and_its_manifest_verifies_seeks_block_by_block() -> None:
    """Every request reads and rewrites the upload's record, so the block digests of its chunks
    live in a segment per request beside it (inline they made the record ~1.2 KB per 8 MiB
    chunk: 1.2 MB at 1,000 chunks). The commit gathers them: the object's manifest has every
    chunk's block digests, and a seek is answered from one verified block. Nothing of the
    upload but its record is left once it is complete."""
    cfg = ServeConfig(chunk_size=MiB, max_upload_size=64 * MiB, body_timeout=10.0)  # 4 blocks of 256 KiB per chunk
    async with in_process_gateway(cfg) as (url, app), aiohttp.ClientSession() as s:
        data = payload(16 * MiB + 100)
        location = await create(s, url, len(data), key="videos/blocks.bin")
        upload_id = location.rsplit("/", 1)[1]
        backend = app["store"].backend
        for start in range(0, 16 * MiB, 4 * MiB):
            async with s.patch(location, headers=patch_headers(start), data=data[start:start + 4 * MiB]) as r:
                assert r.status == 204
            record = json.loads((await backend.get(f"u/{upload_id}/info")).data)
            assert record["blocks"] == {} and len(record["hashes"]) == (start + 4 * MiB) // MiB
        assert len(await store_keys(app, f"u/{upload_id}/b/")) == 4  # one segment per PATCH
        async with s.patch(location, headers=patch_headers(16 * MiB), data=data[16 * MiB:]) as r:
            assert r.status == 204
        manifest = await app["store"].head("videos/blocks.bin")
        assert [len(c.blocks or ()) for c in manifest.chunks] == [4] * 16 + [1]
        assert await store_keys(app, f"u/{upload_id}/") == [f"u/{upload_id}/info"]
        async with s.get(url + "/objects/videos/blocks.bin", headers={"Range": f"bytes={5 * MiB + 7}-{5 * MiB + 70}"}) as r:
            assert r.status == 206 and await r.read() == data[5 * MiB + 7:5 * MiB + 71]


async def test_an_upload_begun_by_an_earlier_release_keeps_its_inline_block_digests() -> None:
    """Records written before the digest segments hold the block digests inline: an upload
    begun that way and finished now commits a manifest with every chunk's block digests."""
    cfg = ServeConfig(chunk_size=MiB, max_upload_size=64 * MiB, body_timeout=10.0)
    async with in_process_gateway(cfg) as (url, app), aiohttp.ClientSession() as s:
        data = payload(3 * MiB + 100)
        location = await create(s, url, len(data), key="videos/old.bin")
        upload_id = location.rsplit("/", 1)[1]
        backend = app["store"].backend
        async with s.patch(location, headers=patch_headers(0), data=data[:2 * MiB]) as r:
            assert r.status == 204
        # What an earlier release stored: the digests in the record, no segment.
        (segment,) = await store_keys(app, f"u/{upload_id}/b/")
        entries = json.loads((await backend.get(segment)).data)["chunks"]
        info = await backend.get(f"u/{upload_id}/info")
        record = json.loads(info.data)
        record["blocks"] = {i: e["blocks"] for i, e in entries.items()}
        await backend.put(f"u/{upload_id}/info", json.dumps(record).encode(), if_match=info.etag)
        await backend.delete(segment)
        async with s.patch(location, headers=patch_headers(2 * MiB), data=data[2 * MiB:]) as r:
            assert r.status == 204
        manifest = await app["store"].head("videos/old.bin")
        assert [len(c.blocks or ()) for c in manifest.chunks] == [4, 4, 4, 1]
        async with s.get(url + "/objects/videos/old.bin") as r:
            assert await r.read() == data
