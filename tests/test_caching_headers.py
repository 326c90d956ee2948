"""Caching headers a CDN in front can use safely: a playlist or manifest is never served stale
after it is replaced, a segment may be kept as long as its version holds.

The policy on its own (``gateway.caching``, table-driven), then over HTTP: what playlists,
segments and other objects get on GET, HEAD and 304; that a replaced playlist is seen on the next
revalidation; that ``?v=<current version>`` earns a year (never past a signed URL's expiry) and
``?v=<another version>`` is a 404, never another version's bytes; that a read a bearer token
unlocked is private; and the per-kind read counter.
"""

from __future__ import annotations

import re
from typing import Any, AsyncIterator

import aiohttp
import pytest

from gateway.auth import prefix_signed_url, signed_url
from gateway.caching import IMMUTABLE_MAX_AGE, cache_control, media_kind
from gateway.config import ServeConfig
from tests.support.gateway import in_process_gateway

pytestmark = pytest.mark.timeout(60)

HLS = "application/vnd.apple.mpegurl"
DASH = "application/dash+xml"
SEGMENT = "video/iso.segment"


@pytest.mark.parametrize("content_type,kw,expected", [
    (HLS, {}, "public, no-cache"),
    ("application/x-mpegURL; charset=utf-8", {}, "public, no-cache"),
    (DASH, {}, "public, no-cache"),
    (SEGMENT, {}, "public, max-age=0, must-revalidate"),
    ("video/mp2t", {}, "public, max-age=0, must-revalidate"),
    ("video/mp4", {}, "public, max-age=0, must-revalidate"),
    (SEGMENT, {"pinned": True}, f"public, max-age={IMMUTABLE_MAX_AGE}, immutable"),
    (HLS, {"pinned": True}, f"public, max-age={IMMUTABLE_MAX_AGE}, immutable"),  # that version never changes either
    (SEGMENT, {"pinned": True, "signed_seconds_left": 599.7}, "public, max-age=599, immutable"),
    (SEGMENT, {"pinned": True, "signed_seconds_left": 10 * IMMUTABLE_MAX_AGE}, f"public, max-age={IMMUTABLE_MAX_AGE}, immutable"),
    (SEGMENT, {"pinned": True, "signed_seconds_left": 0.4}, "public, max-age=0, must-revalidate"),
    (HLS, {"pinned": True, "signed_seconds_left": -3}, "public, no-cache"),
    (SEGMENT, {"private": True}, "private, max-age=0, must-revalidate"),
    (HLS, {"private": True}, "private, no-cache"),
    (SEGMENT, {"private": True, "pinned": True}, f"private, max-age={IMMUTABLE_MAX_AGE}, immutable"),
])
def test_cache_control(content_type: str, kw: dict[str, Any], expected: str) -> None:
    assert cache_control(content_type, **kw) == expected


@pytest.mark.parametrize("content_type,kind", [
    (HLS, "playlist"), ("audio/mpegurl", "playlist"), (DASH, "playlist"),
    (SEGMENT, "segment"), ("video/mp2t", "segment"), ("audio/iso.segment", "segment"),
    ("video/mp4", "media"), ("audio/mp4", "media"), ("video/webm; codecs=vp9", "media"),
    ("text/vtt", "other"), ("application/octet-stream", "other"), ("", "other"),
])
def test_media_kind(content_type: str, kind: str) -> None:
    assert media_kind(content_type) == kind


# ------------------------------------------------------------------------------ over HTTP
@pytest.fixture
async def gw() -> AsyncIterator[tuple[str, aiohttp.ClientSession, Any]]:
    async with in_process_gateway(ServeConfig(chunk_size=1024)) as (url, app), aiohttp.ClientSession() as session:
        for key, data in (("show/master.m3u8", b"#EXTM3U\nv0.m3u8\n"), ("show/manifest.mpd", b"<MPD/>"),
                          ("show/v0/seg001.m4s", b"s" * 3000), ("show/v0/seg002.ts", b"t" * 100), ("show/poster.mp4", b"m")):
            async with session.put(f"{url}/objects/{key}", data=data) as r:
                assert r.status == 201
        yield url, session, app


async def fetch(session: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, bytes, Any]:
    async with session.request(method, url, **kw) as r:
        return r.status, await r.read(), r.headers


@pytest.mark.parametrize("key,expected", [
    ("show/master.m3u8", "public, no-cache"),
    ("show/manifest.mpd", "public, no-cache"),
    ("show/v0/seg001.m4s", "public, max-age=0, must-revalidate"),
    ("show/v0/seg002.ts", "public, max-age=0, must-revalidate"),
    ("show/poster.mp4", "public, max-age=0, must-revalidate"),
])
async def test_get_head_and_304_carry_the_same_cache_control(gw: Any, key: str, expected: str) -> None:
    url, session, _app = gw
    status, _, headers = await fetch(session, "GET", f"{url}/objects/{key}")
    assert status == 200 and headers["Cache-Control"] == expected and headers["ETag"]
    status, _, head = await fetch(session, "HEAD", f"{url}/objects/{key}")
    assert status == 200 and head["Cache-Control"] == expected
    status, body, not_modified = await fetch(session, "GET", f"{url}/objects/{key}", headers={"If-None-Match": headers["ETag"]})
    assert (status, body) == (304, b"") and not_modified["Cache-Control"] == expected
    status, _, ranged = await fetch(session, "GET", f"{url}/objects/{key}", headers={"Range": "bytes=0-0"})
    assert status == 206 and ranged["Cache-Control"] == expected


async def test_a_replaced_playlist_is_seen_on_the_next_revalidation(gw: Any) -> None:
    """What a cache holding the old playlist does on its next use (no-cache: always ask)."""
    url, session, _app = gw
    _, old_body, old = await fetch(session, "GET", f"{url}/objects/show/master.m3u8")
    async with session.put(f"{url}/objects/show/master.m3u8", data=b"#EXTM3U\nv1.m3u8\n") as r:
        assert r.status == 201
    status, body, new = await fetch(session, "GET", f"{url}/objects/show/master.m3u8", headers={"If-None-Match": old["ETag"]})
    assert (status, body) == (200, b"#EXTM3U\nv1.m3u8\n") and new["ETag"] != old["ETag"]
    assert new["Cache-Control"] == "public, no-cache"


async def version_of(session: aiohttp.ClientSession, url: str, key: str, **kw: Any) -> str:
    async with session.get(f"{url}/objects/{key}?manifest", **kw) as r:
        return str((await r.json())["version"])


async def test_a_url_pinning_the_current_version_is_immutable_and_another_version_is_404(gw: Any) -> None:
    url, session, _app = gw
    key = "show/v0/seg001.m4s"
    v1 = await version_of(session, url, key)
    status, body, headers = await fetch(session, "GET", f"{url}/objects/{key}?v={v1}")
    assert (status, body) == (200, b"s" * 3000)
    assert headers["Cache-Control"] == f"public, max-age={IMMUTABLE_MAX_AGE}, immutable"
    status, _, head = await fetch(session, "HEAD", f"{url}/objects/{key}?v={v1}")
    assert status == 200 and head["Cache-Control"] == headers["Cache-Control"]

    async with session.put(f"{url}/objects/{key}", data=b"S" * 3000) as r:  # a new encode under the same name
        assert r.status == 201
    v2 = await version_of(session, url, key)
    for method in ("GET", "HEAD"):
        status, body, _ = await fetch(session, method, f"{url}/objects/{key}?v={v1}")
        assert status == 404
    status, body, _ = await fetch(session, "GET", f"{url}/objects/{key}?v={v1}")
    assert b"version_not_found" in body and b"S" not in body
    status, body, headers = await fetch(session, "GET", f"{url}/objects/{key}?v={v2}")
    assert (status, body) == (200, b"S" * 3000) and "immutable" in headers["Cache-Control"]


async def test_a_signed_or_token_read_is_never_cached_past_its_credential() -> None:
    token, key_ = "tok-cache", "sk-cache"
    cfg = ServeConfig(chunk_size=1024, auth_token=[token], signing_key=key_)
    bearer = {"Authorization": f"Bearer {token}"}
    async with in_process_gateway(cfg) as (url, _app), aiohttp.ClientSession() as session:
        async with session.put(f"{url}/objects/s/seg.m4s", data=b"x" * 10, headers=bearer) as r:
            assert r.status == 201
        v = await version_of(session, url, "s/seg.m4s", headers=bearer)
        prefix_url = prefix_signed_url(url, key_, "s/seg.m4s", "s/", 600) + f"?v={v}"
        status, _, headers = await fetch(session, "GET", prefix_url)
        assert status == 200
        max_age = int(re.search(r"max-age=(\d+)", headers["Cache-Control"]).group(1))  # type: ignore[union-attr]
        assert 590 <= max_age <= 600 and headers["Cache-Control"].endswith("immutable")
        status, _, headers = await fetch(session, "GET", signed_url(url, key_, "s/seg.m4s", 300) + f"&v={v}")
        assert status == 200 and 290 <= int(re.search(r"max-age=(\d+)", headers["Cache-Control"]).group(1)) <= 300  # type: ignore[union-attr]
        status, _, headers = await fetch(session, "GET", f"{url}/objects/s/seg.m4s", headers=bearer)
        assert status == 200 and headers["Cache-Control"] == "private, max-age=0, must-revalidate"


async def test_object_reads_are_counted_by_media_kind(gw: Any) -> None:
    url, session, _app = gw
    for key in ("show/master.m3u8", "show/v0/seg001.m4s", "show/v0/seg002.ts", "show/v0/seg002.ts", "show/poster.mp4"):
        assert (await fetch(session, "GET", f"{url}/objects/{key}"))[0] == 200
    await fetch(session, "HEAD", f"{url}/objects/show/v0/seg001.m4s")  # HEAD sends no media: not a read
    _, text, _ = await fetch(session, "GET", f"{url}/metrics")
    counts = dict(re.findall(r'chunkgate_object_reads_total\{kind="(\w+)"\} (\d+)', text.decode()))
    assert counts == {"playlist": "1", "segment": "3", "media": "1", "other": "0"}
