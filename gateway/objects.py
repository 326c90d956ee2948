"""HTTP handlers for ``/objects``: PUT, GET, HEAD, DELETE, ``?manifest`` and listing.

HTTP only: the range and precondition rules live in ``gateway.ranges`` / ``gateway.conditions``
(pure), the object logic in ``storage.objects``. HEAD runs the GET path with the body switched
off, so both always send the same headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, TypeVar
from urllib.parse import unquote_to_bytes

from aiohttp import ClientPayloadError, EofStream, web
from aiohttp.http_exceptions import HttpProcessingError

from gateway import caching, conditions, hooks, ranges, security, sending
from gateway.body import BodyReceiver, can_receive_into
from gateway.auth import READ_EXPIRES, READ_PRIVATE, TOKEN_PATH
from gateway.errors import HTTPError
from gateway.mediatypes import guess_content_type, normalize_content_type
from storage.errors import IncompleteBody, ObjectError, PreconditionNotMet
from storage.keys import BadKey, validate_key
from storage.manifest import Manifest
from storage.objects import ObjectRead, ObjectStore

log = logging.getLogger("chunkgate.http")

CACHE_CONTROL = "public, max-age=0, must-revalidate"  # keys can be overwritten: always revalidate
# Set on a request whose answer carries an object's own headers (gateway.security.object_headers),
# so decorate_response leaves that answer's Content-Security-Policy to the object's type.
OBJECT_READ = "chunkgate.object_read"
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


# What reading a request body raises when the client goes away mid-body or sends a malformed
# one (short Content-Length body, bad chunked encoding): the upload is incomplete, not a 500.
BODY_READ_ERRORS = (ConnectionError, asyncio.IncompleteReadError, HttpProcessingError, ClientPayloadError, EofStream)


def object_path(raw_path: str) -> tuple[str | None, str]:
    """(path token or None, key) of ``/objects/{key}`` or ``/t/{token}/objects/{key}``, from
    the raw path: the key is percent-decoded here, after routing, so that no URL normalization
    (dot segments, merged slashes) can change which key a request names, and both forms follow
    exactly the same key rules. The token is taken as sent (base64url needs no escaping)."""
    raw = raw_path.split("?", 1)[0]
    token = None
    if raw.startswith(TOKEN_PATH):
        token, sep, rest = raw[len(TOKEN_PATH):].partition("/")
        if not token or not sep:
            raise BadKey("the path must be /t/{token}/objects/{key}")
        raw = "/" + rest
    if not raw.startswith("/objects/"):
        raise BadKey("the path must be /objects/{key}" if token is None else "the path must be /t/{token}/objects/{key}")
    try:
        key = unquote_to_bytes(raw[len("/objects/"):]).decode("utf-8")
    except UnicodeDecodeError:
        raise BadKey("the key is not valid UTF-8") from None
    return token, validate_key(key)


def object_key(request: web.Request) -> str:
    return object_path(request.raw_path)[1]


def path_token(request: web.Request) -> str | None:
    """The prefix token of a ``/t/{token}/objects/{key}`` request, else None."""
    return object_path(request.raw_path)[0]


def store_of(request: web.Request) -> ObjectStore:
    store: ObjectStore = request.app["store"]
    return store


def owner_of(request: web.Request) -> str:
    return f"{request.method} {request.get('request_id', '-')}"


def object_headers(m: Manifest) -> dict[str, str]:
    return {
        "ETag": m.etag,
        "Last-Modified": conditions.http_date(m.last_modified),
        "Accept-Ranges": "bytes",
        "Cache-Control": CACHE_CONTROL,
    }


# ---------------------------------------------------------------------------------- PUT
def write_check(request: web.Request, named: str) -> Callable[[str | None], None]:
    """The request's write preconditions as the store runs them: given the object's current ETag
    (None: no object), raise ``PreconditionNotMet`` unless the write may go ahead. ``named``: the
    headers the error message names."""

    def check(current_etag: str | None) -> None:
        if conditions.evaluate_write(request.headers, current_etag=current_etag) is not conditions.Outcome.PROCEED:
            raise PreconditionNotMet(f"the object's current state does not satisfy {named}")

    return check


def upload_content_type(key: str, supplied: str | None) -> str:
    """The client's Content-Type, unless it is missing, junk, or the generic
    application/octet-stream that HTTP clients send by default for any bytes: then the type
    the key's extension names (a <video> element needs video/mp4, not octet-stream)."""
    given = normalize_content_type(supplied)
    if given and given.split(";")[0].strip().lower() != "application/octet-stream":
        return given
    return guess_content_type(key)


async def put_object(request: web.Request) -> web.Response:
    key = object_key(request)
    store = store_of(request)
    content_type = upload_content_type(key, request.headers.get("Content-Type"))
    sha = request.headers.get("X-Checksum-SHA256")
    if sha is not None and not _HEX64.match(sha.strip()):
        raise HTTPError(400, "bad_checksum", "X-Checksum-SHA256 must be 64 hex digits")
    length = request.content_length  # None for chunked bodies: then the stream decides
    await hooks.authorize(request, key=key, size=length, content_type=content_type)  # before a body byte is read
    conditional = "If-Match" in request.headers or "If-None-Match" in request.headers
    body = receive_body(request)
    try:
        manifest = await store.put(
            key,
            body,
            content_type=content_type,
            content_length=length,
            content_md5=request.headers.get("Content-MD5"),
            sha256_hex=sha.strip() if sha else None,
            check=write_check(request, "If-Match / If-None-Match") if conditional else None,
            owner=owner_of(request),
            event=hooks.post_finish(request),
        )
    finally:
        if isinstance(body, BodyReceiver):
            body.release()  # the connection goes back to aiohttp if the body was not read to its end
    out = {"key": key, "size": manifest.size, "etag": manifest.etag, "version": manifest.version,
           "chunks": len(manifest.chunks)}
    return web.json_response(out, status=201, headers={"ETag": manifest.etag, "Location": request.path})


class UploadRateFloor:
    """Refuses a body arriving slower than ``min_rate`` bytes/s on average once ``grace``
    seconds have passed. The idle timeout catches a client that stops; this catches one that
    dribbles a byte now and then to hold an upload slot forever (slowloris)."""

    def __init__(self, min_rate: float, grace: float, clock: Callable[[], float] = time.monotonic,
                 received: int = 0) -> None:
        self.min_rate, self.grace, self.clock = min_rate, grace, clock
        self.started = clock()
        self.received = received

    def took(self, request: web.Request, piece: bytes) -> None:
        """Count a piece of the body (for the metrics too), then apply the floor."""
        self.received += len(piece)
        request["chunkgate.bytes_received"] = self.received
        self.check(self.received)

    def check(self, received: int) -> None:
        elapsed = self.clock() - self.started
        if self.min_rate and elapsed > self.grace and received < self.min_rate * elapsed:
            raise HTTPError(408, "body_too_slow",
                            f"the request body arrived at {received / elapsed:.0f} B/s for {elapsed:.0f} s; "
                            f"at least {self.min_rate:.0f} B/s is needed")

    @classmethod
    def for_request(cls, request: web.Request) -> "UploadRateFloor":
        cfg = request.app["config"]
        return cls(cfg.min_upload_rate, max(cfg.body_timeout, 1.0), received=request.get("chunkgate.bytes_received", 0))


def receive_body(request: web.Request) -> AsyncIterator[bytes] | BodyReceiver:
    """A PUT's body for the store: received straight into chunk buffers when it is large and
    plain (gateway.body says why and what it costs), else aiohttp's pieces."""
    if can_receive_into(request):
        floor = UploadRateFloor.for_request(request)
        return BodyReceiver(request, timeout=request.app["config"].body_timeout, check_rate=floor.check)
    return request_body(request)


async def request_body(request: web.Request) -> AsyncIterator[bytes]:
    """The request body as pieces, with an idle timeout and a rate floor: a client that stops
    sending, or dribbles, gets 408 and nothing is committed (the store's caller aborts)."""
    timeout = request.app["config"].body_timeout
    floor = UploadRateFloor.for_request(request)
    stream = request.content
    while True:
        try:
            piece = await asyncio.wait_for(stream.readany(), timeout=timeout or None)
        except asyncio.TimeoutError:
            raise HTTPError(408, "body_timeout", f"the request body stalled for {timeout:g} s; nothing was committed") from None
        except BODY_READ_ERRORS as exc:
            raise IncompleteBody(f"the request body was cut short: {exc}") from None
        if not piece:
            break
        floor.took(request, piece)
        yield piece


# ---------------------------------------------------------------------------------- GET/HEAD
async def get_object(request: web.Request) -> web.StreamResponse:
    key = object_key(request)
    refused = security.refused_load(request.app["config"].active_content, request.headers)
    if refused is not None:
        raise HTTPError(403, "untrusted_content",
                        f"uploads are not served to this gateway's own pages as {refused} code; "
                        "they are untrusted content (see --active-content)")
    store = store_of(request)
    if "manifest" in request.query:
        manifest = await store.head(key)
        return web.json_response(manifest.to_dict(), headers={"ETag": manifest.etag, "Cache-Control": "no-cache"})
    planned: list[Answer] = []  # the latest answer planned, for a client gone before the first byte

    def plan(m: Manifest) -> Answer:
        planned[:] = [plan_answer(request, m)]
        return planned[0]

    try:
        # One storage call: the manifest, the answer planned from it, the first piece fetched and
        # checked before any header is sent (storage deals with drift and repairs meanwhile).
        read = await _unless_client_leaves(request, store.open(key, plan), lambda: bool(planned))
    except ConnectionResetError:
        log.debug("client closed the connection to %r before the first byte", key)
        request["chunkgate.bytes_sent"] = 0
        return web.Response(status=planned[0].status, headers=planned[0].headers)  # nobody is left to read it
    answer = read.plan
    if not answer.spans:
        return web.Response(status=answer.status, headers=answer.headers)
    return await _send_body(request, read)


def cache_control_for(request: web.Request, m: Manifest) -> str:
    expires = request.get(READ_EXPIRES)
    return caching.cache_control(m.content_type, pinned=request.query.get("v") == m.version,
                                 private=bool(request.get(READ_PRIVATE)),
                                 signed_seconds_left=None if expires is None else expires - time.time())


@dataclass
class Answer:
    """What a GET or HEAD answers from one manifest: status, headers, and the byte ranges to send
    (``spans``; none for HEAD, 304, or any answer without a body)."""

    status: int
    headers: dict[str, str]
    spans: list[tuple[int, int]] = field(default_factory=list)
    multipart: ranges.MultipartByteranges | None = None


def plan_answer(request: web.Request, m: Manifest) -> Answer:
    """The answer to a GET or HEAD from manifest ``m``; raises ``HTTPError`` for 404 (a pinned
    version that is not current), 412 and 416."""
    pinned = request.query.get("v")
    if pinned is not None and pinned != m.version:
        # The URL names a version whose bytes it may cache for a year: never answer it
        # with another version's bytes.
        raise HTTPError(404, "version_not_found", "?v= names a version that is not the object's current one")
    headers = object_headers(m)
    # Uploads are untrusted: anything but media is sandboxed (or downloaded), per --active-content.
    headers.update(security.object_headers(m.content_type, request.app["config"].active_content))
    request[OBJECT_READ] = True
    headers["Cache-Control"] = cache_control_for(request, m)  # playlists, segments, pinned versions
    if request.method == "GET":
        request.app["metrics"].object_read(caching.media_kind(m.content_type))
    # HEAD answers with exactly the headers GET would send (API.md), ranges included.
    method = "GET" if request.method == "HEAD" else request.method
    decision = conditions.evaluate(method, request.headers, etag=m.etag, last_modified=m.last_modified)
    if decision.outcome is conditions.Outcome.NOT_MODIFIED:
        return Answer(304, headers)
    if decision.outcome is conditions.Outcome.PRECONDITION_FAILED:
        raise HTTPError(412, "precondition_failed", "the object does not satisfy the request's preconditions")
    answer = _ranged_answer(request, m, headers, decision.honor_range)
    if request.method == "HEAD":
        answer.spans = []
    return answer


def _ranged_answer(request: web.Request, m: Manifest, headers: dict[str, str], honor_range: bool) -> Answer:
    """200 with the whole object, or 206 with the ranges asked for (one, or multipart)."""
    max_ranges = request.app["config_max_ranges"]
    try:
        wanted = ranges.parse_range(request.headers.get("Range"), m.size, max_ranges=max_ranges) if honor_range else None
    except ranges.Unsatisfiable:
        raise HTTPError(416, "range_not_satisfiable", f"the object is {m.size} bytes long",
                        headers={"Content-Range": ranges.unsatisfied_range(m.size), **headers}) from None
    multipart = None
    if wanted is None:
        status, parts = 200, [ranges.ByteRange(0, m.size)]
        headers["Content-Type"] = m.content_type
        length = m.size
    elif len(wanted) == 1:
        status, parts = 206, wanted
        headers["Content-Type"] = m.content_type
        headers["Content-Range"] = ranges.content_range(wanted[0], m.size)
        length = wanted[0].end - wanted[0].start
    else:
        status, parts = 206, wanted
        multipart = ranges.MultipartByteranges(wanted, m.size, m.content_type)
        headers["Content-Type"] = multipart.content_type_header
        length = multipart.content_length()
    headers["Content-Length"] = str(length)
    return Answer(status, headers, [(p.start, p.end) for p in parts], multipart)


async def _send_body(request: web.Request, read: ObjectRead[Answer]) -> web.StreamResponse:
    """Send the headers, then the body ``read`` holds (its first piece already fetched)."""
    answer = read.plan
    response = web.StreamResponse(status=answer.status, headers=answer.headers)
    response.content_length = int(answer.headers["Content-Length"])
    sender = sending.BodySender(request, response, sending.SendPolicy.of(request.app))
    try:
        await response.prepare(request)
    except BaseException:
        await read.aclose()
        raise
    multipart = answer.multipart
    sent = 0
    try:
        for i, stream in enumerate(read.streams):
            if multipart is not None:
                sent += await sender.write(multipart.part_header(i))
            first = read.take_first() if i == 0 else None
            if first is not None:
                sent += await sender.send(first)  # released by its stream, as every piece is
            async for piece in stream:
                sent += await sender.send(piece)
        if multipart is not None:
            sent += await sender.write(multipart.trailer())
    except ObjectError as exc:
        # Headers are gone (a chunk rejected, or drifted while a repair runs): the only honest
        # thing left is to end the connection, so the client sees a short body instead of
        # bytes that contradict Content-Length or the ETag.
        log.error("aborting response for %r after %d bytes: %s", read.manifest.key, sent, exc)
        request["chunkgate.bytes_sent"] = sent
        _abort(request)
        return response
    except ConnectionResetError:
        # The viewer went away mid-body (players cancel a request on every seek), or stopped
        # reading and was closed by --send-timeout / --min-download-rate (gateway.sending):
        # not a server error; without this it was logged with a traceback and counted 500.
        log.debug("client closed the connection to %r after %d bytes", read.manifest.key, sent)
        return response
    finally:
        request["chunkgate.bytes_sent"] = sent
        await read.aclose()
        if sender.went_slow:
            sending.return_memory_soon()
    await response.write_eof()
    return response


T = TypeVar("T")


async def _unless_client_leaves(request: web.Request, work: Awaitable[T], started: Callable[[], bool]) -> T:
    """``work``'s result, or ``ConnectionResetError`` if the client leaves once ``started()``.

    aiohttp does not cancel a handler when its client disconnects (handler cancellation is off,
    and must stay off for uploads), and until the first write nothing else notices: a GET that
    disconnects at once would wait out its first chunk and read-ahead. Polling the transport
    while the first chunk comes lets the read give its fetches up (the store stops sending)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_GONE_POLL)
            if done:
                return task.result()
            transport = request.transport
            if started() and (transport is None or transport.is_closing()):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                raise ConnectionResetError("the client went away before the first byte")
    except asyncio.CancelledError:
        task.cancel()
        raise


_GONE_POLL = 0.005  # seconds between checks for a client that left before the first byte


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


# ---------------------------------------------------------------------------------- DELETE
async def delete_object(request: web.Request) -> web.Response:
    key = object_key(request)
    check = write_check(request, "If-Match")
    await store_of(request).delete(key, check=check, owner=owner_of(request), event=hooks.post_delete(request))
    return web.Response(status=204)


# ---------------------------------------------------------------------------------- listing
MAX_LIST = 1000


async def list_objects(request: web.Request) -> web.Response:
    prefix = request.query.get("prefix", "")
    after = request.query.get("after") or None
    raw_limit = request.query.get("limit", str(MAX_LIST))
    try:
        limit = int(raw_limit)
    except ValueError:
        raise HTTPError(400, "bad_limit", f"limit must be a whole number from 1 to {MAX_LIST}") from None
    if not 1 <= limit <= MAX_LIST:
        raise HTTPError(400, "bad_limit", f"limit must be a whole number from 1 to {MAX_LIST}")
    # No key is longer than 1024 bytes of UTF-8, so neither a prefix of one nor a key to go on after is.
    for name, value in (("prefix", prefix), ("after", after or "")):
        if len(value.encode("utf-8", "surrogatepass")) > 1024 or any(ord(c) < 0x20 for c in value):
            raise HTTPError(400, f"bad_{name}", f"{name} must be at most 1024 bytes (UTF-8) without control characters")
    manifests, next_after = await store_of(request).list(prefix, after=after, limit=limit)
    objects = [
        {"key": m.key, "size": m.size, "etag": m.etag, "last_modified": conditions.http_date(m.last_modified),
         "content_type": m.content_type}
        for m in manifests
    ]
    return web.json_response({"objects": objects, "next_after": next_after})


async def signed_object_dispatch(request: web.Request) -> web.StreamResponse:
    """``/t/{token}/objects/{key}``: reads only (the auth middleware has checked the token)."""
    if request.method in ("GET", "HEAD"):
        return await get_object(request)
    if request.method == "OPTIONS":
        return web.Response(status=204, headers={"Allow": "GET, HEAD, OPTIONS"})
    raise HTTPError(405, "method_not_allowed", f"{request.method} is not allowed on a signed URL; use /objects/{{key}}",
                    headers={"Allow": "GET, HEAD, OPTIONS"})


async def object_dispatch(request: web.Request) -> web.StreamResponse:
    handler = {"GET": get_object, "HEAD": get_object, "PUT": put_object, "DELETE": delete_object}.get(request.method)
    if handler is None:
        raise HTTPError(405, "method_not_allowed", f"{request.method} is not allowed on objects",
                        headers={"Allow": "GET, HEAD, PUT, DELETE, OPTIONS"})
    return await handler(request)
