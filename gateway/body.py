"""A large PUT or tus PATCH body with a Content-Length, received from the socket straight into chunk buffers.

aiohttp hands a request body over as ``bytes`` pieces: the event loop copies each socket read
into a new ``bytes``, the HTTP parser copies the body out of it into another, ``readany`` joins
what has queued into a third, and the chunker copies that into the chunk buffer; every piece
also costs a parser callback, a StreamReader wake-up and a hop through two async generators.
In ``ops.bench`` profiles of a 256 MiB PUT that was ~10% of the gateway's CPU in memmove alone
(issue 15). aiohttp has no way to read a body into a caller's buffer, so for a plain body
(Content-Length, no Transfer-Encoding or Content-Encoding) of at least ``RECEIVE_INTO_FROM``
bytes the handler takes the connection's reading over: ``BodyReceiver`` is an
``asyncio.BufferedProtocol`` that the transport reads into the chunk buffer ``readinto`` was
given, in reads as large as the kernel has data for. Smaller bodies keep aiohttp's reader.

A PUT keeps nothing of a body that did not arrive whole (``readinto``). A tus PATCH keeps what
arrived, so it reads with ``readinto_some``: whatever came within a time limit (its lease is
renewed and its partly filled chunk checkpointed between calls), and when the body fails, first
the bytes before the failure, then the failure. Its ``stop`` event (another request asks for the
upload's lock) ends the body like a failure: ``BodyInterrupted``. A 1 GiB tus upload in 32 MiB
PATCHes cost the gateway 2.0 CPU-s/GiB through aiohttp's reader, 1.7-1.8 read this way (issue 15).

The price, and why it is safe:
- aiohttp's parser still expects the body, so the connection cannot carry another request:
  every answer to a taken-over request says ``Connection: close`` (``gateway.app``), and bytes
  after the body (a pipelined request) are read and dropped until the connection closes (not
  left unread: closing over unread bytes sends a reset that can destroy the answer).
- Reading stops whenever no buffer is waiting (a slow store slows the client, as before);
  bytes a transport delivers anyway are kept and given to the next ``readinto``.
- The same idle timeout (408 ``body_timeout``) and rate floor as aiohttp's path apply; a client
  that goes away, or closes before Content-Length bytes came, is ``IncompleteBody``, and the
  store's caller then aborts (nothing committed). A PUT that fails before its body ended gives
  the connection back to aiohttp (``release``), which reads and drops the rest after the answer
  as it always did; its parser then waits for the bytes read here, so it closes at its lingering
  timeout at the latest.
- Write flow control and the connection's end are passed on to aiohttp's own protocol.

Must never: read past Content-Length into a chunk buffer, hand back a partly filled buffer
before the body ended from ``readinto``, raise a failure from ``readinto_some`` before the bytes
that came first were handed over, or leave a taken-over connection open for another request.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from aiohttp import web

from gateway.errors import HTTPError
from storage.errors import BodyInterrupted, IncompleteBody

RECEIVE_INTO_FROM = 1 << 20  # bytes; below this a new connection per PUT would cost more than it saves
BODY_RECEIVED_INTO = "chunkgate.body_received_into"  # set on a request whose connection was taken over
_DROP = bytearray(64 * 1024)  # where bytes after the body go; never read


def can_receive_into(request: web.Request) -> bool:
    length = request.content_length
    if length is None or length < RECEIVE_INTO_FROM:
        return False
    headers = request.headers
    if "Transfer-Encoding" in headers or headers.get("Content-Encoding", "identity").strip().lower() != "identity":
        return False  # aiohttp decodes those; the raw bytes are not the body
    content = request.content
    return request.transport is not None and not content.is_eof() and content.exception() is None


class BodyReceiver(asyncio.BufferedProtocol):
    """Takes over ``request``'s connection at the first ``readinto``, which fills the caller's
    buffers; ``release`` when the store is done with the body."""

    def __init__(self, request: web.Request, *, timeout: float, check_rate: Callable[[int], None],
                 stop: asyncio.Event | None = None, stalled: str = "nothing was committed") -> None:
        # check_rate(received): the rate floor (gateway.objects.UploadRateFloor.check), raises HTTPError 408.
        # stop: set when the body is to end early (BodyInterrupted); stalled: what the 408 says was done.
        assert request.transport is not None and request.content_length is not None
        self._request = request
        self._loop = asyncio.get_running_loop()
        self._transport = request.transport
        self._original: asyncio.BaseProtocol = request.transport.get_protocol()
        self._timeout = timeout
        self._check_rate = check_rate
        self._stop = stop
        self._stalled = stalled
        self._expired = False  # readinto_some's time limit passed
        self._watchdog: asyncio.TimerHandle | None = None
        self._target: memoryview | None = None
        self._filled = 0
        self._early: list[bytes] = []  # body bytes that came with no buffer waiting
        self._spill: bytearray | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._last_progress = self._loop.time()
        self._taken = False
        self.received = 0
        self.left = request.content_length  # body bytes still on the socket

    def _take_over(self) -> None:
        """At the first ``readinto``, not before: a PUT refused before its body is read (a
        precondition) keeps aiohttp's reader, which drains the body after the answer."""
        self._taken = True
        content = self._request.content
        queued = content.read_nowait(-1)  # what aiohttp's parser already took off the socket
        self._transport.pause_reading()  # until a buffer waits for the body (read_nowait may have resumed it)
        if queued:
            self._early.append(queued)
        self.received = len(queued)
        self.left -= len(queued)
        self._request[BODY_RECEIVED_INTO] = True
        self._transport.set_protocol(self)

    def release(self) -> None:
        """The store is done with the body. Before its end (the PUT failed): the connection goes
        back to aiohttp, which reads and drops the rest after the answer (its lingering close), so
        the client, still sending, gets the answer instead of a reset. At its end: aiohttp's reader
        is told the body is complete, so it does not wait for it."""
        if not self._taken:
            return
        if self.left and not self._transport.is_closing():
            self._transport.set_protocol(self._original)
            self._transport.resume_reading()
        elif not self.left:
            self._request.content.feed_eof()

    # -- what the storage layer calls (storage.writes.BodyInto) ----------------------------------
    async def readinto(self, buf: memoryview) -> int:
        """Fill ``buf``; fewer bytes only when the body ends (0 after it ended)."""
        filled = await self._fill(buf, None)
        if self._error is not None:
            raise self._error
        if filled < len(buf) and self.left:
            raise IncompleteBody(f"the request body ended after {self.received} bytes")
        return filled

    async def readinto_some(self, buf: memoryview, within: float | None = None) -> int:
        """Fill ``buf`` with what the body brings within ``within`` seconds: fewer bytes (maybe
        none) when the time is up, the body ended (``ended``) or failed. A failure is raised once
        the bytes that came before it were handed over: by this call when none were left."""
        if self._error is None and self._stop is not None and self._stop.is_set():
            self._fail(BodyInterrupted("another request asked for the upload"))
        filled = await self._fill(buf, within)
        if not filled and self._error is not None:
            raise self._error
        return filled

    @property
    def ended(self) -> bool:
        """Every byte of the body was handed over."""
        return not self.left and not self._early

    async def _fill(self, buf: memoryview, within: float | None) -> int:
        if not self._taken:
            self._take_over()
        filled = self._take_early(buf)
        if filled < len(buf) and self.left and self._error is None:
            self._target, self._filled, self._expired = buf, filled, False
            self._last_progress = self._loop.time()  # time spent away (a slow store) is not the client's idle time
            self._watchdog = self._loop.call_later(self._tick(), self._watch)
            limit = self._loop.call_later(within, self._expire) if within is not None else None
            stopper = None
            if self._stop is not None:
                stopper = asyncio.ensure_future(self._stop.wait())
                stopper.add_done_callback(self._stopped)
            try:
                self._transport.resume_reading()
                while self._filled < len(buf) and self.left and self._error is None and not self._expired:
                    self._waiter = self._loop.create_future()
                    await self._waiter
            finally:
                if self._watchdog is not None:
                    self._watchdog.cancel()
                    self._watchdog = None
                if limit is not None:
                    limit.cancel()
                if stopper is not None:
                    stopper.remove_done_callback(self._stopped)
                    stopper.cancel()
                self._waiter = None
                filled, self._target = self._filled, None
                if self.left:
                    self._transport.pause_reading()
        self._request["chunkgate.bytes_received"] = self.received
        return filled

    def _expire(self) -> None:
        self._expired = True
        self._wake()

    def _stopped(self, waited: "asyncio.Future[Any]") -> None:
        if not waited.cancelled():
            self._fail(BodyInterrupted("another request asked for the upload"))

    def _take_early(self, buf: memoryview) -> int:
        filled = 0
        while self._early and filled < len(buf):
            piece = self._early[0]
            take = min(len(piece), len(buf) - filled)
            buf[filled:filled + take] = piece[:take]
            filled += take
            if take == len(piece):
                self._early.pop(0)
            else:
                self._early[0] = piece[take:]
        return filled

    # -- idle timeout and rate floor, checked by a timer while a buffer waits ---------------------
    def _tick(self) -> float:
        return min(self._timeout / 4, 1.0) if self._timeout else 1.0

    def _watch(self) -> None:
        idle = self._loop.time() - self._last_progress
        if self._timeout and idle >= self._timeout:
            self._fail(HTTPError(408, "body_timeout",
                                 f"the request body stalled for {self._timeout:g} s; {self._stalled}"))
            return
        try:
            self._check_rate(self.received)
        except HTTPError as exc:
            self._fail(exc)
            return
        self._watchdog = self._loop.call_later(self._tick(), self._watch)

    # -- asyncio.BufferedProtocol -----------------------------------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview | bytearray:
        if not self.left:
            return _DROP
        if self._target is not None and self._filled < len(self._target):
            return self._target[self._filled:self._filled + min(len(self._target) - self._filled, self.left)]
        # No buffer waits (a transport that reads while paused): keep the bytes for the next one.
        self._spill = bytearray(min(max(sizehint, 64 * 1024), self.left))
        return self._spill

    def buffer_updated(self, nbytes: int) -> None:
        if not self.left:
            return  # after the body: dropped
        self.left -= nbytes
        self.received += nbytes
        self._last_progress = self._loop.time()
        if self._spill is not None:
            self._early.append(bytes(self._spill[:nbytes]))
            self._spill = None
        else:
            self._filled += nbytes
        target = self._target
        if self.left and (target is None or self._filled == len(target)):
            self._transport.pause_reading()  # until the next buffer waits
        if not self.left or target is None or self._filled == len(target):
            # At the body's end reading goes on: what follows is dropped, so that no unread bytes
            # are left when the connection closes (the kernel would answer them with a reset, which
            # can destroy the answer on its way to the client).
            self._wake()

    def eof_received(self) -> bool | None:
        if self.left:
            self._fail(IncompleteBody(f"the client closed its side after {self.received} of "
                                      f"{self.received + self.left} body bytes"))
        return self._original.eof_received() if isinstance(self._original, asyncio.Protocol) else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.left:
            self._fail(IncompleteBody(f"the request body was cut short after {self.received} bytes: "
                                      f"{exc or 'the connection closed'}"))
        self._original.connection_lost(exc)

    def pause_writing(self) -> None:
        self._original.pause_writing()

    def resume_writing(self) -> None:
        self._original.resume_writing()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
