"""ffprobe and ffmpeg read media over HTTP from the gateway exactly as from the local file.

ffmpeg's HTTP reader is a demanding range client: for an MP4 whose moov atom is at the end it
reads the head, jumps to the tail, then back into mdat, each a new ranged request. Every check
here compares against the same tool reading the local file, so a wrong byte anywhere (a chunk
boundary off by one, a range answered from the wrong offset) changes the outcome.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import ServeConfig
from storage.backends.fs import FsBackend
from tests.support.gateway import in_process_gateway
from tests.support.media import DURATION_S, FPS, Clip, have_media_tools, media_clips, parse_probe, probe_args  # noqa: F401

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not have_media_tools(), reason="ffmpeg/ffprobe are not installed (apt-get install ffmpeg)"),
]

CHUNK = 128 * 1024


async def run(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, f"{args[0]} failed ({proc.returncode}): {err.decode(errors='replace')[-2000:]}"
    return out.decode()


def frame_hashes(framemd5: str) -> list[str]:
    """The per-frame MD5s (last column) of ``-f framemd5`` output, comments dropped."""
    return [line.rsplit(",", 1)[1].strip() for line in framemd5.splitlines() if line and not line.startswith("#")]


def requests_by_status(metrics_text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(metrics_text):
        if fam.name == "chunkgate_http_requests":
            for s in fam.samples:
                if s.name.endswith("_total") and s.labels.get("route") == "/objects/{key}" and s.labels.get("method") == "GET":
                    out[s.labels["status"]] = out.get(s.labels["status"], 0) + s.value
    return out


async def upload(http: aiohttp.ClientSession, base: str, clip: Clip) -> str:
    url = f"{base}/objects/media/{clip.path.name}"
    async with http.put(url, data=clip.data, headers={"Content-Type": clip.content_type}) as resp:
        assert resp.status == 201, await resp.text()
        assert (await resp.json())["chunks"] > 10
    return url


@pytest.mark.parametrize("clip_name", ["mp4_moov_at_end", "mp4_faststart", "webm"])
async def test_ffprobe_over_http_counts_the_same_duration_and_frames_as_the_local_file(
    clip_name: str, media_clips: dict[str, Clip], tmp_path: Path
) -> None:
    clip = media_clips[clip_name]
    async with in_process_gateway(ServeConfig(chunk_size=CHUNK), backend=FsBackend(tmp_path)) as (base, _), \
            aiohttp.ClientSession() as http:
        url = await upload(http, base, clip)
        duration, frames = parse_probe(await run(*probe_args(url)))
        async with http.get(f"{base}/metrics") as resp:
            statuses = requests_by_status(await resp.text())
    assert (duration, frames) == (clip.duration, clip.frames)
    assert frames == DURATION_S * FPS  # every frame of the source, none lost or duplicated
    if clip_name == "mp4_moov_at_end":
        # head, then the moov at the tail, then back into mdat: several ranged reads
        assert statuses.get("206", 0) >= 2, statuses
    assert not any(s.startswith("5") for s in statuses), statuses


@pytest.mark.parametrize("clip_name", ["mp4_moov_at_end", "mp4_faststart"])
async def test_ffmpeg_seek_over_http_decodes_the_frames_at_that_time(
    clip_name: str, media_clips: dict[str, Clip], tmp_path: Path
) -> None:
    clip = media_clips[clip_name]
    local = str(clip.path)
    async with in_process_gateway(ServeConfig(chunk_size=CHUNK), backend=FsBackend(tmp_path)) as (base, _), \
            aiohttp.ClientSession() as http:
        url = await upload(http, base, clip)
        seeked_http = await run("ffmpeg", "-v", "error", "-ss", "5", "-i", url, "-t", "1", "-map", "0:v:0", "-f", "framemd5", "-")
    seeked_local = await run("ffmpeg", "-v", "error", "-ss", "5", "-i", local, "-t", "1", "-map", "0:v:0", "-f", "framemd5", "-")
    # The reference does not seek at all: decode everything, keep seconds 5..6. Since every
    # testsrc2 frame differs, equal hashes mean the seek landed on exactly those frames.
    trimmed_local = await run("ffmpeg", "-v", "error", "-i", local, "-map", "0:v:0", "-vf", "trim=start=5:duration=1",
                              "-f", "framemd5", "-")
    assert len(frame_hashes(seeked_http)) == FPS
    assert frame_hashes(seeked_http) == frame_hashes(seeked_local) == frame_hashes(trimmed_local)
    assert len(set(frame_hashes(trimmed_local))) == FPS


async def test_ffmpeg_copies_the_whole_clip_over_http_bit_identically(media_clips: dict[str, Clip], tmp_path: Path) -> None:
    """Remuxing (no re-encode) hashes every packet: any wrong byte in mdat shows up."""
    clip = media_clips["mp4_moov_at_end"]
    async with in_process_gateway(ServeConfig(chunk_size=CHUNK), backend=FsBackend(tmp_path / "s")) as (base, _), \
            aiohttp.ClientSession() as http:
        url = await upload(http, base, clip)
        over_http = await run("ffmpeg", "-v", "error", "-i", url, "-map", "0", "-c", "copy", "-f", "streamhash", "-hash", "sha256", "-")
    local = await run("ffmpeg", "-v", "error", "-i", str(clip.path), "-map", "0", "-c", "copy", "-f", "streamhash", "-hash", "sha256", "-")
    assert over_http == local
    assert over_http.count("SHA256=") == 2  # video and audio
