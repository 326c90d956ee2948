"""Who may do what: bearer tokens for writes and ``/admin``, HMAC-signed expiring read URLs.

Tokens are compared in constant time and never logged. A per-key signature covers the object key
and the expiry, so a URL cannot be reused for another key or past its time. A prefix token
(``/t/<token>/objects/{key}``) covers every key that starts with its prefix until its expiry, so
the relative URLs of an HLS or DASH ladder carry it too.

Must never: decide access from a normalized path (keys come from the raw path, as for
``/objects/``), accept a token whose MAC is not checked in constant time, or let a path token
reach a log line (``redact_path``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.errors import HTTPError

WRITE_METHODS = frozenset({"PUT", "DELETE", "POST", "PATCH"})


def signature(signing_key: str, key: str, expires: int) -> str:
    msg = f"{key}\n{expires}".encode("utf-8")
    return hmac.new(signing_key.encode("utf-8"), msg, hashlib.sha256).hexdigest()


def signed_url(base_url: str, signing_key: str, key: str, expires_in: float, now: float | None = None) -> str:
    expires = int((time.time() if now is None else now) + expires_in)
    sig = signature(signing_key, key, expires)
    return f"{base_url.rstrip('/')}/objects/{quote(key, safe='/')}?expires={expires}&signature={sig}"


def check_signature(signing_key: str, key: str, query: Any, now: float | None = None) -> int:
    """Raise 403 unless ``query`` carries a valid, unexpired signature for ``key``; return its expiry."""
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
    return expires


# ------------------------------------------------------------------------------ prefix tokens
# A prefix token is base64url (no padding) of
#     version (1 byte, 1) | expires (8 bytes, big-endian unix seconds) | prefix (UTF-8) | MAC (32 bytes)
# where MAC = HMAC-SHA256(prefix_mac_key, everything before it). The fields of fixed length come
# first and the MAC last, so where the prefix ends is never ambiguous (no separator that a prefix
# could contain). The token is one path segment: base64url has no '/', '%' or '?'.
TOKEN_PATH = "/t/"
_TOKEN_VERSION = 1
_MAC_BYTES = 32
_HEAD_BYTES = 1 + 8
MAX_PREFIX_BYTES = 1024
_MAX_TOKEN_CHARS = (_HEAD_BYTES + MAX_PREFIX_BYTES + _MAC_BYTES) * 4 // 3 + 4
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


class PrefixError(ValueError):
    """A prefix a token cannot carry. The message says why."""


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if a prefix token may carry it: 1..1024 bytes of UTF-8 without control
    characters (what a key may start with). Empty is refused: a URL that admits every key is what
    a bearer token is for, and an unset variable must not mint one by accident."""
    if not prefix:
        raise PrefixError("the prefix is empty")
    try:
        raw = prefix.encode("utf-8")
    except UnicodeEncodeError:
        raise PrefixError("the prefix is not valid UTF-8") from None
    if len(raw) > MAX_PREFIX_BYTES:
        raise PrefixError(f"the prefix is {len(raw)} bytes long; at most {MAX_PREFIX_BYTES} are allowed")
    if any(ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F for ch in prefix):
        raise PrefixError("the prefix contains a control character")
    return prefix


def _prefix_mac_key(signing_key: str) -> bytes:
    # Prefix tokens get a key of their own, derived from the signing key, so a MAC made for one
    # kind of credential can never be presented as the other.
    return hmac.new(signing_key.encode("utf-8"), b"chunkgate prefix token v1", hashlib.sha256).digest()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def prefix_token(signing_key: str, prefix: str, expires: int) -> str:
    """The path token that admits every key starting with ``prefix`` until ``expires``."""
    body = bytes([_TOKEN_VERSION]) + int(expires).to_bytes(8, "big") + validate_prefix(prefix).encode("utf-8")
    return _b64url(body + hmac.new(_prefix_mac_key(signing_key), body, hashlib.sha256).digest())


@dataclass(frozen=True)
class PrefixGrant:
    prefix: str
    expires: int


class TokenRefused(Exception):
    """Why a prefix token does not admit a key: ``code`` is the JSON error code (all are 403)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def verify_prefix_token(signing_key: str, token: str, key: str, now: float) -> PrefixGrant:
    """The grant ``token`` carries, if it is well formed, made with ``signing_key``, unexpired at
    ``now`` and its prefix covers ``key``; else ``TokenRefused``. Pure: no clock, no I/O."""
    malformed = TokenRefused("bad_token", "the URL's access token is malformed")
    if len(token) > _MAX_TOKEN_CHARS or not _BASE64URL.fullmatch(token):
        raise malformed
    try:
        raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise malformed from None
    # One byte string has exactly one token: a changed character never decodes to the same bytes
    # (base64 lets unused low bits of the last character vary; those spellings are refused).
    if _b64url(raw) != token or len(raw) <= _HEAD_BYTES + _MAC_BYTES or raw[0] != _TOKEN_VERSION:
        raise malformed
    body, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
    if not hmac.compare_digest(hmac.new(_prefix_mac_key(signing_key), body, hashlib.sha256).digest(), mac):
        raise TokenRefused("bad_signature", "the URL's access token does not match")
    expires = int.from_bytes(body[1:_HEAD_BYTES], "big")
    try:
        prefix = validate_prefix(body[_HEAD_BYTES:].decode("utf-8"))
    except (UnicodeDecodeError, PrefixError):
        raise malformed from None  # only a holder of the signing key could have made it
    if expires < now:
        raise TokenRefused("signature_expired", "the signed URL has expired")
    if not key.startswith(prefix):
        raise TokenRefused("prefix_mismatch", "the URL's access token does not cover this key")
    return PrefixGrant(prefix, expires)


def check_prefix_token(signing_key: str, token: str, key: str, now: float | None = None) -> PrefixGrant:
    """Raise 403 unless ``token`` admits ``key`` now."""
    try:
        return verify_prefix_token(signing_key, token, key, time.time() if now is None else now)
    except TokenRefused as exc:
        raise HTTPError(403, exc.code, exc.message) from None


def prefix_signed_path(signing_key: str, key: str, prefix: str, expires: int) -> str:
    """``/t/<token>/objects/{key}``: a path for ``key`` whose token admits every key under ``prefix``."""
    if not key.startswith(prefix):
        raise PrefixError(f"the key does not start with the prefix {prefix!r}")
    return f"{TOKEN_PATH}{prefix_token(signing_key, prefix, expires)}/objects/{quote(key, safe='/')}"


def prefix_signed_url(base_url: str, signing_key: str, key: str, prefix: str, expires_in: float,
                      now: float | None = None) -> str:
    expires = int((time.time() if now is None else now) + expires_in)
    return base_url.rstrip("/") + prefix_signed_path(signing_key, key, prefix, expires)


# A prefix token anywhere in a path (not only at its start: a client may send "//t/..." or
# dot segments that normalization moves). Real tokens are at least 56 characters.
_TOKEN_IN_PATH = re.compile(r"/t/[A-Za-z0-9_-]{40,}(?=/|\?|$)")


def redact_path(path: str) -> str:
    """``path`` with any prefix token blanked, for logs: until it expires, a logged token is a
    credential for a whole prefix that anyone who reads the logs could replay."""
    return _TOKEN_IN_PATH.sub("/t/REDACTED", path)


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def check_token(tokens: list[str], header: str | None) -> None:
    if not header:
        raise HTTPError(401, "unauthorized", "this request needs Authorization: Bearer <token>",
                        headers={"WWW-Authenticate": 'Bearer realm="chunkgate"'})
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPError(401, "unauthorized", "the Authorization header must be 'Bearer <token>'",
                        headers={"WWW-Authenticate": 'Bearer realm="chunkgate"'})
    # Header values may hold any bytes (aiohttp keeps invalid UTF-8 as lone surrogates), and so
    # may tokens from argv: compare raw bytes, never ``str.encode()``, which raises on those.
    raw = _raw(token.strip())
    # Compare against every token so the time taken doesn't tell which one (or none) matched.
    ok = False
    for t in tokens:
        ok |= hmac.compare_digest(_raw(t), raw)
    if not ok:
        raise HTTPError(403, "forbidden", "the bearer token is not accepted")



# What the auth middleware found out about a read, for the response's caching headers.
READ_EXPIRES = "chunkgate.read_expires"  # unix seconds the signed URL that admitted it expires
READ_PRIVATE = "chunkgate.read_private"  # admitted by a bearer token: no shared cache may keep it


def auth_middleware(tokens: list[str], signing_key: str | None) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
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
        elif signing_key and request.method in ("GET", "HEAD") and path.startswith(("/objects/", TOKEN_PATH)):
            # An empty Authorization is no token at all: the signature decides (else anyone
            # could turn a valid signed URL into a 401 by adding an empty header).
            if request.headers.get("Authorization", "").strip() and tokens:
                check_token(tokens, request.headers.get("Authorization"))  # token holders may read
                request[READ_PRIVATE] = True
            else:
                from gateway.objects import object_key, path_token

                # Both from the raw path, whatever the router matched: the key a token admits is
                # exactly the key the handler serves.
                key, token = object_key(request), path_token(request)
                if token is None:
                    request[READ_EXPIRES] = check_signature(signing_key, key, request.query)
                else:
                    request[READ_EXPIRES] = check_prefix_token(signing_key, token, key).expires
        return await handler(request)

    return middleware


# ------------------------------------------------------------------------------ POST /admin/sign
MAX_SIGN_SECONDS = 366 * 86400


async def admin_sign(request: web.Request) -> web.Response:
    """``POST /admin/sign`` ``{"key", "prefix"?, "expires_in"?}`` -> a prefix-signed URL for key.

    For pages and apps that hold a bearer token and need a URL a ``<video>`` element or a player
    can fetch without headers. The auth middleware has checked the token; without tokens
    configured it would be open to anyone, so then it refuses."""
    from storage.keys import BadKey, validate_key

    cfg = request.app["config"]
    if not cfg.auth_token:
        raise HTTPError(403, "forbidden", "POST /admin/sign needs --auth-token on the gateway, else anyone could mint read URLs")
    if not cfg.signing_key:
        raise HTTPError(409, "signing_disabled", "this gateway has no --signing-key: reads need no signature")
    try:
        doc = json.loads(await request.read() or b"{}")
    except ValueError:
        raise HTTPError(400, "bad_json", "the body must be a JSON object") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("key"), str):
        raise HTTPError(400, "bad_request", 'the body must be a JSON object with a "key" string')
    key = doc["key"]
    try:
        validate_key(key)
    except BadKey as exc:
        raise HTTPError(400, "bad_key", str(exc)) from None
    # By default the key's folder: every sibling and child a playlist names relatively.
    prefix = doc.get("prefix", key[: key.rfind("/") + 1] or key)
    expires_in = doc.get("expires_in", 3600)
    if not isinstance(prefix, str):
        raise HTTPError(400, "bad_prefix", "prefix must be a string")
    if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)) or not 0 < expires_in <= MAX_SIGN_SECONDS:
        raise HTTPError(400, "bad_expires_in", f"expires_in must be seconds, more than 0 and at most {MAX_SIGN_SECONDS}")
    expires = int(time.time() + expires_in)
    try:
        path = prefix_signed_path(cfg.signing_key, key, validate_prefix(prefix), expires)
    except PrefixError as exc:
        raise HTTPError(400, "bad_prefix", str(exc)) from None
    return web.json_response({"url": f"{request.scheme}://{request.host}{path}", "path": path, "prefix": prefix,
                              "expires": expires},
                             headers={"Cache-Control": "no-store"})
