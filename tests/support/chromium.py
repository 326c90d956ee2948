"""Drive Debian's headless Chromium over the DevTools protocol (CDP), for real-browser tests.

``Chromium`` starts the browser with the flags known to work as root here (NOTES.md "Browsers and
media"), a fresh profile, and ``--remote-debugging-port=0``: Chromium picks a free port itself and
writes it to ``DevToolsActivePort`` in the profile, so there is no window between finding a free
port and binding it. The page target comes from ``/json/list``; commands go over aiohttp's
websocket client. Only what the tests need: ``navigate``, ``evaluate``, and ``wait_for`` (polling
``Runtime.evaluate`` until an expression is truthy, since media events fire on the page's clock).

``serve_pages`` serves fixed pages from a little server of their own (another port, so another
origin than the gateway's), as a site embedding media from the gateway would.

Never: leave the browser running (``close`` terminates it and waits), or reuse a profile.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
from aiohttp import web

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-quic", "--autoplay-policy=no-user-gesture-required",
    "--disable-extensions", "--mute-audio", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
)


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class CDPError(RuntimeError):
    """A DevTools command failed, or the page threw."""


class Chromium:
    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.profile = Path(tempfile.mkdtemp(prefix="chunkgate-chromium-"))
        self.devtools = ""
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self.console: list[str] = []  # page console messages and exceptions, for failure messages

    async def start(self, *, timeout: float = 30.0) -> "Chromium":
        binary = chromium_binary()
        if binary is None:
            raise RuntimeError("chromium is not installed (apt-get install chromium)")
        self.proc = await asyncio.create_subprocess_exec(
            binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.returncode is not None or time.monotonic() > deadline:
                await self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        self.devtools = f"http://127.0.0.1:{port}"
        self._session = aiohttp.ClientSession()
        page_ws = await self._page_websocket(deadline)
        self._ws = await self._session.ws_connect(page_ws, max_msg_size=64 * 1024 * 1024)
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        return self

    async def _page_websocket(self, deadline: float) -> str:
        assert self._session is not None
        while True:
            try:
                async with self._session.get(f"{self.devtools}/json/list") as resp:
                    targets = await resp.json()
                for target in targets:
                    if target.get("type") == "page" and target.get("webSocketDebuggerUrl"):
                        return str(target["webSocketDebuggerUrl"])
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("chromium listed no page target")
            await asyncio.sleep(0.1)

    async def send(self, method: str, params: dict[str, Any] | None = None, *, timeout: float = 30.0) -> dict[str, Any]:
        """One CDP command; events that arrive meanwhile are kept only as console text."""
        assert self._ws is not None, "start() first"
        msg_id = next(self._ids)
        await self._ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        async with asyncio.timeout(timeout):
            while True:
                msg = await self._ws.receive()
                if msg.type != aiohttp.WSMsgType.TEXT:
                    raise CDPError(f"DevTools connection ended ({msg.type.name}) waiting for {method}")
                doc = json.loads(msg.data)
                if doc.get("id") == msg_id:
                    if "error" in doc:
                        raise CDPError(f"{method}: {doc['error']}")
                    return dict(doc.get("result", {}))
                self._note_event(doc)

    def _note_event(self, doc: dict[str, Any]) -> None:
        method = doc.get("method")
        params = doc.get("params", {})
        if method == "Runtime.consoleAPICalled":
            self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            self.console.append("exception: " + json.dumps(params.get("exceptionDetails", {}))[:500])

    async def navigate(self, url: str) -> None:
        result = await self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CDPError(f"navigating to {url}: {result['errorText']}")

    async def reload(self) -> None:
        """What the user's reload button does: the page starts over; its origin's storage stays."""
        await self.send("Page.reload", {"ignoreCache": False})

    async def set_input_files(self, selector: str, paths: list[str]) -> None:
        """Choose ``paths`` in the ``<input type=file>`` that ``selector`` names, as the file
        dialog would: the page sees real ``File`` objects and a ``change`` event."""
        found = await self.send("Runtime.evaluate", {"expression": f"document.querySelector({json.dumps(selector)})"})
        object_id = found.get("result", {}).get("objectId")
        if not object_id:
            raise CDPError(f"no element matches {selector!r}")
        await self.send("DOM.setFileInputFiles", {"files": [str(p) for p in paths], "objectId": object_id})

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of ``expression`` in the page (promises are awaited)."""
        result = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise CDPError(f"page threw: {json.dumps(result['exceptionDetails'])[:800]}")
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, *, timeout: float = 60.0, interval: float = 0.2) -> Any:
        """Poll ``expression`` until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"page never satisfied {expression!r}; console: {self.console[-20:]}")
            await asyncio.sleep(interval)

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
            self._ws = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout=10)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    async def __aenter__(self) -> "Chromium":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


@contextlib.asynccontextmanager
async def serve_pages(pages: dict[str, str]) -> AsyncIterator[str]:
    """Serve ``pages`` (path -> HTML) on a free loopback port; yields the origin's base URL."""
    app = web.Application()
    for path, html in pages.items():
        async def page(request: web.Request, html: str = html) -> web.Response:
            return web.Response(text=html, content_type="text/html")

        app.router.add_get(path, page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
