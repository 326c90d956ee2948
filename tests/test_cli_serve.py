"""`chunkgate serve` as a user runs it: the ready line, config errors, graceful shutdown."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.gateway import GatewayProcess

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def test_serve_with_no_store_flag_uses_chunkgate_data_in_the_working_directory(tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(ROOT)}
    with GatewayProcess([], cwd=tmp_path, env=env) as gw:
        assert gw.url.startswith("http://127.0.0.1:") and gw.port != 8080
        req = urllib.request.Request(f"{gw.url}/objects/hello.txt", data=b"hi", method="PUT")
        assert urllib.request.urlopen(req).status == 201
        assert urllib.request.urlopen(f"{gw.url}/objects/hello.txt").read() == b"hi"
    assert (tmp_path / "chunkgate-data").is_dir()
    assert "fs:" in gw.store_name or "chunkgate-data" in gw.store_name


@pytest.mark.parametrize(
    "args,env,flag",
    [
        (["--chunk-size", "huge"], {}, "--chunk-size"),
        (["--host", "0.0.0.0"], {}, "--host"),
        ([], {"CHUNKGATE_LOCK_TIMEOUT": "soon"}, "--lock-timeout"),
        (["--store", "ftp://nope"], {}, "--store"),
        (["--active-content", "trusted"], {}, "--active-content"),
        ([], {"CHUNKGATE_ACTIVE_CONTENT": "Sandbox"}, "--active-content"),
    ],
    ids=["bad-size", "public-host-without-tokens", "bad-env-var", "unknown-store-scheme", "bad-active-content",
         "bad-active-content-env"],
)
def test_bad_configuration_exits_2_with_one_line_naming_the_setting(tmp_path: Path, args, env, flag) -> None:
    result = run_cli("serve", "--port", "0", *args, env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_sigterm_lets_an_in_flight_upload_finish_then_exits_0(tmp_path: Path) -> None:
    with GatewayProcess(["--store", str(tmp_path / "data"), "--chunk-size", "64KiB"]) as gw:
        host, port = "127.0.0.1", gw.port
        payload = os.urandom(256 * 1024)
        sock = socket.create_connection((host, port))
        sock.sendall(f"PUT /objects/slow HTTP/1.1\r\nHost: x\r\nContent-Length: {len(payload)}\r\n\r\n".encode())
        sock.sendall(payload[:100_000])
        time.sleep(0.3)
        gw.proc.terminate()  # SIGTERM while the body is half sent
        time.sleep(0.3)
        sock.sendall(payload[100_000:])
        response = sock.recv(65536)
        sock.close()
        assert response.startswith(b"HTTP/1.1 201"), response[:200]
        assert gw.proc.wait(timeout=30) == 0
    with GatewayProcess(["--store", str(tmp_path / "data"), "--chunk-size", "64KiB"]) as gw2:
        assert urllib.request.urlopen(f"{gw2.url}/objects/slow").read() == payload


def test_sign_prints_a_url_and_refuses_without_a_key() -> None:
    ok = run_cli("sign", "videos/a.mp4", "--expires-in", "10m", env={"CHUNKGATE_SIGNING_KEY": "k"})
    assert ok.returncode == 0 and "/objects/videos/a.mp4?expires=" in ok.stdout and "signature=" in ok.stdout
    bad = run_cli("sign", "videos/a.mp4", env={"CHUNKGATE_SIGNING_KEY": ""})
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_unknown_command_is_one_line_and_exit_2() -> None:
    result = run_cli("frobnicate")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
