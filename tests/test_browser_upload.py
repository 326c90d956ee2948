"""A browser upload survives a page reload: headless Chromium, tus-js-client, another origin.

The page (tests/js/browser-upload.html, the README's example) is served by a little static server
on its own port, so every upload request is cross-origin and only works if the gateway's CORS
answers are right, custom app headers included. The test picks a 64 MiB file in the page's file
input (DevTools ``DOM.setFileInputFiles``, what the file dialog does), reloads the page while a
PATCH is in flight, picks the same file again, and the page continues the upload it finds in its
origin's localStorage (tus-js-client's fingerprint + URL storage). The gateway's access log must
show the resume — a HEAD answering a non-zero offset and the next PATCH starting there — and the
stored object must be byte-exact. The app's pre-create hook (a receiver in the test) admits the
upload because the page passes the app's session in an ``X-App-Session`` header, and is asked
once: resuming is not creating. Once committed, the app hears of it exactly once: one post-finish
naming the version, the upload id and the page's tus metadata.

Chromium's network emulation slows the upload down (as a real uplink would), so the reload
reliably lands mid-upload.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import shutil
import subprocess
from pathlib import Path
from typing import AsyncIterator
from urllib.parse import urlencode

import aiohttp
import pytest
from aiohttp import web

from gateway.config import ServeConfig
from storage.backends.fs import FsBackend
from tests.support.chromium import Chromium, chromium_binary
from tests.support.gateway import in_process_gateway
from tests.support.hooks import HookReceiver

JS_DIR = Path(__file__).parent / "js"
PAGE = JS_DIR / "browser-upload.html"
TUS_BUNDLE = JS_DIR / "node_modules" / "tus-js-client" / "dist" / "tus.min.js"
SIZE = 64 * 1024 * 1024
TUS_CHUNK = 4 * 1024 * 1024  # the page's chunkSize
UPLINK = 12 * 1024 * 1024  # bytes/s Chromium lets through: ~5 s for the whole file

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.skipif(chromium_binary() is None, reason="chromium is not installed (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def tus_bundle() -> Path:
    if not TUS_BUNDLE.exists():
        if shutil.which("npm") is None:
            pytest.skip("needs npm to install tus-js-client (sh ops/install-test-deps.sh)")
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, check=True, timeout=200,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return TUS_BUNDLE


@pytest.fixture
async def app_origin(tus_bundle: Path) -> AsyncIterator[str]:
    """The web app's own origin: its page and the tus-js-client bundle, nothing else."""
    files = {"/upload.html": PAGE, "/tus.min.js": tus_bundle}

    async def serve(request: web.Request) -> web.FileResponse:
        return web.FileResponse(files[request.path])

    app = web.Application()
    for route in files:
        app.router.add_get(route, serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def tus_requests(records: list[logging.LogRecord]) -> list[tuple[str, str, int, int | None]]:
    """(method, path, status, upload_offset) of every tus request in the gateway's access log."""
    return [(r.method, r.path, r.status, getattr(r, "upload_offset", None))  # type: ignore[attr-defined]
            for r in records if r.name == "chunkgate.access" and r.path.startswith("/uploads")]  # type: ignore[attr-defined]


async def test_browser_upload_resumes_after_a_reload_from_the_stored_offset(
    app_origin: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = random.Random(17).randbytes(SIZE)
    path = tmp_path / "holiday.mp4"
    path.write_bytes(data)
    key = "browser/holiday.mp4"
    caplog.set_level(logging.INFO, logger="chunkgate.access")
    # The app's pre-create hook admits only its own signed-in users: the page passes the session.
    # Its post-finish handler hears of the finished upload (the app would start transcoding).
    receiver = HookReceiver(lambda e: (204, "") if e["type"] != "pre-create"
                            else (200, "") if e["headers"].get("X-App-Session") == "s3cret" else (401, "sign in"))
    async with receiver, \
            in_process_gateway(ServeConfig(cors_origins=app_origin, hook_url=receiver.url),
                               backend=FsBackend(tmp_path / "store")) as (gateway, app), \
            Chromium() as browser:
        page = f"{app_origin}/upload.html?" + urlencode({"gateway": gateway, "key": key, "token": "s3cret"})
        await browser.send("Network.enable")
        await browser.send("Network.emulateNetworkConditions", {
            "offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": UPLINK})
        await browser.navigate(page)
        await browser.wait_for("window.pageReady === true", timeout=20)
        await browser.set_input_files("#file", [str(path)])
        accepted = await browser.wait_for(f"window.report.error || (window.report.accepted >= {3 * TUS_CHUNK} && window.report.accepted)",
                                          timeout=90, interval=0.05)
        assert isinstance(accepted, int), f"the upload failed before the reload: {accepted}; {browser.console[-10:]}"
        assert accepted < SIZE, "the upload finished before the reload; slow the uplink down"
        before_reload = len(tus_requests(caplog.records))

        await browser.reload()
        await browser.wait_for("window.pageReady === true && window.report.events.length === 0", timeout=20)
        await browser.set_input_files("#file", [str(path)])  # the user picks the same file again
        report = await browser.wait_for("(window.report.done || window.report.error) && window.report", timeout=150)
        assert report["error"] is None, f"{report}; console: {browser.console[-10:]}"
        assert report["events"][0] == "resume", report

        async with aiohttp.ClientSession() as http, http.get(f"{gateway}/objects/{key}") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "video/mp4"
            body = await resp.read()
        async with aiohttp.ClientSession() as http, http.get(f"{gateway}/objects/{key}?manifest") as resp:
            version = (await resp.json())["version"]
        stats = app["uploads"].stats
        for _ in range(200):  # delivered right after the commit, by the gateway's outbox
            if receiver.of_type("post-finish"):
                break
            await asyncio.sleep(0.05)

    assert len(body) == SIZE and hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
    (asked,) = receiver.of_type("pre-create")  # once: resuming is not creating
    assert asked["key"] == key and asked["size"] == SIZE and asked["headers"]["X-App-Session"] == "s3cret"
    assert report["resumedFrom"].endswith("/uploads/" + asked["upload_id"])
    (finished,) = receiver.of_type("post-finish")  # one upload, one commit, one event
    assert (finished["key"], finished["size"], finished["version"]) == (key, SIZE, version)
    assert finished["upload_id"] == asked["upload_id"] and finished["content_type"] == "video/mp4"
    assert finished["metadata"] == {"key": key, "filetype": "video/mp4"}  # the page's tus metadata
    requests = tus_requests(caplog.records)
    creates = [r for r in requests if r[0] == "POST"]
    assert len(creates) == 1, requests  # the reloaded page created no second upload
    upload_path = report["resumedFrom"].split(gateway, 1)[1]
    after = [r for r in requests[before_reload:] if r[1] == upload_path]
    heads = [r for r in after if r[0] == "HEAD"]
    assert heads and heads[0][2] == 200, requests
    resumed_at = heads[0][3]
    assert resumed_at is not None and resumed_at >= accepted > 0, (resumed_at, accepted)
    first_patch = next(r for r in after[after.index(heads[0]):] if r[0] == "PATCH")
    assert first_patch[3] == resumed_at, requests  # continued where the gateway had it, not from zero
    # Every byte crossed the wire about once: a restart from zero would have sent >= SIZE + resumed_at.
    assert stats.bytes_received < SIZE + resumed_at, (stats.bytes_received, resumed_at)
    assert report["done"] is True
