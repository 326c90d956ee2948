"""``chunkgate put DIR PREFIX`` as users run it (a subprocess) against an in-process gateway: a
whole tree lands at PREFIX + its relative paths with the content types players need; rerunning
sends nothing already stored and resumes what was interrupted; a file the gateway refuses is one
line on stderr and a non-zero exit while the rest is stored; the pieces on their own."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import sys
from pathlib import Path

import aiohttp
import pytest

from gateway.cli.client import ResumeState, fingerprint, tree_files, upload_order
from gateway.config import ServeConfig
from tests.support.gateway import in_process_gateway

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parent.parent
CHUNK = 64 * 1024


def fill(path: Path, size: int) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    out = bytearray()
    i = 0
    while len(out) < size:
        out += hashlib.sha256(i.to_bytes(8, "big") + str(path).encode()).digest()
        i += 1
    path.write_bytes(bytes(out[:size]))
    return bytes(out[:size])


def ladder(root: Path) -> dict[str, bytes]:
    """A small HLS/DASH-shaped tree: playlists, init segments, media segments, subtitles."""
    files = {
        "master.m3u8": 120, "v0/index.m3u8": 300, "v0/init.mp4": 900, "v0/seg000.m4s": 3 * CHUNK + 17,
        "v0/seg001.m4s": 2 * CHUNK, "v1/index.m3u8": 300, "v1/seg000.ts": CHUNK // 3, "dash/manifest.mpd": 700,
        "dash/chunk-0-00001.m4s": CHUNK + 1, "subs/en.vtt": 50, "deep/a/b/c/thumb.jpg": 10,
    }
    return {rel: fill(root / rel, size) for rel, size in files.items()}


async def run_cli(*args: str, state_dir: Path) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CHUNKGATE_STATE_DIR": str(state_dir)}
    env.pop("CHUNKGATE_URL", None)
    env.pop("CHUNKGATE_TOKEN", None)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway.cli", *args, env=env, cwd=str(REPO),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=90)
    return proc.returncode or 0, out.decode(), err.decode()


async def stored(url: str, prefix: str) -> dict[str, tuple[str, bytes]]:
    out = {}
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/objects", params={"prefix": prefix}) as r:
            listing = (await r.json())["objects"]
        for o in listing:
            async with s.get(f"{url}/objects/{o['key']}") as r:
                out[o["key"]] = (o["content_type"], await r.read())
    return out


EXPECTED_TYPES = {
    "master.m3u8": "application/vnd.apple.mpegurl", "v0/index.m3u8": "application/vnd.apple.mpegurl",
    "v0/init.mp4": "video/mp4", "v0/seg000.m4s": "video/iso.segment", "v0/seg001.m4s": "video/iso.segment",
    "v1/index.m3u8": "application/vnd.apple.mpegurl", "v1/seg000.ts": "video/mp2t",
    "dash/manifest.mpd": "application/dash+xml", "dash/chunk-0-00001.m4s": "video/iso.segment",
    "subs/en.vtt": "text/vtt", "deep/a/b/c/thumb.jpg": "image/jpeg",
}


async def test_put_dir_stores_the_tree_under_the_prefix_and_a_rerun_sends_nothing_again(tmp_path: Path) -> None:
    files = ladder(tmp_path / "ladder")
    async with in_process_gateway(ServeConfig(chunk_size=CHUNK)) as (url, app):
        code, out, err = await run_cli("put", str(tmp_path / "ladder"), "shows/pilot/", "--url", url,
                                       "--chunk-size", "100000", state_dir=tmp_path / "state")
        assert code == 0, err
        total = sum(len(b) for b in files.values())
        assert out.strip() == f"shows/pilot/: {len(files)} files, {total} bytes stored and verified ({len(files)} uploaded, 0 already there)"
        assert err == ""
        got = await stored(url, "shows/pilot/")
        assert got == {f"shows/pilot/{rel}": (EXPECTED_TYPES[rel], data) for rel, data in files.items()}
        created = app["uploads"].stats.created
        assert created == len(files)

        code, out, err = await run_cli("put", str(tmp_path / "ladder"), "shows/pilot/", "--url", url,
                                       state_dir=tmp_path / "state")
        assert code == 0, err
        assert f"(0 uploaded, {len(files)} already there)" in out
        assert app["uploads"].stats.created == created  # nothing sent again

        # A file re-encoded in place is sent again; the rest stays.
        new = fill(tmp_path / "ladder" / "v0" / "seg001.m4s", 2 * CHUNK + 5)
        code, out, err = await run_cli("put", str(tmp_path / "ladder"), "shows/pilot/", "--url", url,
                                       state_dir=tmp_path / "state")
        assert code == 0, err
        assert f"(1 uploaded, {len(files) - 1} already there)" in out
        assert (await stored(url, "shows/pilot/v0/seg001.m4s"))["shows/pilot/v0/seg001.m4s"][1] == new


async def test_rerunning_resumes_a_file_that_was_interrupted(tmp_path: Path) -> None:
    files = ladder(tmp_path / "ladder")
    rel, key = "v0/seg000.m4s", "resume/v0/seg000.m4s"
    data = files[rel]
    state_dir = tmp_path / "state"
    async with in_process_gateway(ServeConfig(chunk_size=CHUNK)) as (url, app):
        # A previous run created this file's upload, sent 100000 bytes and died.
        async with aiohttp.ClientSession() as s:
            headers = {"Tus-Resumable": "1.0.0", "Upload-Length": str(len(data)),
                       "Upload-Metadata": "key " + base64.b64encode(key.encode()).decode()}
            async with s.post(url + "/uploads/", headers=headers) as r:
                location = r.headers["Location"]
            async with s.patch(location, data=data[:100_000], headers={
                    "Tus-Resumable": "1.0.0", "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}) as r:
                assert r.status == 204
        ResumeState(state_dir).put(fingerprint(tmp_path / "ladder" / rel, url, key), location, key)
        received = app["uploads"].stats.bytes_received
        code, out, err = await run_cli("put", str(tmp_path / "ladder"), "resume/", "--url", url, state_dir=state_dir)
        assert code == 0, err
        stats = app["uploads"].stats
        assert stats.created == 1 + (len(files) - 1)  # the interrupted file got no new upload
        assert stats.bytes_received - received == sum(len(b) for b in files.values()) - 100_000
        assert (await stored(url, key))[key][1] == data


async def test_a_refused_file_is_one_line_and_a_nonzero_exit_and_the_rest_is_stored(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    small = {rel: fill(root / rel, 1000) for rel in ("a/index.m3u8", "a/seg1.ts", "b/seg2.ts")}
    fill(root / "a" / "huge.ts", 5000)  # over --max-object-size: the gateway refuses it (413)
    (root / "bad\x01name.ts").write_bytes(b"x")  # no key may hold a control character
    os.symlink("/etc/hostname", root / "link.ts")  # not a regular file: skipped, never followed
    async with in_process_gateway(ServeConfig(chunk_size=1024, max_object_size=4000)) as (url, _app):
        code, out, err = await run_cli("put", str(root), "t/", "--url", url, state_dir=tmp_path / "state")
        got = await stored(url, "t/")
    assert code == 1
    lines = err.splitlines()
    assert sorted(lines) == sorted([
        "chunkgate: link.ts: skipped: not a regular file",
        "chunkgate: a/huge.ts: upload failed (HTTP 413): the upload is 5000 bytes; at most 4000 are accepted",
        "chunkgate: 'bad\\x01name.ts': cannot be a key: the key contains a NUL or control character",
        "chunkgate: 2 of 5 files failed; run the same command again to resume",
    ])
    assert lines[-1].startswith("chunkgate: 2 of 5 files failed")
    assert {k: v[1] for k, v in got.items()} == {f"t/{rel}": data for rel, data in small.items()}
    assert "3 files" in out


@pytest.mark.parametrize("args,code,complaint", [
    (["put", "{dir}", "/abs/"], 2, "chunkgate: PREFIX: "),
    (["put", "{dir}", "a/../"], 2, "chunkgate: PREFIX: "),
    (["put", "{dir}", "ok/", "--jobs", "0"], 2, "chunkgate: --jobs: "),
    (["put", "{empty}", "ok/"], 1, "chunkgate: DIR: no regular files under "),
])
async def test_put_dir_complains_in_one_line(tmp_path: Path, args: list[str], code: int, complaint: str) -> None:
    fill(tmp_path / "d" / "x.ts", 10)
    (tmp_path / "e").mkdir()
    argv = [a.format(dir=tmp_path / "d", empty=tmp_path / "e") for a in args]
    async with in_process_gateway(ServeConfig(chunk_size=CHUNK)) as (url, _app):
        got, out, err = await run_cli(*argv, "--url", url, state_dir=tmp_path / "state")
    assert got == code and err.startswith(complaint) and err.count("\n") == 1, err


def test_tree_files_lists_regular_files_only_with_slash_paths(tmp_path: Path) -> None:
    fill(tmp_path / "b" / "2.ts", 1)
    fill(tmp_path / "a.m3u8", 1)
    fill(tmp_path / "b" / "c" / "3.m4s", 1)
    os.symlink(tmp_path / "a.m3u8", tmp_path / "alias.m3u8")
    os.symlink(tmp_path / "b", tmp_path / "linked-dir")
    files, skipped = tree_files(tmp_path)
    assert [rel for _, rel in files] == ["a.m3u8", "b/2.ts", "b/c/3.m4s"]
    assert skipped == ["alias.m3u8", "linked-dir"]


def test_playlists_and_manifests_go_last() -> None:
    files = [(Path(r), r) for r in ("master.m3u8", "v0/a.m4s", "v0/index.m3u8", "dash/m.mpd", "v0/init.mp4", "x.vtt")]
    first, last = upload_order(files)
    assert [r for _, r in first] == ["v0/a.m4s", "v0/init.mp4", "x.vtt"]
    assert [r for _, r in last] == ["master.m3u8", "v0/index.m3u8", "dash/m.mpd"]
