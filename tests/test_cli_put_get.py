"""``chunkgate put`` / ``chunkgate get`` as users run them (subprocesses) against an in-process
gateway: upload+verify+download, automatic resume of an interrupted upload, auth, one-line
failures, and the pieces (manifest verification, the resume state file) on their own."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import sys
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.cli.client import ClientError, ResumeState, fingerprint, verify_against_manifest
from gateway.config import ServeConfig
from storage.manifest import ChunkRef, compute_etag
from tests.support.gateway import in_process_gateway

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parent.parent
CHUNK = 64 * 1024


def make_file(path: Path, size: int) -> Path:
    out = bytearray()
    i = 0
    while len(out) < size:
        out += hashlib.sha256(i.to_bytes(8, "big") + path.name.encode()).digest()
        i += 1
    path.write_bytes(bytes(out[:size]))
    return path


async def run_cli(*args: str, state_dir: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[int, str, str]:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "CHUNKGATE_STATE_DIR": str(state_dir), **(env or {})}
    if "CHUNKGATE_URL" not in (env or {}):
        full_env.pop("CHUNKGATE_URL", None)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway.cli", *args, env=full_env,
                                                cwd=str(cwd or REPO), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=90)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_put_verifies_and_get_downloads_the_same_bytes(tmp_path: Path) -> None:
    src = make_file(tmp_path / "movie.mp4", 5 * CHUNK + 321)
    async with in_process_gateway(ServeConfig(chunk_size=CHUNK)) as (url, app):
        code, out, err = await run_cli("put", str(src), "films/movie.mp4", "--url", url, "--chunk-size", "100000",
                                       state_dir=tmp_path / "state")
        assert code == 0, err
        assert "verified" in out
        assert app["uploads"].stats.completed == 1
        dest = tmp_path / "down" / "copy.mp4"
        dest.parent.mkdir()
        code, out, err = await run_cli("get", "films/movie.mp4", "-o", str(dest), state_dir=tmp_path / "state",
                                       env={"CHUNKGATE_URL": url})
        assert code == 0, err
        assert dest.read_bytes() == src.read_bytes()
        assert sorted(p.name for p in dest.parent.iterdir()) == ["copy.mp4"]  # no temp file left


async def test_put_resumes_an_interrupted_upload_of_the_same_file(tmp_path: Path) -> None:
    src = make_file(tmp_path / "big.bin", 6 * CHUNK + 5)
    data = src.read_bytes()
    state_dir = tmp_path / "state"
    key = "resume/big.bin"
    async with in_process_gateway(ServeConfig(chunk_size=CHUNK)) as (url, app):
        # A previous `chunkgate put` created the upload, sent 150000 bytes and died.
        async with aiohttp.ClientSession() as s:
            headers = {"Tus-Resumable": "1.0.0", "Upload-Length": str(len(data)),
                       "Upload-Metadata": "key " + base64.b64encode(key.encode()).decode()}
            async with s.post(url + "/uploads/", headers=headers) as r:
                location = r.headers["Location"]
            async with s.patch(location, data=data[:150_000], headers={
                    "Tus-Resumable": "1.0.0", "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}) as r:
                assert r.status == 204
        ResumeState(state_dir).put(fingerprint(src, url, key), location, key)
        received_before = app["uploads"].stats.bytes_received

        code, out, err = await run_cli("put", str(src), key, "--url", url, "--chunk-size", "64KiB", state_dir=state_dir)
        assert code == 0, err
        stats = app["uploads"].stats
        assert stats.created == 1  # no new upload: it resumed
        assert stats.bytes_received - received_before == len(data) - 150_000
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{url}/objects/{key}") as r:
                assert await r.read() == data
        assert ResumeState(state_dir).get(fingerprint(src, url, key)) is None  # forgotten once done


async def test_put_starts_over_when_the_remembered_upload_is_gone(tmp_path: Path) -> None:
    src = make_file(tmp_path / "a.bin", 1000)
    state_dir = tmp_path / "state"
    async with in_process_gateway(ServeConfig(chunk_size=CHUNK)) as (url, app):
        ResumeState(state_dir).put(fingerprint(src, url, "a.bin"), f"{url}/uploads/{'0' * 32}", "a.bin")
        code, out, err = await run_cli("put", str(src), "a.bin", "--url", url, state_dir=state_dir)
        assert code == 0, err
        assert app["uploads"].stats.completed == 1


async def test_put_needs_the_token_when_the_gateway_has_tokens(tmp_path: Path) -> None:
    src = make_file(tmp_path / "t.bin", 2000)
    async with in_process_gateway(ServeConfig(chunk_size=CHUNK, auth_token=["s3cret"])) as (url, app):
        code, out, err = await run_cli("put", str(src), "t.bin", "--url", url, state_dir=tmp_path / "state")
        assert code == 1
        assert len(err.strip().splitlines()) == 1 and err.startswith("chunkgate: ")
        assert "Traceback" not in err
        code, out, err = await run_cli("put", str(src), "t.bin", "--url", url, state_dir=tmp_path / "state",
                                       env={"CHUNKGATE_TOKEN": "s3cret"})
        assert code == 0, err


@pytest.mark.parametrize(
    "args, code",
    [
        (["put", "/nonexistent/file", "k"], 1),
        (["put", "{src}", "bad/../key"], 2),
        (["put", "{src}", "k", "--chunk-size", "lots"], 2),
        (["get", "missing/key", "-o", "{out}"], 1),
        (["get", "bad//key"], 2),
    ],
)
async def test_failures_are_one_line_and_nonzero(tmp_path: Path, args: list[str], code: int) -> None:
    src = make_file(tmp_path / "f.bin", 10)
    out_file = tmp_path / "out.bin"
    async with in_process_gateway(ServeConfig(chunk_size=CHUNK)) as (url, _app):
        argv = [a.format(src=src, out=out_file) for a in args] + ["--url", url]
        rc, out, err = await run_cli(*argv, state_dir=tmp_path / "state")
    assert rc == code
    assert len(err.strip().splitlines()) == 1 and err.startswith("chunkgate: "), err
    assert not out_file.exists()


async def test_put_to_an_unreachable_gateway_fails_cleanly(tmp_path: Path) -> None:
    src = make_file(tmp_path / "f.bin", 10)
    rc, out, err = await run_cli("put", str(src), "k", "--url", "http://127.0.0.1:9", state_dir=tmp_path / "state")
    assert rc == 1
    assert err.startswith("chunkgate: ") and "Traceback" not in err


# ------------------------------------------------------------------------------ pieces
def manifest_for(data: bytes, chunk_size: int) -> dict[str, Any]:
    refs = [ChunkRef(i, off, len(data[off:off + chunk_size]), hashlib.sha256(data[off:off + chunk_size]).hexdigest())
            for i, off in enumerate(range(0, len(data), chunk_size))]
    return {"size": len(data), "version": "v1", "chunk_size": chunk_size, "etag": compute_etag("v1", len(data), refs),
            "chunks": [{"index": r.index, "offset": r.offset, "size": r.size, "sha256": r.sha256} for r in refs]}


def _tamper_sha(m: dict[str, Any]) -> None:
    m["chunks"][1]["sha256"] = "0" * 64


def _drop_chunk(m: dict[str, Any]) -> None:
    m["chunks"].pop()


def _size(m: dict[str, Any]) -> None:
    m["size"] += 1


def _etag(m: dict[str, Any]) -> None:
    m["etag"] = '"other"'


@pytest.mark.parametrize("tamper, words", [(None, None), (_tamper_sha, "chunk 1"), (_drop_chunk, "chunk 2"),
                                            (_size, "bytes"), (_etag, "ETag")])
def test_verify_against_manifest(tmp_path: Path, tamper: Any, words: str | None) -> None:
    path = make_file(tmp_path / "v.bin", 2500)
    manifest = manifest_for(path.read_bytes(), 1000)
    if tamper is None:
        verify_against_manifest(path, manifest)
        return
    tamper(manifest)
    with pytest.raises(ClientError, match=words):
        verify_against_manifest(path, manifest)


def test_resume_state_survives_concurrent_writers(tmp_path: Path) -> None:
    def writer(n: int) -> None:
        state = ResumeState(tmp_path)
        for i in range(20):
            state.put(f"fp-{n}-{i}", f"http://x/uploads/{n}-{i}", "k")

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state = ResumeState(tmp_path)
    assert all(state.get(f"fp-{n}-{i}") == f"http://x/uploads/{n}-{i}" for n in range(6) for i in range(20))


def test_fingerprint_changes_with_the_file(tmp_path: Path) -> None:
    path = make_file(tmp_path / "f.bin", 100)
    first = fingerprint(path, "http://g", "k")
    assert fingerprint(path, "http://g", "k") == first
    assert fingerprint(path, "http://g", "other") != first
    os.utime(path, ns=(1, 1))
    assert fingerprint(path, "http://g", "k") != first
