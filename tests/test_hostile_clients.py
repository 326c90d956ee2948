"""What a hostile (or merely odd) client can do to a real ``chunkgate serve``, and must not.

Each case is something anyone can send: a bearer token that is not UTF-8 (must be a 4xx, not a
500 that feeds the 5xx alert), an empty Authorization header on a signed URL (the signature
decides), an ``after`` longer than any key (400), made-up HTTP methods (one metrics label, not
one per method), and anonymous tus HEADs (with tokens configured they would read an upload's
metadata and stop its live PATCH). Raw sockets send what aiohttp's client refuses to.

The gateway runs with aiohttp's C parser and with its pure-Python one (AIOHTTP_NO_EXTENSIONS=1),
which accepts more.
"""

from __future__ import annotations

import base64
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from gateway.auth import signed_url
from tests.support.gateway import GatewayProcess

pytestmark = pytest.mark.timeout(120)

TOKEN = "s3cret-token"
SIGNING_KEY = "signing-key-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TUS = {"Tus-Resumable": "1.0.0"}
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", params=["c-parser", "python-parser"])
def gateway(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    env = {"PYTHONPATH": str(REPO)}
    if request.param == "python-parser":
        env["AIOHTTP_NO_EXTENSIONS"] = "1"
    store = tmp_path_factory.mktemp("hostile-store")
    gw = GatewayProcess(["--store", str(store), "--auth-token", TOKEN, "--signing-key", SIGNING_KEY,
                         "--chunk-size", "64KiB", "--log-level", "warning"], env=env)
    try:
        yield gw
    finally:
        gw.stop()


class Raw:
    """One HTTP/1.1 exchange over a plain socket: the bytes go out exactly as given."""

    def __init__(self, gw: GatewayProcess) -> None:
        self.sock = socket.create_connection(("127.0.0.1", gw.port), timeout=30)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        buf = b""
        while b"\r\n\r\n" not in buf:
            more = self.sock.recv(65536)
            if not more:
                raise AssertionError(f"connection closed before a response: {buf!r}")
            buf += more
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            more = self.sock.recv(65536)
            if not more:
                break
            body += more
        return status, headers, body[:length]

    def close(self) -> None:
        self.sock.close()


def exchange(gw: GatewayProcess, request: bytes) -> tuple[int, dict[str, str], bytes]:
    raw = Raw(gw)
    try:
        raw.send(request)
        return raw.response()
    finally:
        raw.close()


def http_statuses(gw: GatewayProcess) -> dict[tuple[str, str], float]:
    """(method, status) -> requests answered, from /metrics."""
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(requests.get(gw.url + "/metrics", timeout=10).text):
        if family.name == "chunkgate_http_requests":
            for s in family.samples:
                if s.name.endswith("_total"):
                    k = (s.labels["method"], s.labels["status"])
                    out[k] = out.get(k, 0) + s.value
    return out


def assert_json_error(status: int, headers: dict[str, str], body: bytes, allowed: tuple[int, ...]) -> str:
    import json

    assert status in allowed, (status, body)
    assert headers["content-type"].startswith("application/json"), headers
    doc = json.loads(body)
    assert doc["error"] and doc["message"]
    return doc["error"]


# ------------------------------------------------------------------ a bearer token that is not UTF-8
@pytest.mark.parametrize("token", [b"\xff\xfe\xfd", b"caf\xe9", b"\xed\xa0\x80", TOKEN.encode() + b"\x80"])
def test_non_utf8_bearer_token_is_refused_with_json_not_a_500(gateway: GatewayProcess, token: bytes) -> None:
    before = http_statuses(gateway)
    status, headers, body = exchange(gateway, b"PUT /objects/hostile/a.bin HTTP/1.1\r\nHost: x\r\n"
                                     b"Authorization: Bearer " + token + b"\r\nContent-Length: 3\r\n"
                                     b"Connection: close\r\n\r\nabc")
    assert_json_error(status, headers, body, (400, 401, 403))
    assert requests.get(gateway.url + "/objects/hostile/a.bin", headers=AUTH, timeout=10).status_code == 404
    after = http_statuses(gateway)
    new_5xx = {k: v - before.get(k, 0) for k, v in after.items() if k[1].startswith("5") and v != before.get(k, 0)}
    assert new_5xx == {}, new_5xx


# ------------------------------------------------------------------ an empty Authorization on a signed URL
def test_signed_get_with_an_empty_authorization_header_is_judged_by_its_signature(gateway: GatewayProcess) -> None:
    data = os.urandom(1000)
    assert requests.put(gateway.url + "/objects/hostile/signed.bin", data=data, headers=AUTH, timeout=10).status_code == 201
    url = signed_url(gateway.url, SIGNING_KEY, "hostile/signed.bin", 600)
    target = url[len(gateway.url):].encode()
    for header in (b"Authorization:\r\n", b"Authorization: \r\n", b"Authorization:   \r\n"):
        status, _, body = exchange(gateway, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n" + header +
                                   b"Connection: close\r\n\r\n")
        assert status == 200 and body == data, (header, status, body[:200])
    # The signature is still what decides: a wrong one with an empty header is a 403.
    bad = target[:-4] + (b"0000" if not target.endswith(b"0000") else b"1111")
    status, headers, body = exchange(gateway, b"GET " + bad + b" HTTP/1.1\r\nHost: x\r\nAuthorization: \r\n"
                                     b"Connection: close\r\n\r\n")
    assert assert_json_error(status, headers, body, (403,)) == "bad_signature"


# ------------------------------------------------------------------ listing `after` longer than any key
def test_listing_after_longer_than_a_key_can_be_is_400(gateway: GatewayProcess) -> None:
    r = requests.get(gateway.url + "/objects", params={"after": "a" * 1024}, headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    for after in ("a" * 1025, "é" * 513, "x" * 6000):
        r = requests.get(gateway.url + "/objects", params={"after": after}, headers=AUTH, timeout=10)
        assert r.status_code == 400, (len(after), r.status_code, r.text[:200])
        assert r.json()["error"] == "bad_after"


# ------------------------------------------------------------------ made-up methods and metrics labels
def test_made_up_methods_share_one_metrics_label(gateway: GatewayProcess) -> None:
    methods = [f"FOO{n}" for n in range(8)] + ["PROPFIND", "BREW"]
    for method in methods:
        # Refused by the parser (400) or by the router (405): either way never a label of its own.
        status, _, _ = exchange(gateway, method.encode() + b" /objects/hostile/x HTTP/1.1\r\nHost: x\r\n"
                                b"Connection: close\r\n\r\n")
        assert 400 <= status < 500, (method, status)
    labels = {m for m, _ in http_statuses(gateway)}
    assert not labels & set(methods), labels
    assert labels <= {"GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS", "other"}, labels


# ------------------------------------------------------------------ anonymous tus HEAD
def _create_upload(gw: GatewayProcess, length: int) -> str:
    meta = "key " + base64.b64encode(b"hostile/tus.bin").decode()
    r = requests.post(gw.url + "/uploads/", headers={**TUS, **AUTH, "Upload-Length": str(length),
                                                     "Upload-Metadata": meta}, timeout=10)
    assert r.status_code == 201, r.text
    return r.headers["Location"]


def test_tus_head_needs_a_token_and_cannot_stall_a_live_patch(gateway: GatewayProcess) -> None:
    length = 200_000
    data = os.urandom(length)
    location = _create_upload(gateway, length)
    path = location[location.index("/uploads/"):]

    # Without a token: 401, with a wrong one: 403, JSON and Tus-Resumable either way, no metadata.
    for headers, expected in (({}, 401), ({"Authorization": "Bearer wrong"}, 403)):
        r = requests.head(location, headers={**TUS, **headers}, timeout=10)
        assert r.status_code == expected and r.headers["Tus-Resumable"] == "1.0.0"
        assert "Upload-Metadata" not in r.headers and "Upload-Offset" not in r.headers

    # A live, authorised PATCH, its body half sent; anonymous HEADs meanwhile change nothing.
    patch = Raw(gateway)
    try:
        patch.send(f"PATCH {path} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\nAuthorization: Bearer {TOKEN}\r\n"
                   f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
                   f"Content-Length: {length}\r\nConnection: close\r\n\r\n".encode() + data[:length // 2])
        time.sleep(0.3)
        for _ in range(3):
            r = requests.head(location, headers=TUS, timeout=10)
            assert r.status_code == 401
        patch.send(data[length // 2:])
        status, headers, _ = patch.response()
    finally:
        patch.close()
    assert status == 204 and int(headers["upload-offset"]) == length, (status, headers)
    got = requests.get(gateway.url + "/objects/hostile/tus.bin", headers=AUTH, timeout=10)
    assert got.status_code == 200 and got.content == data

    # The token holder still may ask (that is how a client resumes after a dead connection).
    r = requests.head(location, headers={**TUS, **AUTH}, timeout=10)
    assert r.status_code == 200 and r.headers["Upload-Offset"] == str(length)
