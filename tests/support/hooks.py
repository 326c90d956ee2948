"""A real hook receiver for tests: an aiohttp server on a free loopback port that records every
event POSTed to it and answers as the test says (``respond``), and can go down and come back on
the same port (``stop`` / ``start``), the way an application restarts.

Never: answer anything the test did not ask for; keep running after the test (use it as an async
context manager).
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from aiohttp import web

Responder = Callable[[dict[str, Any]], Awaitable[tuple[int, str]] | tuple[int, str]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class HookReceiver:
    respond: Responder = lambda event: (204, "")
    port: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)  # every POST, in arrival order, answered or not
    accepted: list[dict[str, Any]] = field(default_factory=list)  # those answered 2xx
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/json", request.content_type
        event = json.loads(await request.read())
        self.events.append(event)
        answer = self.respond(event)
        status, body = await answer if asyncio.iscoroutine(answer) else answer  # type: ignore[misc]
        if 200 <= status < 300:
            self.accepted.append(event)
        return web.Response(status=status, text=body)

    async def start(self) -> "HookReceiver":
        if not self.port:
            self.port = _free_port()
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def of_type(self, kind: str, *, accepted: bool = True) -> list[dict[str, Any]]:
        return [e for e in (self.accepted if accepted else self.events) if e["type"] == kind]

    async def __aenter__(self) -> "HookReceiver":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
