"""HLS and DASH ladders, uploaded with ``chunkgate put DIR PREFIX``, played by the real hls.js and
dash.js (npm) in headless Chromium, straight from the gateway, with and without signed URLs.

ffmpeg makes a two-rendition HLS ladder (fMP4, ~2 s segments, 30 s) and a DASH manifest of the
same clip. The players run on a page from another origin (every media request is cross-origin,
as on a real site), and report what they saw themselves: positions after seeks, the rendition
playing after a switch, every fragment they loaded. With ``--signing-key``, one URL from
``chunkgate sign --prefix`` must carry the whole ladder (its playlists name everything relatively),
and nothing outside the prefix, nothing expired and nothing tampered with may be read.
"""

from __future__ import annotations

import base64
import json
import shutil
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.auth import prefix_signed_url
from gateway.config import ServeConfig
from storage.backends.fs import FsBackend
from tests.support.chromium import Chromium, chromium_binary
from tests.support.gateway import in_process_gateway
from tests.support.media import Ladder, ladders  # noqa: F401 - fixture
from tests.support.players import player_page_files, run_cli, static_origin

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(chromium_binary() is None, reason="chromium is not installed (apt-get install chromium)"),
    pytest.mark.skipif(shutil.which("npm") is None, reason="needs npm for hls.js and dash.js"),
]

CHUNK = 64 * 1024  # segments of ~100-250 KB span several chunks each
HLS_SEEKS = (17.0, 5.0, 25.0)  # forward past the buffer, back, forward again
DASH_SEEKS = (16.0, 4.0, 24.0)
TOKEN = "players-token-8Hq2"
SIGNING_KEY = "players-signing-key-Vb41"
HLS_PREFIX = "ladders/clip/hls/"
DASH_PREFIX = "ladders/clip/dash/"


@pytest.fixture(scope="module")
def page_files() -> dict[str, Path]:
    return player_page_files()


async def put_ladder(url: str, ladder: Ladder, prefix: str, state_dir: Path, *extra: str) -> None:
    code, out, err = await run_cli("put", str(ladder.directory), prefix, "--url", url, *extra,
                                   env={"CHUNKGATE_STATE_DIR": str(state_dir)})
    assert code == 0, err
    assert f"{prefix}: {len(ladder.files)} files, {ladder.total_bytes} bytes stored and verified" in out, out


async def listing(http: aiohttp.ClientSession, url: str, prefix: str, headers: dict[str, str] | None = None) -> dict[str, str]:
    async with http.get(f"{url}/objects", params={"prefix": prefix}, headers=headers or {}) as r:
        assert r.status == 200, await r.text()
        return {o["key"]: o["content_type"] for o in (await r.json())["objects"]}


async def object_reads(http: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """chunkgate_object_reads_total by kind."""
    async with http.get(f"{url}/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "chunkgate_object_reads":
            for s in fam.samples:
                if s.name.endswith("_total"):
                    out[s.labels["kind"]] = s.value
    return out


async def play(browser: Chromium, origin: str, runner: str, src: str, seeks: tuple[float, ...]) -> dict[str, Any]:
    await browser.navigate(f"{origin}/player.html")
    await browser.wait_for("typeof window.runHls === 'function' && typeof Hls === 'function' && typeof dashjs === 'object'",
                           timeout=30)
    await browser.evaluate(f"window.{runner}({json.dumps(src)}, {json.dumps(list(seeks))})")
    result: dict[str, Any] = await browser.wait_for("window.__result", timeout=150)
    assert result["ok"], f"{runner}: {result.get('error')}; console: {browser.console[-15:]}"
    return result


def assert_played_and_seeked(result: dict[str, Any], seeks: tuple[float, ...]) -> None:
    assert result["duration"] == pytest.approx(30.0, abs=0.5)
    assert result["played"] >= 1.0
    assert [s["target"] for s in result["seeks"]] == list(seeks)
    for seek in result["seeks"]:
        assert abs(seek["currentTime"] - seek["target"]) < 0.5, seek
        assert seek["readyState"] >= 2, seek  # a decoded picture at the new position


def assert_hls_switched(result: dict[str, Any]) -> None:
    assert sorted(lv["width"] for lv in result["levels"]) == [320, 640]  # hls.js orders levels by bitrate
    switch = result["switch"]
    assert switch["level"] == switch["target"] != switch["from"], switch
    # Playing the other rendition's pictures, and still playing well past the switch point.
    assert switch["videoWidth"] == result["levels"][switch["target"]]["width"], switch
    assert switch["playedTo"] >= switch["switchedAt"] + 2.5 and not switch["paused"], switch
    assert switch["target"] in switch["fragsAfter"], switch


async def test_hls_js_plays_seeks_and_switches_renditions_of_a_ladder_put_as_a_directory(
    ladders: dict[str, Ladder], page_files: dict[str, Path], tmp_path: Path
) -> None:
    ladder = ladders["hls"]
    async with in_process_gateway(ServeConfig(chunk_size=CHUNK), backend=FsBackend(tmp_path / "store")) as (url, _app), \
            aiohttp.ClientSession() as http, static_origin(page_files) as origin:
        await put_ladder(url, ladder, HLS_PREFIX, tmp_path / "state")
        stored = await listing(http, url, HLS_PREFIX)
        assert sorted(stored) == [HLS_PREFIX + f for f in ladder.files]
        assert stored[HLS_PREFIX + "master.m3u8"] == "application/vnd.apple.mpegurl"
        assert stored[HLS_PREFIX + "v1/seg003.m4s"] == "video/iso.segment"
        assert stored[HLS_PREFIX + "v0/init_0.mp4"] == "video/mp4"

        before = await object_reads(http, url)
        async with Chromium() as browser:
            result = await play(browser, origin, "runHls", f"{url}/objects/{HLS_PREFIX}master.m3u8", HLS_SEEKS)
        after = await object_reads(http, url)

    assert_played_and_seeked(result, HLS_SEEKS)
    assert_hls_switched(result)
    frags = result["frags"]
    assert {f["level"] for f in frags} == {0, 1}
    assert all(f["url"].startswith(f"{url}/objects/{HLS_PREFIX}v") and f["url"].endswith(".m4s") for f in frags)
    # The gateway saw every segment the player loaded, and the playlists (master + both levels).
    assert after["segment"] - before["segment"] >= len(frags) >= 6
    assert after["playlist"] - before["playlist"] >= 3


async def test_dash_js_plays_and_seeks_the_same_clip_put_as_a_directory(
    ladders: dict[str, Ladder], page_files: dict[str, Path], tmp_path: Path
) -> None:
    ladder = ladders["dash"]
    async with in_process_gateway(ServeConfig(chunk_size=CHUNK), backend=FsBackend(tmp_path / "store")) as (url, _app), \
            aiohttp.ClientSession() as http, static_origin(page_files) as origin:
        await put_ladder(url, ladder, DASH_PREFIX, tmp_path / "state")
        stored = await listing(http, url, DASH_PREFIX)
        assert sorted(stored) == [DASH_PREFIX + f for f in ladder.files]
        assert stored[DASH_PREFIX + "manifest.mpd"] == "application/dash+xml"
        before = await object_reads(http, url)
        async with Chromium() as browser:
            result = await play(browser, origin, "runDash", f"{url}/objects/{DASH_PREFIX}manifest.mpd", DASH_SEEKS)
        after = await object_reads(http, url)

    assert_played_and_seeked(result, DASH_SEEKS)
    assert result["playedAfterSeeks"] >= DASH_SEEKS[-1] + 1.0
    media = {s["media"] for s in result["segments"]}
    assert media == {"video", "audio"}, result["segments"][:5]
    assert after["segment"] - before["segment"] >= len(result["segments"])
    assert after["playlist"] - before["playlist"] >= 1


async def get_status(http: aiohttp.ClientSession, url: str) -> tuple[int, str | None]:
    async with http.get(url) as r:
        doc = await r.json(content_type=None) if r.content_type == "application/json" else None
        return r.status, doc.get("error") if isinstance(doc, dict) else None


def swap_token(url: str, token: str) -> str:
    head, rest = url.split("/t/", 1)
    return f"{head}/t/{token}/{rest.split('/', 1)[1]}"


def token_of(url: str) -> str:
    return url.split("/t/", 1)[1].split("/", 1)[0]


def with_prefix(token: str, prefix: str) -> str:
    """``token`` with its prefix replaced and its MAC (the last 32 bytes) kept: a forgery."""
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    forged = raw[:9] + prefix.encode() + raw[-32:]
    return base64.urlsafe_b64encode(forged).rstrip(b"=").decode()


async def test_one_prefix_signed_url_plays_a_whole_ladder_and_nothing_else(
    ladders: dict[str, Ladder], page_files: dict[str, Path], tmp_path: Path
) -> None:
    cfg = ServeConfig(chunk_size=CHUNK, auth_token=[TOKEN], signing_key=SIGNING_KEY)
    async with in_process_gateway(cfg, backend=FsBackend(tmp_path / "store")) as (url, _app), \
            aiohttp.ClientSession() as http, static_origin(page_files) as origin:
        await put_ladder(url, ladders["hls"], HLS_PREFIX, tmp_path / "state", "--token", TOKEN)
        await put_ladder(url, ladders["dash"], DASH_PREFIX, tmp_path / "state", "--token", TOKEN)
        signed: dict[str, str] = {}
        for name, key, prefix in (("hls", HLS_PREFIX + "master.m3u8", HLS_PREFIX),
                                  ("dash", DASH_PREFIX + "manifest.mpd", DASH_PREFIX)):
            code, out, err = await run_cli("sign", key, "--prefix", prefix, "--expires-in", "10m", "--url", url,
                                           env={"CHUNKGATE_SIGNING_KEY": SIGNING_KEY})
            assert code == 0, err
            signed[name] = out.strip()
            assert signed[name].startswith(f"{url}/t/") and signed[name].endswith("/objects/" + key)

        # Without a credential nothing plays: the gateway really needs signed reads here.
        playlist, segment = HLS_PREFIX + "master.m3u8", HLS_PREFIX + "v0/seg004.m4s"
        assert (await get_status(http, f"{url}/objects/{playlist}"))[0] == 403
        assert (await get_status(http, f"{url}/objects/{segment}"))[0] == 403

        async with Chromium() as browser:
            hls = await play(browser, origin, "runHls", signed["hls"], HLS_SEEKS)
            dash = await play(browser, origin, "runDash", signed["dash"], DASH_SEEKS)

        # Refused, for the playlist and for a segment alike: another prefix's URL, an expired
        # one, and tampered ones (a character of the token changed; the prefix widened under
        # the old MAC).
        other_prefix = token_of(signed["dash"])
        expired = token_of(prefix_signed_url(url, SIGNING_KEY, playlist, HLS_PREFIX, 60, now=time.time() - 3600))
        good = token_of(signed["hls"])
        flipped = good[:20] + ("A" if good[20] != "A" else "B") + good[21:]
        widened = with_prefix(good, "ladders/")
        refused = {}
        for label, token in (("other prefix", other_prefix), ("expired", expired), ("flipped", flipped),
                             ("widened", widened)):
            for key in (playlist, segment):
                refused[label, key] = await get_status(http, swap_token(signed["hls"], token).replace(playlist, key))
        for key in (playlist, segment):
            assert await get_status(http, swap_token(signed["hls"], good).replace(playlist, key)) == (200, None)

    assert_played_and_seeked(hls, HLS_SEEKS)
    assert_hls_switched(hls)
    # Every fragment came through the signed path the playlist named relatively.
    assert hls["frags"] and all(f["url"].startswith(f"{url}/t/{good}/objects/{HLS_PREFIX}") for f in hls["frags"])
    assert_played_and_seeked(dash, DASH_SEEKS)
    assert dash["segments"] and all(s["url"].startswith(f"{url}/t/{other_prefix}/objects/{DASH_PREFIX}")
                                    for s in dash["segments"])
    for (label, key), (status, code) in refused.items():
        assert status == 403, (label, key, status, code)
    assert {refused["other prefix", k][1] for k in (playlist, segment)} == {"prefix_mismatch"}
    assert {refused["expired", k][1] for k in (playlist, segment)} == {"signature_expired"}
    assert {refused["flipped", k][1] for k in (playlist, segment)} <= {"bad_signature", "bad_token"}
    assert {refused["widened", k][1] for k in (playlist, segment)} == {"bad_signature"}
