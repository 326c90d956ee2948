"""Sending response bodies: in bounded slices, with a send timeout and a download rate floor.

A client that sends a GET and then reads nothing must not pin memory or a connection forever.
aiohttp's ``StreamResponse.write`` hands the whole buffer to the transport and then awaits
drain without any time limit, so writing a whole 8 MiB chunk left the transport holding it (a
copy with asyncio's transport, a reference to the chunk with uvloop's) for as long as the client
kept the socket open. Here a body goes out piece by piece, and the transport never holds more than
one small copy:

- while the socket's send buffer has room (at least ``MIN_VIEW_BYTES``), the next piece is a view
  of the chunk of at most that room: the transport sends it at once and keeps nothing (no copy;
  fast readers get few, large writes);
- otherwise (the client is behind), the piece is a copy of at most ``SLICE_BYTES``, so what is
  queued for a stalled client holds no reference to the chunk; when that copy has not drained
  within ``STALL_GRACE`` the chunk's loan is marked idle: the cache may take it back for readers
  that wait for room (``storage.cache``), and the response borrows it again when the client
  reads on;
- a client that takes no byte for ``send_timeout`` seconds, or takes less than ``min_rate``
  bytes/s averaged over the last ``send_timeout`` seconds, has its connection closed (a reset).
  Progress is what the client's TCP has acknowledged (Linux ``tcp_info``; elsewhere what left the
  transport), looked at while a slice waits, so a slow but steady reader is never mistaken for a
  stalled one between slices, and kernel buffers draining in bursts do not look like a stall.

Per connection at most one slice copy plus the transport's high-water mark is queued, so the
memory of responses is the cache budget plus connections x (``SLICE_BYTES`` + 64 KiB).

HTTP only: knows aiohttp's response and transport, and ``storage.objects.ChunkPiece``'s three
methods (view, idle, release), never the cache or the store.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import fcntl
import logging
import socket
import struct
import termios
import time
from dataclasses import dataclass
from typing import Any, Callable

from aiohttp import web

log = logging.getLogger("chunkgate.sending")

SLICE_BYTES = 256 * 1024  # the most of a body copied for a client that is behind
MIN_VIEW_BYTES = 64 * 1024  # less room than this in the socket: the client is behind
STALL_GRACE = 0.25  # a write not drained within this long switches to the slow path (polling)
POLL_MIN, POLL_MAX = 0.01, 0.1  # seconds between looks at a stalled transport (doubling)


class SendAborted(ConnectionResetError):
    """The client was too slow (or stopped reading); its connection has been closed."""


@dataclass(frozen=True)
class SendPolicy:
    send_timeout: float = 60.0  # no progress this long closes the connection (0 = never)
    min_rate: float = 16 * 1024  # bytes/s over the last send_timeout seconds (0 = no floor)
    slice_bytes: int = SLICE_BYTES

    @property
    def window(self) -> float:
        return self.send_timeout if self.send_timeout > 0 else 60.0

    @classmethod
    def of(cls, app: web.Application) -> "SendPolicy":
        cfg = app["config"]
        return cls(send_timeout=cfg.send_timeout, min_rate=cfg.min_download_rate)


class BodySender:
    """Writes one response body. ``write`` for small framing bytes, ``send`` for chunk pieces."""

    def __init__(self, request: web.Request, response: web.StreamResponse, policy: SendPolicy,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.request, self.response, self.policy, self.clock = request, response, policy, clock
        self.handed = 0  # body bytes given to the transport
        self.progress = 0  # bytes the client's side has taken (acknowledged, where the kernel says)
        self.started = self.progress_at = self._sampled = clock()
        self._acked0 = _acked(request.transport)
        self._sock = request.transport.get_extra_info("socket") if request.transport is not None else None
        self._marks: collections.deque[tuple[float, int]] = collections.deque([(self.started, 0)])
        self.behind = False  # the client is not keeping up: copy slices, mark loans idle
        self.went_slow = False  # ever behind (memory may be worth returning when it ends)

    # ------------------------------------------------------------------ writing
    async def write(self, data: Any) -> int:
        """Small bytes of the body's own (multipart framing): sent as they are."""
        await self._send([data], copied=True, on_idle=None)
        return len(data)

    async def send(self, piece: Any) -> int:
        """A ``ChunkPiece``, in slices. Returns the bytes sent."""
        size = len(piece)
        step = self.policy.slice_bytes
        pos = 0
        while pos < size:
            view = await piece.view()  # borrowed again here if the cache took it back while idle
            room = 0 if self.behind else self._kernel_room()
            behind = room < min(MIN_VIEW_BYTES, size - pos)
            # Keeping up: as much as the socket takes now, as a view (sent at once, nothing kept;
            # fewer, larger writes for fast readers). Behind: one slice, copied.
            n = min(size - pos, step if behind else room)
            # In a box, so that no frame here keeps the slice (and with it the chunk) while the
            # client stalls: ``_send`` lets go of it once the transport has it.
            box = [bytes(memoryview(view)[pos:pos + n]) if behind else memoryview(view)[pos:pos + n]]
            del view
            # Nothing here references the chunk until the next view(). Only a slice that has
            # not drained within STALL_GRACE marks the piece idle (the cache may then take the
            # chunk back, and the read gives up its read-ahead): a client merely behind, whose
            # socket is full but draining, keeps both. Marking it idle at once cost a refetch
            # whenever a busy reader's chunk was taken back (1.16-1.36x store bytes per byte
            # served with 40 readers under cache pressure, ops.bench amplify) and cancelled
            # read-ahead fetches half done (1.125x for one sequential GET).
            await self._send(box, copied=behind, on_idle=piece.idle if behind else None)
            pos += n
        return size

    async def _send(self, box: list[Any], *, copied: bool, on_idle: Callable[[], None] | None) -> None:
        transport = self.request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        out = box.pop()
        self.handed += len(out)
        try:
            async with asyncio.timeout(min(STALL_GRACE, self.policy.send_timeout or STALL_GRACE)):
                await self.response.write(out)  # the transport has ``out`` before drain is awaited
        except TimeoutError:
            pass
        else:
            self.behind = False
            if self.clock() - self._sampled >= 0.1:  # a syscall per slice would cost a fast GET
                self._note_progress(transport)
            return
        self.behind = self.went_slow = True
        del out
        await self._wait_drained(transport, on_idle if copied else None)

    async def _wait_drained(self, transport: asyncio.BaseTransport, on_idle: Callable[[], None] | None) -> None:
        """The slow path: look at the transport now and then until it has sent everything,
        closing the connection when the client takes too long. ``on_idle``: called once the
        queue holds only copies, so the chunk may be taken back meanwhile."""
        poll = POLL_MIN
        while True:
            if transport.is_closing():
                raise ConnectionResetError("the client closed the connection")
            queued = transport.get_write_buffer_size()  # type: ignore[attr-defined]
            self._note_progress(transport)
            if queued == 0:
                return
            if on_idle is not None:
                on_idle()
                on_idle = None
            self._enforce(transport)
            await asyncio.sleep(poll)
            poll = min(poll * 2, POLL_MAX)

    # ------------------------------------------------------------------ progress and limits
    def _note_progress(self, transport: asyncio.BaseTransport) -> None:
        now = self._sampled = self.clock()
        acked = _acked(transport)
        if acked is not None and self._acked0 is not None:
            progress = acked - self._acked0
        else:
            progress = self.handed - transport.get_write_buffer_size()  # type: ignore[attr-defined]
        if progress > self.progress:
            self.progress, self.progress_at = progress, now
        if now - self._marks[-1][0] >= self.policy.window / 8:
            self._marks.append((now, self.progress))
            while len(self._marks) > 2 and self._marks[1][0] <= now - self.policy.window:
                self._marks.popleft()

    def _enforce(self, transport: asyncio.BaseTransport) -> None:
        now = self.clock()
        timeout = self.policy.send_timeout
        if timeout and now - self.progress_at >= timeout:
            self._close(transport, f"the client took no byte for {now - self.progress_at:.1f} s (--send-timeout {timeout:g}s)")
        floor = self.policy.min_rate
        if floor and now - self.started >= self.policy.window:
            t0, p0 = self._marks[0]
            elapsed = now - t0
            if elapsed >= self.policy.window and self.progress - p0 < floor * elapsed:
                self._close(transport, f"the client took {(self.progress - p0) / elapsed:.0f} B/s over {elapsed:.0f} s; "
                                       f"--min-download-rate is {floor:.0f} B/s")

    def _close(self, transport: asyncio.BaseTransport, why: str) -> None:
        log.info("closing a response after %d bytes: %s", self.progress, why)
        self.request["chunkgate.send_closed"] = why
        # A reset, not a FIN: a FIN would wait behind the unsent bytes in the kernel (for a
        # client that reads nothing, until the kernel gives up on it), and the client would
        # never learn. Linger 0 drops those bytes and tells it at once.
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(AttributeError, OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()  # type: ignore[attr-defined]
        raise SendAborted(why)

    def _kernel_room(self) -> int:
        """Bytes the socket's send buffer takes now, so that the transport sends a view at once
        and keeps no reference to it; 0 when the transport still queues bytes or it is unknown."""
        transport = self.request.transport
        if transport is None or transport.get_write_buffer_size():
            return 0
        return _kernel_room(self._sock)


def _acked(transport: asyncio.BaseTransport | None) -> int | None:
    """Bytes of this connection the peer's TCP has acknowledged (Linux tcp_info.tcpi_bytes_acked):
    what the client's side has really taken, unlike what merely left the process into the
    kernel's send buffer (which can hold megabytes, then drains in bursts). None if unknown."""
    if transport is None:
        return None
    sock = transport.get_extra_info("socket")
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
        if len(info) < _TCP_INFO_LEN:
            return None
        return int(struct.unpack_from("Q", info, _BYTES_ACKED_AT)[0])
    except (AttributeError, OSError, ValueError):
        return None


_BYTES_ACKED_AT, _TCP_INFO_LEN = 120, 128  # offset of tcpi_bytes_acked (u64) in struct tcp_info


def _kernel_room(sock: Any) -> int:
    """Free bytes in the socket's send buffer (Linux: half of SO_SNDBUF is payload, minus
    what SIOCOUTQ says is queued); 0 when that cannot be asked."""
    try:
        fd = sock.fileno()
        queued = struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)) // 2 - int(queued)
    except (AttributeError, OSError, ValueError):
        return 0


# ---------------------------------------------------------------------- returning memory
_TRIM_DELAY = 2.0
_trim_pending = False


def return_memory_soon() -> None:
    """After a slow client's response ended: ask glibc to give freed heap pages back to the
    system (``malloc_trim``), at most once per ``_TRIM_DELAY``. serve keeps freed chunk memory
    for reuse (``gateway.cli.serve._keep_freed_memory``); after a crowd of stalled clients that
    reserve would otherwise stay at its peak for good."""
    global _trim_pending
    if _trim_pending or _malloc_trim is None:
        return
    _trim_pending = True

    def trim() -> None:
        global _trim_pending
        _trim_pending = False
        try:
            _malloc_trim(0)
        except OSError as exc:  # pragma: no cover - never seen; the memory then stays reserved
            log.debug("malloc_trim failed: %s", exc)

    asyncio.get_running_loop().call_later(_TRIM_DELAY, trim)


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_malloc_trim = _find_malloc_trim()
