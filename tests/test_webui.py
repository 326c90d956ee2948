"""The page for people at ``/ui/``.

Served files: every one with the page's strict Content-Security-Policy; nothing the package
doesn't ship; the page itself free of inline script, style and handlers; the bundled players the
very files of the pinned npm packages, with their licenses, and all of it in the package data.

In headless Chromium, under that CSP (any violation fails the test): with tokens and signed
reads configured the page asks for a token, lists a prefix, uploads a file through its file input
(resumable tus), the object appears, and the page plays it through a signed URL; it plays an HLS
ladder through the bundled hls.js, shows a manifest and the lock table, renders a hostile key as
text, and leaves the token nowhere but in memory. Without tokens it works as plainly. The README
screenshot comes from here (``CHUNKGATE_SCREENSHOT_DIR=docs python -m pytest tests/test_webui.py``).
"""

from __future__ import annotations

import fnmatch
import html.parser
import json
import os
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from gateway.config import ServeConfig
from gateway.webui import UI_DIR, ui_files
from storage.backends.fs import FsBackend
from tests.support.chromium import Chromium, chromium_binary
from tests.support.gateway import in_process_gateway
from tests.support.media import Clip, Ladder, ladders, media_clips  # noqa: F401 - fixtures
from tests.support.players import NODE_MODULES, ensure_players, run_cli, screenshot, set_file_input

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parents[1]
TOKEN = "ui-token-Qw81zP"
SIGNING_KEY = "ui-signing-key-7Tm"
HOSTILE = 'people/<img src=x onerror="window.__pwned=1">&amp;.mp4'


def browser_test(test: Any) -> Any:
    for mark in (pytest.mark.slow,
                 pytest.mark.skipif(chromium_binary() is None, reason="chromium is not installed (apt-get install chromium)"),
                 pytest.mark.skipif(shutil.which("npm") is None, reason="needs npm for the bundled libraries' check")):
        test = mark(test)
    return test


# ------------------------------------------------------------------------------ served files
async def test_every_page_file_is_served_with_the_strict_csp() -> None:
    names = ui_files()
    assert {"index.html", "app.js", "app.css", "vendor/hls.light.min.js", "vendor/tus.min.js"} <= set(names)
    async with in_process_gateway(ServeConfig()) as (url, _app), aiohttp.ClientSession() as s:
        for name in ["", *names]:
            async with s.get(f"{url}/ui/{name}") as r:
                assert r.status == 200, name
                csp = r.headers["Content-Security-Policy"]
                assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp
                assert r.headers["X-Content-Type-Options"] == "nosniff"
                body = await r.read()
                assert body == (UI_DIR / (name or "index.html")).read_bytes()
        async with s.get(f"{url}/ui/app.js") as r:
            assert r.headers["Content-Type"] == "text/javascript; charset=utf-8"
        async with s.get(f"{url}/ui", allow_redirects=False) as r:
            assert r.status == 308 and r.headers["Location"] == "/ui/"


@pytest.mark.parametrize("raw", ["/ui/nope.js", "/ui/../gateway/app.py", "/ui/%2e%2e/webui.py", "/ui/..%2Fwebui.py",
                                 "/ui/vendor/../../webui.py", "/ui/vendor/", "/ui/%2Fetc%2Fpasswd"])
async def test_nothing_but_the_page_files_is_served(raw: str) -> None:
    async with in_process_gateway(ServeConfig()) as (url, _app), aiohttp.ClientSession() as s:
        async with s.get(URL(url + raw, encoded=True), allow_redirects=False) as r:
            body = await r.read()
    assert r.status == 404 and b"import" not in body and b"root:" not in body


@pytest.mark.parametrize("cfg,expected", [
    (ServeConfig(), {"tokens": False, "signed_reads": False}),
    (ServeConfig(auth_token=[TOKEN]), {"tokens": True, "signed_reads": False}),
    (ServeConfig(auth_token=[TOKEN], signing_key=SIGNING_KEY), {"tokens": True, "signed_reads": True}),
])
async def test_config_json_says_only_whether_tokens_and_signed_reads_are_on(cfg: ServeConfig, expected: dict[str, bool]) -> None:
    async with in_process_gateway(cfg) as (url, _app), aiohttp.ClientSession() as s:
        async with s.get(f"{url}/ui/config.json") as r:
            assert await r.json() == expected


class _Audit(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        for name, value in attrs:
            if name.startswith("on") or name == "style":
                self.problems.append(f"<{tag} {name}>")
            if name in ("src", "href", "action") and value and (":" in value or value.startswith("//")):
                self.problems.append(f"<{tag} {name}={value}> is not a relative URL")
        if tag == "style":
            self.problems.append("<style>")
        if tag == "script":
            self._in_script = True
            if not names.get("src"):
                self.problems.append("a <script> without src")
            else:
                self.scripts.append(str(names["src"]))

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False if tag == "script" else self._in_script

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.problems.append("inline script")


def test_the_page_has_no_inline_script_style_or_handlers_and_loads_only_its_own_files() -> None:
    audit = _Audit()
    audit.feed((UI_DIR / "index.html").read_text(encoding="utf-8"))
    assert audit.problems == []
    assert audit.scripts == ["vendor/hls.light.min.js", "vendor/tus.min.js", "app.js"]
    assert all(s in ui_files() for s in audit.scripts)
    code = re.sub(r"(?<![:\"'])//.*", "", (UI_DIR / "app.js").read_text(encoding="utf-8"))  # comments name them
    for forbidden in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "localStorage",
                      "sessionStorage", "document.cookie", "eval(", "new Function", "http:", "https:", "style."):
        assert forbidden not in code, forbidden


def test_the_bundled_libraries_are_the_pinned_npm_files_with_their_licenses() -> None:
    modules = ensure_players()
    vendor = UI_DIR / "vendor"
    assert (vendor / "hls.light.min.js").read_bytes() == (modules / "hls.js" / "dist" / "hls.light.min.js").read_bytes()
    assert (vendor / "tus.min.js").read_bytes() == (modules / "tus-js-client" / "dist" / "tus.min.js").read_bytes()
    assert "Apache License" in (vendor / "hls.js-LICENSE.txt").read_text()
    assert "MIT License" in (vendor / "tus-js-client-LICENSE.txt").read_text()
    pins = json.loads((NODE_MODULES.parent / "package.json").read_text())["dependencies"]
    assert (vendor / "VERSIONS.txt").read_text().split() == ["hls.js", pins["hls.js"], "tus-js-client", pins["tus-js-client"]]


def test_the_package_data_ships_every_page_file() -> None:
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["gateway"]
    for name in ui_files():
        assert any(fnmatch.fnmatchcase(f"ui/{name}", g) and "/" not in f"ui/{name}"[len(g.rsplit('/', 1)[0]) + 1:]
                   for g in globs), name
    for path in (UI_DIR / "vendor").iterdir():  # licenses travel with the code they cover
        assert any(fnmatch.fnmatchcase(f"ui/vendor/{path.name}", g) for g in globs), path.name


# ------------------------------------------------------------------------------ in Chromium
CSP_WATCH = """
window.__csp = [];
document.addEventListener("securitypolicyviolation", (e) => window.__csp.push(e.violatedDirective + " " + e.blockedURI));
"""


async def open_page(browser: Chromium, url: str) -> None:
    await browser.send("Page.addScriptToEvaluateOnNewDocument", {"source": CSP_WATCH})
    await browser.navigate(f"{url}/ui/")
    await browser.wait_for("document.body && document.body.dataset.ready === 'true'", timeout=30)


def js(expr: str) -> str:
    return json.dumps(expr)


async def list_prefix(browser: Chromium, prefix: str, expect_key: str) -> list[str]:
    await browser.evaluate(f"document.getElementById('prefix').value = {js(prefix)};"
                           "document.getElementById('list-form').requestSubmit()")
    await browser.wait_for(f"[...document.querySelectorAll('#objects tbody tr')].some(tr => tr.dataset.key === {js(expect_key)})"
                           f" && document.getElementById('status').textContent.endsWith({js(json.dumps(prefix))})", timeout=20)
    keys: list[str] = await browser.evaluate("[...document.querySelectorAll('#objects tbody td.key')].map(td => td.textContent)")
    return keys


async def click_row(browser: Chromium, key: str, action: str) -> None:
    await browser.evaluate(f"[...document.querySelectorAll('#objects tbody tr')].find(tr => tr.dataset.key === {js(key)})"
                           f".querySelector('td.actions').querySelectorAll('button').forEach(b => b.textContent === {js(action)} && b.click())")


async def wait_playing(browser: Chromium, key: str, seconds: float = 1.5) -> dict[str, Any]:
    await browser.wait_for(f"(() => {{ const v = document.getElementById('video'); return v.dataset.key === {js(key)}"
                           f" && v.currentTime > {seconds} && !v.paused; }})()", timeout=60)
    state: dict[str, Any] = await browser.evaluate(
        "(() => { const v = document.getElementById('video'); return {engine: v.dataset.engine, src: v.currentSrc,"
        " time: v.currentTime, width: v.videoWidth, status: document.getElementById('status').className}; })()")
    return state


async def upload_through_the_page(browser: Chromium, prefix: str, path: Path) -> str:
    await browser.evaluate(f"document.getElementById('upload-prefix').value = {js(prefix)}")
    await set_file_input(browser, "#file", [path])
    await browser.evaluate("document.getElementById('upload-form').requestSubmit()")
    await browser.wait_for("document.getElementById('upload-status').className !== 'hint'", timeout=60)
    status: str = await browser.evaluate("document.getElementById('upload-status').textContent")
    return status


@browser_test
async def test_the_page_lists_uploads_and_plays_through_signed_urls(
    media_clips: dict[str, Clip], ladders: dict[str, Ladder], tmp_path: Path
) -> None:
    clip = media_clips["mp4_faststart"]
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    cfg = ServeConfig(chunk_size=256 * 1024, auth_token=[TOKEN], signing_key=SIGNING_KEY)
    async with in_process_gateway(cfg, backend=FsBackend(tmp_path / "store")) as (url, app), \
            aiohttp.ClientSession() as http:
        code, _out, err = await run_cli("put", str(ladders["hls"].directory), "ladders/clip/hls/", "--url", url,
                                        "--token", TOKEN, env={"CHUNKGATE_STATE_DIR": str(tmp_path / "state")})
        assert code == 0, err
        async with http.put(URL(f"{url}/objects/") / HOSTILE, data=b"not really a video", headers=bearer) as r:
            assert r.status == 201, await r.text()
        created = app["uploads"].stats.created

        async with Chromium() as browser:
            await open_page(browser, url)
            # Tokens configured: the page asks for one before it can list, upload or play.
            assert await browser.evaluate("!document.getElementById('token-box').hidden")
            assert await browser.evaluate("document.querySelectorAll('#objects tbody tr').length") == 0
            await browser.evaluate(f"document.getElementById('token').value = {js(TOKEN)};"
                                   "document.getElementById('token-form').requestSubmit()")

            keys = await list_prefix(browser, "ladders/clip/hls/", "ladders/clip/hls/master.m3u8")
            assert keys == [f"ladders/clip/hls/{f}" for f in ladders["hls"].files]

            status = await upload_through_the_page(browser, "people/", clip.path)
            assert status.startswith("Uploaded 1 file"), status
            keys = await list_prefix(browser, "people/", "people/" + clip.path.name)
            # The hostile key is shown as the text it is, and made no element.
            assert keys == sorted([HOSTILE, "people/" + clip.path.name])
            assert await browser.evaluate("document.querySelectorAll('#objects img').length") == 0
            assert await browser.evaluate("window.__pwned === undefined")

            await click_row(browser, "people/" + clip.path.name, "play")
            mp4 = await wait_playing(browser, "people/" + clip.path.name)

            await click_row(browser, "people/" + clip.path.name, "manifest")
            await browser.wait_for("document.getElementById('manifest-json').textContent.startsWith('{')", timeout=20)
            manifest = json.loads(await browser.evaluate("document.getElementById('manifest-json').textContent"))

            await list_prefix(browser, "ladders/clip/hls/", "ladders/clip/hls/master.m3u8")
            await click_row(browser, "ladders/clip/hls/master.m3u8", "play")
            hls = await wait_playing(browser, "ladders/clip/hls/master.m3u8")
            await click_row(browser, "ladders/clip/hls/v0/seg003.m4s", "manifest")
            await browser.evaluate("document.getElementById('locks-refresh').click()")
            await browser.wait_for("document.getElementById('locks-totals').textContent.includes('acquisitions')", timeout=20)
            locks_text = await browser.evaluate("document.getElementById('locks-totals').textContent")

            shot = await screenshot(browser, tmp_path / "ui.png", width=1200, height=860)
            leaks = await browser.evaluate(
                f"[localStorage.length, sessionStorage.length, document.cookie, document.documentElement.outerHTML.includes({js(TOKEN)})]")
            csp = await browser.evaluate("window.__csp")

        async with http.get(f"{url}/objects/people/{clip.path.name}", headers=bearer) as r:
            stored = await r.read()

    assert stored == clip.data  # byte for byte, through the page's tus upload
    assert app["uploads"].stats.created == created + 1 and app["uploads"].stats.completed >= 1
    assert mp4["engine"] == "native" and f"{url}/t/" in mp4["src"] and mp4["src"].endswith(f"/objects/people/{clip.path.name}")
    assert mp4["width"] == 640 and mp4["status"] != "bad"
    assert manifest["format"] == "chunkgate.manifest/1" and manifest["key"] == "people/" + clip.path.name
    assert manifest["size"] == clip.size and len(manifest["chunks"]) > 1
    assert hls["engine"] == "hls.js" and hls["src"].startswith("blob:") and hls["width"] in (320, 640)
    assert "held" in locks_text and "acquisitions" in locks_text
    assert leaks == [0, 0, "", False]  # the token lives in the page's memory only
    assert csp == []  # everything worked under the page's Content-Security-Policy
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") == 1200
    target = os.environ.get("CHUNKGATE_SCREENSHOT_DIR")
    if target:
        save_small_png(shot, Path(target) / "ui.png")


def save_small_png(src: Path, dst: Path) -> None:
    """The README picture: the screenshot in 128 colours, so it stays small."""
    from PIL import Image

    dst.parent.mkdir(parents=True, exist_ok=True)
    Image.open(src).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(dst, optimize=True)


@browser_test
async def test_without_tokens_the_page_lists_uploads_and_plays_plain_urls(media_clips: dict[str, Clip],
                                                                          tmp_path: Path) -> None:
    clip = media_clips["webm"]
    async with in_process_gateway(ServeConfig(chunk_size=256 * 1024), backend=FsBackend(tmp_path / "store")) as (url, _app):
        async with Chromium() as browser:
            await open_page(browser, url)
            assert await browser.evaluate("document.getElementById('token-box').hidden")
            status = await upload_through_the_page(browser, "open/", clip.path)
            assert status.startswith("Uploaded 1 file"), status
            keys = await list_prefix(browser, "open/", "open/" + clip.path.name)
            await click_row(browser, "open/" + clip.path.name, "play")
            played = await wait_playing(browser, "open/" + clip.path.name)
            csp = await browser.evaluate("window.__csp")
    assert keys == ["open/" + clip.path.name]
    assert played["engine"] == "native" and played["src"] == f"{url}/objects/open/{clip.path.name}"
    assert csp == []

