"""A real Prometheus scrapes a real ``chunkgate serve``: every dashboard panel and alert rule works.

What this module is for: the end-to-end proof of the observability contract (issue 6). A
``chunkgate serve`` process (fs store in tmp) takes a short mixed load (PUTs, GETs, range GETs, a
404, a 412, a tus upload, writers queueing for one key's lock); a Prometheus server (Debian's
``prometheus``) scrapes it every second under job "chunkgate" with ops/prometheus/alerts.yml
loaded. Then every expression of every panel of ops/grafana/chunkgate.json, with Grafana's
variables substituted the way Grafana would for this one instance, must return at least one
series through ``/api/v1/query``; every alert rule must evaluate healthy and none may fire; and
ops/plot_metrics.py must draw a valid PNG from the same Prometheus.

What it must never do: listen anywhere but 127.0.0.1 on free ports, leave either process
running, or assert on timings (it waits for conditions, with deadlines).
Set CHUNKGATE_KEEP_PLOT=<path> to keep the PNG (that is how ops/grafana/metrics-example.png is made).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.dashboard import REPO_ROOT, ALERTS_PATH, iter_panel_queries, instance_regex, load_alert_rules
from tests.support.gateway import GatewayProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PLOT_SCRIPT = REPO_ROOT / "ops" / "plot_metrics.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHUNK = 64 * 1024


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_prometheus() -> None:
    if os.path.exists(PROMETHEUS) and os.access(PROMETHEUS, os.X_OK):
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"the prometheus binary is missing ({PROMETHEUS}); CI must install Debian's prometheus")
    pytest.skip("prometheus is not installed (Debian package prometheus)")


class PrometheusProcess:
    """A throwaway Prometheus: 1 s scrapes of one chunkgate target, the alert rules loaded."""

    def __init__(self, tmp: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": [str(ALERTS_PATH)],
            "scrape_configs": [{"job_name": "chunkgate", "metrics_path": "/metrics",
                                "static_configs": [{"targets": [target]}]}],
        }
        config_path = tmp / "prometheus.yml"
        config_path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
        self.log_path = tmp / "prometheus.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config_path}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=str(tmp),
        )

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                async with session.get(self.url + "/-/ready") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        pytest.fail(f"prometheus was not ready in {timeout}s:\n{self.log_tail()}")

    async def wait_scraped(self, session: aiohttp.ClientSession, timeout: float = 60.0) -> None:
        """Until the target has been scraped: load sent before the first scrape would be invisible
        to rate(), and Prometheus spreads its first scrape over the interval after start."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = await self.api(session, "/api/v1/query", query='up{job="chunkgate"} == 1')
            if data["result"]:
                return
            await asyncio.sleep(0.2)
        pytest.fail(f"prometheus did not scrape the gateway in {timeout}s:\n{self.log_tail()}")

    async def api(self, session: aiohttp.ClientSession, path: str, **params: str) -> Any:
        async with session.get(self.url + path, params=params) as r:
            body = await r.json()
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(["--store", str(tmp_path / "store"), "--chunk-size", str(CHUNK),
                         "--cache-size", str(8 * CHUNK)], cwd=REPO_ROOT)
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture
def prometheus(tmp_path: Path, gateway: GatewayProcess) -> Iterator[PrometheusProcess]:
    require_prometheus()
    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()
    prom = PrometheusProcess(prom_dir, f"127.0.0.1:{gateway.port}")
    try:
        yield prom
    finally:
        prom.stop()


async def drive_load(session: aiohttp.ClientSession, base: str, seconds: float) -> dict[str, int]:
    """Mixed traffic for about ``seconds``; returns the statuses seen, so the test knows it happened."""
    seen: dict[str, int] = {}

    def saw(what: str, status: int, expected: int) -> None:
        assert status == expected, f"{what}: {status}, expected {expected}"
        seen[what] = seen.get(what, 0) + 1

    body = os.urandom(5 * CHUNK + 123)
    deadline = time.monotonic() + seconds
    round_ = 0
    while round_ < 2 or time.monotonic() < deadline:
        round_ += 1
        key = f"load/clip-{round_ % 6}.mp4"
        async with session.put(f"{base}/objects/{key}", data=body) as r:
            saw("put", r.status, 201)
            etag = r.headers["ETag"]
        async with session.get(f"{base}/objects/{key}") as r:
            saw("get", r.status, 200)
            assert await r.read() == body
        async with session.get(f"{base}/objects/{key}", headers={"Range": f"bytes={CHUNK - 10}-{2 * CHUNK + 10}"}) as r:
            saw("range", r.status, 206)
            assert await r.read() == body[CHUNK - 10:2 * CHUNK + 11]
        async with session.get(f"{base}/objects/{key}", headers={"If-None-Match": etag}) as r:
            saw("not_modified", r.status, 304)
        async with session.get(f"{base}/objects/load/missing-{round_}") as r:
            saw("missing", r.status, 404)
        async with session.put(f"{base}/objects/{key}", data=b"x", headers={"If-Match": '"not-the-etag"'}) as r:
            saw("precondition", r.status, 412)
        if round_ % 3 == 1:
            await tus_upload(session, base, f"load/upload-{round_}.webm", body[: 3 * CHUNK + 7])
            seen["tus"] = seen.get("tus", 0) + 1
        if round_ % 3 == 2:
            # Writers of one key queue for its lock at commit time.
            statuses = await asyncio.gather(*(_put_status(session, f"{base}/objects/load/hot", body[:CHUNK])
                                              for _ in range(12)))
            assert set(statuses) == {201}, statuses
            seen["contended"] = seen.get("contended", 0) + 1
        await asyncio.sleep(0.1)
    return seen


async def _put_status(session: aiohttp.ClientSession, url: str, data: bytes) -> int:
    async with session.put(url, data=data) as r:
        return r.status


async def tus_upload(session: aiohttp.ClientSession, base: str, key: str, data: bytes) -> None:
    tus = {"Tus-Resumable": "1.0.0"}
    meta = "key " + base64.b64encode(key.encode()).decode()
    async with session.post(f"{base}/uploads/", headers={**tus, "Upload-Length": str(len(data)), "Upload-Metadata": meta}) as r:
        assert r.status == 201, await r.text()
        location = r.headers["Location"]
    url = location if location.startswith("http") else base + location
    half = len(data) // 2
    for offset, piece in ((0, data[:half]), (half, data[half:])):
        async with session.patch(url, data=piece, headers={**tus, "Upload-Offset": str(offset),
                                                          "Content-Type": "application/offset+octet-stream"}) as r:
            assert r.status == 204, await r.text()
    async with session.get(f"{base}/objects/{key}") as r:
        assert r.status == 200 and await r.read() == data


async def empty_panels(prom: PrometheusProcess, session: aiohttp.ClientSession, instance: str) -> dict[str, str]:
    """Panel queries that return no series now: {"title [refId]": expr}."""
    empty: dict[str, str] = {}
    for q in iter_panel_queries(instance=instance):
        data = await prom.api(session, "/api/v1/query", query=q.expr)
        if not data["result"]:
            empty[f"{q.panel_title} [{q.ref_id}]"] = q.expr
    return empty


async def instant_value(prom: PrometheusProcess, session: aiohttp.ClientSession, expr: str) -> float:
    data = await prom.api(session, "/api/v1/query", query=expr)
    assert data["result"], f"no series for {expr}"
    return float(data["result"][0]["value"][1])


async def test_every_dashboard_panel_and_alert_rule_works_on_a_real_prometheus(
    gateway: GatewayProcess, prometheus: PrometheusProcess, tmp_path: Path
) -> None:
    target = f"127.0.0.1:{gateway.port}"
    instance = instance_regex(target)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        await prometheus.wait_ready(session)
        await prometheus.wait_scraped(session)
        seen = await drive_load(session, gateway.url, seconds=5.0)
        assert {"put", "get", "range", "missing", "precondition", "tus", "contended"} <= set(seen)

        # A few more scrapes after the load: every rate() needs two samples of each new series.
        deadline = time.monotonic() + 45
        empty = await empty_panels(prometheus, session, instance)
        while empty and time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            empty = await empty_panels(prometheus, session, instance)
        assert not empty, "dashboard panels without a series:\n" + "\n".join(f"{k}: {v}" for k, v in empty.items())

        # The numbers say what happened, not just that series exist. (Raw counters: increase()
        # cannot see a series' first increments, Prometheus does not assume it started at 0.)
        sel = f'{{instance=~"{instance}"}}'
        assert await instant_value(prometheus, session, f'sum(up{{job="chunkgate", instance=~"{instance}"}})') == 1
        for expr in (
            f'sum(chunkgate_http_requests_total{{instance=~"{instance}", status="404"}})',
            f'sum(chunkgate_http_requests_total{{instance=~"{instance}", status="412"}})',
            f'sum(chunkgate_http_requests_total{{instance=~"{instance}", status="206"}})',
            f"sum(chunkgate_backend_bytes_read_total{sel})",
            f"sum(chunkgate_cache_hits_total{sel})",
            f"sum(chunkgate_lock_acquisitions_total{sel})",
            f"sum(chunkgate_uploads_completed_total{sel})",
            f"sum(chunkgate_upload_bytes_total{sel})",
        ):
            assert await instant_value(prometheus, session, expr) > 0, expr
        assert await instant_value(prometheus, session, f"sum(chunkgate_http_requests_in_flight{sel})") >= 0

        # Every alert rule loaded, evaluated and healthy; a healthy gateway pages nobody.
        wanted = {rule["alert"] for rule in load_alert_rules()}
        deadline = time.monotonic() + 30
        while True:
            data = await prometheus.api(session, "/api/v1/rules")
            rules = {r["name"]: r for g in data["groups"] for r in g["rules"] if r["type"] == "alerting"}
            unhealthy = {n: (r.get("health"), r.get("lastError")) for n, r in rules.items() if r.get("health") != "ok"}
            if set(rules) == wanted and not unhealthy or time.monotonic() > deadline:
                break
            await asyncio.sleep(1.0)
        assert set(rules) == wanted
        assert not unhealthy, unhealthy
        firing = {n: r["state"] for n, r in rules.items() if r["state"] == "firing"}
        assert not firing, firing

        # The plot script draws the same data into a PNG.
        png = tmp_path / "metrics.png"
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, str(PLOT_SCRIPT), "--prometheus", prometheus.url, "--minutes", "2", "--step", "1",
             "--rate-window", "10s", "--instance", re.escape(target), "-o", str(png)],
            capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stderr
        data = png.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
        assert "no data" not in result.stderr, result.stderr  # each of the six panels drew a line
        keep = os.environ.get("CHUNKGATE_KEEP_PLOT")
        if keep:
            shutil.copyfile(png, keep)
