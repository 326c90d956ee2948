"""How the gateway's answers must be treated by a browser, so that nothing anyone uploaded can act
as the gateway's own origin (read its storage and cookies, or call it with what a viewer's browser
holds), and the gateway's own pages stay strict.

Pure policy: content types and request headers in, response headers and decisions out. No aiohttp.
``gateway.app.decorate_response`` applies the headers every response carries; ``gateway.objects``
applies the per-object ones. This module must never decide from an object's bytes (sniffing is
exactly what ``nosniff`` turns off in browsers) or from its key's extension: the stored
Content-Type is what a browser acts on, so it is the only input.

Why "everything but media": a browser decides from the Content-Type whether a top-level response
becomes a document, and documents run script: HTML, XHTML, SVG, XML with XHTML elements or an
XSLT stylesheet, multipart parts in Firefox, PDFs with their own script engines, and types no list
here anticipates. A ``Content-Security-Policy`` on a response only acts when that response becomes a
document or a worker; ``<video>``, ``<img>``, ``<track>``, ``fetch`` and XHR (hls.js, dash.js) ignore
it. So sandboxing every non-media type costs players nothing, while an allowlist of the few types
players need inline cannot miss a scriptable type the way a blocklist can.
"""

from __future__ import annotations

import re
from typing import Mapping

__all__ = [
    "ACTIVE_CONTENT_MODES", "API_CSP", "EVERY_RESPONSE", "PAGE_CSP", "PAGE_HEADERS", "SERVER",
    "essence", "is_gateway_page", "is_media", "object_headers", "refused_load",
]

# No product version: a version tells a scanner which advisories to try (RFC 9110 §10.2.4 says
# to avoid "overly fine detail"). The name alone tells an operator what answered.
SERVER = "chunkgate"

# Sent on every response, whatever its route or status: never let a browser guess a type
# (a text/plain error echoing a key with "<script>" must stay text, a JSON body stays JSON).
EVERY_RESPONSE: dict[str, str] = {"X-Content-Type-Options": "nosniff", "Server": SERVER}

# --active-content: how uploads that are not media are served.
#   sandbox    the default: inline, in a sandbox without allow-same-origin, so the document gets an
#              opaque origin: its own scripts run and its media plays, but the gateway origin's
#              storage, cookies and service workers are out of its reach.
#   attachment downloaded instead of shown, plus the script-less sandbox in case anything still
#              renders it (a browser that ignores Content-Disposition for a frame, say).
#   inline     served as stored, for an operator who knowingly hosts a site; safe only on a
#              hostname of its own, never the origin of /ui/ (README "Uploads are untrusted content").
ACTIVE_CONTENT_MODES = ("sandbox", "attachment", "inline")

# Only allow-scripts: the issue's promise is that a page "may still run its own scripts and play
# media" (media needs no token). Never allow-same-origin: with allow-scripts it undoes the whole
# sandbox. Left out on purpose: allow-popups and allow-top-navigation (a way to put a phishing
# page in front of the viewer), allow-forms and allow-modals (credential prompts), allow-downloads.
SANDBOX_CSP = "sandbox allow-scripts"
SANDBOX_NO_SCRIPTS_CSP = "sandbox"

# The gateway's own pages (/ui/ and below). No inline script or style, so an injected "<script>"
# or style attribute does nothing; blob: for media and workers because hls.js and dash.js play
# through Media Source Extensions (blob: URLs) and hls.js demuxes in a blob: worker; data: images
# for icons. frame-ancestors 'none' stops an uploaded page (when served inline) from framing the
# page to read or overlay it.
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
            "media-src 'self' blob:; connect-src 'self'; worker-src 'self' blob:; object-src 'none'; "
            "base-uri 'none'; frame-ancestors 'none'; form-action 'none'")
PAGE_HEADERS: dict[str, str] = {
    "Content-Security-Policy": PAGE_CSP,
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
    "Referrer-Policy": "no-referrer",  # a signed URL in the page's address never leaks in Referer
    # A window this page opens (an upload, say) or that opened it gets no handle on it: the token
    # the page holds in memory is out of reach of an uploaded page served inline.
    "Cross-Origin-Opener-Policy": "same-origin",
}

# Every other answer the gateway itself writes (JSON errors, listings, manifests, metrics, tus) is
# data, never a page: if a browser is ever made to render one, it may load nothing and run nothing.
API_CSP = "default-src 'none'; frame-ancestors 'none'"

# What players need inline, beyond video/*, audio/* and raster image/* (RFC 8216 §4 lists both
# HLS names; text/vtt is what <track> loads; MP4 and Ogg containers are also registered under
# application/).
_MEDIA_TYPES = frozenset({
    "application/vnd.apple.mpegurl", "application/x-mpegurl", "application/mpegurl",
    "text/vtt",
    "application/mp4", "application/ogg",
})
_MEDIA_TOP_LEVEL = ("video/", "audio/", "image/")
_ESSENCE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*")

# Sec-Fetch-Dest values for which a response runs as (or styles) the page that asked for it.
_CODE_DESTINATIONS = frozenset({
    "script", "worker", "sharedworker", "serviceworker", "audioworklet", "paintworklet", "style", "xslt",
})


def essence(content_type: str | None) -> str:
    """``type/subtype`` lower-cased, parameters dropped (``Text/HTML; charset=x`` -> ``text/html``)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_media(content_type: str | None) -> bool:
    """True for what players load and show as is: video, audio, raster images, HLS playlists,
    WebVTT. Anything else, unknown or junk types included, is treated as a document that may run
    script. SVG and every ``+xml`` type are documents even under image/ or video/: browsers render
    XML types as XML documents, and an XML document runs any XHTML ``<script>`` in it. DASH
    manifests (``application/dash+xml``) are therefore sandboxed too, which costs dash.js nothing:
    it reads them with XHR, where response CSP and Content-Disposition do not apply."""
    kind = essence(content_type)
    if not _ESSENCE.fullmatch(kind) or kind.endswith("+xml") or "svg" in kind:
        return False
    return kind in _MEDIA_TYPES or kind.startswith(_MEDIA_TOP_LEVEL)


def object_headers(content_type: str | None, mode: str) -> dict[str, str]:
    """The extra headers for an object with this stored Content-Type under ``--active-content``
    ``mode``: nothing for media or in ``inline`` mode, the sandbox otherwise. The same on 200, 206,
    304 and HEAD, so a cached copy revalidated by a 304 keeps its policy."""
    if mode == "inline" or is_media(content_type):
        return {}
    if mode == "attachment":
        # No filename parameter: browsers name the download from the URL's last segment, which is
        # the key's, and leaving it out means no key (quotes, non-ASCII) is ever put into a header.
        return {"Content-Disposition": "attachment", "Content-Security-Policy": SANDBOX_NO_SCRIPTS_CSP}
    if mode == "sandbox":
        return {"Content-Security-Policy": SANDBOX_CSP}
    raise ValueError(f"unknown --active-content mode {mode!r}")


def refused_load(mode: str, headers: Mapping[str, str]) -> str | None:
    """The destination (``script``, ``serviceworker``, ...) when a request is one of the gateway's
    own pages loading an upload as code, which must be refused unless ``mode`` is ``inline``;
    None when the request may be served.

    Why: the page CSP's ``script-src 'self'`` admits every URL on the gateway's origin, uploads
    included, so an HTML injection in /ui/ could run an uploaded ``.js`` as the gateway, and a
    service worker registered from an upload would control every ``/objects/`` URL. Browsers say
    who asks (``Sec-Fetch-Site``, ``Sec-Fetch-Dest``; ``Service-Worker`` on a registration). A
    sandboxed upload's own scripts are not refused: its origin is opaque, so its requests are
    ``cross-site``; neither are other sites that load scripts from the gateway, nor clients that
    send no fetch metadata (curl, ffmpeg, players outside browsers)."""
    if mode == "inline":
        return None
    if "Service-Worker" in headers:
        return "serviceworker"
    if headers.get("Sec-Fetch-Site", "").lower() != "same-origin":
        return None
    dest = headers.get("Sec-Fetch-Dest", "").lower()
    return dest if dest in _CODE_DESTINATIONS else None


def is_gateway_page(path: str) -> bool:
    """True for the gateway's page for people: ``/ui`` and everything below ``/ui/``."""
    return path == "/ui" or path.startswith("/ui/")
