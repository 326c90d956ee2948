"""A real browser plays media straight from the gateway: headless Chromium, ``<video crossorigin>``.

The page comes from a separate little server on another port, so every media request is
cross-origin: the clip only loads if the gateway's CORS answers are right, and drawing a frame to
a canvas and reading its pixels only works if the response was CORS-approved (else the canvas is
"tainted" and ``getImageData`` throws). The clips span many small chunks, and the MP4 without
faststart forces the player to range-read the tail (moov) before it can start.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

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

CHUNK = 128 * 1024
SEEKS = (8.0, 2.5, 10.5)  # forward past the buffered part, back, forward again

PLAYER_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>chunkgate player</title></head><body>
<canvas id="c" width="64" height="36"></canvas>
<script>
window.__result = null;
function once(v, name) {
  return new Promise((resolve, reject) => {
    const ok = () => { done(); resolve(); };
    const bad = () => { done(); reject(new Error("media error " + (v.error ? v.error.code + " " + v.error.message : "?"))); };
    const done = () => { v.removeEventListener(name, ok); v.removeEventListener("error", bad); };
    v.addEventListener(name, ok);
    v.addEventListener("error", bad);
  });
}
function frameStats(v) {
  // Throws SecurityError when the response was not CORS-approved (tainted canvas).
  const ctx = document.getElementById("c").getContext("2d");
  ctx.drawImage(v, 0, 0, 64, 36);
  const px = ctx.getImageData(0, 0, 64, 36).data;
  let lit = 0;
  for (let i = 0; i < px.length; i += 4) if (px[i] + px[i + 1] + px[i + 2] > 60) lit++;
  return lit / (px.length / 4);
}
async function runPlayer(src, seeks) {
  const v = document.createElement("video");
  v.crossOrigin = "anonymous";
  v.muted = true;
  v.preload = "auto";
  document.body.appendChild(v);
  const meta = once(v, "loadedmetadata");
  v.src = src;
  await meta;
  const result = {duration: v.duration, seeks: []};
  await v.play();
  while (v.currentTime < 1.0) await once(v, "timeupdate");
  v.pause();
  result.played = v.currentTime;
  for (const t of seeks) {
    const seeked = once(v, "seeked");
    v.currentTime = t;
    await seeked;
    result.seeks.push({target: t, currentTime: v.currentTime, readyState: v.readyState, lit: frameStats(v)});
  }
  return result;
}
window.play = (src, seeks) => runPlayer(src, seeks).then(
  r => { window.__result = {ok: true, ...r}; },
  e => { window.__result = {ok: false, error: String(e)}; });
</script></body></html>
"""


@pytest.fixture
async def page_origin() -> AsyncIterator[str]:
    """The player page, served from its own origin (another port than the gateway)."""
    async with serve_pages({"/player.html": PLAYER_PAGE}) as origin:
        yield origin


def object_responses(metrics_text: str) -> dict[str, float]:
    """chunkgate_http_requests_total for GET /objects/{key}, by status."""
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(metrics_text):
        if fam.name != "chunkgate_http_requests":
            continue
        for s in fam.samples:
            if s.name.endswith("_total") and s.labels.get("method") == "GET" and s.labels.get("route") == "/objects/{key}":
                out[s.labels["status"]] = out.get(s.labels["status"], 0) + s.value
    return out


async def scrape(session: aiohttp.ClientSession, base: str) -> dict[str, float]:
    async with session.get(f"{base}/metrics") as resp:
        return object_responses(await resp.text())


@pytest.mark.parametrize("clip_name", ["mp4_moov_at_end", "mp4_faststart", "webm"])
async def test_chromium_plays_and_seeks_a_chunked_clip_cross_origin(
    clip_name: str, media_clips: dict[str, Clip], page_origin: str, tmp_path: Path
) -> None:
    clip = media_clips[clip_name]
    cfg = ServeConfig(chunk_size=CHUNK)
    async with in_process_gateway(cfg, backend=FsBackend(tmp_path / "store")) as (base, _app), aiohttp.ClientSession() as http:
        url = f"{base}/objects/videos/{clip.path.name}"
        async with http.put(url, data=clip.data, headers={"Content-Type": clip.content_type}) as resp:
            assert resp.status == 201, await resp.text()
            assert (await resp.json())["chunks"] > 10  # the clip really spans many chunks
        before = await scrape(http, base)

        async with Chromium() as browser:
            await browser.navigate(f"{page_origin}/player.html")
            await browser.wait_for("typeof window.play === 'function'", timeout=20)
            await browser.evaluate(f"window.play({json.dumps(url)}, {json.dumps(list(SEEKS))})")
            result: dict[str, Any] = await browser.wait_for("window.__result", timeout=90)

        after = await scrape(http, base)

    assert result["ok"], f"{clip_name}: {result.get('error')}; console: {browser.console[-10:]}"
    assert result["duration"] == pytest.approx(clip.duration, abs=0.1)
    assert result["played"] >= 1.0
    assert [s["target"] for s in result["seeks"]] == list(SEEKS)
    for seek in result["seeks"]:
        assert abs(seek["currentTime"] - seek["target"]) < 0.1, seek
        assert seek["readyState"] >= 2, seek  # HAVE_CURRENT_DATA: the frame at the target is decoded
        assert seek["lit"] > 0.05, seek  # a real picture, read from an untainted (CORS-approved) canvas
    delta = {status: after.get(status, 0) - before.get(status, 0) for status in after}
    # Every read is a range read. How many Chromium makes depends on timing: over loopback it may
    # stream a whole small clip (moov at the end included) in its first open-ended 206.
    assert delta.get("206", 0) >= 1 and not delta.get("200"), delta
    assert not any(status.startswith("5") and n for status, n in delta.items()), delta
