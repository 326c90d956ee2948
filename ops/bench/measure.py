"""Measuring tools shared by the scenarios: the HTTP/S3 clients that are timed, a peak-RSS
sampler, a /metrics reader, and the summary statistics and goal verdicts.

Clients are chosen so they are never the bottleneck and are the same for both sides wherever the
brief allows (curl for plain HTTP, urllib3 for latency probes, boto3 where boto3 *is* the peer).
This module must never assert on time: it measures, and verdicts are data in the result.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

import psutil
import urllib3
from prometheus_client.parser import text_string_to_metric_families

MiB = 1024 * 1024
_CURL_FORMAT = "%{http_code} %{size_download} %{time_total}\\n"


class BenchFailure(RuntimeError):
    """A measured request did not do what it must (wrong status, short body): the figure is void."""


# ------------------------------------------------------------------------------ HTTP with curl
def curl_get(url: str, *, output: str = "/dev/null", expect_bytes: int | None = None) -> float:
    """GET ``url`` with curl into ``output``; return seconds (curl's own time_total)."""
    done = subprocess.run(["curl", "-sS", "--fail", "-o", output, "-w", _CURL_FORMAT, url],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchFailure(f"curl GET {url} failed ({done.returncode}): {done.stderr.strip()}")
    status, size, seconds = done.stdout.split()
    if status not in ("200", "206"):
        raise BenchFailure(f"GET {url}: status {status}")
    if expect_bytes is not None and int(size) != expect_bytes:
        raise BenchFailure(f"GET {url}: {size} bytes, expected {expect_bytes}")
    return float(seconds)


def curl_put(url: str, path: Path) -> tuple[float, str]:
    """PUT the file at ``path`` to ``url`` (streamed, ``-T``); return (seconds, response body)."""
    body_file = path.parent / f".put-response-{threading.get_ident()}"
    done = subprocess.run(["curl", "-sS", "--fail-with-body", "-T", str(path), "-H", "Expect:",
                           "-H", "Content-Type: application/octet-stream", "-o", str(body_file),
                           "-w", _CURL_FORMAT, url], capture_output=True, text=True, check=False)
    body = body_file.read_text(errors="replace") if body_file.exists() else ""
    body_file.unlink(missing_ok=True)
    if done.returncode != 0:
        raise BenchFailure(f"curl PUT {url} failed ({done.returncode}): {done.stderr.strip()} {body[:300]}")
    return float(done.stdout.split()[2]), body


def curl_storm(url: str, readers: int, expect_bytes: int) -> float:
    """``readers`` concurrent GETs of ``url`` from one curl process (``--parallel``); return wall
    seconds from start to the last byte. Every transfer must be a 200 with the whole body."""
    cmd = ["curl", "-sS", "--parallel", "--parallel-immediate", "--parallel-max", str(readers),
           "-w", _CURL_FORMAT]
    for _ in range(readers):
        cmd += ["-o", "/dev/null", url]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    lines = done.stdout.split("\n")
    results = [line.split() for line in lines if line.strip()]
    bad = [r for r in results if r[0] != "200" or int(r[1]) != expect_bytes]
    if done.returncode != 0 or len(results) != readers or bad:
        raise BenchFailure(f"storm on {url}: rc={done.returncode}, {len(results)} transfers, bad={bad[:3]}, "
                           f"{done.stderr.strip()[:300]}")
    return seconds


# ------------------------------------------------------------------------------ S3 with boto3
class NullSink:
    """A write-only file object for ``download_fileobj`` that keeps nothing (counts bytes)."""

    def __init__(self) -> None:
        self.size = 0
        self._lock = threading.Lock()

    def write(self, data: bytes) -> int:
        with self._lock:
            self.size += len(data)
        return len(data)


def boto3_download(client: Any, bucket: str, key: str, *, sink: Any | None = None) -> tuple[float, int]:
    target = sink if sink is not None else NullSink()
    start = time.perf_counter()
    client.download_fileobj(bucket, key, target)
    seconds = time.perf_counter() - start
    return seconds, getattr(target, "size", -1)


def boto3_upload(client: Any, bucket: str, key: str, path: Path) -> float:
    with open(path, "rb") as body:
        start = time.perf_counter()
        client.upload_fileobj(body, bucket, key)
        return time.perf_counter() - start


# ------------------------------------------------------------------------------ checks
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(4 * MiB), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_url(pool: urllib3.PoolManager, url: str) -> tuple[str, int]:
    """Stream a GET into SHA-256 (untimed verification); return (hex digest, bytes)."""
    response = pool.request("GET", url, preload_content=False)
    if response.status != 200:
        raise BenchFailure(f"GET {url}: status {response.status}")
    digest, size = hashlib.sha256(), 0
    for block in response.stream(4 * MiB):
        digest.update(block)
        size += len(block)
    response.release_conn()
    return digest.hexdigest(), size


def metric_value(pool: urllib3.PoolManager, base_url: str, name: str) -> float:
    """Sum of every sample named ``name`` (all label sets) on ``base_url``/metrics."""
    text = pool.request("GET", base_url + "/metrics").data.decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total


class RssSampler:
    """Peak resident memory of a process, sampled every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self._proc = psutil.Process(pid)
        self._interval = interval
        self._stop = threading.Event()
        self.baseline = self._proc.memory_info().rss
        self.peak = self.baseline
        self.series: list[tuple[float, int]] = []
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self._proc.memory_info().rss
            self.peak = max(self.peak, rss)
            self.series.append((time.perf_counter() - self._t0, rss))
            self._stop.wait(self._interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


# ------------------------------------------------------------------------------ CPU per byte
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds a process has used so far (all its threads), from
    ``/proc/PID/stat`` fields 14 and 15; ``None``: this process. Read before and after a timed
    transfer, the difference is steadier than MiB/s on a shared machine."""
    with open(f"/proc/{pid or 'self'}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # fields 14, 15 counted after "pid (comm)"


class CpuMeter:
    """CPU seconds of one process over a ``with`` block, as CPU-seconds per GiB moved."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid
        self.seconds = 0.0

    def __enter__(self) -> Self:
        self._start = cpu_seconds(self.pid)
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = cpu_seconds(self.pid) - self._start

    def per_gib(self, nbytes: int) -> float:
        return self.seconds / (nbytes / GiB_BYTES)


GiB_BYTES = 1024 ** 3


# ------------------------------------------------------------------------------ statistics
def sha256_floor(mib: int = 256) -> float:
    """CPU-seconds per GiB that hashlib's SHA-256 takes in this process now: the floor API.md
    sets for every uploaded byte, and a yardstick of how fast this shared machine is during the
    run (it drifts by 15% and more between runs here, and every CPU-s/GiB figure with it)."""
    data = os.urandom(8 * 1024 * 1024)
    started = time.process_time()
    for _ in range(mib // 8):
        hashlib.sha256(data).digest()
    return round((time.process_time() - started) * 1024 / mib, 3)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def mib_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / MiB / seconds if seconds > 0 else float("inf")


@dataclass
class Series:
    """Repeated measurements of one thing (MiB/s or ms), one value per run."""

    unit: str
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {"unit": self.unit, "runs": [round(v, 3) for v in self.values], "median": round(self.median, 3),
                "min": round(min(self.values), 3) if self.values else None,
                "max": round(max(self.values), 3) if self.values else None}


@dataclass
class Comparison:
    """chunkgate vs one peer on one metric, with the goal from the issue.

    ``higher_is_better`` decides the ratio's direction: throughput ratios are chunkgate / peer
    (goal ``>=``), latency ratios are chunkgate / peer too but the goal is ``<=``."""

    name: str
    metric: str
    chunkgate: float
    peer: float
    peer_name: str
    goal: float | None  # None: informational, no goal in the issue
    higher_is_better: bool = True
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.chunkgate / self.peer if self.peer else float("inf")

    @property
    def met(self) -> bool | None:
        if self.goal is None:
            return None
        return self.ratio >= self.goal if self.higher_is_better else self.ratio <= self.goal

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        goal_text = "" if self.goal is None else f"{'>=' if self.higher_is_better else '<='} {self.goal}x"
        doc.update(ratio=round(self.ratio, 3), goal_text=goal_text, met=self.met,
                   chunkgate=round(self.chunkgate, 3), peer=round(self.peer, 3))
        return doc


def alternate(reps: int, peer: Callable[[int], None], ours: Callable[[int], None]) -> None:
    """Run ``reps`` rounds of both, swapping who goes first each round, so drift and warm-up
    of the shared store do not favour either side."""
    for rep in range(reps):
        order = (peer, ours) if rep % 2 == 0 else (ours, peer)
        for run in order:
            run(rep)
