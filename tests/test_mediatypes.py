"""Content-Type for keys and validation of client-supplied Content-Types (gateway/mediatypes.py)."""

from __future__ import annotations

import pytest

from gateway.mediatypes import guess_content_type, normalize_content_type

GUESSES = [
    ("movie.mp4", "video/mp4"),
    ("movie.m4v", "video/mp4"),
    ("song.m4a", "audio/mp4"),
    ("clip.webm", "video/webm"),
    ("film.mkv", "video/x-matroska"),
    ("take.mov", "video/quicktime"),
    ("hls/index.m3u8", "application/vnd.apple.mpegurl"),
    ("hls/seg00001.ts", "video/mp2t"),
    ("dash/chunk-1.m4s", "video/iso.segment"),
    ("dash/manifest.mpd", "application/dash+xml"),
    ("subs/en.vtt", "text/vtt"),
    ("subs/en.srt", "application/x-subrip"),
    ("track.mp3", "audio/mpeg"),
    ("track.aac", "audio/aac"),
    ("track.ogg", "audio/ogg"),
    ("clip.ogv", "video/ogg"),
    ("track.oga", "audio/ogg"),
    ("track.flac", "audio/flac"),
    ("track.wav", "audio/wav"),
    ("poster.jpg", "image/jpeg"),
    ("poster.jpeg", "image/jpeg"),
    ("poster.png", "image/png"),
    ("poster.webp", "image/webp"),
    ("meta.json", "application/json"),
    ("MOVIE.MP4", "video/mp4"),
    ("Hls/Seg.Ts", "video/mp2t"),
    ("docs/readme.pdf", "application/pdf"),
    ("notes.txt", "text/plain"),
    ("backup.tar.gz", "application/gzip"),
    ("data/blob", "application/octet-stream"),
    ("v1.0/blob", "application/octet-stream"),
    ("dir/.mp4", "application/octet-stream"),
    ("ends-with-dot.", "application/octet-stream"),
    ("file.unknownextension", "application/octet-stream"),
]


@pytest.mark.parametrize(
    ("key", "expected"),
    GUESSES,
    ids=[f"{key} is served as {ctype}" for key, ctype in GUESSES],
)
def test_guess_content_type(key: str, expected: str) -> None:
    assert guess_content_type(key) == expected


NORMALIZED = [
    ("video/mp4", "video/mp4", "a plain type is kept"),
    ("Video/MP4", "video/mp4", "type and subtype are lower cased"),
    ("  application/json \t", "application/json", "surrounding whitespace is dropped"),
    ("text/vtt;charset=utf-8", "text/vtt; charset=utf-8", "a parameter is spaced canonically"),
    ("text/plain; Charset=UTF-8", "text/plain; charset=UTF-8", "parameter names are lower cased but values kept"),
    ('text/plain; x="a;b=c"', 'text/plain; x="a;b=c"', "a quoted parameter value may hold separators"),
    ('text/plain; x="q\\"x"', 'text/plain; x="q\\"x"', "a quoted pair is kept"),
    ('video/mp4; codecs="avc1.64001F, mp4a.40.2"', 'video/mp4; codecs="avc1.64001F, mp4a.40.2"', "a codecs list is kept"),
    ("application/vnd.apple.mpegurl", "application/vnd.apple.mpegurl", "a vendor type is kept"),
    ("application/dash+xml", "application/dash+xml", "a structured suffix is kept"),
    ("a/b;", "a/b", "an empty parameter is dropped"),
    ("a/b; x=1;; y=2", "a/b; x=1; y=2", "empty parameters between others are dropped"),
]


@pytest.mark.parametrize(("value", "expected"), [n[:2] for n in NORMALIZED], ids=[n[2] for n in NORMALIZED])
def test_normalize_content_type_accepts(value: str, expected: str) -> None:
    assert normalize_content_type(value) == expected


JUNK = [
    (None, "an absent value"),
    ("", "an empty value"),
    ("video", "a type without a subtype"),
    ("video/", "an empty subtype"),
    ("/mp4", "an empty type"),
    ("video/mp4/x", "two slashes"),
    ("video mp4", "a space instead of a slash"),
    ("*/*", "a wildcard type"),
    ("video/*", "a wildcard subtype"),
    ("video/mp4\r\nSet-Cookie: a=b", "an injected header line"),
    ("video/mp4\x00", "a nul character"),
    ("video/mp4; x=\"a\tb\"", "a tab inside a quoted value"),
    ("video/mp\x7f4", "a delete character"),
    ("vidéo/mp4", "a non ascii character"),
    ("text/plain; charset", "a parameter without a value"),
    ("text/plain; charset=", "a parameter with an empty value"),
    ("text/plain; charset=a b", "an unquoted value with a space"),
    ('text/plain; x="unterminated', "an unterminated quoted value"),
    ("video/" + "a" * 128, "a subtype longer than 127 characters"),
    ("video/mp4; x=" + "a" * 250, "a value longer than 255 characters in all"),
]


def test_a_subtype_of_exactly_127_characters_is_accepted() -> None:
    assert normalize_content_type("video/" + "a" * 127) == "video/" + "a" * 127


@pytest.mark.parametrize("value", [j[0] for j in JUNK], ids=[j[1] for j in JUNK])
def test_normalize_content_type_refuses_junk(value: str | None) -> None:
    assert normalize_content_type(value) is None
