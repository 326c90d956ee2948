"""The warm-GET peer: a bare aiohttp handler that streams one file's bytes from memory.

``python -m ops.bench.memserver FILE`` loads FILE into memory, listens on a free loopback port,
prints ``memserver listening on http://127.0.0.1:PORT`` and answers every GET with the whole
file in 1 MiB writes (the ceiling NOTES.md measured for any aiohttp response). It does nothing
else -- no ranges, no conditionals, no checks -- and must never listen beyond loopback.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from aiohttp import web

_WRITE = 1024 * 1024


def build_app(data: bytes) -> web.Application:
    view = memoryview(data)

    async def handle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = len(data)
        await response.prepare(request)
        for offset in range(0, len(data), _WRITE):
            await response.write(view[offset : offset + _WRITE])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    return app


async def serve(path: Path) -> None:
    runner = web.AppRunner(build_app(path.read_bytes()), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"memserver listening on http://127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(serve(Path(sys.argv[1])))
