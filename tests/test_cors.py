"""CORS as a browser player on another origin needs it (API.md, OPTIONS /objects/{key}).

A ``<video crossorigin>`` or hls.js/fetch player sends a preflight before a ranged or conditional
request, and may only read the response headers the gateway exposes. Table-driven: request
headers in, the CORS headers a browser checks out. (tests/test_player_chromium.py shows a real
browser accepting them.)
"""

from __future__ import annotations

from typing import AsyncIterator

import aiohttp
import pytest

from gateway.config import ServeConfig
from tests.support.gateway import in_process_gateway

pytestmark = pytest.mark.timeout(60)

PLAYER = "http://player.example:3000"
BODY = bytes(range(256)) * 64  # 16 KiB
EXPOSED_FOR_PLAYERS = ("Content-Range", "Content-Length", "Accept-Ranges", "ETag")


def header_set(value: str | None) -> set[str]:
    return {v.strip().lower() for v in (value or "").split(",") if v.strip()}


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    async with in_process_gateway(ServeConfig(chunk_size=4096)) as (base, _), aiohttp.ClientSession() as http:
        async with http.put(f"{base}/objects/v/a.mp4", data=BODY) as resp:
            assert resp.status == 201
        yield base, http


@pytest.mark.parametrize(
    "method,request_headers",
    [
        ("GET", "range"),
        ("GET", "range, if-range"),
        ("GET", "if-none-match, if-modified-since"),
        ("GET", "if-match, if-unmodified-since, range"),
        ("HEAD", "range"),
    ],
)
async def test_preflight_from_a_player_origin_allows_ranges_and_conditionals(
    gateway: tuple[str, aiohttp.ClientSession], method: str, request_headers: str
) -> None:
    base, http = gateway
    headers = {"Origin": PLAYER, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": request_headers}
    async with http.options(f"{base}/objects/v/a.mp4", headers=headers) as resp:
        assert resp.status in (200, 204)
        assert resp.headers["Access-Control-Allow-Origin"] in ("*", PLAYER)
        assert method.lower() in header_set(resp.headers.get("Access-Control-Allow-Methods"))
        assert header_set(request_headers) <= header_set(resp.headers.get("Access-Control-Allow-Headers"))


@pytest.mark.parametrize(
    "request_headers,status",
    [
        ({}, 200),
        ({"Range": "bytes=100-199"}, 206),
        ({"Range": "bytes=-10"}, 206),
        ({"Range": "bytes=999999-"}, 416),  # the error a player must be able to read too
        ({"If-None-Match": "*"}, 304),
    ],
)
async def test_reads_from_a_player_origin_expose_the_headers_players_need(
    gateway: tuple[str, aiohttp.ClientSession], request_headers: dict[str, str], status: int
) -> None:
    base, http = gateway
    async with http.get(f"{base}/objects/v/a.mp4", headers={"Origin": PLAYER, **request_headers}) as resp:
        assert resp.status == status
        assert resp.headers["Access-Control-Allow-Origin"] in ("*", PLAYER)
        exposed = header_set(resp.headers.get("Access-Control-Expose-Headers"))
        assert {h.lower() for h in EXPOSED_FOR_PLAYERS} <= exposed
        if status == 206:
            assert resp.headers["Content-Range"].startswith("bytes ")


async def test_head_from_a_player_origin_exposes_the_same_headers(gateway: tuple[str, aiohttp.ClientSession]) -> None:
    base, http = gateway
    async with http.head(f"{base}/objects/v/a.mp4", headers={"Origin": PLAYER, "Range": "bytes=0-9"}) as resp:
        assert resp.status == 206
        assert resp.headers["Access-Control-Allow-Origin"] in ("*", PLAYER)
        assert {h.lower() for h in EXPOSED_FOR_PLAYERS} <= header_set(resp.headers.get("Access-Control-Expose-Headers"))


async def test_a_configured_origin_is_echoed_and_others_get_no_cors_grant() -> None:
    cfg = ServeConfig(cors_origins=PLAYER)
    async with in_process_gateway(cfg) as (base, _), aiohttp.ClientSession() as http:
        async with http.put(f"{base}/objects/a", data=b"x" * 100) as resp:
            assert resp.status == 201
        async with http.get(f"{base}/objects/a", headers={"Origin": PLAYER}) as resp:
            assert resp.headers["Access-Control-Allow-Origin"] == PLAYER
            assert "origin" in header_set(resp.headers.get("Vary"))  # caches must not mix origins
        async with http.get(f"{base}/objects/a", headers={"Origin": "http://evil.example"}) as resp:
            assert resp.status == 200  # the read itself is not CORS's business...
            assert "Access-Control-Allow-Origin" not in resp.headers  # ...but the browser won't hand it over
        preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "GET",
                     "Access-Control-Request-Headers": "range"}
        async with http.options(f"{base}/objects/a", headers=preflight) as resp:
            assert resp.headers.get("Access-Control-Allow-Origin") not in ("*", "http://evil.example")


@pytest.mark.parametrize(
    "asked,allowed,refused",
    [
        ("x-app-session", {"x-app-session"}, set()),
        ("tus-resumable, upload-length, upload-metadata, x-app-session, x-tenant",
         {"tus-resumable", "upload-length", "upload-metadata", "x-app-session", "x-tenant"}, set()),
        ("x-app-session, cookie, x-bad name", {"x-app-session"}, {"cookie", "x-bad name"}),
    ],
)
async def test_preflight_of_an_upload_app_allows_its_own_x_headers(asked: str, allowed: set[str], refused: set[str]) -> None:
    """A web app passes its own credentials in an X-* header for its pre-create hook to check:
    the browser only sends it if the preflight allows it by name."""
    app_origin = "http://app.example:8000"
    async with in_process_gateway(ServeConfig(cors_origins=app_origin)) as (base, _), aiohttp.ClientSession() as http:
        headers = {"Origin": app_origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": asked}
        async with http.options(f"{base}/uploads/", headers=headers) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == app_origin
            granted = header_set(resp.headers.get("Access-Control-Allow-Headers"))
            assert allowed <= granted
            assert not refused & granted
