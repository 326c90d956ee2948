"""tus 1.0 resumable uploads at ``/uploads/``: core, creation, creation-with-upload,
creation-defer-length, expiration, checksum and termination.

HTTP only: header parsing (pure functions, table-tested), the lock around every request, and the
mapping of upload errors to tus statuses. Sessions, offsets and commits live in
``storage.uploads``; nothing here keeps upload state in memory.

Must never: answer a request on an upload without holding that upload's lock; report an offset
it did not get from the store; send an error without the JSON body of API.md.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import re
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Awaitable, Callable

from aiohttp import web

from gateway import conditions, hooks
from gateway.auth import check_token
from gateway.body import BodyReceiver, can_receive_into
from gateway.errors import HTTPError, to_response
from gateway.objects import (
    BODY_READ_ERRORS,
    UploadRateFloor,
    owner_of,
    upload_content_type,
)
from storage.errors import IncompleteBody
from storage.keys import validate_key
from storage.quota import UploadCaps, client_id
from storage.uploads import (
    CHECKSUM_ALGORITHMS,
    BodyInterrupted,
    UploadOptions,
    UploadSessions,
    UploadState,
    UploadStatus,
    new_upload_id,
    valid_upload_id,
)

TUS_VERSION = "1.0.0"
TUS_EXTENSIONS = "creation,creation-with-upload,creation-defer-length,expiration,checksum,termination"
OFFSET_CONTENT_TYPE = "application/offset+octet-stream"
_UINT = re.compile(r"^[0-9]{1,19}$")
_META_KEY = re.compile(r"^[^\s,]+$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# ------------------------------------------------------------------------------ pure parsing
def parse_uint(value: str | None, name: str) -> int | None:
    """A tus non-negative integer header; None when absent. Raises 400 when malformed."""
    if value is None:
        return None
    value = value.strip()
    if not _UINT.match(value):
        raise HTTPError(400, "bad_header", f"{name} must be a non-negative integer")
    return int(value)


def parse_metadata(header: str | None) -> dict[str, str | None]:
    """``Upload-Metadata``: comma-separated ``key base64value`` pairs (value optional).
    Raises 400 on a malformed pair, a duplicate key or a value that is not base64 UTF-8."""
    result: dict[str, str | None] = {}
    if header is None or not header.strip():
        return result
    for pair in header.split(","):
        parts = pair.strip().split(" ")
        if not parts[0] or len(parts) > 2 or not _META_KEY.match(parts[0]):
            raise HTTPError(400, "bad_metadata", f"Upload-Metadata pair {pair.strip()!r} is not 'key base64value'")
        name = parts[0]
        if name in result:
            raise HTTPError(400, "bad_metadata", f"Upload-Metadata names {name!r} twice")
        if len(parts) == 1 or parts[1] == "":
            result[name] = None
            continue
        try:
            result[name] = base64.b64decode(parts[1], validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise HTTPError(400, "bad_metadata", f"Upload-Metadata value of {name!r} is not base64 of UTF-8 text") from None
    return result


def parse_checksum(header: str | None) -> tuple[str, bytes] | None:
    """``Upload-Checksum: <algorithm> <base64 digest>``; None when absent. An unsupported
    algorithm or a malformed digest is a 400 (tus checksum extension)."""
    if header is None:
        return None
    parts = header.strip().split(" ")
    if len(parts) != 2:
        raise HTTPError(400, "bad_checksum", "Upload-Checksum must be '<algorithm> <base64 digest>'")
    algorithm = parts[0].lower()
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise HTTPError(400, "unsupported_checksum",
                        f"checksum algorithm {parts[0]!r} is not supported; use one of {', '.join(CHECKSUM_ALGORITHMS)}")
    try:
        digest = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise HTTPError(400, "bad_checksum", "the Upload-Checksum digest is not base64") from None
    import hashlib

    if len(digest) != hashlib.new(algorithm).digest_size:
        raise HTTPError(400, "bad_checksum", f"the Upload-Checksum digest is not a {algorithm} digest")
    return algorithm, digest


def http_date(unix: float) -> str:
    """A tus expiry (unix seconds) as an HTTP date, the one way the gateway writes dates."""
    return conditions.http_date(datetime.fromtimestamp(unix, timezone.utc))


def status_headers(status: UploadStatus) -> dict[str, str]:
    """What HEAD reports (and PATCH/POST partly): offset, length, metadata, expiry."""
    headers = {"Upload-Offset": str(status.offset), "Cache-Control": "no-store"}
    if status.length is None:
        headers["Upload-Defer-Length"] = "1"
    else:
        headers["Upload-Length"] = str(status.length)
    if status.metadata:
        headers["Upload-Metadata"] = status.metadata
    if status.state in (UploadState.PENDING, UploadState.RECEIVING):
        headers["Upload-Expires"] = http_date(status.expires)
    return headers


def options_headers(max_size: int) -> dict[str, str]:
    return {
        "Tus-Resumable": TUS_VERSION,
        "Tus-Version": TUS_VERSION,
        "Tus-Extension": TUS_EXTENSIONS,
        "Tus-Max-Size": str(max_size),
        "Tus-Checksum-Algorithm": ",".join(CHECKSUM_ALGORITHMS),
    }


def require_tus_resumable(headers: Any) -> None:
    version = headers.get("Tus-Resumable")
    if version != TUS_VERSION:
        raise HTTPError(412, "unsupported_version",
                        f"this server speaks tus {TUS_VERSION}; send Tus-Resumable: {TUS_VERSION}",
                        headers={"Tus-Version": TUS_VERSION})


# ------------------------------------------------------------------------------ routes
def tus_route(handler: Handler) -> Handler:
    """Every tus response carries Tus-Resumable, errors included."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            response = await handler(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            mapped = to_response(exc)  # the one mapping (gateway/errors.py), tus statuses included
            if mapped is None:
                raise
            response = mapped
        response.headers["Tus-Resumable"] = TUS_VERSION
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    return wrapped


# ------------------------------------------------------------------------------ handlers
def sessions_of(request: web.Request) -> UploadSessions:
    sessions: UploadSessions = request.app["uploads"]
    return sessions


def client_of(request: web.Request) -> str:
    """Whom a new upload counts against for --max-open-uploads-per-token: the bearer token (the
    auth middleware has checked it) or, without configured tokens, one anonymous client (an
    unchecked header must not buy a fresh count)."""
    token = None
    if request.app["config"].auth_token:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else None
    return client_id(token)


def upload_id_of(request: web.Request) -> str:
    upload_id = request.match_info["id"]
    if not valid_upload_id(upload_id):
        raise HTTPError(404, "not_found", f"no upload {upload_id!r}")
    return upload_id


async def patch_body(request: web.Request, stop: asyncio.Event, idle_timeout: float) -> AsyncIterator[bytes]:
    """The PATCH body as pieces. Raises ``BodyInterrupted`` when another request asks for the
    upload's lock: the bytes so far are kept (unless a checksum covers the whole body) and the
    client resumes from the offset. A body idle for ``idle_timeout`` or cut short raises, after
    which the bytes so far are kept too."""
    stream = request.content
    floor = UploadRateFloor.for_request(request)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        while True:
            if stop.is_set():
                raise BodyInterrupted("another request asked for the upload")
            read = asyncio.ensure_future(stream.readany())
            done, _ = await asyncio.wait({read, stopper}, timeout=idle_timeout or None,
                                         return_when=asyncio.FIRST_COMPLETED)
            if read not in done:
                read.cancel()
                await asyncio.gather(read, return_exceptions=True)
                if stop.is_set():
                    raise BodyInterrupted("another request asked for the upload")
                raise HTTPError(408, "body_timeout",
                                f"the request body stalled for {idle_timeout:g} s; the bytes received so far were kept")
            try:
                piece = read.result()
            except BODY_READ_ERRORS as exc:
                raise IncompleteBody(f"the request body was cut short: {exc}") from None
            if not piece:
                return
            floor.took(request, piece)
            yield piece
    finally:
        stopper.cancel()


def has_body(request: web.Request) -> bool:
    return bool(request.content_length) or (request.content_length is None and request.body_exists)


def _content_type_is_offset_stream(request: web.Request) -> bool:
    return request.headers.get("Content-Type", "").split(";")[0].strip().lower() == OFFSET_CONTENT_TYPE


@tus_route
async def options(request: web.Request) -> web.StreamResponse:
    return web.Response(status=204, headers=options_headers(request.app["tus_max_size"]))


@tus_route
async def create(request: web.Request) -> web.StreamResponse:
    require_tus_resumable(request.headers)
    length = parse_uint(request.headers.get("Upload-Length"), "Upload-Length")
    defer = request.headers.get("Upload-Defer-Length")
    if defer is not None and (defer.strip() != "1" or length is not None):
        raise HTTPError(400, "bad_header", "send either Upload-Length or Upload-Defer-Length: 1")
    if length is None and defer is None:
        raise HTTPError(400, "bad_header", "Upload-Length (or Upload-Defer-Length: 1) is required")
    max_size = request.app["tus_max_size"]
    if length is not None and length > max_size:
        raise HTTPError(413, "too_large", f"the upload is {length} bytes; at most {max_size} are accepted")
    raw_metadata = request.headers.get("Upload-Metadata", "")
    metadata_limit = request.app["config"].max_upload_metadata
    if metadata_limit and len(raw_metadata.encode("utf-8", "surrogateescape")) > metadata_limit:
        # Kept in the upload's record and read back by every request on it: bounded (tus lets
        # a server refuse metadata it will not keep).
        raise HTTPError(431, "metadata_too_large",
                        f"Upload-Metadata is {len(raw_metadata.encode('utf-8', 'surrogateescape'))} bytes; "
                        f"at most {metadata_limit} are accepted")
    metadata = parse_metadata(raw_metadata)
    key = metadata.get("key")
    if not key:
        raise HTTPError(400, "missing_key", "Upload-Metadata must carry 'key' (the object key, base64)")
    validate_key(key)
    body = has_body(request)
    if body and not _content_type_is_offset_stream(request):
        raise HTTPError(415, "unsupported_media_type", f"an upload's bytes must be sent as {OFFSET_CONTENT_TYPE}")
    checksum = parse_checksum(request.headers.get("Upload-Checksum")) if body else None
    content_type = upload_content_type(key, metadata.get("content-type") or metadata.get("filetype"))
    sessions = sessions_of(request)
    await sessions.admit(client_of(request))  # over a cap: refused before the hook is asked
    upload_id = new_upload_id()  # chosen first, so the pre-create hook can name it
    await hooks.authorize(request, key=key, size=length, content_type=content_type, metadata=metadata, upload_id=upload_id)
    status = await sessions.create(key, length=length, metadata=raw_metadata.strip(), content_type=content_type,
                                   owner=owner_of(request), meta={k: v or "" for k, v in metadata.items()},
                                   upload_id=upload_id, client=client_of(request))
    location = str(request.url.origin().join(request.app.router["tus_upload"].url_for(id=status.id)))
    if body:  # creation-with-upload
        try:
            status = await _append(request, status.id, offset=0, length=None, checksum=checksum)
        except Exception as exc:
            failed = to_response(exc)
            if failed is None:
                raise
            failed.headers["Location"] = location  # the upload exists: the client resumes it there
            return failed
    headers = {"Location": location, "Upload-Offset": str(status.offset)}
    if status.state in (UploadState.PENDING, UploadState.RECEIVING):
        headers["Upload-Expires"] = http_date(status.expires)
    return web.Response(status=201, headers=headers)


async def _append(request: web.Request, upload_id: str, *, offset: int, length: int | None,
                  checksum: tuple[str, bytes] | None) -> UploadStatus:
    sessions = sessions_of(request)
    async with sessions.lock(upload_id, owner=owner_of(request)) as lease:
        body = patch_receiver(request, lease.release_requested, checksum=checksum)
        try:
            return await sessions.append(upload_id, lease, offset=offset, length=length, checksum=checksum,
                                         body=body, content_length=request.content_length)
        finally:
            if isinstance(body, BodyReceiver):
                body.release()  # the connection goes back to aiohttp if the body was not read to its end


def patch_receiver(request: web.Request, stop: asyncio.Event, *,
                   checksum: tuple[str, bytes] | None) -> AsyncIterator[bytes] | BodyReceiver:
    """A PATCH's body: received straight into the upload's chunk buffers when it is large and
    plain (gateway.body; a checksummed one is held in memory until verified, so it keeps
    aiohttp's pieces), else ``patch_body``. Both end early when ``stop`` is set."""
    timeout = request.app["config"].body_timeout
    if checksum is None and can_receive_into(request):
        floor = UploadRateFloor.for_request(request)
        return BodyReceiver(request, timeout=timeout, check_rate=floor.check, stop=stop,
                            stalled="the bytes received so far were kept")
    return patch_body(request, stop, timeout)


async def head(request: web.Request) -> web.StreamResponse:
    require_tus_resumable(request.headers)
    tokens = request.app["config"].auth_token
    if tokens:
        # A HEAD reveals the upload's metadata and asks a live PATCH to let go of its lock (so
        # a client can resume after a dead connection): only someone who may write may ask.
        check_token(tokens, request.headers.get("Authorization"))
    upload_id = upload_id_of(request)
    sessions = sessions_of(request)
    async with sessions.lock(upload_id, owner=owner_of(request)) as lease:
        status = await sessions.status(upload_id, lease)
    request["chunkgate.upload_offset"] = status.offset
    return web.Response(status=200, headers=status_headers(status))


async def patch(request: web.Request) -> web.StreamResponse:
    require_tus_resumable(request.headers)
    upload_id = upload_id_of(request)
    if not _content_type_is_offset_stream(request):
        raise HTTPError(415, "unsupported_media_type", f"PATCH bodies must be sent as {OFFSET_CONTENT_TYPE}")
    offset = parse_uint(request.headers.get("Upload-Offset"), "Upload-Offset")
    if offset is None:
        raise HTTPError(400, "bad_header", "Upload-Offset is required")
    request["chunkgate.upload_offset"] = offset
    length = parse_uint(request.headers.get("Upload-Length"), "Upload-Length")
    checksum = parse_checksum(request.headers.get("Upload-Checksum"))
    status = await _append(request, upload_id, offset=offset, length=length, checksum=checksum)
    headers = {"Upload-Offset": str(status.offset)}
    if status.state in (UploadState.PENDING, UploadState.RECEIVING):
        headers["Upload-Expires"] = http_date(status.expires)
    return web.Response(status=204, headers=headers)


async def delete(request: web.Request) -> web.StreamResponse:
    require_tus_resumable(request.headers)
    upload_id = upload_id_of(request)
    sessions = sessions_of(request)
    async with sessions.lock(upload_id, owner=owner_of(request)) as lease:
        await sessions.terminate(upload_id, lease)
    return web.Response(status=204)


_METHODS: dict[str, Handler] = {"HEAD": head, "PATCH": patch, "DELETE": delete}


@tus_route
async def upload_dispatch(request: web.Request) -> web.StreamResponse:
    if request.method == "OPTIONS":
        return web.Response(status=204, headers=options_headers(request.app["tus_max_size"]))
    method = request.method
    if method == "POST":  # tus: clients behind proxies that only pass GET/POST
        method = request.headers.get("X-HTTP-Method-Override", "").upper()
    handler = _METHODS.get(method)
    if handler is None:
        raise HTTPError(405, "method_not_allowed", f"{request.method} is not allowed on an upload",
                        headers={"Allow": "HEAD, PATCH, DELETE, OPTIONS"})
    return await handler(request)


@tus_route
async def collection_other(request: web.Request) -> web.StreamResponse:
    raise HTTPError(405, "method_not_allowed", f"{request.method} is not allowed on /uploads/; POST creates an upload",
                    headers={"Allow": "POST, OPTIONS"})


# ------------------------------------------------------------------------------ wiring
def upload_options(cfg: Any) -> UploadOptions:
    max_size = int(cfg.max_upload_size)
    if cfg.max_object_size:
        max_size = min(max_size, int(cfg.max_object_size))
    expiry = float(cfg.upload_expiry)
    return UploadOptions(
        chunk_size=cfg.chunk_size,
        expiry=expiry,
        max_size=max_size,
        lock_timeout=cfg.lock_timeout,
        checksum_body_limit=max(64 * 1024 * 1024, 2 * cfg.chunk_size),
        sweep_interval=min(60.0, max(1.0, expiry / 4)),
        tombstone_seconds=max(60.0, min(expiry, 86400.0)),
        caps=UploadCaps(total=int(cfg.max_open_uploads), per_client=int(cfg.max_open_uploads_per_token)),
    )


def setup(app: web.Application) -> None:
    """Routes for ``/uploads/``, the sessions object (``app["uploads"]``), its sweeper and metrics."""
    options_ = upload_options(app["config"])
    sessions = UploadSessions(app["store"], options_)
    app["uploads"] = sessions
    app["tus_max_size"] = options_.max_size
    for path in ("/uploads/", "/uploads"):
        app.router.add_route("POST", path, create)
        app.router.add_route("OPTIONS", path, options)
        app.router.add_route("*", path, collection_other)
    app.router.add_route("*", "/uploads/{id}", upload_dispatch, name="tus_upload")
    app["metrics"].attach_uploads(sessions)

    async def start_sweeper(app: web.Application) -> None:
        await sessions.start()

    app.on_startup.append(start_sweeper)
    # gateway.app's cleanup calls app["uploads"].close(), which stops the sweeper.
