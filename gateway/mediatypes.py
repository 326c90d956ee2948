"""Media types: the Content-Type to serve for an object key, and validation of a Content-Type a
client supplies on upload.

Pure logic: no aiohttp. The only I/O is the standard library's one-time read of the system MIME
files that ``mimetypes.MimeTypes()`` triggers; its answers here come from Python's built-in table
only. This module must never let the machine's /etc/mime.types decide what a player receives:
Debian's maps ``.ts`` to a Qt translation file (``text/vnd.trolltech.linguist``), which no player
will play, so the same key would get a different type on another host.
"""

from __future__ import annotations

import mimetypes
import posixpath
import re
from functools import cache

__all__ = ["DEFAULT_CONTENT_TYPE", "guess_content_type", "normalize_content_type"]

DEFAULT_CONTENT_TYPE = "application/octet-stream"

# What browsers' <video>/<audio>, hls.js, dash.js, Safari, VLC and ffmpeg expect; checked before
# Python's table because several of these are missing there or differ (.m4v, .mkv, .ts, .m4s,
# .srt, .wav, .js).
_MEDIA_TYPES: dict[str, str] = {
    # video containers
    "mp4": "video/mp4",
    "m4v": "video/mp4",
    "webm": "video/webm",
    "mkv": "video/x-matroska",
    "mov": "video/quicktime",
    "ogv": "video/ogg",
    "3gp": "video/3gpp",
    "avi": "video/x-msvideo",
    # streaming: HLS playlists and MPEG-TS segments, DASH manifests and CMAF/fMP4 segments
    "m3u8": "application/vnd.apple.mpegurl",
    "m3u": "audio/x-mpegurl",
    "ts": "video/mp2t",
    "m2ts": "video/mp2t",
    "mts": "video/mp2t",
    "m4s": "video/iso.segment",
    "mpd": "application/dash+xml",
    # subtitles
    "vtt": "text/vtt",
    "srt": "application/x-subrip",
    # audio
    "m4a": "audio/mp4",
    "mp3": "audio/mpeg",
    "aac": "audio/aac",
    "ogg": "audio/ogg",
    "oga": "audio/ogg",
    "opus": "audio/ogg",  # RFC 7845 §9: Opus files are Ogg
    "mka": "audio/x-matroska",
    "flac": "audio/flac",
    "wav": "audio/wav",
    # images (posters, thumbnails, sprite sheets)
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "avif": "image/avif",
    "gif": "image/gif",
    # the rest a media site commonly stores beside its media
    "json": "application/json",
    "js": "text/javascript",  # RFC 9239
    "mjs": "text/javascript",
    "gz": "application/gzip",
}


@cache
def _builtin_types() -> dict[str, str]:
    # A MimeTypes instance starts from Python's built-in table only (the module-level functions
    # would add the host's files); strict entries win over the common non-standard ones.
    table = mimetypes.MimeTypes()
    return {**table.types_map[False], **table.types_map[True]}


def guess_content_type(key: str) -> str:
    """The Content-Type to serve for an object stored under ``key``, from its extension
    (case-insensitive); ``application/octet-stream`` when unknown or absent."""
    name = key.rsplit("/", 1)[-1]
    # splitext treats a leading dot as part of the name: "dir/.mp4" has no extension.
    ext = posixpath.splitext(name)[1][1:].lower()
    if not ext:
        return DEFAULT_CONTENT_TYPE
    return _MEDIA_TYPES.get(ext) or _builtin_types().get("." + ext) or DEFAULT_CONTENT_TYPE


# RFC 6838 §4.2 restricted-name for type and subtype: stricter than a token, and no "*", which
# belongs in Accept, never in a stored Content-Type.
_NAME = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
# quoted-string (§5.6.4) without obs-text or HTAB: non-ASCII and control characters are junk.
_QUOTED = r'"(?:[ !#-\[\]-~]|\\[ -~])*"'
_MEDIA_TYPE = re.compile(
    rf"({_NAME})/({_NAME})((?:[ \t]*;[ \t]*(?:{_TOKEN}=(?:{_TOKEN}|{_QUOTED}))?)*)", re.ASCII
)
_PARAMETER = re.compile(rf"({_TOKEN})=({_TOKEN}|{_QUOTED})", re.ASCII)
MAX_CONTENT_TYPE_LENGTH = 255


def normalize_content_type(value: str | None) -> str | None:
    """A client-supplied Content-Type in canonical form (``type/subtype; name=value``, type,
    subtype and parameter names lower-cased, values kept), or None if it is absent or junk:
    longer than 255 characters, any control or non-ASCII character, or not the RFC 9110 §8.3.1
    shape ``type/subtype *( OWS ";" OWS [ name=value ] )``."""
    if value is None or len(value) > MAX_CONTENT_TYPE_LENGTH:
        return None
    text = value.strip(" \t")
    m = _MEDIA_TYPE.fullmatch(text)
    if m is None:
        return None
    normalized = f"{m.group(1).lower()}/{m.group(2).lower()}"
    for name, param_value in _PARAMETER.findall(m.group(3)):
        normalized += f"; {name.lower()}={param_value}"
    return normalized
