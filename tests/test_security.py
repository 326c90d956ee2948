"""gateway.security: which stored types are media, the headers each --active-content mode adds,
which requests are the gateway's own pages loading an upload as code, and the page headers."""

from __future__ import annotations

import pytest

from gateway import security
from gateway.security import SANDBOX_CSP, SANDBOX_NO_SCRIPTS_CSP, is_gateway_page, is_media, object_headers, refused_load

# (stored Content-Type, is media, why)
MEDIA_CASES = [
    ("video/mp4", True, "<video>"),
    ("video/webm", True, "<video>"),
    ("video/mp2t", True, "HLS TS segment"),
    ("video/iso.segment", True, "DASH/CMAF segment"),
    ("audio/mpeg", True, "<audio>"),
    ("audio/mp4", True, "<audio>"),
    ("image/jpeg", True, "poster"),
    ("image/png", True, "thumbnail"),
    ("image/webp", True, "sprite sheet"),
    ("image/avif", True, "poster"),
    ("application/vnd.apple.mpegurl", True, "HLS playlist (RFC 8216)"),
    ("application/x-mpegurl", True, "HLS playlist, older name"),
    ("audio/x-mpegurl", True, "HLS/M3U playlist under audio/"),
    ("text/vtt", True, "<track> subtitles"),
    ("application/mp4", True, "MP4 container registered under application/"),
    ("application/ogg", True, "Ogg container registered under application/"),
    ("VIDEO/MP4", True, "case does not matter"),
    ("video/mp4; codecs=\"avc1.42E01E\"", True, "parameters do not matter"),
    # documents a browser renders, with script
    ("text/html", False, "HTML runs script"),
    ("text/html; charset=utf-8", False, "HTML with a charset"),
    ("TEXT/HTML", False, "HTML in capitals"),
    ("application/xhtml+xml", False, "XHTML runs script"),
    ("image/svg+xml", False, "SVG runs script"),
    ("image/svg", False, "not a raster image, whatever its top-level type"),
    ("text/xml", False, "XML runs XHTML <script> elements in it"),
    ("application/xml", False, "XML"),
    ("text/xsl", False, "XSLT stylesheets make documents"),
    ("application/xslt+xml", False, "XSLT"),
    ("application/rss+xml", False, "rendered as XML by browsers"),
    ("application/dash+xml", False, "XML: sandboxed; dash.js reads it with XHR, where CSP does not apply"),
    ("application/ttml+xml", False, "XML subtitles: read by players with XHR"),
    ("video/vnd.example+xml", False, "+xml is XML under any top-level type"),
    ("application/pdf", False, "PDF viewers run the PDF's own script"),
    ("multipart/x-mixed-replace", False, "Firefox renders each part as its own type"),
    # neither media nor known to run script: sandboxed anyway (allowlist, not blocklist)
    ("text/plain", False, "text"),
    ("application/json", False, "data"),
    ("text/javascript", False, "script source: harmless as a document, refused as the gateway's own code"),
    ("application/octet-stream", False, "unknown bytes"),
    ("application/x-unheard-of", False, "a type no list here anticipates"),
    ("", False, "no type at all"),
    ("video", False, "junk: no subtype"),
    ("video/", False, "junk: empty subtype"),
    ("image/*", False, "junk: a wildcard belongs in Accept"),
]


@pytest.mark.parametrize("content_type,expected,why", MEDIA_CASES, ids=[f"{c[0] or 'empty'}" for c in MEDIA_CASES])
def test_only_what_players_load_counts_as_media(content_type: str, expected: bool, why: str) -> None:
    assert is_media(content_type) is expected, why


# (mode, stored Content-Type, extra headers on the object's answers)
HEADER_CASES = [
    ("sandbox", "text/html", {"Content-Security-Policy": "sandbox allow-scripts"}),
    ("sandbox", "image/svg+xml", {"Content-Security-Policy": "sandbox allow-scripts"}),
    ("sandbox", "application/dash+xml", {"Content-Security-Policy": "sandbox allow-scripts"}),
    ("sandbox", "text/plain", {"Content-Security-Policy": "sandbox allow-scripts"}),
    ("sandbox", "video/mp4", {}),
    ("sandbox", "application/vnd.apple.mpegurl", {}),
    ("sandbox", "text/vtt", {}),
    ("sandbox", "image/png", {}),
    ("attachment", "text/html", {"Content-Disposition": "attachment", "Content-Security-Policy": "sandbox"}),
    ("attachment", "image/svg+xml", {"Content-Disposition": "attachment", "Content-Security-Policy": "sandbox"}),
    ("attachment", "application/json", {"Content-Disposition": "attachment", "Content-Security-Policy": "sandbox"}),
    ("attachment", "video/webm", {}),
    ("attachment", "audio/mpeg", {}),
    ("attachment", "image/jpeg", {}),
    ("inline", "text/html", {}),
    ("inline", "image/svg+xml", {}),
    ("inline", "video/mp4", {}),
]


@pytest.mark.parametrize("mode,content_type,expected", HEADER_CASES, ids=[f"{m}-{c}" for m, c, _ in HEADER_CASES])
def test_each_mode_adds_its_headers_to_everything_but_media(mode: str, content_type: str, expected: dict[str, str]) -> None:
    assert object_headers(content_type, mode) == expected


def test_the_sandbox_never_grants_the_gateway_origin_back() -> None:
    # allow-same-origin together with allow-scripts would let the page remove its own sandbox.
    for csp in (SANDBOX_CSP, SANDBOX_NO_SCRIPTS_CSP):
        tokens = csp.split()
        assert tokens[0] == "sandbox" and "allow-same-origin" not in tokens
        assert not {"allow-popups", "allow-top-navigation", "allow-forms"} & set(tokens)


def test_an_unknown_mode_is_a_programming_error_not_a_silent_default() -> None:
    with pytest.raises(ValueError):
        object_headers("text/html", "open")


# (mode, request headers, refused destination or None)
LOAD_CASES = [
    ("sandbox", {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Dest": "script"}, "script"),
    ("sandbox", {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Dest": "worker"}, "worker"),
    ("sandbox", {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Dest": "sharedworker"}, "sharedworker"),
    ("sandbox", {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Dest": "serviceworker", "Service-Worker": "script"}, "serviceworker"),
    ("sandbox", {"Service-Worker": "script"}, "serviceworker"),
    ("sandbox", {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Dest": "style"}, "style"),
    ("sandbox", {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Dest": "audioworklet"}, "audioworklet"),
    ("sandbox", {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Dest": "xslt"}, "xslt"),
    ("attachment", {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Dest": "script"}, "script"),
    # what the gateway's pages and players load from uploads
    ("sandbox", {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Dest": "video"}, None),
    ("sandbox", {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Dest": "audio"}, None),
    ("sandbox", {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Dest": "track"}, None),
    ("sandbox", {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Dest": "image"}, None),
    ("sandbox", {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Dest": "empty"}, None),  # fetch/XHR: hls.js, dash.js
    ("sandbox", {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Dest": "iframe"}, None),  # sandboxed by its own CSP
    ("sandbox", {"Sec-Fetch-Site": "none", "Sec-Fetch-Dest": "document"}, None),  # typed into the address bar
    # a sandboxed upload's own scripts: its origin is opaque, so its requests are cross-site
    ("sandbox", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Dest": "script"}, None),
    ("sandbox", {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Dest": "script"}, None),
    ("sandbox", {}, None),  # curl, ffmpeg, VLC: no fetch metadata
    ("sandbox", {"Sec-Fetch-Site": "SAME-ORIGIN", "Sec-Fetch-Dest": "Script"}, "script"),
    ("inline", {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Dest": "script"}, None),
    ("inline", {"Service-Worker": "script"}, None),
]


@pytest.mark.parametrize("mode,headers,expected", LOAD_CASES)
def test_uploads_are_refused_as_the_gateway_pages_own_code(mode: str, headers: dict[str, str], expected: str | None) -> None:
    assert refused_load(mode, headers) == expected


@pytest.mark.parametrize(
    "path,expected",
    [("/ui", True), ("/ui/", True), ("/ui/app.js", True), ("/ui/player/index.html", True),
     ("/uix", False), ("/objects/ui/page.html", False), ("/", False), ("/healthz", False)],
)
def test_gateway_pages_are_ui_and_below(path: str, expected: bool) -> None:
    assert is_gateway_page(path) is expected


def directives(csp: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for part in csp.split(";"):
        name, *values = part.split()
        assert name not in out, f"{name} given twice"
        out[name] = values
    return out


def test_the_page_csp_allows_no_inline_script_no_plugins_and_no_framing() -> None:
    d = directives(security.PAGE_CSP)
    assert d["default-src"] == ["'self'"] and d["script-src"] == ["'self'"] and d["style-src"] == ["'self'"]
    assert d["object-src"] == ["'none'"] and d["frame-ancestors"] == ["'none'"] and d["base-uri"] == ["'none'"]
    everything = [v for values in d.values() for v in values]
    assert not {"'unsafe-inline'", "'unsafe-eval'", "*", "http:", "https:"} & set(everything)
    assert set(d["media-src"]) == {"'self'", "blob:"}  # Media Source Extensions (hls.js, dash.js)
    assert security.PAGE_HEADERS["Content-Security-Policy"] == security.PAGE_CSP
    assert security.PAGE_HEADERS["X-Frame-Options"] == "DENY"
    assert security.PAGE_HEADERS["Referrer-Policy"] == "no-referrer"
