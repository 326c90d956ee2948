"""The /objects HTTP surface, as curl and players see it (API.md)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os

import aiohttp
import pytest

from gateway.config import ServeConfig
from tests.support.gateway import in_process_gateway

CHUNK = 64 * 1024


@pytest.fixture
async def gw():
    async with in_process_gateway(ServeConfig(chunk_size=CHUNK)) as (url, app):
        async with aiohttp.ClientSession() as session:
            yield url, session, app


async def raw_request(url: str, request_line: str, headers: str = "") -> tuple[int, bytes]:
    """Send a request line exactly as written: no client library normalizes the path."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"{request_line}\r\nHost: {host}\r\nConnection: close\r\n{headers}\r\n".encode("latin-1"))
    await writer.drain()
    data = await reader.read()
    writer.close()
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


async def test_put_returns_201_with_the_manifest_summary_and_an_etag(gw) -> None:
    url, s, _ = gw
    data = os.urandom(3 * CHUNK + 7)
    async with s.put(f"{url}/objects/videos/a.mp4", data=data) as r:
        assert r.status == 201
        body = await r.json()
        assert body["key"] == "videos/a.mp4" and body["size"] == len(data) and body["chunks"] == 4
        assert r.headers["ETag"] == body["etag"] and body["version"]
    async with s.get(f"{url}/objects/videos/a.mp4") as r:
        assert r.status == 200
        assert await r.read() == data
        assert r.headers["ETag"] == body["etag"]
        assert r.headers["Content-Type"] == "video/mp4"  # guessed from the key
        assert r.headers["Accept-Ranges"] == "bytes"
        assert int(r.headers["Content-Length"]) == len(data)
        assert r.headers["Last-Modified"].endswith("GMT")


async def test_head_sends_the_same_headers_as_get_without_a_body(gw) -> None:
    url, s, _ = gw
    await s.put(f"{url}/objects/a.webm", data=b"x" * 1000)
    for extra in ({}, {"Range": "bytes=10-19"}):
        async with s.get(f"{url}/objects/a.webm", headers=extra) as g:
            await g.read()
        async with s.head(f"{url}/objects/a.webm", headers=extra) as h:
            assert h.status == g.status
            assert await h.read() == b""
            for name in ("Content-Length", "Content-Type", "ETag", "Last-Modified", "Accept-Ranges", "Content-Range"):
                assert h.headers.get(name) == g.headers.get(name), name


async def test_uploaded_content_type_is_kept(gw) -> None:
    url, s, _ = gw
    await s.put(f"{url}/objects/clip", data=b"abc", headers={"Content-Type": "video/webm"})
    async with s.get(f"{url}/objects/clip") as r:
        assert r.headers["Content-Type"] == "video/webm"


@pytest.mark.parametrize(
    "range_header,status,expected_slice,content_range",
    [
        ("bytes=0-1", 206, slice(0, 2), "bytes 0-1/300000"),
        ("bytes=65530-65545", 206, slice(65530, 65546), "bytes 65530-65545/300000"),
        ("bytes=299990-", 206, slice(299990, 300000), "bytes 299990-299999/300000"),
        ("bytes=-100", 206, slice(299900, 300000), "bytes 299900-299999/300000"),
        ("bytes=-999999", 206, slice(0, 300000), "bytes 0-299999/300000"),
        ("bytes=299000-999999", 206, slice(299000, 300000), "bytes 299000-299999/300000"),
        ("bytes=300000-", 416, None, "bytes */300000"),
        ("bytes=5-1", 200, slice(0, 300000), None),
        ("items=0-1", 200, slice(0, 300000), None),
    ],
    ids=["first-two-bytes-safari-probe", "across-a-chunk-boundary", "open-range", "suffix", "suffix-longer-than-object",
         "end-past-eof-clamped", "start-past-eof-unsatisfiable", "invalid-range-ignored", "other-unit-ignored"],
)
async def test_single_ranges_follow_rfc_9110(gw, range_header, status, expected_slice, content_range) -> None:
    url, s, _ = gw
    data = os.urandom(300000)
    await s.put(f"{url}/objects/r.bin", data=data)
    async with s.get(f"{url}/objects/r.bin", headers={"Range": range_header}) as r:
        body = await r.read()
        assert r.status == status
        assert r.headers.get("Content-Range") == content_range
        if expected_slice is not None:
            assert body == data[expected_slice]
            assert int(r.headers["Content-Length"]) == len(body)
        else:
            assert r.headers["Content-Type"].startswith("application/json")
            assert json.loads(body)["error"] == "range_not_satisfiable"


async def test_multiple_ranges_come_back_as_multipart_byteranges(gw) -> None:
    url, s, _ = gw
    data = os.urandom(200000)
    await s.put(f"{url}/objects/m.bin", data=data)
    async with s.get(f"{url}/objects/m.bin", headers={"Range": "bytes=0-9, 150000-150009"}) as r:
        assert r.status == 206
        assert r.headers["Content-Type"].startswith("multipart/byteranges; boundary=")
        body = await r.read()
        assert len(body) == int(r.headers["Content-Length"])
        boundary = r.headers["Content-Type"].split("boundary=", 1)[1].encode()
    # RFC 9110 §14.6 framing, parsed by hand so the test checks the exact bytes on the wire.
    parts = []
    for raw in body.split(b"--" + boundary)[1:-1]:
        head, payload = raw.split(b"\r\n\r\n", 1)
        fields = dict(line.split(b": ", 1) for line in head.strip().split(b"\r\n"))
        assert payload.endswith(b"\r\n")
        parts.append((fields[b"Content-Range"].decode(), payload[:-2]))
    assert body.endswith(b"--" + boundary + b"--\r\n")
    assert parts == [("bytes 0-9/200000", data[0:10]), ("bytes 150000-150009/200000", data[150000:150010])]


async def test_conditional_get_answers_304_and_412(gw) -> None:
    url, s, _ = gw
    async with s.put(f"{url}/objects/c", data=b"abc") as r:
        etag = r.headers["ETag"]
    async with s.get(f"{url}/objects/c", headers={"If-None-Match": etag}) as r:
        assert r.status == 304 and r.headers["ETag"] == etag
    async with s.get(f"{url}/objects/c", headers={"If-Match": '"nope"'}) as r:
        assert r.status == 412 and (await r.json())["error"] == "precondition_failed"
    async with s.get(f"{url}/objects/c", headers={"Range": "bytes=0-0", "If-Range": '"other"'}) as r:
        assert r.status == 200 and await r.read() == b"abc"
    async with s.get(f"{url}/objects/c", headers={"Range": "bytes=0-0", "If-Range": etag}) as r:
        assert r.status == 206 and await r.read() == b"a"


async def test_conditional_puts_refuse_to_clobber(gw) -> None:
    url, s, _ = gw
    async with s.put(f"{url}/objects/p", data=b"one", headers={"If-None-Match": "*"}) as r:
        assert r.status == 201
        etag = r.headers["ETag"]
    async with s.put(f"{url}/objects/p", data=b"two", headers={"If-None-Match": "*"}) as r:
        assert r.status == 412
    async with s.put(f"{url}/objects/p", data=b"two", headers={"If-Match": '"stale"'}) as r:
        assert r.status == 412
    async with s.put(f"{url}/objects/p", data=b"two", headers={"If-Match": etag}) as r:
        assert r.status == 201
    async with s.get(f"{url}/objects/p") as r:
        assert await r.read() == b"two"


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-MD5": base64.b64encode(hashlib.md5(b"else").digest()).decode()},
        {"X-Checksum-SHA256": hashlib.sha256(b"else").hexdigest()},
        {"X-Checksum-SHA256": "not-hex"},
    ],
    ids=["content-md5-mismatch", "sha256-mismatch", "sha256-malformed"],
)
async def test_a_checksum_mismatch_is_a_400_and_nothing_is_committed(gw, headers) -> None:
    url, s, app = gw
    await s.put(f"{url}/objects/sum", data=b"original")
    async with s.put(f"{url}/objects/sum", data=os.urandom(2 * CHUNK), headers=headers) as r:
        assert r.status == 400
        body = await r.json()
        assert set(body) == {"error", "message"}
    async with s.get(f"{url}/objects/sum") as r:
        assert await r.read() == b"original"


async def test_matching_checksums_are_accepted(gw) -> None:
    url, s, _ = gw
    data = os.urandom(CHUNK + 1)
    hdrs = {"Content-MD5": base64.b64encode(hashlib.md5(data).digest()).decode(),
            "X-Checksum-SHA256": hashlib.sha256(data).hexdigest()}
    async with s.put(f"{url}/objects/ok", data=data, headers=hdrs) as r:
        assert r.status == 201
    async with s.get(f"{url}/objects/ok") as r:
        assert (r.status, await r.read()) == (200, data)


async def test_delete_is_204_then_404(gw) -> None:
    url, s, _ = gw
    await s.put(f"{url}/objects/d", data=b"x")
    async with s.delete(f"{url}/objects/d") as r:
        assert r.status == 204
    async with s.delete(f"{url}/objects/d") as r:
        assert r.status == 404 and (await r.json())["error"] == "not_found"
    async with s.get(f"{url}/objects/d") as r:
        assert r.status == 404


async def test_manifest_endpoint_returns_the_api_md_format(gw) -> None:
    url, s, _ = gw
    data = os.urandom(2 * CHUNK + 5)
    await s.put(f"{url}/objects/videos/m.mp4", data=data)
    async with s.get(f"{url}/objects/videos/m.mp4?manifest") as r:
        doc = await r.json()
    assert doc["format"] == "chunkgate.manifest/1" and doc["key"] == "videos/m.mp4"
    assert doc["size"] == len(data) and doc["chunk_size"] == CHUNK and doc["content_type"] == "video/mp4"
    assert [c["size"] for c in doc["chunks"]] == [CHUNK, CHUNK, 5]
    assert [c["offset"] for c in doc["chunks"]] == [0, CHUNK, 2 * CHUNK]
    assert doc["chunks"][2]["sha256"] == hashlib.sha256(data[2 * CHUNK:]).hexdigest()
    assert doc["created"].endswith("Z")


async def test_listing_pages_in_key_order(gw) -> None:
    url, s, _ = gw
    for k in ["v/b", "v/a", "w/c", "v/c"]:
        await s.put(f"{url}/objects/{k}", data=k.encode())
    async with s.get(f"{url}/objects", params={"prefix": "v/", "limit": "2"}) as r:
        page = await r.json()
    assert [o["key"] for o in page["objects"]] == ["v/a", "v/b"] and page["next_after"] == "v/b"
    assert set(page["objects"][0]) == {"key", "size", "etag", "last_modified", "content_type"}
    async with s.get(f"{url}/objects", params={"prefix": "v/", "limit": "2", "after": "v/b"}) as r:
        page = await r.json()
    assert [o["key"] for o in page["objects"]] == ["v/c"] and page["next_after"] is None
    async with s.get(f"{url}/objects", params={"limit": "0"}) as r:
        assert r.status == 400


@pytest.mark.parametrize(
    "path",
    ["/objects/a%0Ab", "/objects/a%00b", "/objects/a/../b", "/objects/./a", "/objects/a//b", "/objects/%2Fabs",
     "/objects/a/..", "/objects/%FF", "/objects/" + "x" * 1025],
    ids=["newline", "nul", "dot-dot-segment", "dot-segment", "empty-segment", "leading-slash", "trailing-dot-dot",
         "invalid-utf8", "longer-than-1024-bytes"],
)
async def test_bad_keys_are_a_400_with_a_json_error(gw, path) -> None:
    url, _, _ = gw
    for method in ("GET", "PUT"):
        status, body = await raw_request(url, f"{method} {path} HTTP/1.1", "Content-Length: 0\r\n")
        assert status == 400, (method, path, body)
        assert b'"error": "bad_key"' in body


async def test_unicode_and_space_keys_round_trip(gw) -> None:
    url, s, _ = gw
    async with s.put(f"{url}/objects/vidéos/mon film.mp4", data=b"data") as r:
        assert r.status == 201
        assert (await r.json())["key"] == "vidéos/mon film.mp4"
    async with s.get(f"{url}/objects/vid%C3%A9os/mon%20film.mp4") as r:
        assert r.status == 200 and await r.read() == b"data"


async def test_health_readiness_admin_and_metrics_answer(gw) -> None:
    url, s, _ = gw
    async with s.get(f"{url}/healthz") as r:
        assert r.status == 200
    async with s.get(f"{url}/readyz") as r:
        assert r.status == 200
    async with s.get(f"{url}/admin/locks") as r:
        doc = await r.json()
        assert doc["totals"]["active"] == 0 and doc["locks"] == []
    async with s.get(f"{url}/metrics") as r:
        text = await r.text()
    for name in ("chunkgate_locks_active", "chunkgate_lock_wait_seconds_bucket", "chunkgate_cache_hits_total",
                 "chunkgate_backend_requests_total", "chunkgate_http_requests_total"):
        assert name in text, name


async def test_unknown_routes_and_methods_get_json_errors(gw) -> None:
    url, s, _ = gw
    async with s.get(f"{url}/nope") as r:
        assert r.status == 404 and (await r.json())["error"] == "not_found"
    async with s.post(f"{url}/objects/x") as r:
        assert r.status == 405 and "GET" in r.headers["Allow"]
