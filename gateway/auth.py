"""Who may do what: bearer tokens for writes and ``/admin``, HMAC-signed expiring read URLs.

Tokens are compared in constant time and never logged. A signature covers the object key and
the expiry, so a URL cannot be reused for another key or past its time.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any
from urllib.parse import quote

from aiohttp import web

from gateway.errors import HTTPError

WRITE_METHODS = frozenset({"PUT", "DELETE", "POST", "PATCH"})


def signature(signing_key: str, key: str, expires: int) -> str:
    msg = f"{key}\n{expires}".encode("utf-8")
    return hmac.new(signing_key.encode("utf-8"), msg, hashlib.sha256).hexdigest()


def signed_url(base_url: str, signing_key: str, key: str, expires_in: float, now: float | None = None) -> str:
    expires = int((time.time() if now is None else now) + expires_in)
    sig = signature(signing_key, key, expires)
    return f"{base_url.rstrip('/')}/objects/{quote(key, safe='/')}?expires={expires}&signature={sig}"


def check_signature(signing_key: str, key: str, query: Any, now: float | None = None) -> None:
    """Raise 403 unless ``query`` carries a valid, unexpired signature for ``key``."""
    expires_raw, sig = query.get("expires"), query.get("signature")
    if not expires_raw or not sig:
        raise HTTPError(403, "signature_required", "reads need a signed URL (?expires=...&signature=...)")
    try:
        expires = int(expires_raw)
    except ValueError:
        raise HTTPError(403, "bad_signature", "expires must be unix seconds") from None
    if expires < (time.time() if now is None else now):
        raise HTTPError(403, "signature_expired", "the signed URL has expired")
    # Bytes, not str: compare_digest refuses non-ASCII str, and a hostile signature may be anything.
    if not hmac.compare_digest(signature(signing_key, key, expires).encode(), sig.lower().encode("utf-8", "replace")):
        raise HTTPError(403, "bad_signature", "the URL's signature does not match")


def check_token(tokens: list[str], header: str | None) -> None:
    if not header:
        raise HTTPError(401, "unauthorized", "this request needs Authorization: Bearer <token>",
                        headers={"WWW-Authenticate": 'Bearer realm="chunkgate"'})
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPError(401, "unauthorized", "the Authorization header must be 'Bearer <token>'",
                        headers={"WWW-Authenticate": 'Bearer realm="chunkgate"'})
    token = token.strip().encode()
    # Compare against every token so the time taken doesn't tell which one (or none) matched.
    ok = False
    for t in tokens:
        ok |= hmac.compare_digest(t.encode(), token)
    if not ok:
        raise HTTPError(403, "forbidden", "the bearer token is not accepted")


def auth_middleware(tokens: list[str], signing_key: str | None) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        path = request.path
        if request.method == "OPTIONS":
            return await handler(request)
        if tokens and (request.method in WRITE_METHODS or path.startswith("/admin")):
            check_token(tokens, request.headers.get("Authorization"))
        elif signing_key and request.method in ("GET", "HEAD") and path in ("/objects", "/objects/"):
            # Signed URLs name one object; listing every key and ETag is for token holders only.
            if not tokens:
                raise HTTPError(403, "forbidden", "listing is disabled while reads need signed URLs")
            check_token(tokens, request.headers.get("Authorization"))
        elif signing_key and request.method in ("GET", "HEAD") and path.startswith("/objects/"):
            if "Authorization" in request.headers and tokens:
                check_token(tokens, request.headers.get("Authorization"))  # token holders may read
            else:
                from gateway.objects import object_key

                check_signature(signing_key, object_key(request), request.query)
        return await handler(request)

    return middleware
