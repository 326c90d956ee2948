"""Run a real ``chunkgate serve`` process for tests, the way users run it.

``GatewayProcess`` starts the console command with ``--port 0``, waits for the ready line
(``chunkgate listening on http://HOST:PORT (store: ...)``), exposes ``.url``, and stops it with
SIGTERM (or SIGKILL on request). Also ``in_process_gateway`` for fast tests that need no process.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import AsyncIterator, Iterator, Sequence

READY = re.compile(r"chunkgate listening on (http://\S+) \(store: (.*)\)")


class GatewayProcess:
    def __init__(self, args: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | Path | None = None,
                 ready_timeout: float = 30.0) -> None:
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        cmd = [sys.executable, "-m", "gateway.cli", "serve", "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                                     cwd=str(cwd) if cwd else None)
        self.stderr_lines: list[str] = []
        self._stderr_thread = threading.Thread(target=self._drain_stderr, daemon=True)
        self._stderr_thread.start()
        self.url = ""
        self.store_name = ""
        deadline = time.monotonic() + ready_timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            m = READY.search(line)
            if m:
                self.url, self.store_name = m.group(1), m.group(2)
                break
        if not self.url:
            self.stop(kill=True)
            raise RuntimeError("chunkgate serve did not become ready:\n" + "".join(self.stderr_lines[-40:]))
        threading.Thread(target=self._drain_stdout, daemon=True).start()

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def _drain_stdout(self) -> None:
        assert self.proc.stdout is not None
        for _ in self.proc.stdout:
            pass

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self, *, kill: bool = False, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "GatewayProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def gateway_process(args: Sequence[str], **kw: object) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(args, **kw)  # type: ignore[arg-type]
    try:
        yield gw
    finally:
        gw.stop()


@contextlib.asynccontextmanager
async def in_process_gateway(cfg: object = None, *, backend: object = None, faults: object = None) -> AsyncIterator[tuple[str, object]]:
    """An app on a free loopback port in this event loop: yields (base_url, app)."""
    from aiohttp import web

    from gateway.app import build_app
    from gateway.config import ServeConfig
    from storage.backends.memory import MemoryBackend

    app = build_app(cfg or ServeConfig(), backend=backend if backend is not None else MemoryBackend(), faults=faults)  # type: ignore[arg-type]
    runner = web.AppRunner(app, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        await runner.cleanup()
