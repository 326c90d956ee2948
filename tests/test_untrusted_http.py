"""Uploads are untrusted content, seen over HTTP from real ``chunkgate serve`` processes: each
``--active-content`` mode's headers on every kind of object answer, nosniff and a version-less
``Server`` on every answer (aiohttp's own included), the strict headers of the gateway's pages,
no key reflected into HTML, and uploads refused as the gateway pages' own code.

The browser-side consequences (what an uploaded page can and cannot read) are in
tests/test_untrusted_chromium.py.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Iterator

import aiohttp
import pytest
import requests
from aiohttp import web

from gateway import security
from gateway.app import build_app
from gateway.config import ServeConfig
from storage.backends.memory import MemoryBackend
from tests.support.gateway import GatewayProcess

ROOT = Path(__file__).resolve().parents[1]
MODES = ("sandbox", "attachment", "inline")

# (key, Content-Type sent on PUT, is media)
UPLOADS = [
    ("site/page.html", "text/html; charset=utf-8", False),
    ("site/logo.svg", "image/svg+xml", False),
    ("ladder/manifest.mpd", "application/dash+xml", False),
    ("notes/readme.txt", "text/plain", False),
    ("site/app.js", "text/javascript", False),
    ("videos/clip.mp4", "video/mp4", True),
    ("ladder/master.m3u8", "application/vnd.apple.mpegurl", True),
    ("ladder/subs.vtt", "text/vtt", True),
    ("images/poster.png", "image/png", True),
]
BODY = b"<script>document.title = 'ran'</script>" + bytes(range(256)) * 4


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, GatewayProcess]]:
    """One serve process per mode: the default (no setting), the flag, and the environment variable."""
    env = {"PYTHONPATH": str(ROOT)}
    procs = {
        "sandbox": GatewayProcess(["--store", str(tmp_path_factory.mktemp("sandbox"))], env=env),
        "attachment": GatewayProcess(["--store", str(tmp_path_factory.mktemp("attachment")), "--active-content", "attachment"], env=env),
        "inline": GatewayProcess(["--store", str(tmp_path_factory.mktemp("inline"))], env={**env, "CHUNKGATE_ACTIVE_CONTENT": "inline"}),
    }
    try:
        for gw in procs.values():
            for key, content_type, _ in UPLOADS:
                resp = requests.put(f"{gw.url}/objects/{key}", data=BODY, headers={"Content-Type": content_type}, timeout=30)
                assert resp.status_code == 201, resp.text
        yield procs
    finally:
        for gw in procs.values():
            gw.stop()


def expected_object_headers(mode: str, media: bool) -> dict[str, str | None]:
    sandbox = {"Content-Security-Policy": None, "Content-Disposition": None}
    if media or mode == "inline":
        return sandbox
    if mode == "sandbox":
        return {**sandbox, "Content-Security-Policy": "sandbox allow-scripts"}
    return {"Content-Security-Policy": "sandbox", "Content-Disposition": "attachment"}


def assert_common(resp: requests.Response) -> None:
    assert resp.headers.get("X-Content-Type-Options") == "nosniff", (resp.request.method, resp.url, dict(resp.headers))
    assert resp.headers.get("Server") == "chunkgate", (resp.url, resp.headers.get("Server"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("key,content_type,media", UPLOADS, ids=[u[0] for u in UPLOADS])
def test_every_answer_for_an_object_carries_its_modes_headers(gateways: dict[str, GatewayProcess], mode: str, key: str,
                                                              content_type: str, media: bool) -> None:
    url = f"{gateways[mode].url}/objects/{key}"
    full = requests.get(url, timeout=30)
    assert full.status_code == 200 and full.content == BODY
    assert full.headers["Content-Type"] == content_type  # the stored type, never rewritten
    answers = {
        "200": full,
        "HEAD": requests.head(url, timeout=30),
        "206": requests.get(url, headers={"Range": "bytes=0-9"}, timeout=30),
        "multi-range 206": requests.get(url, headers={"Range": "bytes=0-1,5-6"}, timeout=30),
        "304": requests.get(url, headers={"If-None-Match": full.headers["ETag"]}, timeout=30),
    }
    assert [a.status_code for a in answers.values()] == [200, 200, 206, 206, 304]
    want = expected_object_headers(mode, media)
    for name, resp in answers.items():
        assert_common(resp)
        got = {h: resp.headers.get(h) for h in want}
        assert got == want, f"{name} of {key} in {mode} mode"


# (method, path, extra headers, body, expected status)
GATEWAY_ANSWERS = [
    ("GET", "/healthz", {}, None, 200),
    ("GET", "/readyz", {}, None, 200),
    ("GET", "/metrics", {}, None, 200),
    ("GET", "/admin/locks", {}, None, 200),
    ("GET", "/objects?prefix=site/", {}, None, 200),
    ("GET", "/objects/site/page.html?manifest", {}, None, 200),
    ("GET", "/objects/no/such/key", {}, None, 404),
    ("GET", "/nowhere", {}, None, 404),
    ("POST", "/healthz", {}, b"x", 404),
    ("DELETE", "/objects/site/page.html", {"If-Match": "\"stale\""}, None, 412),
    ("PATCH", "/objects/site/page.html", {}, b"x", 405),
    ("PUT", "/objects/a%00b", {}, b"x", 400),
    ("GET", "/objects/site/page.html", {"Range": "bytes=999999-"}, None, 416),
    ("OPTIONS", "/uploads/", {}, None, 204),
    ("POST", "/uploads/", {"Tus-Resumable": "1.0.0", "Upload-Length": "3", "Upload-Metadata": "key dC50eHQ="}, None, 201),
    ("OPTIONS", "/objects/site/page.html",
     {"Origin": "http://elsewhere.example", "Access-Control-Request-Method": "GET"}, None, 204),
]


@pytest.mark.parametrize("method,path,headers,body,status", GATEWAY_ANSWERS, ids=[f"{a[0]} {a[1]}" for a in GATEWAY_ANSWERS])
def test_every_gateway_answer_has_nosniff_and_no_version(gateways: dict[str, GatewayProcess], method: str, path: str,
                                                         headers: dict[str, str], body: bytes | None, status: int) -> None:
    resp = requests.request(method, gateways["sandbox"].url + path, headers=headers, data=body, timeout=30)
    assert resp.status_code == status, resp.text
    assert_common(resp)
    assert "aiohttp" not in json.dumps(dict(resp.headers)) and "Python" not in json.dumps(dict(resp.headers))
    if path.endswith("page.html") and status == 416:
        return  # an object read: its answer carries the object's policy (asserted above)
    # The gateway's own answers are data, never pages: a browser made to render one runs nothing.
    assert resp.headers.get("Content-Security-Policy") == security.API_CSP


@pytest.mark.parametrize("path", ["/ui", "/ui/", "/ui/app.js", "/ui/deep/page.html"])
def test_the_gateway_pages_get_the_strict_page_headers(gateways: dict[str, GatewayProcess], path: str) -> None:
    resp = requests.get(gateways["sandbox"].url + path, timeout=30)
    assert_common(resp)
    for name, value in security.PAGE_HEADERS.items():
        assert resp.headers.get(name) == value, name
    csp = resp.headers["Content-Security-Policy"]
    assert "'unsafe-inline'" not in csp and "frame-ancestors 'none'" in csp and "script-src 'self'" in csp


def test_paths_that_only_look_like_ui_are_not_pages(gateways: dict[str, GatewayProcess]) -> None:
    resp = requests.get(gateways["sandbox"].url + "/uix", timeout=30)
    assert resp.headers.get("Content-Security-Policy") == security.API_CSP and "X-Frame-Options" not in resp.headers


MARKUP = "<script>alert(document.domain)</script>"


@pytest.mark.parametrize("path", [
    f"/objects/{MARKUP}", f"/objects/x/{MARKUP}?manifest", f"/objects?prefix={MARKUP}&limit=abc",
    f"/objects?prefix={MARKUP}", f"/{MARKUP}", f"/objects/{MARKUP}%00",
])
@pytest.mark.parametrize("accept", ["*/*", "text/html,application/xhtml+xml"])
def test_a_key_with_markup_is_never_answered_as_html(gateways: dict[str, GatewayProcess], path: str, accept: str) -> None:
    resp = requests.get(gateways["sandbox"].url + path, headers={"Accept": accept}, timeout=30)
    assert resp.headers["Content-Type"].startswith("application/json"), resp.headers["Content-Type"]
    resp.json()  # a JSON body, whatever it echoes
    assert_common(resp)


def raw_exchange(port: int, request: bytes) -> tuple[str, str]:
    """Send bytes no HTTP client would and read the answer until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.decode("utf-8", "replace").partition("\r\n\r\n")
    return head, body


@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.1\r\nHost: x\r\nNot a <header>\r\n\r\n",
    b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"G<T / HTTP/1.1\r\nHost: x\r\n\r\n",
], ids=["bad-header", "line-over-16KiB", "bad-method"])
def test_answers_aiohttp_writes_itself_are_json_with_the_same_headers(gateways: dict[str, GatewayProcess],
                                                                      request_bytes: bytes) -> None:
    head, body = raw_exchange(gateways["sandbox"].port, request_bytes)
    lines = head.split("\r\n")
    assert lines[0].split()[1] == "400", head
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    assert headers["server"] == "chunkgate" and headers["x-content-type-options"] == "nosniff"
    assert headers["content-type"].startswith("application/json")
    doc = json.loads(body)
    assert doc["error"] == "bad_request" and doc["message"].startswith("the request could not be parsed")
    assert "<" not in body  # the request's own bytes are not echoed back


CODE_LOADS = [
    ({"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Dest": "script"}, True),
    ({"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Dest": "serviceworker", "Service-Worker": "script"}, True),
    ({"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Dest": "worker"}, True),
    ({"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Dest": "script"}, False),  # a sandboxed page's own script
    ({"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Dest": "video"}, False),
    ({}, False),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("headers,refused", CODE_LOADS, ids=[f"{h.get('Sec-Fetch-Site')}-{h.get('Sec-Fetch-Dest')}" for h, _ in CODE_LOADS])
def test_uploads_are_refused_as_code_of_the_gateways_own_pages(gateways: dict[str, GatewayProcess], mode: str,
                                                                headers: dict[str, str], refused: bool) -> None:
    resp = requests.get(f"{gateways[mode].url}/objects/site/app.js", headers=headers, timeout=30)
    if refused and mode != "inline":
        assert resp.status_code == 403 and resp.json()["error"] == "untrusted_content"
    else:
        assert resp.status_code == 200 and resp.content == BODY
    assert_common(resp)


async def test_an_exception_escaping_every_middleware_is_a_json_500_even_for_a_browser() -> None:
    """The other answer aiohttp writes itself: for a browser (Accept: text/html) it used to be an
    HTML page naming aiohttp. A middleware outside all of the gateway's raises here, so the
    gateway's own error mapping cannot catch it, exactly as a bug in that layer would."""
    app = build_app(ServeConfig(), backend=MemoryBackend())

    @web.middleware
    async def broken(request: web.Request, handler: object) -> web.StreamResponse:
        raise RuntimeError("a bug outside the error middleware")

    app.middlewares.insert(0, broken)
    runner = web.AppRunner(app, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{port}/healthz", headers={"Accept": "text/html"}) as resp:
            body = await resp.json()
            assert resp.status == 500 and resp.headers["Content-Type"].startswith("application/json")
            assert resp.headers["Server"] == "chunkgate" and resp.headers["X-Content-Type-Options"] == "nosniff"
            assert body == {"error": "internal_server_error", "message": "the gateway failed unexpectedly; the error is logged"}
    finally:
        await runner.cleanup()
