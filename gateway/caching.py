"""Cache-Control for object responses: what a browser, or a CDN in front of the gateway, may keep
and for how long; and which kind of media an object is (playlist, segment, media, other).

Pure logic: no aiohttp, no clock (the caller passes how long a signed URL has left).

Keys can be overwritten, so a URL that names only a key promises nothing about its bytes: every
cache must revalidate (the strong ETag makes that a 304 without a body). Only a URL that pins the
current version (``?v=<version>``) names bytes that never change, and may be kept for a year.

Must never: let a cache reuse a playlist or manifest without asking the gateway (after a ladder
is replaced, a stale playlist names segments that no longer match, or old segments play under a
new playlist); give a long lifetime to a URL that doesn't pin the version; let a cached response
outlive the signed URL that admitted it; or let a shared cache keep a response that a bearer
token unlocked.
"""

from __future__ import annotations

__all__ = ["IMMUTABLE_MAX_AGE", "PLAYLIST_TYPES", "SEGMENT_TYPES", "cache_control", "media_kind"]

IMMUTABLE_MAX_AGE = 365 * 86400

# HLS playlists (RFC 8216 §4 and the types players and servers still send) and DASH manifests.
PLAYLIST_TYPES = frozenset({
    "application/vnd.apple.mpegurl", "application/x-mpegurl", "audio/mpegurl", "audio/x-mpegurl",
    "application/dash+xml",
})
# Media segments: MPEG-TS, and CMAF/fMP4 segments (.m4s).
SEGMENT_TYPES = frozenset({"video/mp2t", "video/iso.segment", "audio/iso.segment"})


def _essence(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def media_kind(content_type: str) -> str:
    """``playlist``, ``segment``, ``media`` (other audio/video, e.g. an MP4 or a ladder's init
    segment) or ``other``: a bounded label for metrics."""
    essence = _essence(content_type)
    if essence in PLAYLIST_TYPES:
        return "playlist"
    if essence in SEGMENT_TYPES:
        return "segment"
    if essence.startswith(("video/", "audio/")):
        return "media"
    return "other"


def cache_control(content_type: str, *, pinned: bool = False, private: bool = False,
                  signed_seconds_left: float | None = None) -> str:
    """The Cache-Control of a GET/HEAD/304 answer for an object of ``content_type``.

    ``pinned``: the URL's ``?v=`` is the object's current version. ``private``: a bearer token
    admitted the read. ``signed_seconds_left``: a signed URL admitted it and expires this soon."""
    scope = "private" if private else "public"
    if pinned:
        max_age = IMMUTABLE_MAX_AGE
        if signed_seconds_left is not None:
            max_age = min(max_age, int(max(0.0, signed_seconds_left)))
        if max_age > 0:
            return f"{scope}, max-age={max_age}, immutable"
    if _essence(content_type) in PLAYLIST_TYPES:
        return f"{scope}, no-cache"
    return f"{scope}, max-age=0, must-revalidate"
