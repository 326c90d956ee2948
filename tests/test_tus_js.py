"""tus-js-client (npm), run under Node, uploads a file through the gateway.

Needs ``node`` and ``npm``; ``tests/js/node_modules`` is installed here with ``npm ci`` when
missing (CI must allow that, or run ``npm ci`` in tests/js beforehand)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest

from gateway.config import ServeConfig
from tests.support.gateway import in_process_gateway

JS_DIR = Path(__file__).parent / "js"
pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None, reason="needs node and npm"),
]


@pytest.fixture(scope="module")
def js_client() -> Path:
    if not (JS_DIR / "node_modules" / "tus-js-client").is_dir():
        cmd = ["npm", "ci"] if (JS_DIR / "package-lock.json").exists() else ["npm", "install"]
        subprocess.run(cmd + ["--no-audit", "--no-fund"], cwd=JS_DIR, check=True, timeout=200,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return JS_DIR / "upload.mjs"


@pytest.mark.parametrize("chunk_size", [None, 100_000])
async def test_tus_js_client_uploads_a_file(js_client: Path, tmp_path: Path, chunk_size: int | None) -> None:
    data = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(12_000))  # 384000 bytes
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    key = f"js/clip-{chunk_size}.mp4"
    async with in_process_gateway(ServeConfig(chunk_size=64 * 1024)) as (url, app):
        args = ["node", str(js_client), url + "/uploads/", str(path), key]
        if chunk_size:
            args.append(str(chunk_size))
        proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
        assert proc.returncode == 0, (out + err).decode()
        result = json.loads(out.decode().strip().splitlines()[-1])
        assert result["ok"] is True
        assert result["url"].startswith(url + "/uploads/")
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{url}/objects/{key}") as r:
                assert r.status == 200
                assert r.headers["Content-Type"] == "video/mp4"
                assert await r.read() == data
        assert app["uploads"].stats.completed == 1
