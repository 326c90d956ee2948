"""Test clips made with ffmpeg, with their facts measured by ffprobe, for the player tests.

Three clips of the same synthetic content (lavfi testsrc2 + a sine tone): an H.264/AAC MP4 with
the moov atom at the END (what a camera or a plain ``ffmpeg`` writes; a player must range-read
the tail before it can play), the same with ``+faststart``, and a VP9/Opus WebM. Keyframes every
second, so seeks land quickly. Duration and frame count come from ``ffprobe -count_frames`` on the
local file, which is what the HTTP reads are compared against.

Also an HLS ladder (two renditions, fMP4, ~2 s segments, 30 s) and a DASH manifest of the same
clip, for the streaming player tests (``ladders`` fixture).

Never: download anything, or depend on which encoder build is present beyond Debian's ffmpeg.
Clips are made once per test session (``media_clips`` and ``ladders`` fixtures, cached per process).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

DURATION_S = 12
FPS = 25
WIDTH, HEIGHT = 640, 360

_SOURCE = [
    "-f", "lavfi", "-i", f"testsrc2=duration={DURATION_S}:size={WIDTH}x{HEIGHT}:rate={FPS}",
    "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={DURATION_S}",
]
# A fixed GOP (one keyframe a second) and a bitrate high enough that a clip spans many small chunks.
_H264 = ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-g", str(FPS), "-keyint_min", str(FPS),
         "-sc_threshold", "0", "-b:v", "1500k", "-c:a", "aac", "-b:a", "96k"]
_VP9 = ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-row-mt", "1", "-pix_fmt", "yuv420p",
        "-g", str(FPS), "-keyint_min", str(FPS), "-b:v", "1500k", "-c:a", "libopus", "-b:a", "96k"]


@dataclass(frozen=True)
class Clip:
    name: str  # "mp4_moov_at_end", "mp4_faststart", "webm"
    path: Path
    content_type: str
    duration: float  # seconds, from the container (ffprobe format=duration)
    frames: int  # decoded video frames (ffprobe -count_frames)
    size: int

    @property
    def data(self) -> bytes:
        return self.path.read_bytes()


def have_media_tools() -> bool:
    return all(shutil.which(tool) for tool in ("ffmpeg", "ffprobe"))


def probe(source: str) -> tuple[float, int]:
    """(container duration in seconds, decoded video frame count) of a file path or URL."""
    out = subprocess.run(probe_args(source), check=True, capture_output=True, text=True, timeout=120).stdout
    return parse_probe(out)


def probe_args(source: str) -> list[str]:
    return ["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
            "-show_entries", "stream=nb_read_frames:format=duration", "-of", "json", source]


def parse_probe(out: str) -> tuple[float, int]:
    doc = json.loads(out)
    return float(doc["format"]["duration"]), int(doc["streams"][0]["nb_read_frames"])


def moov_is_last(path: Path) -> bool:
    """Whether the MP4's top-level 'moov' box comes after 'mdat' (no faststart)."""
    order: list[bytes] = []
    with path.open("rb") as fh:
        while True:
            header = fh.read(8)
            if len(header) < 8:
                break
            size, kind = int.from_bytes(header[:4], "big"), header[4:8]
            order.append(kind)
            if size == 1:
                size = int.from_bytes(fh.read(8), "big")
                fh.seek(size - 16, 1)
            elif size == 0:
                break
            else:
                fh.seek(size - 8, 1)
    return order.index(b"moov") > order.index(b"mdat")


def make_clips(directory: Path) -> dict[str, Clip]:
    directory.mkdir(parents=True, exist_ok=True)
    specs = {
        "mp4_moov_at_end": ("clip-moov-at-end.mp4", "video/mp4", _H264),
        "mp4_faststart": ("clip-faststart.mp4", "video/mp4", _H264 + ["-movflags", "+faststart"]),
        "webm": ("clip.webm", "video/webm", _VP9),
    }
    clips: dict[str, Clip] = {}
    for name, (filename, content_type, codec) in specs.items():
        path = directory / filename
        subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *_SOURCE, *codec, str(path)],
                       check=True, timeout=300)
        duration, frames = probe(str(path))
        clips[name] = Clip(name, path, content_type, duration, frames, path.stat().st_size)
    # The premise of the moov-at-end tests: guard it, so an ffmpeg default change can't hollow them out.
    assert moov_is_last(clips["mp4_moov_at_end"].path)
    assert not moov_is_last(clips["mp4_faststart"].path)
    return clips


_made: dict[str, dict[str, Clip]] = {}


@pytest.fixture(scope="session")
def media_clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Clip]:
    """The three clips, made once per process even when several modules import this fixture."""
    if not have_media_tools():
        pytest.skip("ffmpeg/ffprobe are not installed (apt-get install ffmpeg)")
    if "clips" not in _made:
        _made["clips"] = make_clips(tmp_path_factory.mktemp("media"))
    return _made["clips"]


# ------------------------------------------------------------------------------ streaming ladders
LADDER_DURATION_S = 30
LADDER_SEGMENT_S = 2
_LADDER_SOURCE = [
    "-f", "lavfi", "-i", f"testsrc2=duration={LADDER_DURATION_S}:size={WIDTH}x{HEIGHT}:rate={FPS}",
    "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={LADDER_DURATION_S}",
]
# Two renditions of one picture (640x360 and 320x180), keyframes exactly every segment, so every
# segment starts with one and a rendition switch can happen at any segment boundary.
_LADDER_VIDEO = [
    "-filter_complex", f"[0:v]split=2[hi][lo0];[lo0]scale={WIDTH // 2}:{HEIGHT // 2}[lo]",
    "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
    "-g", str(FPS * LADDER_SEGMENT_S), "-keyint_min", str(FPS * LADDER_SEGMENT_S), "-sc_threshold", "0",
    "-b:v:0", "900k", "-b:v:1", "300k", "-c:a", "aac", "-b:a", "64k",
]


@dataclass(frozen=True)
class Ladder:
    directory: Path
    entry: str  # the playlist or manifest a player opens, relative to directory
    files: tuple[str, ...]  # every file, relative, "/"-separated
    renditions: int
    segments: int  # media segments in the whole ladder

    @property
    def total_bytes(self) -> int:
        return sum((self.directory / f).stat().st_size for f in self.files)


def _ladder_files(directory: Path) -> tuple[str, ...]:
    return tuple(sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()))


def make_hls_ladder(directory: Path) -> Ladder:
    """A two-rendition HLS ladder: ``master.m3u8`` naming ``v0/index.m3u8`` and ``v1/index.m3u8``,
    each with an fMP4 init segment and ~2 s ``.m4s`` segments, 30 s in all."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *_LADDER_SOURCE, *_LADDER_VIDEO,
                    "-map", "[hi]", "-map", "[lo]", "-map", "1:a", "-map", "1:a",
                    "-f", "hls", "-hls_time", str(LADDER_SEGMENT_S), "-hls_playlist_type", "vod",
                    "-hls_segment_type", "fmp4", "-hls_fmp4_init_filename", "init.mp4",
                    "-master_pl_name", "master.m3u8", "-var_stream_map", "v:0,a:0 v:1,a:1",
                    "-hls_segment_filename", str(directory / "v%v" / "seg%03d.m4s"), str(directory / "v%v" / "index.m3u8")],
                   check=True, timeout=300)
    files = _ladder_files(directory)
    segments = [f for f in files if f.endswith(".m4s")]
    # The premise of the player tests: guard it, so an ffmpeg default change can't hollow them out.
    assert "master.m3u8" in files and {"v0/index.m3u8", "v1/index.m3u8"} <= set(files), files
    assert len(segments) >= 2 * 14, files
    return Ladder(directory, "master.m3u8", files, 2, len(segments))


def make_dash_ladder(directory: Path) -> Ladder:
    """The same clip as DASH: ``manifest.mpd`` with two video representations and one audio, fMP4
    init and ~2 s media segments (``$Number$`` templates)."""
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *_LADDER_SOURCE, *_LADDER_VIDEO,
                    "-map", "[hi]", "-map", "[lo]", "-map", "1:a",
                    "-f", "dash", "-seg_duration", str(LADDER_SEGMENT_S), "-use_template", "1", "-use_timeline", "0",
                    "-adaptation_sets", "id=0,streams=v id=1,streams=a",
                    "-init_seg_name", "init-$RepresentationID$.m4s",
                    "-media_seg_name", "chunk-$RepresentationID$-$Number%05d$.m4s", str(directory / "manifest.mpd")],
                   check=True, timeout=300)
    files = _ladder_files(directory)
    segments = [f for f in files if f.startswith("chunk-")]
    assert "manifest.mpd" in files and len(segments) >= 3 * 14, files
    return Ladder(directory, "manifest.mpd", files, 2, len(segments))


_ladders: dict[str, Ladder] = {}


@pytest.fixture(scope="session")
def ladders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Ladder]:
    """The HLS and DASH ladders, made once per process."""
    if not have_media_tools():
        pytest.skip("ffmpeg/ffprobe are not installed (apt-get install ffmpeg)")
    if not _ladders:
        root = tmp_path_factory.mktemp("ladders")
        _ladders.update(hls=make_hls_ladder(root / "hls"), dash=make_dash_ladder(root / "dash"))
    return dict(_ladders)
