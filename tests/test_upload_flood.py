"""A flood of tus uploads stays cheap (issue 13): open uploads are capped per token and in all,
counted from the store's upload records (so restarts and a second gateway over the same store
count them too); a finished, terminated or expired upload frees its slot; the sweeper's reads do
not grow with the number of idle uploads; and with ``--locks store`` no lease record is left in
the store once the requests are done.

Real ``chunkgate serve`` processes on a local directory (and on SeaweedFS for the lease
records), with small caps so the test stays quick; the sweep is counted through the stack's
observing wrapper (``storage.backends.observed``) over the real upload sessions."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from storage import keys
from storage.backends.fs import FsBackend
from storage.backends.memory import MemoryBackend
from storage.backends.observed import ObservedBackend
from storage.locks import LockManager
from storage.objects import ObjectStore, StoreOptions
from storage.quota import ANONYMOUS, OpenUploadsFull, TooManyOpenUploads, UploadCaps, UploadIndex, UploadSummary, client_id
from storage.uploads import UploadOptions, UploadSessions
from tests.support.gateway import gateway_process

pytestmark = pytest.mark.timeout(180)

TUS = {"Tus-Resumable": "1.0.0"}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def create(http: aiohttp.ClientSession, url: str, key: str, *, token: str | None = None, length: int = 10,
                 metadata: str = "") -> tuple[int, Any, Any]:
    headers = {**TUS, "Upload-Length": str(length), "Upload-Metadata": f"key {b64(key)}{metadata}"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with http.post(f"{url}/uploads/", headers=headers) as r:
        body = await r.json() if r.content_type == "application/json" else None
        return r.status, r.headers, body


async def patch(http: aiohttp.ClientSession, location: str, data: bytes, *, offset: int = 0,
                token: str | None = None) -> int:
    headers = {**TUS, "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with http.patch(location, data=data, headers=headers) as r:
        return r.status


async def terminate(http: aiohttp.ClientSession, location: str, token: str) -> int:
    async with http.delete(location, headers={**TUS, "Authorization": f"Bearer {token}"}) as r:
        return r.status


# ------------------------------------------------------------------------------ the caps
def test_open_uploads_are_capped_per_token_and_in_all_across_restarts_and_gateways(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    args = ["--store", store, "--auth-token", "alpha", "--auth-token", "beta", "--auth-token", "gamma",
            "--max-open-uploads-per-token", "3", "--max-upload-metadata", "1KiB"]
    env = {"CHUNKGATE_MAX_OPEN_UPLOADS": "5"}  # the env var of --max-open-uploads

    async def flood(url: str) -> dict[str, list[str]]:
        made: dict[str, list[str]] = {"alpha": [], "beta": []}
        async with aiohttp.ClientSession() as http:
            for n in range(3):
                status, headers, _ = await create(http, url, f"a/{n}", token="alpha")
                assert status == 201
                made["alpha"].append(headers["Location"])
            # The token's cap: a clear JSON 429, with when its first idle upload expires.
            status, headers, body = await create(http, url, "a/3", token="alpha")
            assert status == 429 and body["error"] == "too_many_open_uploads"
            assert "3 open uploads" in body["message"] and "terminate" in body["message"]
            assert 0 < int(headers["Retry-After"]) <= 86400
            assert headers["Tus-Resumable"] == "1.0.0"
            for n in range(2):
                status, headers, _ = await create(http, url, f"b/{n}", token="beta")
                assert status == 201
                made["beta"].append(headers["Location"])
            # Five open in all: the gateway's cap, whoever asks.
            status, headers, body = await create(http, url, "c/0", token="gamma")
            assert status == 503 and body["error"] == "open_uploads_full" and int(headers["Retry-After"]) > 0
            # Metadata is bounded too (kept in the record every request reads).
            status, _, body = await create(http, url, "c/1", token="gamma", metadata=f",junk {b64('x' * 1500)}")
            assert status == 431 and body["error"] == "metadata_too_large"
            # A terminated upload frees its slot at once...
            assert await terminate(http, made["alpha"].pop(), "alpha") == 204
            status, headers, _ = await create(http, url, "c/2", token="gamma")
            assert status == 201
            # ...and so does a finished one (its object is committed).
            assert await patch(http, made["beta"].pop(), b"0123456789", token="beta") == 204
            async with http.get(f"{url}/objects/b/1") as r:
                assert r.status == 200 and await r.read() == b"0123456789"
            status, headers, _ = await create(http, url, "a/4", token="alpha")
            assert status == 201
            made["alpha"].append(headers["Location"])
        return made

    with gateway_process(args, env=env) as first:
        made = asyncio.run(flood(first.url))
        # A second gateway over the same store counts the first one's uploads (from the records).
        with gateway_process(args, env=env) as second:
            async def second_sees_them() -> None:
                async with aiohttp.ClientSession() as http:
                    status, _, body = await create(http, second.url, "a/5", token="alpha")
                    assert status == 429 and body["error"] == "too_many_open_uploads"
                    # Finished on the first gateway: the second frees the slot within its refresh
                    # (README: about 5 s when close to a cap).
                    assert await terminate(http, made["alpha"].pop(0), "alpha") == 204
                    deadline = time.monotonic() + 20
                    while True:
                        status, _, body = await create(http, second.url, "a/6", token="alpha")
                        if status == 201 or time.monotonic() > deadline:
                            break
                        assert status == 429
                        await asyncio.sleep(0.5)
                    assert status == 201

            asyncio.run(second_sees_them())
    # A restart counts what the store holds: alpha has 3 open uploads again.
    with gateway_process(args, env=env) as again:
        async def after_restart() -> None:
            async with aiohttp.ClientSession() as http:
                status, _, body = await create(http, again.url, "a/7", token="alpha")
                assert status == 429 and body["error"] == "too_many_open_uploads"
                status, _, _ = await create(http, again.url, "b/7", token="beta")
                assert status == 503  # alpha 3 + beta 0 + gamma 2 = 5 in all

        asyncio.run(after_restart())


def test_anonymous_clients_share_one_count(tmp_path: Path) -> None:
    # Without tokens configured, an invented Authorization header buys no fresh count.
    args = ["--store", str(tmp_path / "store"), "--max-open-uploads-per-token", "2"]
    with gateway_process(args) as gw:
        async def run() -> None:
            async with aiohttp.ClientSession() as http:
                assert (await create(http, gw.url, "x/0"))[0] == 201
                assert (await create(http, gw.url, "x/1", token="made-up"))[0] == 201
                status, _, body = await create(http, gw.url, "x/2", token="another-made-up")
                assert status == 429 and "anonymous" in body["message"]

        asyncio.run(run())


# ------------------------------------------------------------------------------ the count (pure)
NOW = 1_900_000_000.0


def summary(upload_id: str, client: str = "t:a", state: str = "receiving", expires: float = NOW + 100,
            etag: str = "e1") -> UploadSummary:
    return UploadSummary(upload_id, client, state, NOW - 10, expires, None, etag)


@pytest.mark.parametrize(("entries", "client", "caps", "raises"), [
    ([summary("1"), summary("2")], "t:a", UploadCaps(total=10, per_client=2), TooManyOpenUploads),
    ([summary("1"), summary("2")], "t:b", UploadCaps(total=10, per_client=2), None),
    ([summary("1"), summary("2", client="t:b")], "t:c", UploadCaps(total=2, per_client=5), OpenUploadsFull),
    # An upload past its expiry frees its slot, before any sweep removes it...
    ([summary("1"), summary("2", expires=NOW - 1)], "t:a", UploadCaps(total=10, per_client=2), None),
    # ...but a commit in progress keeps its slot whatever its expiry.
    ([summary("1"), summary("2", state="committing", expires=NOW - 1)], "t:a", UploadCaps(per_client=2), TooManyOpenUploads),
    ([summary("1"), summary("2", state="complete")], "t:a", UploadCaps(per_client=2), None),
    ([summary("1"), summary("2", state="aborted")], "t:a", UploadCaps(per_client=2), None),
    # Records of an older release name no client: the total counts them, no client's cap does.
    ([summary("1", client=""), summary("2", client="")], "t:a", UploadCaps(total=3, per_client=2), None),
    ([summary("1", client=""), summary("2", client="")], "t:a", UploadCaps(total=2, per_client=2), OpenUploadsFull),
    ([summary(str(i)) for i in range(5)], "t:a", UploadCaps(total=0, per_client=0), None),  # 0: no cap
])
def test_the_cap_counts_open_uploads(entries: list[UploadSummary], client: str, caps: UploadCaps,
                                     raises: type | None) -> None:
    index = UploadIndex()
    for entry in entries:
        index.note(entry)
    if raises is None:
        index.check(caps, client, NOW)
    else:
        with pytest.raises(raises) as info:
            index.check(caps, client, NOW)
        assert info.value.retry_after is None or info.value.retry_after >= 1


def test_the_per_token_answer_says_when_the_first_idle_upload_expires() -> None:
    index = UploadIndex()
    index.note(summary("1", expires=NOW + 500))
    index.note(summary("2", expires=NOW + 90.2))
    with pytest.raises(TooManyOpenUploads) as info:
        index.check(UploadCaps(per_client=2), "t:a", NOW)
    assert info.value.retry_after == 91 and "expires in 91 s" in info.value.message


def test_a_refresh_keeps_changes_made_here_while_it_listed_and_drops_what_is_gone() -> None:
    index = UploadIndex()
    index.note(summary("old"))
    index.note(summary("done-elsewhere"))
    mark = index.mark()
    index.note(summary("new-here"))  # created while the listing ran: not in it
    index.note(summary("old", state="complete", etag="e2"))  # finished here meanwhile
    listed = {"old": "e1", "other-gw": "x1"}
    assert sorted(index.changed(listed)) == ["old", "other-gw"]
    index.merge(mark, listed, [summary("old", etag="e1"), summary("other-gw", client="t:b", etag="x1")])
    assert {s.id for s in index.summaries()} == {"old", "new-here", "other-gw"}
    assert index.get("old").state == "complete"  # ours is newer than what the listing saw
    assert index.open_counts("t:a", NOW) == (1, 2)


def test_clients_are_counted_by_a_hash_of_their_token() -> None:
    assert client_id(None) == client_id("") == ANONYMOUS
    assert client_id("alpha") != client_id("beta") and "alpha" not in client_id("alpha")
    assert client_id("alpha") == client_id("alpha")


# ------------------------------------------------------------------------------ the sweep
class CountingObserver:
    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def backend_call(self, op: str, outcome: str, seconds: float, bytes_read: int, bytes_written: int) -> None:
        self.calls[op] += 1


def sessions_over(backend: Any, now: list[float]) -> UploadSessions:
    store = ObjectStore(backend, LockManager(), StoreOptions(chunk_size=1024), clock=lambda: now[0])
    return UploadSessions(store, UploadOptions(chunk_size=1024, expiry=3600.0), clock=lambda: now[0])


async def sweep_reads(n: int) -> dict[str, int]:
    """Store calls of sweeps over ``n`` idle uploads, each with 15 KiB of metadata."""
    observer = CountingObserver()
    shared = MemoryBackend()
    backend = ObservedBackend(shared, observer)
    now = [1_900_000_000.0]
    gw = sessions_over(backend, now)
    for i in range(n):
        await gw.create(f"flood/{i}", length=1 << 40, metadata=f"junk {b64('x' * 11000)}", content_type="video/mp4")
    out: dict[str, int] = {}

    async def counted(name: str, sessions: UploadSessions) -> None:
        observer.calls.clear()
        await sessions.sweep()
        out[name + "_gets"], out[name + "_lists"] = observer.calls["get"], observer.calls["list"]

    await counted("first", gw)
    now[0] += 60
    await counted("second", gw)
    # A restarted gateway (a fresh index) reads every record once, then only what changes.
    restarted = sessions_over(backend, now)
    await counted("restart", restarted)
    now[0] += 60
    await counted("restart_next", restarted)
    # One upload progresses on another gateway: the next sweep here reads that record only.
    other = sessions_over(ObservedBackend(shared, CountingObserver()), now)
    upload_id = next(iter(s.id for s in restarted.index.summaries()))
    async with other.lock(upload_id, owner="patch") as lease:
        async def body() -> Any:
            yield b"x" * 100

        await other.append(upload_id, lease, offset=0, body=body())
    await counted("after_change", restarted)
    out["open"] = restarted.in_progress
    # Past their expiry they are expired (from the index, no record read before it is due).
    now[0] += 7200
    observer.calls.clear()
    out["expired"] = await restarted.sweep()
    out["open_after_expiry"] = restarted.in_progress
    return out


def test_the_sweep_reads_only_records_that_changed_however_many_uploads_are_idle() -> None:
    small, big = asyncio.run(sweep_reads(100)), asyncio.run(sweep_reads(1000))
    for n, figures in ((100, small), (1000, big)):
        assert figures["first_gets"] == 0, figures  # its own uploads: known from their creation
        assert figures["second_gets"] == 0, figures
        assert figures["restart_gets"] == n, figures  # once, after a restart
        assert figures["restart_next_gets"] == 0, figures
        assert figures["after_change_gets"] == 1, figures
        assert figures["second_lists"] == figures["restart_next_lists"] == 1, figures
        assert figures["open"] == n
        assert figures["expired"] == n and figures["open_after_expiry"] == 0, figures
    print(f"\nsweep store gets, N=100: {small}\nsweep store gets, N=1000: {big}")


# ------------------------------------------------------------------------------ lease records
async def upload_some(url: str, m: int) -> None:
    async with aiohttp.ClientSession() as http:
        for i in range(m):
            data = os.urandom(3000 + i)
            status, headers, _ = await create(http, url, f"leases/{i}", length=len(data))
            assert status == 201
            location = headers["Location"]
            assert await patch(http, location, data[:1000]) == 204
            assert await patch(http, location, data[1000:], offset=1000) == 204
            async with http.head(location, headers=TUS) as r:
                assert r.status == 200 and r.headers["Upload-Offset"] == str(len(data))
            async with http.get(f"{url}/objects/leases/{i}") as r:
                assert await r.read() == data
        async with http.put(f"{url}/objects/plain", data=b"p" * 5000) as r:
            assert r.status == 201
        async with http.delete(f"{url}/objects/plain") as r:
            assert r.status == 204
        async with http.get(f"{url}/admin/locks") as r:
            totals = (await r.json())["totals"]
            assert totals["acquisitions"] >= 3 * m and totals["active"] == 0


async def lease_records(backend: Any) -> list[str]:
    return [i.key async for i in backend.list(keys.LEASE_PREFIX)]


def test_no_lease_record_is_left_after_uploads_complete_on_fs(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with gateway_process(["--store", str(store), "--locks", "store"]) as gw:
        asyncio.run(upload_some(gw.url, 6))
        left = asyncio.run(lease_records(FsBackend(store)))
        assert left == []  # while it runs: removed on release, not only at shutdown


@pytest.mark.seaweedfs
def test_no_lease_record_is_left_after_uploads_complete_on_seaweedfs(seaweedfs: Any) -> None:
    bucket = seaweedfs.new_bucket()
    args = ["--store", f"s3://{bucket}", "--s3-endpoint-url", seaweedfs.endpoint, "--locks", "store"]
    with gateway_process(args) as gw:
        asyncio.run(upload_some(gw.url, 4))
        listed = seaweedfs.client().list_objects_v2(Bucket=bucket, Prefix=keys.LEASE_PREFIX)
        assert listed.get("KeyCount", 0) == 0, [o["Key"] for o in listed.get("Contents", [])]
