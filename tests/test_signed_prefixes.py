"""Signed prefixes: ``/t/<token>/objects/{key}``, a credential in the path that admits every key
under one prefix until it expires, so the relative URLs of an HLS/DASH ladder carry it too.

The token on its own (pure, table-driven): what admits, what is refused and with which code, that
no changed character is ever accepted; the path parsing that gives ``/t/`` the very key rules of
``/objects/``; over HTTP: a ``/t/`` read answers exactly as ``/objects/`` does (ranges,
conditionals, HEAD), refusals are 403 JSON, writes are not allowed there, ``POST /admin/sign``
needs a token, and ``chunkgate sign --prefix`` prints a URL a real gateway accepts. Tokens never
reach a log line.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from yarl import URL

from gateway import auth
from gateway.auth import (PrefixError, TokenRefused, prefix_signed_url, prefix_token, redact_path, signed_url,
                          validate_prefix, verify_prefix_token)
from gateway.config import ServeConfig
from gateway.objects import object_path
from storage.keys import BadKey
from tests.support.gateway import GatewayProcess, in_process_gateway

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-prefix-9fQ2"
TOKEN = "tok-prefix-Lm3x"
NOW = 1_800_000_000
LATER = NOW + 3600


def good(prefix: str = "videos/a/", expires: int = LATER) -> str:
    return prefix_token(KEY, prefix, expires)


def raw_token(body: bytes, signing_key: str = KEY) -> str:
    """A token with a valid MAC over ``body`` (for bodies ``prefix_token`` would never make)."""
    mac = hmac.new(auth._prefix_mac_key(signing_key), body, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(body + mac).rstrip(b"=").decode()


def body(prefix: bytes, expires: int = LATER, version: int = 1) -> bytes:
    return bytes([version]) + expires.to_bytes(8, "big") + prefix


# ------------------------------------------------------------------------------ the token, pure
@pytest.mark.parametrize("prefix,key", [
    ("videos/a/", "videos/a/master.m3u8"),
    ("videos/a/", "videos/a/v0/seg001.m4s"),
    ("videos/a", "videos/ab/other.mp4"),  # a prefix is a string prefix: end it with "/" for a folder
    ("films/été 2026/", "films/été 2026/a?b#c%d.mp4"),
    ("x", "x"),
])
def test_a_token_admits_every_key_that_starts_with_its_prefix(prefix: str, key: str) -> None:
    grant = verify_prefix_token(KEY, prefix_token(KEY, prefix, LATER), key, NOW)
    assert (grant.prefix, grant.expires) == (prefix, LATER)


def _flip_last_bits(token: str) -> str:
    # The last base64 character carries unused low bits for most lengths: another spelling of
    # the same bytes, which must be refused too (one token per byte string).
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    i = alphabet.index(token[-1])
    return token[:-1] + alphabet[i ^ 1]


@pytest.mark.parametrize("token,key,now,code", [
    (good(), "videos/b/master.m3u8", NOW, "prefix_mismatch"),
    (good(), "videos/a", NOW, "prefix_mismatch"),  # the folder's own name is not under "videos/a/"
    (good("videos/a/"), "videos/ab/x.ts", NOW, "prefix_mismatch"),
    (good(), "videos/a/x.ts", LATER + 1, "signature_expired"),
    (prefix_token("another-key", "videos/a/", LATER), "videos/a/x.ts", NOW, "bad_signature"),
    (good()[:-1], "videos/a/x.ts", NOW, "bad_token"),  # truncated
    (good() + "A", "videos/a/x.ts", NOW, "bad_signature"),  # well formed, but its last 32 bytes are not the MAC
    (good() + "==", "videos/a/x.ts", NOW, "bad_token"),  # padding is not part of the format
    (good().replace("A", "%41", 1), "videos/a/x.ts", NOW, "bad_token"),  # percent-encoding is not the token
    ("", "videos/a/x.ts", NOW, "bad_token"),
    ("not.a.token", "videos/a/x.ts", NOW, "bad_token"),
    ("A" * 5000, "videos/a/x.ts", NOW, "bad_token"),
    (auth.signature(KEY, "videos/a/x.ts", LATER), "videos/a/x.ts", NOW, "bad_token"),  # a per-key signature
    (raw_token(body(b"videos/a/", version=2)), "videos/a/x.ts", NOW, "bad_token"),
    (raw_token(body(b"videos/\xff/")), "videos/a/x.ts", NOW, "bad_token"),
    (raw_token(body(b"")), "videos/a/x.ts", NOW, "bad_token"),
    (raw_token(body(b"videos/a/"))[:20], "videos/a/x.ts", NOW, "bad_token"),
])
def test_a_token_is_refused_with_the_reason(token: str, key: str, now: int, code: str) -> None:
    with pytest.raises(TokenRefused) as caught:
        verify_prefix_token(KEY, token, key, now)
    assert caught.value.code == code


def test_the_token_is_good_until_its_expiry_second() -> None:
    assert verify_prefix_token(KEY, good(), "videos/a/x.ts", LATER).expires == LATER


def test_no_changed_character_of_a_token_is_ever_accepted() -> None:
    token = good("videos/ladder/")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for i, ch in enumerate(token):
        for other in (alphabet[(alphabet.index(ch) + 1) % 64], alphabet[(alphabet.index(ch) + 31) % 64]):
            forged = token[:i] + other + token[i + 1:]
            with pytest.raises(TokenRefused):
                verify_prefix_token(KEY, forged, "videos/ladder/master.m3u8", NOW)
    with pytest.raises(TokenRefused) as caught:
        verify_prefix_token(KEY, _flip_last_bits(token), "videos/ladder/master.m3u8", NOW)
    assert caught.value.code in ("bad_token", "bad_signature")


def test_a_widened_prefix_under_the_old_mac_is_refused() -> None:
    token = good("videos/a/")
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    forged = base64.urlsafe_b64encode(body(b"videos/") + raw[-32:]).rstrip(b"=").decode()
    with pytest.raises(TokenRefused) as caught:
        verify_prefix_token(KEY, forged, "videos/b/secret.mp4", NOW)
    assert caught.value.code == "bad_signature"


def test_the_token_format_is_version_expiry_prefix_mac() -> None:
    token = prefix_token(KEY, "v/", 1234)
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    assert raw[0] == 1 and int.from_bytes(raw[1:9], "big") == 1234 and raw[9:-32] == b"v/"
    derived = hmac.new(KEY.encode(), b"chunkgate prefix token v1", hashlib.sha256).digest()
    assert raw[-32:] == hmac.new(derived, raw[:-32], hashlib.sha256).digest()
    assert "/" not in token and "=" not in token and "+" not in token


@pytest.mark.parametrize("prefix,ok", [
    ("videos/", True), ("a", True), ("é/", True), ("x" * 1024, True),
    ("", False), ("x" * 1025, False), ("a\nb", False), ("a\x00", False), ("a\x7f", False),
])
def test_validate_prefix(prefix: str, ok: bool) -> None:
    if ok:
        assert validate_prefix(prefix) == prefix
    else:
        with pytest.raises(PrefixError):
            validate_prefix(prefix)


@pytest.mark.parametrize("path,expected", [
    ("/t/" + "A" * 60 + "/objects/a/b.ts", "/t/REDACTED/objects/a/b.ts"),
    ("/t/" + "A" * 60 + "/objects/a?v=1", "/t/REDACTED/objects/a?v=1"),
    ("//t/" + "A" * 60 + "/objects/a", "//t/REDACTED/objects/a"),
    ("/objects/t/clip.mp4", "/objects/t/clip.mp4"),  # a key segment "t" followed by a short name stays
    ("/objects/a.mp4", "/objects/a.mp4"),
])
def test_redact_path(path: str, expected: str) -> None:
    assert redact_path(path) == expected


@pytest.mark.parametrize("raw,expected", [
    ("/objects/a/b.mp4", (None, "a/b.mp4")),
    ("/t/TOK/objects/a/b.mp4", ("TOK", "a/b.mp4")),
    ("/t/TOK/objects/a%20b/%C3%A9.mp4?x=1", ("TOK", "a b/é.mp4")),
    ("/t/TOK/objects/a%2Fb", ("TOK", "a/b")),  # decoded exactly as /objects/ decodes it
    ("/t/TOK/objects/a/../b", BadKey),
    ("/t/TOK/objects/a/%2e%2e/b", BadKey),
    ("/t/TOK/objects/a//b", BadKey),
    ("/t/TOK/objects/%0A", BadKey),
    ("/t/TOK/objects/%FF", BadKey),
    ("/t/TOK/objects/", BadKey),
    ("/t//objects/a", BadKey),
    ("/t/TOK", BadKey),
    ("/t/TOK/../objects/a", BadKey),
    ("/t/TOK/x/objects/a", BadKey),
    ("/x/../objects/a", BadKey),
])
def test_object_path_gives_both_forms_the_same_key_rules(raw: str, expected: Any) -> None:
    if expected is BadKey:
        with pytest.raises(BadKey):
            object_path(raw)
    else:
        assert object_path(raw) == expected
    plain = "/objects/" + raw.split("/objects/", 1)[1] if raw.startswith("/t/TOK/objects/") else None
    if plain is not None:  # /t/TOK/objects/K and /objects/K name the same key or are both bad
        try:
            want: Any = object_path(plain)[1]
        except BadKey:
            want = BadKey
        try:
            got: Any = object_path(raw)[1]
        except BadKey:
            got = BadKey
        assert got == want


# ------------------------------------------------------------------------------ over HTTP
BODY = bytes(range(256)) * 40  # 10240 bytes over 10 chunks


@pytest.fixture
async def gw() -> AsyncIterator[tuple[str, aiohttp.ClientSession, Any]]:
    cfg = ServeConfig(auth_token=[TOKEN], signing_key=KEY, chunk_size=1024)
    async with in_process_gateway(cfg) as (url, app), aiohttp.ClientSession() as session:
        for key, data in (("ladder/master.m3u8", b"#EXTM3U\nv0/index.m3u8\n"), ("ladder/v0/seg001.m4s", BODY),
                          ("ladder-other/secret.mp4", b"secret"), ("films/été 2026/a b.mp4", b"unicode")):
            async with session.put(URL(f"{url}/objects/{key}"), data=data, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                assert r.status == 201, await r.text()
        yield url, session, app


async def call(session: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, bytes, Any]:
    async with session.request(method, URL(url, encoded=True), **kw) as r:
        return r.status, await r.read(), r.headers


def signed(url: str, key: str, prefix: str = "ladder/", expires_in: float = 600) -> str:
    return prefix_signed_url(url, KEY, key, prefix, expires_in)


COMPARED = ("ETag", "Last-Modified", "Content-Type", "Content-Length", "Content-Range", "Accept-Ranges", "Cache-Control")


@pytest.mark.parametrize("method,headers", [
    ("GET", {}),
    ("HEAD", {}),
    ("GET", {"Range": "bytes=1000-2999"}),
    ("GET", {"Range": "bytes=-100"}),
    ("GET", {"Range": "bytes=0-0,5000-5001"}),
    ("HEAD", {"Range": "bytes=100-"}),
    ("GET", {"Range": "bytes=999999-"}),
    ("GET", {"If-None-Match": "*"}),
    ("GET", {"If-Match": '"nope"'}),
    ("GET", {"If-Modified-Since": "Fri, 01 Jan 2100 00:00:00 GMT"}),
])
async def test_a_signed_prefix_read_answers_exactly_as_a_per_key_signed_read(gw: Any, method: str,
                                                                            headers: dict[str, str]) -> None:
    url, session, _app = gw
    key = "ladder/v0/seg001.m4s"
    a = await call(session, method, signed(url, key), headers=headers)
    b = await call(session, method, signed_url(url, KEY, key, 600), headers=headers)
    assert a[0] == b[0] and a[0] != 403
    if "boundary" in a[2].get("Content-Type", ""):  # multipart boundaries differ per response
        assert a[2]["Content-Length"] == b[2]["Content-Length"]
    else:
        assert a[1] == b[1]
        assert {h: a[2].get(h) for h in COMPARED} == {h: b[2].get(h) for h in COMPARED}


async def test_the_same_token_admits_every_key_under_its_prefix_and_the_manifest(gw: Any) -> None:
    url, session, _app = gw
    master = signed(url, "ladder/master.m3u8")
    status, data, _ = await call(session, "GET", master)
    assert (status, data) == (200, b"#EXTM3U\nv0/index.m3u8\n")
    segment = master.replace("master.m3u8", "v0/seg001.m4s")  # what a player resolves the playlist's line to
    status, data, _ = await call(session, "GET", segment)
    assert (status, data) == (200, BODY)
    status, data, _ = await call(session, "GET", segment + "?manifest")
    assert status == 200 and json.loads(data)["size"] == len(BODY)
    status, data, _ = await call(session, "GET", signed(url, "films/été 2026/a b.mp4", "films/été 2026/"))
    assert (status, data) == (200, b"unicode")


@pytest.mark.parametrize("make,code", [
    (lambda u: signed(u, "ladder/master.m3u8").replace("ladder/master.m3u8", "ladder-other/secret.mp4"), "prefix_mismatch"),
    (lambda u: signed(u, "ladder/master.m3u8", expires_in=-5), "signature_expired"),
    (lambda u: prefix_signed_url(u, "wrong-key", "ladder/master.m3u8", "ladder/", 600), "bad_signature"),
    (lambda u: f"{u}/t/garbage/objects/ladder/master.m3u8", "bad_token"),
    (lambda u: f"{u}/t/{'A' * 80}/objects/ladder/master.m3u8", "bad_token"),
    (lambda u: f"{u}/objects/ladder/master.m3u8", "signature_required"),
    # a per-key signature of the playlist does not carry over to what it names
    (lambda u: signed_url(u, KEY, "ladder/master.m3u8", 600).replace("master.m3u8", "v0/seg001.m4s"), "bad_signature"),
])
async def test_refusals_are_403_json(gw: Any, make: Any, code: str) -> None:
    url, session, _app = gw
    for method in ("GET", "HEAD"):
        status, data, headers = await call(session, method, make(url))
        assert status == 403
        if method == "GET":
            assert headers["Content-Type"].startswith("application/json")
            assert json.loads(data)["error"] == code


@pytest.mark.parametrize("raw_key", ["ladder/../ladder-other/secret.mp4", "ladder/%2e%2e/ladder-other/secret.mp4",
                                     "ladder//v0/seg001.m4s", "ladder/%0A", "ladder/%FF"])
async def test_dot_segments_and_bad_keys_under_a_token_are_400_never_another_key(gw: Any, raw_key: str) -> None:
    url, session, _app = gw
    token = signed(url, "ladder/master.m3u8").split("/t/")[1].split("/")[0]
    status, data, _ = await call(session, "GET", f"{url}/t/{token}/objects/{raw_key}")
    assert status == 400 and json.loads(data)["error"] == "bad_key"
    plain, _, _ = await call(session, "GET", f"{url}/objects/{raw_key}", headers={"Authorization": f"Bearer {TOKEN}"})
    assert plain == 400


async def test_signed_prefix_urls_are_read_only(gw: Any) -> None:
    url, session, _app = gw
    master = signed(url, "ladder/master.m3u8")
    status, _, _ = await call(session, "PUT", master, data=b"overwrite")
    assert status == 401  # writes need a token, wherever they are sent
    for method in ("PUT", "DELETE"):
        status, data, headers = await call(session, method, master, data=b"x", headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 405 and json.loads(data)["error"] == "method_not_allowed" and "PUT" not in headers["Allow"]
    status, data, _ = await call(session, "GET", f"{url}/objects/ladder/master.m3u8", headers={"Authorization": f"Bearer {TOKEN}"})
    assert data == b"#EXTM3U\nv0/index.m3u8\n"


async def test_a_token_holder_may_read_through_any_path_form(gw: Any) -> None:
    url, session, _app = gw
    status, data, _ = await call(session, "GET", f"{url}/t/garbage/objects/ladder/master.m3u8",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    assert (status, data) == (200, b"#EXTM3U\nv0/index.m3u8\n")


async def test_without_a_signing_key_reads_are_public_in_both_forms() -> None:
    async with in_process_gateway(ServeConfig(chunk_size=1024)) as (url, _app), aiohttp.ClientSession() as session:
        async with session.put(f"{url}/objects/open/a.ts", data=b"ts") as r:
            assert r.status == 201
        status, data, _ = await call(session, "GET", f"{url}/t/anything/objects/open/a.ts")
        assert (status, data) == (200, b"ts")


# ------------------------------------------------------------------------------ POST /admin/sign
async def test_admin_sign_mints_a_prefix_url_for_the_keys_folder(gw: Any) -> None:
    url, session, _app = gw
    async with session.post(f"{url}/admin/sign", json={"key": "ladder/master.m3u8", "expires_in": 120},
                            headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
        doc = await r.json()
    assert doc["prefix"] == "ladder/" and doc["url"] == url + doc["path"]
    assert time.time() + 100 < doc["expires"] <= time.time() + 121
    status, data, _ = await call(session, "GET", url + doc["path"].replace("master.m3u8", "v0/seg001.m4s"))
    assert (status, data) == (200, BODY)
    status, _, _ = await call(session, "GET", url + doc["path"].replace("ladder/master.m3u8", "ladder-other/secret.mp4"))
    assert status == 403


@pytest.mark.parametrize("payload,headers,status,code", [
    ({"key": "ladder/master.m3u8"}, {}, 401, "unauthorized"),
    ({"key": "ladder/master.m3u8"}, {"Authorization": "Bearer wrong"}, 403, "forbidden"),
    ({"key": "ladder/master.m3u8", "prefix": "other/"}, None, 400, "bad_prefix"),
    ({"key": "ladder/master.m3u8", "prefix": ""}, None, 400, "bad_prefix"),
    ({"key": "../x"}, None, 400, "bad_key"),
    ({"key": "ladder/master.m3u8", "expires_in": 0}, None, 400, "bad_expires_in"),
    ({"key": "ladder/master.m3u8", "expires_in": "1h"}, None, 400, "bad_expires_in"),
    ({"prefix": "ladder/"}, None, 400, "bad_request"),
    ([1, 2], None, 400, "bad_request"),
])
async def test_admin_sign_refusals(gw: Any, payload: Any, headers: dict[str, str] | None, status: int, code: str) -> None:
    url, session, _app = gw
    async with session.post(f"{url}/admin/sign", json=payload,
                            headers={"Authorization": f"Bearer {TOKEN}"} if headers is None else headers) as r:
        assert r.status == status
        assert (await r.json())["error"] == code


@pytest.mark.parametrize("cfg,status,code", [
    (ServeConfig(signing_key=KEY), 403, "forbidden"),  # no tokens: anyone could mint read URLs
    (ServeConfig(auth_token=[TOKEN]), 409, "signing_disabled"),
])
async def test_admin_sign_needs_tokens_and_a_signing_key(cfg: ServeConfig, status: int, code: str) -> None:
    async with in_process_gateway(cfg) as (url, _app), aiohttp.ClientSession() as session:
        async with session.post(f"{url}/admin/sign", json={"key": "a/b.mp4"}, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert (r.status, (await r.json())["error"]) == (status, code)


# ------------------------------------------------------------------------------ real processes
def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


@pytest.mark.parametrize("args,complaint", [
    (["sign", "ladder/master.m3u8", "--prefix", "other/"], "KEY"),
    (["sign", "ladder/master.m3u8", "--prefix", ""], "--prefix"),
    (["sign", "ladder/master.m3u8", "--prefix", "lad\x01"], "--prefix"),
    (["sign", "../x", "--prefix", "."], "KEY"),
])
def test_chunkgate_sign_prefix_complains_in_one_line(args: list[str], complaint: str) -> None:
    out = cli(*args, "--signing-key", KEY)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith(f"chunkgate: {complaint}") and "Traceback" not in out.stderr


async def test_chunkgate_sign_prefix_url_works_on_a_real_gateway_and_its_token_is_never_logged(tmp_path: Path) -> None:
    with GatewayProcess(["--store", str(tmp_path / "data"), "--auth-token", TOKEN, "--signing-key", KEY,
                         "--log-format", "json"], cwd=REPO) as gw:
        async with aiohttp.ClientSession() as session:
            for key in ("talk/master.m3u8", "talk/v1/seg000.ts"):
                async with session.put(f"{gw.url}/objects/{key}", data=key.encode(),
                                       headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                    assert r.status == 201
            out = cli("sign", "talk/master.m3u8", "--prefix", "talk/", "--expires-in", "10m", "--url", gw.url,
                      env={"CHUNKGATE_SIGNING_KEY": KEY})
            assert out.returncode == 0, out.stderr
            url = out.stdout.strip()
            assert url.startswith(f"{gw.url}/t/") and url.endswith("/objects/talk/master.m3u8") and "\n" not in url
            token = url.split("/t/")[1].split("/")[0]
            status, data, _ = await call(session, "GET", url)
            assert (status, data) == (200, b"talk/master.m3u8")
            status, data, _ = await call(session, "GET", url.replace("master.m3u8", "v1/seg000.ts"))
            assert (status, data) == (200, b"talk/v1/seg000.ts")
            status, _, _ = await call(session, "GET", url.replace("talk/master.m3u8", "other.mp4"))
            assert status == 403
            status, _, _ = await call(session, "GET", f"{gw.url}//t/{token}/objects/talk/master.m3u8")
            assert status in (400, 404)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum('"/t/REDACTED/objects/' in line for line in gw.stderr_lines) < 3:
            time.sleep(0.1)
    logged = "".join(gw.stderr_lines)
    assert token not in logged
    access = [json.loads(line) for line in gw.stderr_lines if '"request_id"' in line and "/t/" in line]
    assert len(access) >= 4
    assert all(doc["path"].startswith(("/t/REDACTED/objects/", "//t/REDACTED/objects/")) for doc in access), access
    assert all("REDACTED" in doc["message"] for doc in access)
