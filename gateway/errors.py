"""The one place where errors become HTTP responses.

Every error body is JSON ``{"error": code, "message": sentence}``. Handlers raise typed errors
(storage errors, upload errors, ``HTTPError``, lock errors); ``to_response`` answers each from the
one table ``RULES``, for object and tus routes alike; ``error_middleware`` applies it.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

from aiohttp import web
from aiohttp.typedefs import Handler

from storage import errors as se
from storage.backends.base import BackendError
from storage.keys import BadKey
from storage.locks import LeaseLost, LockTimeout
from storage.quota import OpenUploadsFull, TooManyOpenUploads

log = logging.getLogger("chunkgate.http")


class HTTPError(Exception):
    """An error a handler raises with its status and code decided."""

    def __init__(self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


def json_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status, headers=headers)


def _retry_after(exc: Any) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(getattr(exc, "retry_after", None) or 1)))}


def _retry_after_if_known(exc: Any) -> dict[str, str]:
    return {"Retry-After": str(int(exc.retry_after))} if exc.retry_after else {}


def _offset(exc: Any) -> dict[str, str]:
    return {"Upload-Offset": str(exc.offset)}


@dataclass(frozen=True)
class Rule:
    """How one error class answers: its status, headers drawn from the error, and, for errors
    that carry no ``code``/``message`` of their own, the ones to send."""

    status: int
    headers: Callable[[Any], dict[str, str]] | None = None
    code: str | None = None
    message: str | None = None


# Every error a handler may raise, and its answer. Looked up along the error's class hierarchy
# (its own class first), so a subclass's rule wins over its base's. tus statuses included: an
# offset that is not the durable one or an upload stopped early is 409 with the offset to resume
# from, a finished or expired upload 410, a body that failed its Upload-Checksum 460.
RULES: dict[type, Rule] = {
    BadKey: Rule(400, code="bad_key"),
    LockTimeout: Rule(503, lambda _: {"Retry-After": "1"}, "lock_timeout",
                      "another request holds this key's lock; try again later"),
    LeaseLost: Rule(409, code="conflict",
                    message="this request's lock was cleared as stale before it could commit; nothing was committed"),
    # 504, not 503: the store (our upstream) did not answer in time -- what Gateway Timeout means,
    # and what an operator's dashboard should tell apart from a store that refused. Retry-After
    # too: retrying is right, and clients that honour it space their retries.
    se.StoreTimedOut: Rule(504, _retry_after),
    se.StoreUnavailable: Rule(503, _retry_after),
    # A HEAD whose lease was lost while it read: 5xx (retry), never a 4xx ("the upload is gone").
    se.UploadStatusUnsettled: Rule(503, _retry_after),
    TooManyOpenUploads: Rule(429, _retry_after_if_known),
    OpenUploadsFull: Rule(503, _retry_after),
    se.OffsetMismatch: Rule(409, _offset),
    se.UploadInterrupted: Rule(409, _offset),
    se.UploadGone: Rule(410),
    se.UploadChecksumMismatch: Rule(460),
    se.ObjectNotFound: Rule(404),
    se.PreconditionNotMet: Rule(412),
    se.ChecksumMismatch: Rule(400),
    se.StoreFull: Rule(507),  # no Retry-After: only freeing space helps, not waiting
    se.BadRequest: Rule(400),
    se.BodyTooLarge: Rule(413),
    se.IncompleteBody: Rule(400),
    se.CommitConflict: Rule(409),
    se.ChunkRejected: Rule(502),
    se.CorruptManifest: Rule(502),
    se.StoreFailed: Rule(502),
    se.ChunkSizeDrift: Rule(503),
}


def to_response(exc: BaseException) -> web.Response | None:
    """The response for a known error, or None for an unexpected one (a bug: a 500)."""
    if isinstance(exc, HTTPError):
        return json_error(exc.status, exc.code, exc.message, exc.headers)
    if isinstance(exc, BackendError):
        # A store error that reached HTTP untranslated (storage.errors.from_backend is meant to
        # catch them all): still the store's failure, never a 500; logged so the gap is seen.
        log.warning("untranslated store error: %r", exc)
        return to_response(se.from_backend(exc, "answering the request"))
    for cls in type(exc).__mro__:
        rule = RULES.get(cls)
        if rule is not None:
            code = rule.code or getattr(exc, "code", None) or "error"
            message = rule.message or getattr(exc, "message", None) or str(exc)
            return json_error(rule.status, code, message, rule.headers(exc) if rule.headers else None)
    return None


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
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
            from gateway.auth import (
                redact_path,  # here: gateway.auth imports this module
            )

            log.exception("unexpected error handling %s %s", request.method, redact_path(request.path))
            return json_error(500, "internal", "the gateway failed unexpectedly; the error is logged")
        return response
