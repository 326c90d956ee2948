"""The one place where errors become HTTP responses.

Every error body is JSON ``{"error": code, "message": sentence}``. Handlers raise typed errors
(storage errors, ``HTTPError``, lock errors); ``error_middleware`` maps them.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from aiohttp import web

from storage import errors as se
from storage.backends.base import BackendError
from storage.keys import BadKey
from storage.locks import LeaseLost, LockTimeout

log = logging.getLogger("chunkgate.http")


class HTTPError(Exception):
    """An error a handler raises with its status and code decided."""

    def __init__(self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


def json_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status, headers=headers)


def to_response(exc: BaseException) -> web.Response | None:
    """The response for a known error, or None for an unexpected one."""
    if isinstance(exc, HTTPError):
        return json_error(exc.status, exc.code, exc.message, exc.headers)
    if isinstance(exc, BadKey):
        return json_error(400, "bad_key", str(exc))
    if isinstance(exc, LockTimeout):
        return json_error(503, "lock_timeout", "another request holds this key's lock; try again later", {"Retry-After": "1"})
    if isinstance(exc, LeaseLost):
        return json_error(409, "conflict", "this request's lock was cleared as stale before it could commit; nothing was committed")
    if isinstance(exc, se.StoreTimedOut):
        # 504, not 503: the store (our upstream) did not answer in time -- what Gateway Timeout
        # means, and what an operator's dashboard should tell apart from a store that refused.
        # Retry-After too: retrying is right, and clients that honour it space their retries.
        retry = str(max(1, math.ceil(exc.retry_after or 1)))
        return json_error(504, exc.code, exc.message, {"Retry-After": retry})
    if isinstance(exc, se.StoreUnavailable):
        retry = str(max(1, math.ceil(exc.retry_after or 1)))
        return json_error(503, exc.code, exc.message, {"Retry-After": retry})
    if isinstance(exc, BackendError):
        # A store error that reached HTTP untranslated (storage.errors.from_backend is meant to
        # catch them all): still the store's failure, never a 500; logged so the gap is seen.
        log.warning("untranslated store error: %r", exc)
        return to_response(se.from_backend(exc, "answering the request"))
    status = {
        se.ObjectNotFound: 404,
        se.PreconditionNotMet: 412,
        se.ChecksumMismatch: 400,
        se.BadRequest: 400,
        se.BodyTooLarge: 413,
        se.IncompleteBody: 400,
        se.CommitConflict: 409,
        se.ChunkRejected: 502,
        se.CorruptManifest: 502,
        se.StoreFailed: 502,
        se.ChunkSizeDrift: 503,
    }
    for cls in type(exc).__mro__:
        if cls in status:
            return json_error(status[cls], exc.code, exc.message)  # type: ignore[attr-defined]
    return None


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != "application/json":
            code = exc.reason.lower().replace(" ", "_")
            return json_error(exc.status, code, exc.text if exc.text and not exc.text.startswith(str(exc.status)) else exc.reason,
                              {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")})
        raise
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        response = to_response(exc)
        if response is None:
            from gateway.auth import redact_path  # here: gateway.auth imports this module

            log.exception("unexpected error handling %s %s", request.method, redact_path(request.path))
            return json_error(500, "internal", "the gateway failed unexpectedly; the error is logged")
        return response
