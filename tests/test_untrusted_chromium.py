"""Uploads are untrusted content, in a real browser: headless Chromium over DevTools.

Each test first plants a value in the gateway origin's ``localStorage`` and a cookie (from a page
of that origin), then opens what someone uploaded. An uploaded HTML page, SVG image or XML
document whose script reads both must get nothing in the default ``sandbox`` mode, and its report
must say why (the browser refused: SecurityError, opaque origin); the same upload served
``inline`` does read them, which is the control that shows the test can fail. ``attachment`` mode
makes the browser download instead of render. The gateway's own pages (``/ui/``) cannot be made to
run an upload as their own script or service worker. Players are unaffected: a DASH manifest, an
HLS playlist, WebVTT subtitles and an SVG ``<img>`` still load from a page on another origin.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest

from gateway.config import ServeConfig
from storage.backends.fs import FsBackend
from tests.support.chromium import Chromium, chromium_binary, serve_pages
from tests.support.gateway import in_process_gateway
from tests.support.media import Clip, media_clips  # noqa: F401 - fixture

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.skipif(chromium_binary() is None, reason="chromium is not installed (apt-get install chromium)"),
]

# What each upload's script reports: the planted values if it can read them, else the browser's
# exception name. Reading localStorage or document.cookie in a sandboxed document throws.
PROBE = """
const got = {origin: self.origin};
try { got.storage = localStorage.getItem("planted"); } catch (e) { got.storage_error = e.name; }
try { got.cookie = document.cookie; } catch (e) { got.cookie_error = e.name; }
"""

# The page also runs a script of its own from a relative URL and plays an uploaded clip: what a
# sandboxed page must still be able to do.
PAGE = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>an upload</title><script src="helper.js"></script></head><body>
<script>
{PROBE}
got.helper = window.__helper || null;
async function play() {{
  const v = document.createElement("video");
  v.muted = true;
  v.src = "clip.webm";
  document.body.appendChild(v);
  await v.play();
  await new Promise((resolve, reject) => {{
    v.addEventListener("error", () => reject(new Error("media error")));
    const tick = () => {{ if (v.currentTime > 0.2) resolve(); }};
    v.addEventListener("timeupdate", tick);
  }});
  return v.currentTime;
}}
play().then(t => {{ got.played = t; }}, e => {{ got.played_error = String(e); }}).finally(() => {{ window.__report = got; }});
</script></body></html>
"""
HELPER = "window.__helper = 'ran';"

SVG = f"""<svg xmlns="http://www.w3.org/2000/svg" width="120" height="40" viewBox="0 0 120 40">
<rect width="120" height="40" fill="#36c"/>
<script><![CDATA[
{PROBE}
window.__report = got;
]]></script></svg>"""

XML = f"""<?xml version="1.0" encoding="utf-8"?>
<report><script xmlns="http://www.w3.org/1999/xhtml"><![CDATA[
{PROBE}
window.__report = got;
]]></script></report>"""

DOCUMENTS = {
    "html": ("site/page.html", "text/html; charset=utf-8", PAGE),
    "svg": ("site/logo.svg", "image/svg+xml", SVG),
    "xml": ("site/feed.xml", "text/xml", XML),  # an XML document runs the XHTML <script> in it
}


async def put(http: aiohttp.ClientSession, base: str, key: str, body: str | bytes, content_type: str) -> None:
    async with http.put(f"{base}/objects/{key}", data=body, headers={"Content-Type": content_type}) as resp:
        assert resp.status == 201, await resp.text()


async def plant(browser: Chromium, base: str, page: str = "/healthz") -> tuple[str, str]:
    """A value in the gateway origin's localStorage and a cookie for its whole path, set from a
    page of that origin, and read back there (so a miss later is the sandbox, not the planting)."""
    stored, cookie = f"storage-{secrets.token_hex(8)}", f"cookie-{secrets.token_hex(8)}"
    await browser.navigate(base + page)
    await browser.wait_for("document.readyState === 'complete'", timeout=20)
    back = await browser.evaluate(
        f"localStorage.setItem('planted', {json.dumps(stored)}); document.cookie = 'planted={cookie}; path=/';"
        "[localStorage.getItem('planted'), document.cookie]")
    assert back == [stored, f"planted={cookie}"], back
    return stored, cookie


async def open_upload(browser: Chromium, url: str) -> dict[str, Any]:
    await browser.navigate(url)
    report: dict[str, Any] = await browser.wait_for("window.__report", timeout=60)
    return report


@pytest.fixture
def webm(media_clips: dict[str, Clip]) -> bytes:
    return media_clips["webm"].data


async def plant_then_open(mode: str, kind: str, webm: bytes, tmp_path: Path) -> tuple[str, str, str, dict[str, Any]]:
    """Upload the document (with its helper script and clip) to a gateway in ``mode``, plant
    values in the gateway origin, open the document: (base URL, planted value, planted cookie,
    the document's report)."""
    key, content_type, body = DOCUMENTS[kind]
    async with in_process_gateway(ServeConfig(active_content=mode), backend=FsBackend(tmp_path / "store")) as (base, _app), \
            aiohttp.ClientSession() as http:
        await put(http, base, key, body, content_type)
        await put(http, base, "site/helper.js", HELPER, "text/javascript")
        await put(http, base, "site/clip.webm", webm, "video/webm")
        async with Chromium() as browser:
            stored, cookie = await plant(browser, base)
            report = await open_upload(browser, f"{base}/objects/{key}")
    return base, stored, cookie, report


@pytest.mark.parametrize("kind", sorted(DOCUMENTS))
async def test_an_uploaded_document_gets_nothing_of_the_gateway_origins_storage_or_cookies(
    kind: str, webm: bytes, tmp_path: Path
) -> None:
    _base, stored, cookie, report = await plant_then_open("sandbox", kind, webm, tmp_path)

    assert stored not in json.dumps(report) and cookie not in json.dumps(report), report
    assert report["origin"] == "null", report  # an opaque origin, not the gateway's
    assert report.get("storage_error") == "SecurityError" and "storage" not in report, report
    assert report.get("cookie_error") == "SecurityError" and "cookie" not in report, report
    if kind == "html":
        # Still a working page: its own script from a relative URL ran and its media played.
        assert report["helper"] == "ran", report
        assert report.get("played", 0) > 0.2, report


@pytest.mark.parametrize("kind", sorted(DOCUMENTS))
async def test_control_the_same_upload_served_inline_reads_both(kind: str, webm: bytes, tmp_path: Path) -> None:
    base, stored, cookie, report = await plant_then_open("inline", kind, webm, tmp_path)

    assert report["origin"] == base, report
    assert report.get("storage") == stored, report
    assert f"planted={cookie}" in report.get("cookie", ""), report


@pytest.mark.parametrize("kind", sorted(DOCUMENTS))
async def test_attachment_mode_downloads_the_upload_instead_of_rendering_it(kind: str, tmp_path: Path) -> None:
    key, content_type, body = DOCUMENTS[kind]
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    async with in_process_gateway(ServeConfig(active_content="attachment")) as (base, _app), aiohttp.ClientSession() as http:
        await put(http, base, key, body, content_type)
        async with Chromium() as browser:
            await plant(browser, base)
            await browser.send("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
            result = await browser.send("Page.navigate", {"url": f"{base}/objects/{key}"})
            saved = downloads / key.rsplit("/", 1)[1]
            for _ in range(300):  # the download finishes on the browser's own time
                if saved.exists() and saved.read_bytes() == body.encode():
                    break
                await asyncio.sleep(0.1)
            still = await browser.evaluate("[location.pathname, typeof window.__report]")

    assert result.get("isDownload") is True, result
    assert saved.read_bytes() == body.encode()  # the bytes as uploaded, saved as a file
    assert still == ["/healthz", "undefined"]  # nothing rendered, nothing ran


EVIL = "window.__evil = localStorage.getItem('planted');"
SERVICE_WORKER = "self.addEventListener('fetch', () => {});"
INJECT = """
(async () => {
  const script = await new Promise(resolve => {
    const s = document.createElement("script");
    s.src = "/objects/site/evil.js";
    s.onload = () => resolve({loaded: true, evil: window.__evil ?? null});
    s.onerror = () => resolve({loaded: false, evil: window.__evil ?? null});
    document.documentElement.appendChild(s);
  });
  const worker = await navigator.serviceWorker.register("/objects/site/sw.js").then(
    r => ({registered: true, scope: r.scope}), e => ({registered: false, error: e.name}));
  return {script, worker};
})()
"""


@pytest.mark.parametrize("mode", ["sandbox", "attachment", "inline"])
async def test_the_gateways_own_pages_cannot_run_an_upload_as_their_script_or_service_worker(mode: str) -> None:
    """As if /ui/ had an HTML-injection bug: its CSP's script-src 'self' admits every URL of the
    origin, uploads included, so the gateway itself refuses to serve them as a page's code."""
    async with in_process_gateway(ServeConfig(active_content=mode)) as (base, _app), aiohttp.ClientSession() as http:
        await put(http, base, "site/evil.js", EVIL, "text/javascript")
        await put(http, base, "site/sw.js", SERVICE_WORKER, "text/javascript")
        async with Chromium() as browser:
            stored, _ = await plant(browser, base, page="/ui/")
            result = await browser.evaluate(INJECT)

    if mode == "inline":  # control: the attack is real when uploads share the page's origin
        assert result["script"] == {"loaded": True, "evil": stored}, result
        assert result["worker"]["registered"] and result["worker"]["scope"] == f"{base}/objects/site/", result
    else:
        assert result["script"] == {"loaded": False, "evil": None}, result
        assert result["worker"]["registered"] is False, result


PLAYER_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>a player elsewhere</title></head><body><script>
window.probe = async (base) => {
  const out = {};
  const mpd = await fetch(base + "/objects/ladder/manifest.mpd");
  const doc = new DOMParser().parseFromString(await mpd.text(), "application/xml");
  out.mpd = {status: mpd.status, root: doc.documentElement.localName,
             representations: doc.getElementsByTagName("Representation").length};
  const m3u8 = await fetch(base + "/objects/ladder/master.m3u8");
  out.m3u8 = {status: m3u8.status, first: (await m3u8.text()).split("\\n")[0]};
  out.svg = await new Promise(resolve => {
    const img = new Image();
    img.onload = () => resolve({width: img.naturalWidth});
    img.onerror = () => resolve({error: true});
    img.src = base + "/objects/site/logo.svg";
  });
  out.cues = await new Promise((resolve, reject) => {
    const v = document.createElement("video");
    v.crossOrigin = "anonymous";
    const t = document.createElement("track");
    t.kind = "subtitles"; t.default = true; t.src = base + "/objects/ladder/subs.vtt";
    t.onload = () => resolve(t.track.cues.length);
    t.onerror = () => resolve(-1);
    v.appendChild(t);
    v.src = base + "/objects/site/clip.webm";
    document.body.appendChild(v);
    t.track.mode = "hidden";
  });
  window.__result = out;
};
</script></body></html>
"""
MPD = """<?xml version="1.0" encoding="utf-8"?>
<MPD xmlns="urn:mpeg:dash:schema:mpd:2011" type="static" mediaPresentationDuration="PT12S" minBufferTime="PT2S"
     profiles="urn:mpeg:dash:profile:isoff-on-demand:2011">
  <Period><AdaptationSet mimeType="video/webm">
    <Representation id="low" bandwidth="400000"/><Representation id="high" bandwidth="1500000"/>
  </AdaptationSet></Period></MPD>"""
M3U8 = "#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=400000\nlow/index.m3u8\n"
VTT = "WEBVTT\n\n00:00.000 --> 00:02.000\nfirst\n\n00:02.000 --> 00:04.000\nsecond\n"


@pytest.fixture
async def player_origin() -> AsyncIterator[str]:
    """A page on another origin (another port), as a site embedding media from the gateway is."""
    async with serve_pages({"/player.html": PLAYER_PAGE}) as origin:
        yield origin


@pytest.mark.parametrize("mode", ["sandbox", "attachment"])
async def test_players_still_load_manifests_playlists_subtitles_and_images(mode: str, webm: bytes, player_origin: str) -> None:
    async with in_process_gateway(ServeConfig(active_content=mode)) as (base, _app), aiohttp.ClientSession() as http:
        await put(http, base, "ladder/manifest.mpd", MPD, "application/dash+xml")  # sandboxed: it is XML
        await put(http, base, "ladder/master.m3u8", M3U8, "application/vnd.apple.mpegurl")
        await put(http, base, "ladder/subs.vtt", VTT, "text/vtt")
        await put(http, base, "site/logo.svg", SVG, "image/svg+xml")  # sandboxed, still an image
        await put(http, base, "site/clip.webm", webm, "video/webm")
        async with http.get(f"{base}/objects/ladder/manifest.mpd") as resp:
            assert "sandbox" in resp.headers["Content-Security-Policy"]  # the case that matters here
        async with Chromium() as browser:
            await browser.navigate(f"{player_origin}/player.html")
            await browser.wait_for("typeof window.probe === 'function'", timeout=20)
            await browser.evaluate(f"window.probe({json.dumps(base)})")
            result = await browser.wait_for("window.__result", timeout=60)

    assert result["mpd"] == {"status": 200, "root": "MPD", "representations": 2}, result
    assert result["m3u8"] == {"status": 200, "first": "#EXTM3U"}, result
    assert result["svg"] == {"width": 120}, result
    assert result["cues"] == 2, result
