"""Auth end to end: bearer tokens for writes and /admin, signed expiring read URLs, `chunkgate
sign` against a real gateway, and serve refusing to expose unauthenticated writes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest

from gateway.auth import signature, signed_url
from gateway.config import ServeConfig
from tests.support.gateway import GatewayProcess, in_process_gateway

REPO = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token"
SIGNING_KEY = "signing-key-one"


@pytest.fixture
async def gw() -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    cfg = ServeConfig(auth_token=[TOKEN, "second-token"], signing_key=SIGNING_KEY, chunk_size=1024)
    async with in_process_gateway(cfg) as (url, _app), aiohttp.ClientSession() as session:
        async with session.put(f"{url}/objects/dir/clip.mp4", data=b"frames" * 500,
                               headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 201
        yield url, session


async def call(session: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, Any, Any]:
    async with session.request(method, url, **kw) as r:
        body = await r.read()
        doc = await r.json(content_type=None) if r.content_type == "application/json" and body else None
        return r.status, doc, r.headers


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("method,path,headers,status,code", [
    ("PUT", "/objects/new.bin", {}, 401, "unauthorized"),
    ("PUT", "/objects/new.bin", bearer("wrong"), 403, "forbidden"),
    ("PUT", "/objects/new.bin", {"Authorization": f"Basic {TOKEN}"}, 401, "unauthorized"),
    ("PUT", "/objects/new.bin", {"Authorization": "Bearer "}, 401, "unauthorized"),
    ("DELETE", "/objects/dir/clip.mp4", {}, 401, "unauthorized"),
    ("DELETE", "/objects/dir/clip.mp4", bearer("s3cret-token-but-longer"), 403, "forbidden"),
    ("POST", "/uploads/", {}, 401, "unauthorized"),
    ("PATCH", "/uploads/whatever", bearer("nope"), 403, "forbidden"),
    ("GET", "/admin/locks", {}, 401, "unauthorized"),
    ("GET", "/admin/locks", bearer("nope"), 403, "forbidden"),
    ("GET", "/%61dmin/locks", {}, 401, "unauthorized"),  # an encoded path is still /admin
    ("GET", "/x/../admin/locks", {}, 401, "unauthorized"),
])
async def test_writes_and_admin_without_a_valid_token_are_refused(gw: Any, method: str, path: str, headers: dict[str, str],
                                                                   status: int, code: str) -> None:
    url, session = gw
    got, doc, resp_headers = await call(session, method, url + path, headers=headers, data=b"x")
    assert (got, doc["error"]) == (status, code)
    if status == 401:
        assert resp_headers["WWW-Authenticate"].startswith("Bearer")
    # and nothing was written or removed
    signed = signed_url(url, SIGNING_KEY, "dir/clip.mp4", 60)
    assert (await call(session, "GET", signed))[0] == 200
    assert (await call(session, "GET", signed_url(url, SIGNING_KEY, "new.bin", 60)))[0] == 404


@pytest.mark.parametrize("token", [TOKEN, "second-token"])
async def test_every_configured_token_may_write_delete_and_administer(gw: Any, token: str) -> None:
    url, session = gw
    assert (await call(session, "PUT", f"{url}/objects/t.bin", data=b"abc", headers=bearer(token)))[0] == 201
    assert (await call(session, "GET", f"{url}/admin/locks", headers=bearer(token)))[0] == 200
    assert (await call(session, "DELETE", f"{url}/objects/t.bin", headers=bearer(token)))[0] == 204


def tamper(url: str, **changes: str) -> str:
    base, _, query = url.partition("?")
    params = dict(p.split("=", 1) for p in query.split("&"))
    params.update(changes)
    return base + "?" + "&".join(f"{k}={v}" for k, v in params.items() if v != "")


@pytest.mark.parametrize("make,status,code", [
    (lambda u: f"{u}/objects/dir/clip.mp4", 403, "signature_required"),
    (lambda u: signed_url(u, SIGNING_KEY, "dir/clip.mp4", 3600), 200, None),
    (lambda u: signed_url(u, SIGNING_KEY, "dir/clip.mp4", 3600).upper().replace("HTTP://", "http://")
     .replace("/OBJECTS/DIR/CLIP.MP4", "/objects/dir/clip.mp4").replace("?EXPIRES=", "?expires=")
     .replace("&SIGNATURE=", "&signature="), 200, None),  # hex digits in upper case are the same signature
    (lambda u: tamper(signed_url(u, SIGNING_KEY, "dir/clip.mp4", 3600), signature="0" * 64), 403, "bad_signature"),
    (lambda u: tamper(signed_url(u, SIGNING_KEY, "dir/clip.mp4", 3600), signature=""), 403, "signature_required"),
    (lambda u: tamper(signed_url(u, SIGNING_KEY, "dir/clip.mp4", 3600), expires=str(int(time.time()) + 7200)), 403,
     "bad_signature"),  # pushing the expiry out breaks the signature
    (lambda u: tamper(signed_url(u, SIGNING_KEY, "dir/clip.mp4", 3600), expires="soon"), 403, "bad_signature"),
    (lambda u: signed_url(u, SIGNING_KEY, "dir/clip.mp4", -5), 403, "signature_expired"),
    (lambda u: signed_url(u, SIGNING_KEY, "dir/other.mp4", 3600).replace("other.mp4", "clip.mp4"), 403, "bad_signature"),
    (lambda u: signed_url(u, "another-signing-key", "dir/clip.mp4", 3600), 403, "bad_signature"),
])
async def test_reads_need_a_valid_unexpired_signature_for_that_key(gw: Any, make: Any, status: int, code: str | None) -> None:
    url, session = gw
    for method in ("GET", "HEAD"):
        got, doc, _ = await call(session, method, make(url))
        assert got == status
        if code is not None and method == "GET":
            assert doc["error"] == code


async def test_a_non_ascii_signature_is_a_403_not_a_crash(gw: Any) -> None:
    url, session = gw
    got, doc, _ = await call(session, "GET", tamper(signed_url(url, SIGNING_KEY, "dir/clip.mp4", 60), signature="%C3%A9"))
    assert (got, doc["error"]) == (403, "bad_signature")


async def test_a_token_holder_may_read_without_a_signature(gw: Any) -> None:
    url, session = gw
    got, _, _ = await call(session, "GET", f"{url}/objects/dir/clip.mp4", headers=bearer(TOKEN))
    assert got == 200
    got, _, _ = await call(session, "GET", f"{url}/objects/dir/clip.mp4", headers=bearer("wrong"))
    assert got == 403


async def test_a_signed_url_for_a_key_with_spaces_and_unicode_works() -> None:
    cfg = ServeConfig(signing_key=SIGNING_KEY)
    async with in_process_gateway(cfg) as (url, _app), aiohttp.ClientSession() as session:
        key = "films/été 2026/a?b#c%d.mp4"
        signed = signed_url(url, SIGNING_KEY, key, 60)
        put_url = signed.split("?", 1)[0]
        async with session.put(aiohttp.client.URL(put_url, encoded=True), data=b"hello") as r:
            assert r.status == 201, await r.text()
        async with session.get(aiohttp.client.URL(signed, encoded=True)) as r:
            assert r.status == 200 and await r.read() == b"hello"


def test_signature_is_hmac_sha256_of_key_and_expiry() -> None:
    import hashlib
    import hmac

    want = hmac.new(b"k", b"a/b.mp4\n1700000000", hashlib.sha256).hexdigest()
    assert signature("k", "a/b.mp4", 1700000000) == want


# ------------------------------------------------------------------------------ real processes
def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


async def test_chunkgate_sign_prints_a_url_a_real_gateway_accepts(tmp_path: Path) -> None:
    with GatewayProcess(["--store", str(tmp_path / "data"), "--auth-token", TOKEN, "--signing-key", SIGNING_KEY],
                        cwd=REPO) as gw:
        async with aiohttp.ClientSession() as session:
            async with session.put(f"{gw.url}/objects/talks/keynote.webm", data=b"webm" * 100,
                                   headers=bearer(TOKEN)) as r:
                assert r.status == 201
            out = cli("sign", "talks/keynote.webm", "--expires-in", "10m", "--url", gw.url,
                      env={"CHUNKGATE_SIGNING_KEY": SIGNING_KEY})
            assert out.returncode == 0, out.stderr
            signed = out.stdout.strip()
            assert signed.startswith(f"{gw.url}/objects/talks/keynote.webm?expires=") and "\n" not in signed
            async with session.get(signed) as r:
                assert r.status == 200 and await r.read() == b"webm" * 100
            async with session.get(signed.split("?")[0]) as r:
                assert r.status == 403
            expired = cli("sign", "talks/keynote.webm", "--expires-in", "0s", "--url", gw.url,
                          "--signing-key", SIGNING_KEY).stdout.strip()
            time.sleep(1.1)
            async with session.get(expired) as r:
                assert r.status == 403 and (await r.json())["error"] == "signature_expired"
            wrong = cli("sign", "talks/keynote.webm", "--url", gw.url, "--signing-key", "not-the-key").stdout.strip()
            async with session.get(wrong) as r:
                assert r.status == 403 and (await r.json())["error"] == "bad_signature"


@pytest.mark.parametrize("args,complaint", [
    (["sign", "a.mp4"], "--signing-key"),
    (["sign", "../a.mp4", "--signing-key", "k"], "KEY"),
    (["sign", "a.mp4", "--signing-key", "k", "--expires-in", "soon"], "--expires-in"),
])
def test_chunkgate_sign_complains_in_one_line(args: list[str], complaint: str) -> None:
    out = cli(*args, env={"CHUNKGATE_SIGNING_KEY": ""})
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and complaint in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("args,env", [
    (["--host", "0.0.0.0"], {}),
    (["--host", "192.0.2.10"], {}),
    (["--host", "::"], {}),
    ([], {"CHUNKGATE_HOST": "0.0.0.0"}),
])
def test_serve_refuses_a_public_host_without_tokens(args: list[str], env: dict[str, str], tmp_path: Path) -> None:
    out = cli("serve", "--port", "0", "--store", str(tmp_path), *args, env=env)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "--host" in out.stderr and "--auth-token" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
