"""Structured logs of a real ``chunkgate serve --log-format json`` process.

What this module is for: proving what an operator's log pipeline relies on: every stderr line is
one JSON object; each request gets exactly one access line carrying request_id, method, path,
status and duration; a client's X-Request-Id is honoured, echoed and logged (and a missing or
unusable one is replaced by a generated id that is echoed too); bearer tokens and URL signatures
never reach the logs; tolerated chunk size drift and stale lock clears are warnings naming the key
and the figures.

What it must never do: read the store's internals beyond finding a chunk file to damage (the fs
store is a plain directory), listen anywhere but 127.0.0.1, or assert on timings.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.auth import signed_url
from tests.support.gateway import GatewayProcess

pytestmark = pytest.mark.timeout(120)

REPO_ROOT = Path(__file__).resolve().parents[1]
CHUNK = 64 * 1024
TOKEN = "tok-Zq8rW2mN5vX1cK7b"
WRONG_TOKEN = "tok-WRONG-b4Jt9sLq3hP6"
SIGNING_KEY = "sk-logs-Hd73kPq0aZ"
GENERATED_ID = re.compile(r"^[0-9a-f]{32}$")


def start(tmp_path: Path, *extra: str) -> GatewayProcess:
    return GatewayProcess(["--store", str(tmp_path / "store"), "--log-format", "json", "--chunk-size", str(CHUNK),
                           "--auth-token", TOKEN, *extra], cwd=REPO_ROOT)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayProcess]:
    gw = start(tmp_path)
    try:
        yield gw
    finally:
        gw.stop()


def json_lines(gw: GatewayProcess) -> list[dict[str, Any]]:
    """Every stderr line parsed; a line that is not one JSON object fails the test."""
    docs = []
    for line in list(gw.stderr_lines):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            pytest.fail(f"stderr line is not JSON: {line!r}")
        assert isinstance(doc, dict), line
        assert {"time", "level", "logger", "message"} <= doc.keys(), doc
        docs.append(doc)
    return docs


async def wait_for_line(gw: GatewayProcess, match: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for doc in json_lines(gw):
            if match(doc):
                return doc
        await asyncio.sleep(0.1)
    pytest.fail("no such log line; stderr was:\n" + "".join(gw.stderr_lines[-30:]))


AUTH = {"Authorization": f"Bearer {TOKEN}"}
# (method, path, request headers, body, expected status). Each is sent once with a client request
# id and once without; between them they touch every kind of route and the auth and error paths.
REQUESTS: list[tuple[str, str, dict[str, str], bytes | None, int]] = [
    ("PUT", "/objects/logs/a.mp4", AUTH, b"a" * (CHUNK + 10), 201),
    ("GET", "/objects/logs/a.mp4", {}, None, 200),
    ("GET", "/objects/logs/a.mp4", {"Range": "bytes=0-99"}, None, 206),
    ("HEAD", "/objects/logs/a.mp4", {}, None, 200),
    ("GET", "/objects/logs/missing.mp4", {}, None, 404),
    ("GET", "/objects/logs/a.mp4", {"Range": "bytes=999999-"}, None, 416),
    ("PUT", "/objects/logs/b.mp4", {}, b"b", 401),
    ("PUT", "/objects/logs/b.mp4", {"Authorization": f"Bearer {WRONG_TOKEN}"}, b"b", 403),
    ("DELETE", "/objects/logs/a.mp4", AUTH, None, 204),
    ("GET", "/admin/locks", AUTH, None, 200),
    ("GET", "/healthz", {}, None, 200),
    ("GET", "/metrics", {}, None, 200),
    ("GET", "/no/such/route", {}, None, 404),
]


async def test_one_json_access_line_per_request_with_request_id(gateway: GatewayProcess) -> None:
    sent: list[tuple[str, str, int, str]] = []  # method, path, status, request id the response named
    async with aiohttp.ClientSession() as session:
        for n, (method, path, headers, body, expected) in enumerate(REQUESTS):
            for client_id in (f"client-{n}-{method.lower()}", None):
                hdrs = dict(headers)
                if client_id:
                    hdrs["X-Request-Id"] = client_id
                async with session.request(method, gateway.url + path, headers=hdrs, data=body) as r:
                    await r.read()
                    assert r.status == expected, (method, path, r.status)
                    echoed = r.headers.get("X-Request-Id", "")
                if client_id:
                    assert echoed == client_id
                else:
                    assert GENERATED_ID.match(echoed), echoed
                sent.append((method, path, expected, echoed))
                if method == "DELETE":  # put it back, so the second DELETE is a 204 too
                    async with session.put(gateway.url + path, headers=AUTH, data=b"again") as r:
                        assert r.status == 201
                        sent.append(("PUT", path, 201, r.headers["X-Request-Id"]))
    assert gateway.stop() == 0

    access = [d for d in json_lines(gateway) if d["logger"] == "chunkgate.access"]
    by_id: dict[str, list[dict[str, Any]]] = {}
    for doc in access:
        by_id.setdefault(doc["request_id"], []).append(doc)
    assert len(access) == len(sent), "one access line per request, no more"
    for method, path, status, rid in sent:
        lines = by_id.get(rid, [])
        assert len(lines) == 1, (rid, method, path, lines)
        line = lines[0]
        assert (line["method"], line["path"], line["status"]) == (method, path, status)
        assert isinstance(line["duration_s"], (int, float)) and line["duration_s"] >= 0
        assert line["level"] == "info"
    assert len({rid for *_, rid in sent}) == len(sent), "generated request ids are unique"


@pytest.mark.parametrize("client_id, honoured", [
    ("abc-123", True),
    ("trace=00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", True),
    ("x" * 128, True),
    ("x" * 129, False),  # too long to be a sane id: replaced
    ("", False),
])
async def test_client_request_id_honoured_or_replaced(gateway: GatewayProcess, client_id: str, honoured: bool) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/objects/nothing/here", headers={"X-Request-Id": client_id}) as r:
            assert r.status == 404
            echoed = r.headers["X-Request-Id"]
    if honoured:
        assert echoed == client_id
    else:
        assert GENERATED_ID.match(echoed)
    line = await wait_for_line(gateway, lambda d: d["logger"] == "chunkgate.access" and d.get("request_id") == echoed)
    assert line["status"] == 404 and line["path"] == "/objects/nothing/here"


async def test_tokens_and_signatures_never_logged(tmp_path: Path) -> None:
    # Debug level: whatever anything logs, credentials must not be in it.
    gw = start(tmp_path, "--signing-key", SIGNING_KEY, "--log-level", "debug")
    try:
        async with aiohttp.ClientSession() as session:
            async with session.put(gw.url + "/objects/secret/v.mp4", headers=AUTH, data=b"v" * 1000) as r:
                assert r.status == 201
            async with session.put(gw.url + "/objects/secret/w.mp4",
                                   headers={"Authorization": f"Bearer {WRONG_TOKEN}"}, data=b"w") as r:
                assert r.status == 403
            async with session.get(gw.url + "/admin/locks", headers={"Authorization": f"Basic {WRONG_TOKEN}"}) as r:
                assert r.status in (401, 403)
            url = signed_url(gw.url, SIGNING_KEY, "secret/v.mp4", 3600)
            signature = url.rsplit("signature=", 1)[1]
            async with session.get(url) as r:
                assert r.status == 200
            async with session.get(url.replace("secret/v.mp4", "secret/other.mp4")) as r:
                assert r.status == 403  # a signature for another key
            meta = "key " + base64.b64encode(b"secret/t.mp4").decode()
            async with session.post(gw.url + "/uploads/", headers={**AUTH, "Tus-Resumable": "1.0.0",
                                                                   "Upload-Length": "3", "Upload-Metadata": meta}) as r:
                assert r.status == 201
    finally:
        assert gw.stop() == 0
    docs = json_lines(gw)
    text = "".join(gw.stderr_lines)
    assert sum(d["logger"] == "chunkgate.access" for d in docs) == 6
    for secret in (TOKEN, WRONG_TOKEN, SIGNING_KEY, signature):
        assert secret not in text, f"{secret!r} leaked into the logs"
    signed = [d for d in docs if d["logger"] == "chunkgate.access" and d["path"] == "/objects/secret/v.mp4" and d["method"] == "GET"]
    assert signed and "signature=REDACTED" in signed[0]["message"]  # the request is still recognisable


def chunk_file(store: Path, data: bytes) -> Path:
    """The fs store's file holding exactly ``data`` (the store is a plain directory tree)."""
    found = [p for p in store.rglob("*") if p.is_file() and p.stat().st_size == len(data) and p.read_bytes() == data]
    assert len(found) == 1, found
    return found[0]


async def test_tolerated_size_drift_is_a_warning_with_key_and_figures(gateway: GatewayProcess, tmp_path: Path) -> None:
    body = os.urandom(3 * CHUNK + 5)
    async with aiohttp.ClientSession() as session:
        async with session.put(gateway.url + "/objects/drift/clip.mp4", headers=AUTH, data=body) as r:
            assert r.status == 201
        # A store that rewrote chunk 1 with 100 extra bytes: within the default 2048-byte tolerance.
        with open(chunk_file(tmp_path / "store", body[CHUNK:2 * CHUNK]), "ab") as f:
            f.write(b"\0" * 100)
        async with session.get(gateway.url + "/objects/drift/clip.mp4", headers={"X-Request-Id": "drift-read"}) as r:
            try:
                await r.read()
            except aiohttp.ClientPayloadError:
                pass  # the response may be cut where the drift is found; the log line is the point
    line = await wait_for_line(gateway, lambda d: d["level"] == "warning" and "tolerated" in d["message"])
    assert line["logger"] == "chunkgate.objects"
    for figure in ("drift/clip.mp4", "chunk=1", str(CHUNK), str(CHUNK + 100)):
        assert figure in line["message"], line
    assert await wait_for_line(gateway, lambda d: d["logger"] == "chunkgate.access" and d.get("request_id") == "drift-read")


async def test_stale_lock_clear_is_a_warning_with_key_and_figures(tmp_path: Path) -> None:
    gw = start(tmp_path, "--lock-stale-after", "1s")
    writer: asyncio.StreamWriter | None = None
    try:
        async with aiohttp.ClientSession() as session:
            meta = "key " + base64.b64encode(b"stale/upload.mp4").decode()
            async with session.post(gw.url + "/uploads/", headers={**AUTH, "Tus-Resumable": "1.0.0",
                                                                   "Upload-Length": str(CHUNK), "Upload-Metadata": meta}) as r:
                assert r.status == 201
                location = r.headers["Location"]
        upload_id = location.rstrip("/").rsplit("/", 1)[1]
        # A client that sends half of a PATCH body and then goes quiet: the upload's lock is held
        # by a request that stops renewing it.
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        head = (f"PATCH /uploads/{upload_id} HTTP/1.1\r\nHost: 127.0.0.1\r\nTus-Resumable: 1.0.0\r\n"
                f"Authorization: Bearer {TOKEN}\r\nUpload-Offset: 0\r\n"
                f"Content-Type: application/offset+octet-stream\r\nContent-Length: {CHUNK}\r\n\r\n")
        writer.write(head.encode() + b"\1" * 1000)
        await writer.drain()
        line = await wait_for_line(gw, lambda d: d["logger"] == "chunkgate.locks" and "stale" in d["message"])
        assert line["level"] == "warning"
        assert upload_id in line["message"]
        assert re.search(r"not renewed for \d+\.\d+s", line["message"]), line
        assert "stale after 1.0s" in line["message"], line
    finally:
        if writer is not None:
            writer.close()  # before stop(), which blocks this loop: else the server drains a stalled PATCH
            await writer.wait_closed()
        gw.stop()
