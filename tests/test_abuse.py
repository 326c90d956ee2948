"""Hostile requests and hostile store contents: path traversal against the fs store through
HTTP, and manifests planted in the store that the gateway must refuse cleanly."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import ServeConfig
from storage import keys
from storage.backends.fs import FsBackend
from storage.backends.memory import MemoryBackend
from tests.support.gateway import in_process_gateway


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


async def raw_request(url: str, method: str, target: str, body: bytes = b"") -> tuple[int, bytes]:
    """Send the request target exactly as written: no client normalizes or re-encodes it."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                     f"Connection: close\r\n\r\n".encode("latin-1") + body)
        await writer.drain()
        resp = await asyncio.wait_for(reader.read(), timeout=20)
    finally:
        writer.close()
    head, _, payload = resp.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), payload


TRAVERSALS = [
    "/objects/../../outside/pwned",
    "/objects/..%2F..%2Foutside%2Fpwned",
    "/objects/%2E%2E/%2E%2E/outside/pwned",
    "/objects/%2e%2e%2f%2e%2e%2foutside%2fpwned",
    "/objects/a/../../../outside/pwned",
    "/objects/%2Ftmp%2Fpwned",
    "/objects//etc/passwd",
    "/objects/%2F%2Fetc%2Fpasswd",
    "/objects/a%00b",
    "/objects/..%00/pwned",
    "/objects/..%5C..%5Coutside%5Cpwned",
    "/objects/a%5C..%5C..%5Cpwned",
    "/objects/..\\..\\outside\\pwned",
    "/objects/%252E%252E/%252E%252E/outside/pwned",  # double-encoded: a literal '%2E%2E' key
    "/objects/./pwned",
    "/objects/a/./b",
    "/objects/%C0%AE%C0%AE/pwned",  # overlong UTF-8 for '.'
]


@pytest.mark.parametrize("target", TRAVERSALS)
async def test_path_traversal_through_http_never_writes_outside_the_fs_root(target: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"precious")
    before = files_under(tmp_path)
    async with in_process_gateway(ServeConfig(chunk_size=1024), backend=FsBackend(root)) as (url, _app):
        for method in ("PUT", "GET", "DELETE", "HEAD"):
            status, body = await raw_request(url, method, target, b"evil" if method == "PUT" else b"")
            if "%25" in target or "%5C" in target or "\\" in target:
                # The double-encoded form names a legal key ('%2E%2E' is just text), and so do
                # backslashes (API.md allows them; no segment is '..'): each lands inside the
                # root under an encoded name and reads back as written.
                assert status == {"PUT": 201, "GET": 200, "DELETE": 204, "HEAD": 404}[method], (method, status, body)
                if method == "GET":
                    assert body == b"evil"
            else:
                assert status in (400, 404, 204 if method == "DELETE" else 404), (method, target, status, body)
                if method != "HEAD" and body:
                    assert "error" in json.loads(body)
    after = files_under(tmp_path)
    assert {p for p in after - before if not p.startswith("root")} == set()
    assert (outside / "keep").read_bytes() == b"precious"
    assert files_under(outside) == {"keep"}


async def test_a_backslash_key_is_stored_and_read_back_by_the_fs_store(tmp_path: Path) -> None:
    # API.md allows backslashes; the embedded store holds them (encoded) like any other key.
    async with in_process_gateway(ServeConfig(chunk_size=1024), backend=FsBackend(tmp_path / "root")) as (url, _app):
        status, body = await raw_request(url, "PUT", "/objects/dir%5C..%5Cfile", b"payload")
        assert status == 201, body
        status, body = await raw_request(url, "GET", "/objects/dir%5C..%5Cfile")
        assert (status, body) == (200, b"payload")
        status, body = await raw_request(url, "GET", "/objects?prefix=dir")
        assert [o["key"] for o in json.loads(body)["objects"]] == ["dir\\..\\file"]
    assert all((tmp_path / "root") in p.parents for p in tmp_path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------ hostile manifests
def good_manifest(key: str) -> dict[str, Any]:
    return {"format": "chunkgate.manifest/1", "key": key, "version": "0190f0a0b0c0d0e0", "size": 10,
            "content_type": "video/mp4", "created": "2026-11-22T10:00:00Z", "chunk_size": 10,
            "chunks": [{"index": 0, "offset": 0, "size": 10, "sha256": "ab" * 32}]}


def mutated(object_key: str, **changes: Any) -> bytes:
    doc = good_manifest(object_key)
    doc.update(changes)
    return json.dumps(doc).encode()


HOSTILE = {
    "not-json": lambda k: b"\x00\xff not json",
    "empty": lambda k: b"",
    "array": lambda k: b"[]",
    "wrong-format": lambda k: mutated(k, format="chunkgate.manifest/999"),
    "other-key": lambda k: mutated(k, key="someone/else"),
    "negative-size": lambda k: mutated(k, size=-1),
    "sizes-dont-add-up": lambda k: mutated(k, size=10**12),
    "chunk-past-end": lambda k: mutated(k, chunks=[{"index": 0, "offset": 5, "size": 10, "sha256": "ab" * 32}]),
    "float-size": lambda k: mutated(k, size=10.0),
    "bool-size": lambda k: mutated(k, chunks=[{"index": 0, "offset": 0, "size": True, "sha256": "ab" * 32}], size=1),
    "bad-sha": lambda k: mutated(k, chunks=[{"index": 0, "offset": 0, "size": 10, "sha256": "../../etc/passwd"}]),
    "traversal-version": lambda k: mutated(k, version="../../../../tmp/x"),
    "header-injection": lambda k: mutated(k, content_type="video/mp4\r\nSet-Cookie: a=b"),
    "missing-chunk": lambda k: mutated(k),  # well-formed, but no chunk was ever stored
    "nan-size": lambda k: json.dumps(good_manifest(k)).replace('"size": 10,', '"size": NaN,', 1).encode(),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_a_hostile_manifest_in_the_store_gives_a_clean_502(name: str) -> None:
    raw = MemoryBackend()
    key = "videos/planted.mp4"
    await raw.put(keys.manifest_key(key), HOSTILE[name](key))
    async with in_process_gateway(ServeConfig(chunk_size=1024), backend=raw) as (url, _app), \
            aiohttp.ClientSession() as session:
        for headers in ({}, {"Range": "bytes=0-4"}, {"Range": "bytes=-3"}):
            async with session.get(f"{url}/objects/{key}", headers=headers) as r:
                body = await r.read()
                assert r.status == 502, (name, r.status, body[:200])
                assert r.content_type == "application/json"
                doc = json.loads(body)
                assert doc["error"] in ("corrupt_manifest", "store_error") and doc["message"]
                assert "Set-Cookie" not in r.headers
        well_formed = name == "missing-chunk"  # HEAD and ?manifest need no chunk
        async with session.head(f"{url}/objects/{key}") as r:
            assert r.status == (200 if well_formed else 502)
        async with session.get(f"{url}/objects/{key}?manifest") as r:
            assert r.status == (200 if well_formed else 502)
        async with session.get(f"{url}/objects?prefix=videos/") as r:  # listing survives it
            assert r.status == 200
        async with session.get(f"{url}/healthz") as r:
            assert r.status == 200
