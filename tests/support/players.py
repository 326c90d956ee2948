"""What the streaming-player and /ui/ browser tests share: the npm players (hls.js, dash.js in
``tests/players``), a page origin of its own (a tiny aiohttp static server on another port, so
every media request the players make is cross-origin), and the DevTools steps the page tests need
beyond ``tests.support.chromium`` (setting a file input, taking a screenshot).

Never: fetch anything from outside 127.0.0.1 at test time (``npm ci`` installs the pinned
packages from the committed lock file), or serve a file the test didn't name.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import AsyncIterator, Sequence

from aiohttp import web

from tests.support.chromium import Chromium

PLAYERS_DIR = Path(__file__).resolve().parents[1] / "players"
REPO = PLAYERS_DIR.parents[1]
NODE_MODULES = PLAYERS_DIR / "node_modules"


def ensure_players() -> Path:
    """``tests/players/node_modules``, installed with ``npm ci`` when missing."""
    if not (NODE_MODULES / "hls.js" / "package.json").is_file() or not (NODE_MODULES / "dashjs" / "package.json").is_file():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=PLAYERS_DIR, check=True, timeout=300,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return NODE_MODULES


def player_page_files() -> dict[str, Path]:
    """The driver page and the players it loads: the npm packages' own builds."""
    modules = ensure_players()
    return {
        "player.html": PLAYERS_DIR / "player.html",
        "player.js": PLAYERS_DIR / "player.js",
        "hls.min.js": modules / "hls.js" / "dist" / "hls.min.js",
        "dash.all.min.js": modules / "dashjs" / "dist" / "modern" / "umd" / "dash.all.min.js",
    }


_TYPES = {".html": "text/html", ".js": "text/javascript"}


@contextlib.asynccontextmanager
async def static_origin(files: dict[str, Path]) -> AsyncIterator[str]:
    """Serve exactly ``files`` (name -> path) on a free loopback port; yields the origin."""
    app = web.Application()

    async def serve(request: web.Request) -> web.StreamResponse:
        path = files.get(request.match_info["name"])
        if path is None:
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Content-Type": _TYPES.get(path.suffix, "application/octet-stream")})

    app.router.add_get("/{name}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def set_file_input(browser: Chromium, selector: str, paths: Sequence[Path]) -> None:
    """Choose ``paths`` in the page's ``<input type=file>`` as a user would (DOM.setFileInputFiles)."""
    doc = await browser.send("DOM.getDocument", {"depth": 0})
    found = await browser.send("DOM.querySelector", {"nodeId": doc["root"]["nodeId"], "selector": selector})
    if not found.get("nodeId"):
        raise AssertionError(f"no element matches {selector!r}")
    await browser.send("DOM.setFileInputFiles", {"nodeId": found["nodeId"], "files": [str(p) for p in paths]})


async def screenshot(browser: Chromium, out: Path, *, width: int = 1200, height: int = 760) -> Path:
    """A PNG of the page at ``width`` x ``height`` CSS pixels (Page.captureScreenshot)."""
    await browser.send("Emulation.setDeviceMetricsOverride",
                       {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    await asyncio.sleep(0.3)  # let layout settle at the new size
    shot = await browser.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})
    out.write_bytes(base64.b64decode(shot["data"]))
    return out


async def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> tuple[int, str, str]:
    """``chunkgate ARGS`` as a user runs it; (exit code, stdout, stderr)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway.cli", *args, env=full_env, cwd=str(REPO),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=timeout)
    return proc.returncode or 0, out.decode(), err.decode()
