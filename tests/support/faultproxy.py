"""A small TCP proxy between a gateway and its store that misbehaves on command, as networks do.

``FaultProxy(upstream_host, upstream_port)`` listens on 127.0.0.1 (a free port) in a thread of
its own with its own event loop, so a test (sync or async) and a ``chunkgate serve`` subprocess
both reach it, and forwards every connection to the upstream. Modes, switched at any time with
``set_mode`` (safe from any thread):

- ``pass``: forward both ways.
- ``stall``: accept connections and never answer -- a firewall that drops, a hung node: bytes
  already read are held, nothing more is read or forwarded, new connections are accepted and
  left unanswered. The connection stays open (no FIN, no RST).
- ``slow``: forward one byte at a time, ``slow_delay`` seconds apart, both ways.
- ``reset``: every open connection is reset (RST) now, and each new one as soon as it is
  accepted -- a node that restarts or a middlebox that kills flows.
- ``heal()``: back to ``pass``; held bytes flow on, as after a network partition heals.

Counters (``accepted``, ``open_connections``, ``bytes_up``, ``bytes_down``) let a test see that
the proxy was really in the path. Loopback only; ``close()`` stops everything it started.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from typing import Any

MODES = ("pass", "stall", "slow", "reset")


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int, *, slow_delay: float = 0.005) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.slow_delay = slow_delay
        self.mode = "pass"
        self.accepted = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self._conns: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._changed: asyncio.Event | None = None
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="faultproxy", daemon=True)
        self._thread.start()
        self.port = self._run(self._start())

    # ------------------------------------------------------------------ control (any thread)
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
        self._run(self._apply(mode))

    def stall(self) -> None:
        self.set_mode("stall")

    def slow(self) -> None:
        self.set_mode("slow")

    def reset(self) -> None:
        self.set_mode("reset")

    def heal(self) -> None:
        self.set_mode("pass")

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    # ------------------------------------------------------------------ the proxy (its loop)
    async def _start(self) -> int:
        self._changed = asyncio.Event()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._conns):
            _rst(writer)
        self._conns.clear()
        self._closing = True
        self._wake()  # stalled connections wake up, see the proxy closing and end
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._server is not None:
            await self._server.wait_closed()

    async def _apply(self, mode: str) -> None:
        self.mode = mode
        if mode == "reset":
            for writer in list(self._conns):
                _rst(writer)
        self._wake()

    def _wake(self) -> None:
        assert self._changed is not None
        self._changed.set()
        self._changed = asyncio.Event()

    async def _flowing(self) -> None:
        """Return once bytes may move (not stalled)."""
        while self.mode == "stall" and not self._closing:
            assert self._changed is not None
            await self._changed.wait()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._conns.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            if self.mode == "reset":
                _rst(writer)
                return
            await self._flowing()  # a stalled store: accepted, never answered
            if writer.is_closing() or self._closing:
                return
            up_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
            self._conns.add(upstream_writer)
            await asyncio.gather(self._pump(reader, upstream_writer, "up"), self._pump(up_reader, writer, "down"),
                                 return_exceptions=True)
        except OSError:
            pass
        finally:
            self._tasks.discard(task)
            for w in (writer, upstream_writer):
                if w is not None:
                    self._conns.discard(w)
                    if not w.is_closing():
                        w.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: str) -> None:
        try:
            while True:
                await self._flowing()
                data = await src.read(65536)
                if not data:
                    break
                await self._flowing()  # read just before a stall began: held, not forwarded
                if self.mode == "slow":
                    for i in range(len(data)):
                        await self._flowing()
                        dst.write(data[i:i + 1])
                        await dst.drain()
                        self._count(direction, 1)
                        await asyncio.sleep(self.slow_delay)
                else:
                    dst.write(data)
                    await dst.drain()
                    self._count(direction, len(data))
            if dst.can_write_eof():
                dst.write_eof()
        except (OSError, RuntimeError):
            pass
        finally:
            if self.mode == "reset":
                _rst(dst)

    def _count(self, direction: str, n: int) -> None:
        if direction == "up":
            self.bytes_up += n
        else:
            self.bytes_down += n


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), not a FIN: what a killed flow looks like."""
    sock = writer.get_extra_info("socket")
    try:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    writer.transport.abort()
