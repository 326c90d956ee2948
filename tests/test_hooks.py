"""The pre-create hook (API.md "Hooks"): a real receiver decides who may upload what.

A refusal (4xx) gives the client 403 ``rejected_by_hook`` with the hook's words and leaves the
store empty; a hook that is down, slow or failing (5xx) fails the upload closed with 503. Both
for PUT (before a byte of the body is read) and for tus (before the upload exists). The pure
parts (event fields, forwarded headers, the refusal message, the retry schedule) are table-tested.
"""

from __future__ import annotations

import asyncio
import base64
import os
from datetime import datetime
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import outbox_options
from gateway.config import ConfigError, ServeConfig, parse_serve_args
from gateway.hooks import Outcome, classify, forwarded_headers, pre_create_event, refusal_message
from storage.backends.fs import FsBackend
from storage.manifests import ManifestStore
from tests.support.gateway import in_process_gateway
from tests.support.hooks import HookReceiver

pytestmark = pytest.mark.timeout(60)

TUS = {"Tus-Resumable": "1.0.0"}


# ------------------------------------------------------------------------------ pure parts
@pytest.mark.parametrize(
    "headers,expected",
    [
        ({"Authorization": "Bearer t", "User-Agent": "curl", "Content-Type": "video/mp4"}, {"Authorization": "Bearer t"}),
        ({"X-App-Session": "s", "x-tenant": "acme", "Cookie": "c=1", "Host": "h"}, {"X-App-Session": "s", "x-tenant": "acme"}),
        ({}, {}),
    ],
)
def test_forwarded_headers_are_authorization_and_x_headers_only(headers: dict[str, str], expected: dict[str, str]) -> None:
    assert forwarded_headers(headers) == expected


def test_forwarded_headers_join_a_repeated_header() -> None:
    from multidict import CIMultiDict

    assert forwarded_headers(CIMultiDict([("X-Role", "a"), ("X-Role", "b")])) == {"X-Role": "a, b"}


@pytest.mark.parametrize(
    "body,status,expected",
    [
        (b"quota exceeded for user 7", 403, "quota exceeded for user 7"),
        (b"x" * 5000, 400, "x" * 1024),
        ("é".encode() * 600, 403, "é" * 512),  # 1024 bytes exactly: 512 two-byte characters
        (b"a" + "é".encode() * 600, 403, "a" + "é" * 511),  # the cut would split a character: drop it
        (b"", 401, "the upload was refused by the application's pre-create hook (HTTP 401)"),
        (b"  \n", 409, "the upload was refused by the application's pre-create hook (HTTP 409)"),
    ],
)
def test_refusal_message_is_the_hooks_body_cut_to_1_kib(body: bytes, status: int, expected: str) -> None:
    assert refusal_message(body, status) == expected
    assert len(refusal_message(body, status).encode()) <= 1024


@pytest.mark.parametrize("status,outcome", [(200, Outcome.OK), (204, Outcome.OK), (299, Outcome.OK), (301, Outcome.ERROR),
                                            (400, Outcome.REFUSED), (403, Outcome.REFUSED), (499, Outcome.REFUSED),
                                            (500, Outcome.ERROR), (503, Outcome.ERROR)])
def test_classify(status: int, outcome: Outcome) -> None:
    assert classify(status) is outcome


def test_pre_create_event_has_the_api_fields() -> None:
    event = pre_create_event(key="v/a.mp4", size=None, content_type="video/mp4", metadata={"key": "v/a.mp4", "flag": None},
                             upload_id="ab" * 16, headers={"X-App-Session": "s", "Accept": "*/*"})
    assert set(event) == {"id", "type", "time", "key", "size", "content_type", "metadata", "upload_id", "headers"}
    assert event["type"] == "pre-create" and event["size"] is None and event["upload_id"] == "ab" * 16
    assert event["metadata"] == {"key": "v/a.mp4", "flag": ""}
    assert event["headers"] == {"X-App-Session": "s"}
    assert event["time"].endswith("Z") and datetime.fromisoformat(event["time"].replace("Z", "+00:00"))
    assert len(event["id"]) == 32 and event["id"] != pre_create_event(key="k", size=1, content_type="", metadata={},
                                                                        upload_id=None, headers={})["id"]


@pytest.mark.parametrize("url", ["ftp://app/hook", "app.example/hook", "http://", "not a url"])
def test_a_hook_url_that_is_not_http_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="--hook-url"):
        parse_serve_args(["--hook-url", url], environ={})


@pytest.mark.parametrize("flag", ["--hook-retry-max", "--hook-scan-interval"])
@pytest.mark.parametrize("value", ["0", "0s", "0.0ms", "soon"])
def test_hook_delivery_timings_must_be_positive_durations(flag: str, value: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        parse_serve_args(["--hook-url", "http://app/hooks", flag, value], environ={})


@pytest.mark.parametrize(
    "argv,retry_cap,interval",
    [([], 60.0, 5.0), (["--hook-retry-max", "5s", "--hook-scan-interval", "500ms"], 5.0, 0.5)],
)
def test_hook_delivery_timings_reach_the_outbox(argv: list[str], retry_cap: float, interval: float) -> None:
    options = outbox_options(parse_serve_args(["--hook-url", "http://app/hooks", *argv], environ={}))
    # A pointer older than one scan is any gateway's to deliver (its own gateway delivered at once).
    assert (options.retry_cap, options.interval, options.takeover_after) == (retry_cap, interval, interval)


def test_hook_url_comes_from_the_environment_too() -> None:
    assert parse_serve_args([], environ={"CHUNKGATE_HOOK_URL": "http://app:9000/hooks"}).hook_url == "http://app:9000/hooks"
    assert parse_serve_args([], environ={"CHUNKGATE_HOOK_URL": ""}).hook_url is None


# ------------------------------------------------------------------------------ against a receiver
def stored_files(root: Path) -> list[str]:
    """Every file the fs store holds, relative to its root (temporary files included)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def tus_metadata(**pairs: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in pairs.items())


async def request_bytes(http: aiohttp.ClientSession, base: str) -> float:
    async with http.get(f"{base}/metrics") as resp:
        text = await resp.text()
    return sum(s.value for fam in text_string_to_metric_families(text) if fam.name == "chunkgate_http_request_bytes"
               for s in fam.samples if s.name.endswith("_total"))


async def deliveries(http: aiohttp.ClientSession, base: str) -> dict[tuple[str, str], float]:
    async with http.get(f"{base}/metrics") as resp:
        text = await resp.text()
    return {(s.labels["type"], s.labels["outcome"]): s.value for fam in text_string_to_metric_families(text)
            if fam.name == "chunkgate_hook_deliveries" for s in fam.samples if s.name.endswith("_total")}


@pytest.fixture
async def store_root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
async def gateway(store_root: Path) -> AsyncIterator[tuple[str, HookReceiver, aiohttp.ClientSession]]:
    """A gateway on an fs store whose pre-create hook refuses keys under ``private/`` with 403 and
    anything without the app's session header with 401 (the body says why); post-* events are
    acknowledged."""

    def respond(event: dict[str, Any]) -> tuple[int, str]:
        if event["type"] != "pre-create":
            return 204, ""
        if event["headers"].get("X-App-Session") != "alice":
            return 401, "no app session"
        if event["key"].startswith("private/"):
            return 403, f"alice may not write {event['key']}"
        return 200, "ok"

    async with HookReceiver(respond) as receiver:
        cfg = ServeConfig(chunk_size=64 * 1024, hook_url=receiver.url, hook_timeout=2.0, hook_scan_interval=0.2)
        async with in_process_gateway(cfg, backend=FsBackend(store_root)) as (base, _app), aiohttp.ClientSession() as http:
            yield base, receiver, http


async def test_put_refused_by_the_hook_is_403_with_its_message_and_stores_nothing(
    gateway: tuple[str, HookReceiver, aiohttp.ClientSession], store_root: Path
) -> None:
    base, receiver, http = gateway
    body = os.urandom(3 * 1024 * 1024)
    headers = {"X-App-Session": "alice", "Content-Type": "video/mp4", "Authorization": "Bearer app-token"}
    async with http.put(f"{base}/objects/private/plan.mp4", data=body, headers=headers) as resp:
        assert resp.status == 403
        assert await resp.json() == {"error": "rejected_by_hook", "message": "alice may not write private/plan.mp4"}
    async with http.get(f"{base}/objects/private/plan.mp4") as resp:
        assert resp.status == 404
    assert stored_files(store_root) == []
    assert await request_bytes(http, base) == 0  # refused before a byte of the body was read
    (event,) = receiver.events
    assert event["type"] == "pre-create" and event["key"] == "private/plan.mp4"
    assert event["size"] == len(body) and event["content_type"] == "video/mp4"
    assert event["metadata"] == {} and event["upload_id"] is None
    assert event["headers"] == {"X-App-Session": "alice", "Authorization": "Bearer app-token"}
    assert (await deliveries(http, base))[("pre-create", "refused")] == 1


async def test_put_allowed_by_the_hook_is_stored(
    gateway: tuple[str, HookReceiver, aiohttp.ClientSession], store_root: Path
) -> None:
    base, receiver, http = gateway
    async with http.put(f"{base}/objects/public/a.bin", data=b"hello", headers={"X-App-Session": "alice"}) as resp:
        assert resp.status == 201, await resp.text()
    async with http.get(f"{base}/objects/public/a.bin") as resp:
        assert await resp.read() == b"hello"
    assert stored_files(store_root) and await request_bytes(http, base) == 5  # what the refusal tests see as empty
    assert [e["key"] for e in receiver.of_type("pre-create")] == ["public/a.bin"]
    assert (await deliveries(http, base))[("pre-create", "ok")] == 1


async def test_a_refusal_with_an_empty_body_still_explains_itself(gateway: tuple[str, HookReceiver, aiohttp.ClientSession]) -> None:
    base, receiver, http = gateway
    receiver.respond = lambda event: (422, "")
    async with http.put(f"{base}/objects/a", data=b"x", headers={"X-App-Session": "alice"}) as resp:
        assert resp.status == 403
        doc = await resp.json()
    assert doc["error"] == "rejected_by_hook" and "HTTP 422" in doc["message"]


async def test_a_long_refusal_is_cut_to_1_kib(gateway: tuple[str, HookReceiver, aiohttp.ClientSession]) -> None:
    base, receiver, http = gateway
    receiver.respond = lambda event: (403, "no. " * 2000)
    async with http.put(f"{base}/objects/a", data=b"x", headers={"X-App-Session": "alice"}) as resp:
        assert resp.status == 403
        assert (await resp.json())["message"] == ("no. " * 256).strip()


async def test_tus_create_refused_by_the_hook_creates_no_upload(
    gateway: tuple[str, HookReceiver, aiohttp.ClientSession], store_root: Path
) -> None:
    base, receiver, http = gateway
    headers = {**TUS, "Upload-Length": "1000", "X-App-Session": "alice",
               "Upload-Metadata": tus_metadata(key="private/x.mp4", filetype="video/mp4", note="hi")}
    async with http.post(f"{base}/uploads/", headers=headers) as resp:
        assert resp.status == 403
        assert "Location" not in resp.headers
        assert resp.headers["Tus-Resumable"] == "1.0.0"
        assert await resp.json() == {"error": "rejected_by_hook", "message": "alice may not write private/x.mp4"}
    assert stored_files(store_root) == []
    (event,) = receiver.events
    assert event["size"] == 1000 and event["content_type"] == "video/mp4"
    assert event["metadata"] == {"key": "private/x.mp4", "filetype": "video/mp4", "note": "hi"}
    assert len(event["upload_id"]) == 32


async def test_tus_creation_with_upload_refused_reads_no_body(
    gateway: tuple[str, HookReceiver, aiohttp.ClientSession], store_root: Path
) -> None:
    base, _receiver, http = gateway
    headers = {**TUS, "Upload-Length": str(2 * 1024 * 1024), "Content-Type": "application/offset+octet-stream",
               "Upload-Metadata": tus_metadata(key="a.bin")}  # no app session: 401 from the hook
    async with http.post(f"{base}/uploads/", headers=headers, data=os.urandom(2 * 1024 * 1024)) as resp:
        assert resp.status == 403
        assert (await resp.json())["message"] == "no app session"
    assert stored_files(store_root) == []
    assert await request_bytes(http, base) == 0


async def test_tus_upload_allowed_by_the_hook_carries_the_id_it_was_announced_with(
    gateway: tuple[str, HookReceiver, aiohttp.ClientSession]
) -> None:
    base, receiver, http = gateway
    headers = {**TUS, "Upload-Length": "5", "X-App-Session": "alice", "Upload-Metadata": tus_metadata(key="public/t.bin")}
    async with http.post(f"{base}/uploads/", headers=headers) as resp:
        assert resp.status == 201, await resp.text()
        location = resp.headers["Location"]
    async with http.patch(location, data=b"abcde", headers={**TUS, "Upload-Offset": "0",
                                                            "Content-Type": "application/offset+octet-stream"}) as resp:
        assert resp.status == 204
    (event,) = receiver.of_type("pre-create")
    assert location.endswith("/uploads/" + event["upload_id"])
    async with http.get(f"{base}/objects/public/t.bin") as resp:
        assert await resp.read() == b"abcde"


@pytest.mark.parametrize("failure", ["down", "500", "slow"])
async def test_a_hook_that_cannot_say_yes_fails_uploads_closed_with_503(failure: str, tmp_path: Path) -> None:
    async def respond(event: dict[str, Any]) -> tuple[int, str]:
        if failure == "slow":
            await asyncio.sleep(5)  # beyond --hook-timeout
        return 500, "database is down"

    async with HookReceiver(respond) as receiver:
        if failure == "down":
            await receiver.stop()
        root = tmp_path / "store"
        cfg = ServeConfig(hook_url=receiver.url, hook_timeout=0.5)
        async with in_process_gateway(cfg, backend=FsBackend(root)) as (base, _app), aiohttp.ClientSession() as http:
            async with http.put(f"{base}/objects/a.bin", data=b"x" * 1000) as resp:
                assert resp.status == 503
                doc = await resp.json()
                assert doc["error"] == "hook_unavailable" and "nothing was stored" in doc["message"]
                assert resp.headers["Retry-After"] == "1"
            headers = {**TUS, "Upload-Length": "10", "Upload-Metadata": tus_metadata(key="b.bin")}
            async with http.post(f"{base}/uploads/", headers=headers) as resp:
                assert resp.status == 503
                assert (await resp.json())["error"] == "hook_unavailable"
            assert stored_files(root) == []
            assert (await deliveries(http, base))[("pre-create", "error")] == 2


async def test_without_a_hook_url_nothing_is_asked_and_nothing_is_recorded(tmp_path: Path) -> None:
    """No app: no pre-create, and commits carry no events (nobody would ever deliver them)."""
    async with HookReceiver(lambda e: (403, "no")) as receiver:
        async with in_process_gateway(ServeConfig(), backend=FsBackend(tmp_path / "s")) as (base, _), \
                aiohttp.ClientSession() as http:
            for key in ("a", "b"):
                async with http.put(f"{base}/objects/{key}", data=b"x") as resp:
                    assert resp.status == 201
            headers = {**TUS, "Upload-Length": "5", "Upload-Metadata": tus_metadata(key="t")}
            async with http.post(f"{base}/uploads/", headers=headers) as resp:
                location = resp.headers["Location"]
            async with http.patch(location, data=b"abcde", headers={**TUS, "Upload-Offset": "0",
                                                                    "Content-Type": "application/offset+octet-stream"}) as resp:
                assert resp.status == 204
            async with http.delete(f"{base}/objects/a") as resp:
                assert resp.status == 204
    assert receiver.events == []
    assert not [f for f in stored_files(tmp_path / "s") if f.startswith("o/")]
    records = ManifestStore(FsBackend(tmp_path / "s"))
    for key in ("b", "t"):
        current = await records.read(key)
        assert current is not None and current.manifest is not None and current.events == ()
    tombstone = await records.read("a")
    assert tombstone is not None and tombstone.manifest is None and tombstone.events == ()  # gc's to remove


async def test_put_tus_and_delete_announce_themselves_to_the_app(
    gateway: tuple[str, HookReceiver, aiohttp.ClientSession], store_root: Path
) -> None:
    base, receiver, http = gateway
    async with http.put(f"{base}/objects/public/a.mp4", data=b"hello", headers={"X-App-Session": "alice"}) as resp:
        assert resp.status == 201
        put = await resp.json()
    headers = {**TUS, "Upload-Length": "5", "X-App-Session": "alice",
               "Upload-Metadata": tus_metadata(key="public/t.webm", filetype="video/webm", title="été")}
    async with http.post(f"{base}/uploads/", headers=headers) as resp:
        location = resp.headers["Location"]
    async with http.patch(location, data=b"abcde", headers={**TUS, "Upload-Offset": "0",
                                                            "Content-Type": "application/offset+octet-stream"}) as resp:
        assert resp.status == 204
    async with http.get(f"{base}/objects/public/t.webm?manifest") as resp:
        tus_version = (await resp.json())["version"]
    async with http.delete(f"{base}/objects/public/a.mp4") as resp:
        assert resp.status == 204

    def pointers() -> list[str]:
        return [f for f in stored_files(store_root) if f.startswith("o/")]

    for _ in range(400):  # delivered at once; the pointers go with the next scan
        if len(receiver.of_type("post-finish") + receiver.of_type("post-delete")) == 3 and not pointers():
            break
        await asyncio.sleep(0.05)
    finished = {e["key"]: e for e in receiver.of_type("post-finish")}
    fields = {"id", "type", "time", "key", "size", "etag", "version", "content_type", "upload_id", "metadata"}
    assert set(finished) == {"public/a.mp4", "public/t.webm"} and all(set(e) == fields for e in finished.values())
    assert {k: finished["public/a.mp4"][k] for k in ("size", "etag", "version", "content_type", "upload_id", "metadata")} == \
        {"size": 5, "etag": put["etag"], "version": put["version"], "content_type": "video/mp4", "upload_id": None,
         "metadata": {}}
    tus = finished["public/t.webm"]
    assert location.endswith("/uploads/" + tus["upload_id"]) and tus["version"] == tus_version
    assert tus["metadata"] == {"key": "public/t.webm", "filetype": "video/webm", "title": "été"}
    assert tus["content_type"] == "video/webm" and tus["size"] == 5
    (deleted,) = receiver.of_type("post-delete")
    assert set(deleted) == {"id", "type", "time", "key", "version"}
    assert (deleted["key"], deleted["version"]) == ("public/a.mp4", put["version"])
    assert datetime.fromisoformat(deleted["time"].replace("Z", "+00:00")).utcoffset().total_seconds() == 0  # RFC 3339, UTC
    assert pointers() == []  # the outbox emptied
    tombstone = await ManifestStore(FsBackend(store_root)).read("public/a.mp4")
    assert tombstone is not None and tombstone.manifest is None and tombstone.events == ()  # delivered; gc's to remove
    counts = await deliveries(http, base)
    assert counts[("post-finish", "ok")] == 2 and counts[("post-delete", "ok")] == 1
