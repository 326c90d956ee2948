"""The seven benchmark scenarios of issue 8. Each one prepares its objects (untimed), runs
chunkgate and its peer alternately ``reps`` times, checks every transfer for size (and, where the
brief asks, SHA-256), and returns a JSON-ready dict; goals become ``Comparison``/``Target`` records.

A scenario must never compare figures from different runs, never count a transfer that failed
its byte check, and never read a chunkgate object it expects to be cold twice.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import mmap
import random
import re
import signal
import socket
import statistics
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import urllib3

from ops.bench import procs
from ops.bench.measure import (
    BenchFailure,
    Comparison,
    CpuMeter,
    MiB,
    RssSampler,
    Series,
    alternate,
    boto3_download,
    boto3_upload,
    curl_get,
    curl_put,
    curl_storm,
    metric_value,
    mib_per_s,
    percentile,
    sha256_file,
    sha256_url,
)

KiB = 1024
GiB = 1024 * MiB
BYTES_READ = "chunkgate_backend_bytes_read_total"
CACHE_HITS = "chunkgate_cache_hits_total"
CACHE_MISSES = "chunkgate_cache_misses_total"
STORE_REQUESTS = "chunkgate_backend_requests_total"


@dataclass
class BenchConfig:
    """Sizes and repetitions; ``quick()`` shrinks everything for a smoke run."""

    scenarios: list[str]
    reps: int = 3
    cold_size: int = 256 * MiB
    warm_size: int = 128 * MiB
    storm_size: int = 64 * MiB
    readers: int = 32
    seek_size: int = 256 * MiB
    seeks: int = 200
    seek_bytes: int = 64 * KiB
    block_bytes: int = 1 * MiB  # the manifest's verified block (storage.manifest)
    store_probes: int = 100
    put_sizes: list[int] = field(default_factory=lambda: [256 * MiB])
    tus_size: int = 512 * MiB
    tus_chunk: int = 32 * MiB
    tus_long_size: int = 2 * GiB  # one upload, PATCH by PATCH (the tuslong scenario)
    lock_ops: int = 200_000
    lock_waiters: int = 1000
    pressure_readers: int = 40  # concurrent readers of distinct objects, working set > cache
    pressure_size: int = 16 * MiB
    multirange_repeats: int = 8
    abandoned_gets: int = 8
    list_keys: int = 1000
    block_sizes: list[int] = field(default_factory=lambda: [1 * MiB, 256 * KiB, 128 * KiB])
    chunk_size: int = 8 * MiB
    write_concurrency: int = 4
    cache_size: int = 256 * MiB
    seed: int = 8


@dataclass
class Target:
    """An absolute goal (no peer): a limit the value must stay within."""

    name: str
    metric: str
    value: float
    limit: float
    higher_is_better: bool
    note: str = ""

    @property
    def met(self) -> bool:
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.update(value=round(self.value, 4), met=self.met,
                   goal_text=f"{'>=' if self.higher_is_better else '<='} {self.limit:g}")
        return doc


@dataclass
class Context:
    """Everything a scenario needs: config, work dir, the store, the gateway, and the verdicts."""

    cfg: BenchConfig
    workdir: Path
    datadir: Path
    stack: ExitStack
    s3: Any = None
    raw_bucket: str = "bench-raw"
    gw_bucket: str = "bench-chunkgate"
    tus_bucket: str = "bench-tus"
    _store: procs.Proc | None = None
    _gateway: procs.Proc | None = None
    pool: urllib3.PoolManager = field(default_factory=lambda: urllib3.PoolManager(maxsize=8, timeout=120.0, retries=False))
    comparisons: list[Comparison] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)
    profile_dir: Path | None = None
    profiles: dict[str, Any] = field(default_factory=dict)
    cpu: dict[str, dict[str, Any]] = field(default_factory=dict)  # CPU-s/GiB per transfer kind
    _files: dict[int, Path] = field(default_factory=dict)

    @property
    def store(self) -> procs.Proc:
        if self._store is None:
            raise BenchFailure("this scenario needs the store, which was not started")
        return self._store

    @property
    def gateway(self) -> procs.Proc:
        if self._gateway is None:
            raise BenchFailure("this scenario needs the gateway, which was not started")
        return self._gateway

    # -- test data ---------------------------------------------------------------------------
    def data_file(self, size: int) -> Path:
        """A file of ``size`` random bytes (tmpfs), made once per size and shared by both sides."""
        if size not in self._files:
            path = self.datadir / f"data-{size}"
            rng = random.Random(self.cfg.seed + size)
            with open(path, "wb") as out:
                left = size
                while left:
                    step = min(left, 16 * MiB)
                    out.write(rng.randbytes(step))
                    left -= step
            self._files[size] = path
        return self._files[size]

    def sha(self, size: int) -> str:
        attr = f"_sha_{size}"
        if not hasattr(self, attr):
            setattr(self, attr, sha256_file(self.data_file(size)))
        return str(getattr(self, attr))

    # -- chunkgate ---------------------------------------------------------------------------
    def gw_url(self, key: str) -> str:
        return f"{self.gateway.url}/objects/{key}"

    def gw_put(self, key: str, size: int) -> dict[str, Any]:
        seconds, body = curl_put(self.gw_url(key), self.data_file(size))
        doc = json.loads(body)
        if doc.get("size") != size:
            raise BenchFailure(f"PUT {key}: the gateway committed {doc.get('size')} bytes, not {size}")
        doc["_seconds"] = seconds
        return doc

    def metric(self, name: str) -> float:
        return metric_value(self.pool, self.gateway.url, name)

    # -- the raw store -----------------------------------------------------------------------
    def raw_url(self, key: str) -> str:
        return f"{self.store.url}/{self.raw_bucket}/{key}"

    def raw_put(self, key: str, size: int) -> None:
        boto3_upload(self.s3, self.raw_bucket, key, self.data_file(size))

    @contextmanager
    def profiled(self, name: str) -> Iterator[None]:
        """With ``--profile``: py-spy records the gateway for the timed section only (never the
        untimed preparation), and the top frames go into the result under ``profiles``."""
        if self.profile_dir is None:
            yield
            return
        raw = self.profile_dir / f"profile-{name}.txt"
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(self.gateway.pid), "--rate", "200", "--nonblocking",
                                "--format", "raw", "-o", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # py-spy needs a moment to attach
        try:
            yield
        finally:
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(60)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
            if raw.exists():
                self.profiles[name] = profile_summary(raw)

    def check(self, name: str, ok: bool) -> None:
        """Record a byte check; one failure anywhere makes the named check false for the run."""
        self.checks[name] = self.checks.get(name, True) and bool(ok)


def profile_summary(raw: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count

    def share(count: int) -> float:
        return round(100.0 * count / total, 1) if total else 0.0

    return {"file": raw.name, "samples": total,
            "self_percent": [[f, share(c)] for f, c in own.most_common(top)],
            "inclusive_percent": [[f, share(c)] for f, c in inclusive.most_common(top)]}


def _key(prefix: str) -> str:
    return f"bench/{prefix}-{uuid.uuid4().hex[:10]}"


def _compare(ctx: Context, name: str, metric: str, ours: Series, peer: Series, peer_name: str, goal: float | None,
             *, higher_is_better: bool = True, note: str = "") -> None:
    ctx.comparisons.append(Comparison(name, metric, ours.median, peer.median, peer_name, goal, higher_is_better, note))


def _cpu(ctx: Context, name: str, ours: Series, limit: float | None, peers: dict[str, Series] | None = None) -> None:
    """Record the gateway's CPU-s/GiB for one kind of transfer (a Target when the issue sets a
    limit) beside each peer's own process CPU for the same bytes."""
    doc: dict[str, Any] = {"chunkgate": ours.to_json()}
    for peer_name, series in (peers or {}).items():
        doc[peer_name] = series.to_json()
    ctx.cpu[name] = doc
    if limit is not None:
        ctx.targets.append(Target(f"{name} gateway CPU", "CPU-s/GiB (median)", ours.median, limit, False,
                                  "utime+stime of the gateway process from /proc, per GiB moved"))


# ------------------------------------------------------------------------------ 1. cold GET
def cold_get(ctx: Context) -> dict[str, Any]:
    cfg, size = ctx.cfg, ctx.cfg.cold_size
    raw_key = _key("cold-raw")
    ctx.raw_put(raw_key, size)
    gw_keys = [_key(f"cold-{rep}") for rep in range(cfg.reps)]
    for key in gw_keys:
        ctx.gw_put(key, size)
    ours, boto, curl_direct = Series("MiB/s"), Series("MiB/s"), Series("MiB/s")
    ours_cpu, boto_cpu = Series("CPU-s/GiB"), Series("CPU-s/GiB")
    read_ratio: list[float] = []

    def peer(rep: int) -> None:
        with CpuMeter() as cpu:
            seconds, got = boto3_download(ctx.s3, ctx.raw_bucket, raw_key)
        boto_cpu.values.append(cpu.per_gib(size))
        ctx.check("cold_get_sizes", got == size)
        boto.values.append(mib_per_s(size, seconds))
        curl_direct.values.append(mib_per_s(size, curl_get(ctx.raw_url(raw_key), expect_bytes=size)))

    def mine(rep: int) -> None:
        before = ctx.metric(BYTES_READ)
        with CpuMeter(ctx.gateway.pid) as cpu:
            ours.values.append(mib_per_s(size, curl_get(ctx.gw_url(gw_keys[rep]), expect_bytes=size)))
        ours_cpu.values.append(cpu.per_gib(size))
        read_ratio.append((ctx.metric(BYTES_READ) - before) / size)

    with ctx.profiled("cold"):
        alternate(cfg.reps, peer, mine)
    _compare(ctx, "cold GET vs boto3", "MiB/s", ours, boto, "boto3 download_fileobj", 1.0)
    _compare(ctx, "cold GET vs curl from store", "MiB/s", ours, curl_direct, "curl straight from SeaweedFS", None)
    _cpu(ctx, "cold GET", ours_cpu, 1.5, {"boto3 download_fileobj client": boto_cpu})
    return {"size": size, "chunkgate_curl": ours.to_json(), "boto3_download_fileobj": boto.to_json(),
            "chunkgate_cpu_s_per_gib": ours_cpu.to_json(), "boto3_client_cpu_s_per_gib": boto_cpu.to_json(),
            "curl_from_store": curl_direct.to_json(), "store_bytes_per_object_byte": [round(r, 4) for r in read_ratio]}


# ------------------------------------------------------------------------------ 2. warm GET
def warm_get(ctx: Context) -> dict[str, Any]:
    cfg, size = ctx.cfg, ctx.cfg.warm_size
    if size > cfg.cache_size // 2:
        raise BenchFailure(f"--warm-size {size} does not fit comfortably in the {cfg.cache_size}-byte cache")
    key = _key("warm")
    ctx.gw_put(key, size)
    curl_get(ctx.gw_url(key), expect_bytes=size)  # fills the cache
    digest, got = sha256_url(ctx.pool, ctx.gw_url(key))
    ctx.check("warm_get_sha256", digest == ctx.sha(size) and got == size)
    mem = procs.start_memserver(ctx.workdir, data_file=ctx.data_file(size))
    ours, bare = Series("MiB/s"), Series("MiB/s")
    ours_cpu, bare_cpu = Series("CPU-s/GiB"), Series("CPU-s/GiB")
    misses_before = ctx.metric(CACHE_MISSES)

    # /proc counts CPU in 10 ms ticks, ~3 for one warm 128 MiB GET: each rep's CPU figure is
    # taken over enough GETs of the object to make a GiB.
    rounds = max(1, GiB // size)

    def timed(url: str, pid: int, speed: Series, cpu_series: Series) -> None:
        speed.values.append(mib_per_s(size, curl_get(url, expect_bytes=size)))
        with CpuMeter(pid) as cpu:
            for _ in range(rounds):
                curl_get(url, expect_bytes=size)
        cpu_series.values.append(cpu.per_gib(size * rounds))

    try:
        with ctx.profiled("warm"):
            alternate(cfg.reps, lambda rep: timed(mem.url + "/x", mem.pid, bare, bare_cpu),
                      lambda rep: timed(ctx.gw_url(key), ctx.gateway.pid, ours, ours_cpu))
    finally:
        mem.stop()
    misses = ctx.metric(CACHE_MISSES) - misses_before
    ctx.check("warm_get_all_cache_hits", misses == 0)
    _compare(ctx, "warm GET vs bare aiohttp", "MiB/s", ours, bare, "bare aiohttp handler from memory", 0.6)
    _cpu(ctx, "warm GET", ours_cpu, 0.25, {"bare aiohttp server process": bare_cpu})
    return {"size": size, "chunkgate_cache_hit": ours.to_json(), "bare_aiohttp": bare.to_json(),
            "cache_misses_during_timed_runs": misses}


# ------------------------------------------------------------------------------ 3. viewer storm
_UPSTREAM = re.compile(r"ub=([^;]*);")


def _nginx_upstream_bytes(log: Path, offset: int) -> tuple[int, int]:
    """Sum of $upstream_bytes_received logged after ``offset``; returns (bytes, new offset)."""
    with open(log, "rb") as handle:
        handle.seek(offset)
        text = handle.read().decode(errors="replace")
        end = handle.tell()
    total = 0
    for match in _UPSTREAM.finditer(text):
        total += sum(int(n) for n in re.findall(r"\d+", match.group(1)))
    return total, end


def viewer_storm(ctx: Context) -> dict[str, Any]:
    cfg, size, readers = ctx.cfg, ctx.cfg.storm_size, ctx.cfg.readers
    raw_keys = [_key(f"storm-raw-{rep}") for rep in range(cfg.reps)]
    gw_keys = [_key(f"storm-{rep}") for rep in range(cfg.reps)]
    for raw_key, gw_key in zip(raw_keys, gw_keys):
        ctx.raw_put(raw_key, size)
        ctx.gw_put(gw_key, size)
    nginx = procs.start_nginx(ctx.workdir, store_url=ctx.store.url)
    log: Path = nginx.extra["access_log"]
    ours_cold, ours_warm, ngx_cold, ngx_warm, direct = (Series("MiB/s") for _ in range(5))
    ours_bytes, ngx_bytes = Series("store bytes / object byte"), Series("store bytes / object byte")
    total = size * readers

    def peer(rep: int) -> None:
        url = f"{nginx.url}/{ctx.raw_bucket}/{raw_keys[rep]}"
        offset = log.stat().st_size if log.exists() else 0
        ngx_cold.values.append(mib_per_s(total, curl_storm(url, readers, size)))
        fetched, offset = _nginx_upstream_bytes(log, offset)
        ngx_bytes.values.append(fetched / size)
        ngx_warm.values.append(mib_per_s(total, curl_storm(url, readers, size)))
        direct.values.append(mib_per_s(total, curl_storm(ctx.raw_url(raw_keys[rep]), readers, size)))

    def mine(rep: int) -> None:
        before = ctx.metric(BYTES_READ)
        ours_cold.values.append(mib_per_s(total, curl_storm(ctx.gw_url(gw_keys[rep]), readers, size)))
        ours_bytes.values.append((ctx.metric(BYTES_READ) - before) / size)
        ours_warm.values.append(mib_per_s(total, curl_storm(ctx.gw_url(gw_keys[rep]), readers, size)))

    try:
        with ctx.profiled("storm"):
            alternate(cfg.reps, peer, mine)
    finally:
        nginx.stop()
    # The chunk data itself plus one manifest read per object: anything above ~1.0 is a
    # chunk fetched twice.
    worst = max(ours_bytes.values)
    ctx.targets.append(Target("viewer storm store reads", "store bytes / object byte (worst run)", worst, 1.005, False,
                              f"nginx: {max(ngx_bytes.values):.4f} (includes response headers); direct: {readers}.0"))
    _compare(ctx, "storm cold vs nginx cold", "aggregate MiB/s", ours_cold, ngx_cold, "nginx slice+cache, cold", 1.0)
    _compare(ctx, "storm warm vs nginx warm", "aggregate MiB/s", ours_warm, ngx_warm, "nginx slice+cache, warm", 0.7)
    _compare(ctx, "storm cold vs direct", "aggregate MiB/s", ours_cold, direct, "32 readers straight from SeaweedFS",
             None, note=f"direct reads the store {readers}x per object byte")
    return {"size": size, "readers": readers,
            "chunkgate_cold": ours_cold.to_json(), "chunkgate_warm": ours_warm.to_json(),
            "nginx_cold": ngx_cold.to_json(), "nginx_warm": ngx_warm.to_json(), "direct": direct.to_json(),
            "chunkgate_store_bytes_per_object_byte": ours_bytes.to_json(),
            "nginx_store_bytes_per_object_byte": ngx_bytes.to_json(),
            "direct_store_bytes_per_object_byte": float(readers)}


# ------------------------------------------------------------------------------ 4. seek probe
def _timed_range(pool: urllib3.PoolManager, url: str, start: int, length: int) -> tuple[float, bytes, int]:
    t0 = time.perf_counter()
    response = pool.request("GET", url, headers={"Range": f"bytes={start}-{start + length - 1}"})
    return (time.perf_counter() - t0) * 1000.0, response.data, response.status


def _latency(values: list[float]) -> dict[str, Any]:
    return {"unit": "ms", "n": len(values), "p50": round(percentile(values, 50), 3),
            "p99": round(percentile(values, 99), 3), "mean": round(sum(values) / len(values), 3)}


def _seek_ours(ctx: Context, data: mmap.mmap, key: str, cold_at: int, warm_at: int,
               cold_ms: list[float], warm_ms: list[float]) -> None:
    span = ctx.cfg.seek_bytes
    # A player seeks in an object it is already playing: its manifest is known (and cached for
    # a second); the chunk under the new position is what is cold.
    if ctx.pool.request("HEAD", ctx.gw_url(key)).status != 200:
        raise BenchFailure(f"HEAD {key} failed")
    for sink, offset in ((cold_ms, cold_at), (warm_ms, warm_at)):
        ms, body, status = _timed_range(ctx.pool, ctx.gw_url(key), offset, span)
        ctx.check("seek_bytes_exact", status == 206 and body == data[offset : offset + span])
        sink.append(ms)


def _seek_direct(ctx: Context, data: mmap.mmap, raw_key: str, offset: int) -> float:
    span = ctx.cfg.seek_bytes
    ms, body, status = _timed_range(ctx.pool, ctx.raw_url(raw_key), offset, span)
    ctx.check("seek_bytes_exact", status == 206 and body == data[offset : offset + span])
    return ms


def seek_probe(ctx: Context) -> dict[str, Any]:
    """Cold 64 KiB seeks: every probe lands in a chunk no earlier probe touched (fresh objects as
    needed), so each one pays whatever the gateway's cold path costs. Right after each cold probe
    a second one elsewhere in the same chunk shows what a viewer's next seek nearby costs (a
    cache hit if the first seek cached the chunk; the cache hit/miss counts say which). The object's manifest
    is warm (a HEAD just before), as it is for a player seeking in what it plays."""
    cfg, size, span, chunk = ctx.cfg, ctx.cfg.seek_size, ctx.cfg.seek_bytes, ctx.cfg.chunk_size
    per_object = size // chunk
    if per_object < 1 or span > chunk:
        raise BenchFailure(f"--seek-size {size} must hold at least one {chunk}-byte chunk larger than the range")
    raw_key = _key("seek-raw")
    ctx.raw_put(raw_key, size)
    gw_keys = [_key(f"seek-{n}") for n in range(-(-cfg.seeks // per_object))]
    for key in gw_keys:
        ctx.gw_put(key, size)
    rng = random.Random(cfg.seed)
    # (object, chunk) pairs in random order, each used once; offsets stay inside the chunk.
    slots = [(key, index) for key in gw_keys for index in range(per_object)]
    rng.shuffle(slots)
    probes = [(key, index * chunk + rng.randrange(0, chunk - span), index * chunk + rng.randrange(0, chunk - span))
              for key, index in slots[: cfg.seeks]]
    cold_ms: list[float] = []
    warm_ms: list[float] = []
    direct_ms: list[float] = []
    chunk_direct_ms: list[float] = []
    head_direct_ms: list[float] = []
    # The same bytes read straight from the chunk object the gateway reads them from, so this says
    # what the gateway itself adds: SeaweedFS answers a range that starts in an object's first
    # 8 MiB by fetching a whole filer chunk (ops.bench.cli WEED_ARGS), and every offset of an
    # 8 MiB chunk object is in its first 8 MiB. The "head" peer shows the direct client paying
    # the same: the same in-chunk offset, read from the first chunk-size bytes of the big object.
    versions = {key: json.loads(ctx.pool.request("GET", ctx.gw_url(key) + "?manifest").data)["version"] for key in gw_keys}

    def chunk_direct(key: str, offset: int) -> None:
        from storage import keys as store_keys

        ck = store_keys.chunk_key(key, versions[key], offset // chunk)
        ms, body, status = _timed_range(ctx.pool, f"{ctx.store.url}/{ctx.gw_bucket}/{ck}", offset % chunk, span)
        ctx.check("seek_bytes_exact", status == 206 and body == data[offset : offset + span])
        chunk_direct_ms.append(ms)
    hits0, misses0, read0 = ctx.metric(CACHE_HITS), ctx.metric(CACHE_MISSES), ctx.metric(BYTES_READ)
    with open(ctx.data_file(size), "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data, \
            ctx.profiled("seek"):
        for n, (key, cold_at, warm_at) in enumerate(probes):
            if n % 2 == 0:
                _seek_ours(ctx, data, key, cold_at, warm_at, cold_ms, warm_ms)
                direct_ms.append(_seek_direct(ctx, data, raw_key, cold_at))
                chunk_direct(key, warm_at)
            else:
                direct_ms.append(_seek_direct(ctx, data, raw_key, cold_at))
                _seek_ours(ctx, data, key, cold_at, warm_at, cold_ms, warm_ms)
                chunk_direct(key, warm_at)  # always after ours: it must not warm the store for us
            head_direct_ms.append(_seek_direct(ctx, data, raw_key, cold_at % chunk))
    hits, misses = ctx.metric(CACHE_HITS) - hits0, ctx.metric(CACHE_MISSES) - misses0
    read = ctx.metric(BYTES_READ) - read0
    for q in (50, 99):
        ctx.comparisons.append(Comparison(f"seek p{q} cold vs direct ranged GET", f"p{q} ms", percentile(cold_ms, q),
                                          percentile(direct_ms, q), "ranged GET straight from SeaweedFS (urllib3)",
                                          1.5 if q == 50 else 2.0, higher_is_better=False))  # issue 15's goals
    for q in (50, 99):
        ctx.comparisons.append(Comparison(f"seek p{q} cold vs direct GET of the same chunk object", f"p{q} ms",
                                          percentile(cold_ms, q), percentile(chunk_direct_ms, q),
                                          "ranged GET straight from the 8 MiB chunk object in SeaweedFS", None,
                                          higher_is_better=False))
    ctx.comparisons.append(Comparison("seek p50 cold vs direct ranged GET at the same offset in an object's first chunk",
                                      "p50 ms", percentile(cold_ms, 50), percentile(head_direct_ms, 50),
                                      "ranged GET straight from the first 8 MiB of the big object (SeaweedFS's sequential window)",
                                      None, higher_is_better=False))
    ctx.comparisons.append(Comparison("seek p50 same-chunk repeat vs direct", "p50 ms", percentile(warm_ms, 50),
                                      percentile(direct_ms, 50), "ranged GET straight from SeaweedFS (urllib3)",
                                      None, higher_is_better=False))
    return {"object_size": size, "objects": len(gw_keys), "range_bytes": span, "probes": len(probes),
            "manifest_warm": True,
            "chunkgate_cold": _latency(cold_ms), "chunkgate_same_chunk_repeat": _latency(warm_ms), "direct": _latency(direct_ms),
            "direct_from_chunk_object": _latency(chunk_direct_ms),
            "direct_in_first_chunk": _latency(head_direct_ms),
            "chunkgate_cache_hits": hits, "chunkgate_cache_misses": misses,
            "chunkgate_store_bytes_read_per_cold_probe": round(read / len(probes)),
            "store_cost": store_cost(ctx),
            "samples_ms": {"chunkgate": [round(v, 3) for v in cold_ms], "chunkgate_same_chunk_repeat": [round(v, 3) for v in warm_ms],
                           "direct_from_chunk_object": [round(v, 3) for v in chunk_direct_ms],
                           "direct_in_first_chunk": [round(v, 3) for v in head_direct_ms],
                           "direct": [round(v, 3) for v in direct_ms]}}


def store_cost(ctx: Context) -> dict[str, Any]:
    """SeaweedFS's own cost of a ranged 64 KiB get vs a whole-chunk get, through boto3 (the
    gateway's client) and raw HTTP: the measurement behind ``StoreOptions.small_read_bytes``."""
    cfg, chunk, span = ctx.cfg, ctx.cfg.chunk_size, ctx.cfg.seek_bytes
    keys = [_key(f"chunk-{n}") for n in range(8)]
    for key in keys:
        ctx.raw_put(key, chunk)
    rng = random.Random(cfg.seed + 1)
    block = cfg.block_bytes
    # ranged: the 64 KiB a player asks for; block: the aligned verified block the gateway fetches
    # for it (manifests record a SHA-256 per block); whole: the whole chunk.
    timings: dict[str, list[float]] = {f"{client}_{what}": [] for client in ("boto3", "http")
                                       for what in ("ranged", "block", "whole")}
    for n in range(cfg.store_probes):
        key = keys[n % len(keys)]
        start = rng.randrange(0, chunk - span)
        names = list(timings)
        for name in names if n % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            if name.endswith("ranged"):
                got, want = _store_get(ctx, name, key, start, span), span
            elif name.endswith("block"):
                got, want = _store_get(ctx, name, key, start // block * block, block), block
            else:
                got, want = _store_get(ctx, name, key, 0, chunk), chunk
            timings[name].append((time.perf_counter() - t0) * 1000.0)
            ctx.check("store_cost_sizes", got == want)
    doc: dict[str, Any] = {"chunk_bytes": chunk, "block_bytes": block, "range_bytes": span, "probes": cfg.store_probes}
    for name, values in timings.items():
        doc[name] = _latency(values)
    for client in ("boto3", "http"):
        for what in ("block", "whole"):
            doc[f"{client}_{what}_over_ranged_p50"] = round(
                percentile(timings[f"{client}_{what}"], 50) / percentile(timings[f"{client}_ranged"], 50), 2)
    return doc


def _store_get(ctx: Context, how: str, key: str, start: int, span: int) -> int:
    """One timed store read for ``store_cost``; returns the bytes received."""
    whole = how.endswith("whole")
    if how.startswith("boto3"):
        if whole:
            return len(ctx.s3.get_object(Bucket=ctx.raw_bucket, Key=key)["Body"].read())
        return len(ctx.s3.get_object(Bucket=ctx.raw_bucket, Key=key, Range=f"bytes={start}-{start + span - 1}")["Body"].read())
    if whole:
        return len(ctx.pool.request("GET", ctx.raw_url(key)).data)
    return len(_timed_range(ctx.pool, ctx.raw_url(key), start, span)[1])


# ------------------------------------------------------------------------------ 5. PUT
def put_object(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    limit = (cfg.write_concurrency + 2) * cfg.chunk_size + 64 * MiB
    out: dict[str, Any] = {"rss_limit_bytes": limit, "sizes": {}}
    for size in cfg.put_sizes:
        label = f"{size // MiB}MiB"
        doc = _put_one_size(ctx, size, label)
        ctx.targets.append(Target(f"PUT {label} peak RSS growth", "bytes (worst run)", float(max(doc["rss_growth_bytes"])),
                                  float(limit), False, f"(N+2) x chunk + 64 MiB with N={cfg.write_concurrency}"))
        out["sizes"][label] = doc
    return out


def _put_one_size(ctx: Context, size: int, label: str) -> dict[str, Any]:
    ours_put, boto_put, ours_get, boto_get = (Series("MiB/s") for _ in range(4))
    put_cpu, boto_put_cpu, get_cpu, boto_get_cpu = (Series("CPU-s/GiB") for _ in range(4))
    growth: list[int] = []
    rss_series: list[list[tuple[float, int]]] = []
    expected = ctx.sha(size)
    scratch = ctx.datadir / "get-target"  # tmpfs: both sides pay the same write

    def peer(rep: int) -> None:
        key = _key(f"put-raw-{label}-{rep}")
        with CpuMeter() as cpu:
            boto_put.values.append(mib_per_s(size, boto3_upload(ctx.s3, ctx.raw_bucket, key, ctx.data_file(size))))
        boto_put_cpu.values.append(cpu.per_gib(size))
        with open(scratch, "wb") as sink, CpuMeter() as cpu:
            seconds, _ = boto3_download(ctx.s3, ctx.raw_bucket, key, sink=sink)
        boto_get_cpu.values.append(cpu.per_gib(size))
        ctx.check("put_get_sha256", sha256_file(scratch) == expected)
        scratch.unlink()
        boto_get.values.append(mib_per_s(size, seconds))
        ctx.s3.delete_object(Bucket=ctx.raw_bucket, Key=key)

    def mine(rep: int) -> None:
        key = _key(f"put-{label}-{rep}")
        with RssSampler(ctx.gateway.pid) as rss, CpuMeter(ctx.gateway.pid) as cpu:
            doc = ctx.gw_put(key, size)
        put_cpu.values.append(cpu.per_gib(size))
        growth.append(rss.growth)
        rss_series.append([(round(t, 3), v - rss.baseline) for t, v in rss.series])
        ours_put.values.append(mib_per_s(size, doc["_seconds"]))
        with CpuMeter(ctx.gateway.pid) as cpu:
            ours_get.values.append(mib_per_s(size, curl_get(ctx.gw_url(key), output=str(scratch), expect_bytes=size)))
        get_cpu.values.append(cpu.per_gib(size))
        ctx.check("put_get_sha256", sha256_file(scratch) == expected)
        scratch.unlink()
        ctx.pool.request("DELETE", ctx.gw_url(key))

    with ctx.profiled(f"put-{label}"):
        alternate(ctx.cfg.reps, peer, mine)
    _compare(ctx, f"PUT {label} vs boto3", "MiB/s", ours_put, boto_put, "boto3 upload_fileobj", 1.0)
    _compare(ctx, f"GET {label} after PUT vs boto3", "MiB/s", ours_get, boto_get, "boto3 download_fileobj", 1.0)
    _cpu(ctx, f"PUT {label}", put_cpu, 1.5, {"boto3 upload_fileobj client": boto_put_cpu})
    _cpu(ctx, f"GET {label} after PUT", get_cpu, None, {"boto3 download_fileobj client": boto_get_cpu})
    return {"size": size, "chunkgate_put": ours_put.to_json(), "boto3_upload_fileobj": boto_put.to_json(),
            "chunkgate_get": ours_get.to_json(), "boto3_download_fileobj": boto_get.to_json(),
            "rss_growth_bytes": growth, "rss_series": rss_series}


# ------------------------------------------------------------------------------ 6. tus
def _tus_upload(url: str, path: Path, chunk: int, metadata: dict[str, str]) -> tuple[float, str]:
    from tusclient import client as tus_client

    with open(path, "rb") as stream:
        uploader = tus_client.TusClient(url).uploader(file_stream=stream, chunk_size=chunk, metadata=metadata)
        start = time.perf_counter()
        uploader.upload()
        seconds = time.perf_counter() - start
    return seconds, str(uploader.url)


def tus_upload(ctx: Context) -> dict[str, Any]:
    cfg, size = ctx.cfg, ctx.cfg.tus_size
    path, expected = ctx.data_file(size), ctx.sha(size)
    peer_proc = procs.start_tus_peer(ctx.workdir, endpoint=ctx.store.url, bucket=ctx.tus_bucket, part_size=cfg.chunk_size)
    ours, tusd_js, boto = Series("MiB/s"), Series("MiB/s"), Series("MiB/s")
    ours_cpu, node_cpu, boto_cpu = Series("CPU-s/GiB"), Series("CPU-s/GiB"), Series("CPU-s/GiB")

    def peer(rep: int) -> None:
        with CpuMeter(peer_proc.pid) as cpu:
            seconds, upload_url = _tus_upload(peer_proc.url, path, cfg.tus_chunk, {"filename": f"bench-{rep}.bin"})
        node_cpu.values.append(cpu.per_gib(size))
        tusd_js.values.append(mib_per_s(size, seconds))
        # @tus/s3-store keeps the object under the upload id: check it byte for byte.
        key = upload_url.rstrip("/").rsplit("/", 1)[1]
        digest, got = sha256_url(ctx.pool, f"{ctx.store.url}/{ctx.tus_bucket}/{key}")
        ctx.check("tus_peer_sha256", digest == expected and got == size)
        raw_key = _key(f"tus-raw-{rep}")
        with CpuMeter() as cpu:
            boto.values.append(mib_per_s(size, boto3_upload(ctx.s3, ctx.raw_bucket, raw_key, path)))
        boto_cpu.values.append(cpu.per_gib(size))
        ctx.s3.delete_object(Bucket=ctx.raw_bucket, Key=raw_key)

    def mine(rep: int) -> None:
        key = _key(f"tus-{rep}")
        with CpuMeter(ctx.gateway.pid) as cpu:
            seconds, _ = _tus_upload(ctx.gateway.url + "/uploads/", path, cfg.tus_chunk,
                                     {"key": key, "content-type": "application/octet-stream"})
        ours_cpu.values.append(cpu.per_gib(size))
        ours.values.append(mib_per_s(size, seconds))
        digest, got = sha256_url(ctx.pool, ctx.gw_url(key))
        ctx.check("tus_sha256", digest == expected and got == size)
        ctx.pool.request("DELETE", ctx.gw_url(key))

    try:
        with ctx.profiled("tus"):
            alternate(cfg.reps, peer, mine)
    finally:
        peer_proc.stop()
    _compare(ctx, "tus vs @tus/server", "MiB/s", ours, tusd_js, "@tus/server + @tus/s3-store (tuspy client)", 2.5)
    _compare(ctx, "tus vs boto3", "MiB/s", ours, boto, "boto3 upload_fileobj", 0.9)
    _cpu(ctx, "tus", ours_cpu, None, {"@tus/server process": node_cpu, "boto3 upload_fileobj client": boto_cpu})
    return {"size": size, "tus_chunk": cfg.tus_chunk, "chunkgate_tus": ours.to_json(), "tus_node": tusd_js.to_json(),
            "boto3_upload_fileobj": boto.to_json()}


# ------------------------------------------------------------------------------ 10. a long tus upload
def tus_long(ctx: Context) -> dict[str, Any]:
    """One long tus upload, PATCH by PATCH (``--tus-chunk`` each, the same bytes every time):
    what a PATCH late in it costs against one early in it, and HEAD at its end. Each request
    reads the upload's state from the store; what it reads must not grow with the upload
    (issue 15: no request pattern amplifies store traffic)."""
    cfg = ctx.cfg
    patch, count = cfg.tus_chunk, max(4, cfg.tus_long_size // cfg.tus_chunk)
    body = random.Random(cfg.seed).randbytes(patch)
    tus = {"Tus-Resumable": "1.0.0"}
    key = _key("tus-long")
    r = ctx.pool.request("POST", ctx.gateway.url + "/uploads/", headers={
        **tus, "Upload-Length": str(count * patch), "Upload-Metadata": "key " + base64.b64encode(key.encode()).decode()})
    if r.status != 201:
        raise BenchFailure(f"creating the long upload answered {r.status}: {r.data[:200]!r}")
    location = r.headers["Location"]
    ms: list[float] = []
    with CpuMeter(ctx.gateway.pid) as cpu:
        for n in range(count):
            started = time.perf_counter()
            r = ctx.pool.request("PATCH", location, body=body, headers={
                **tus, "Upload-Offset": str(n * patch), "Content-Type": "application/offset+octet-stream"})
            ms.append((time.perf_counter() - started) * 1000)
            if r.status != 204:
                raise BenchFailure(f"PATCH {n} of the long upload answered {r.status}: {r.data[:200]!r}")
            if n == count - 2:  # HEAD before the last PATCH, when the upload is at its longest
                heads = []
                for _ in range(10):
                    started = time.perf_counter()
                    h = ctx.pool.request("HEAD", location, headers=tus)
                    heads.append((time.perf_counter() - started) * 1000)
                ctx.check("tus_long_head_offset", h.headers.get("Upload-Offset") == str((n + 1) * patch))
    digest, got = sha256_url(ctx.pool, ctx.gw_url(key))
    ctx.check("tus_long_sha256", got == count * patch and digest == hashlib.sha256(body * count).hexdigest())
    ctx.pool.request("DELETE", ctx.gw_url(key))
    early, late = Series("ms", ms[:10]), Series("ms", ms[-11:-1])  # the last PATCH also commits
    size_label = f"{count * patch // MiB}MiB"
    ctx.comparisons.append(Comparison(f"tus {size_label}: a late PATCH vs an early one", "p50 ms", late.median, early.median,
                                      "the first ten PATCHes of the same upload", None, False))
    return {"patches": count, "patch_bytes": patch, "patch_ms": [round(v, 2) for v in ms],
            "early_p50_ms": early.median, "late_p50_ms": late.median, "head_at_end_p50_ms": statistics.median(heads),
            "commit_patch_ms": ms[-1], "gateway_cpu_s_per_gib": cpu.per_gib(count * patch)}


# ------------------------------------------------------------------------------ 8. read amplification
def _raw_get_and_leave(url: str) -> None:
    """Send a GET and close the connection at once, as a player cancelling a request does."""
    parsed = urllib3.util.parse_url(url)
    with socket.create_connection((parsed.host, parsed.port or 80), timeout=10) as sock:
        sock.sendall(f"GET {parsed.request_uri} HTTP/1.1\r\nHost: {parsed.host}\r\n\r\n".encode())


def _curl_many(urls: list[str], expect_bytes: int) -> float:
    cmd = ["curl", "-sS", "--parallel", "--parallel-immediate", "--parallel-max", str(len(urls)), "-w", "%{http_code} %{size_download}\\n"]
    for url in urls:
        cmd += ["-o", "/dev/null", url]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    results = [line.split() for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or len(results) != len(urls) or any(r != ["200", str(expect_bytes)] for r in results):
        raise BenchFailure(f"parallel GETs: rc={done.returncode}, {results[:3]}, {done.stderr.strip()[:300]}")
    return seconds


def read_amplification(ctx: Context) -> dict[str, Any]:
    """Store bytes per byte served for each read pattern of issue 15, and store requests per
    listing page. Every object read here is fresh (cold), so the store pays whatever the pattern
    costs; store bytes are the gateway's own count of bytes its store calls returned."""
    cfg, chunk = ctx.cfg, ctx.cfg.chunk_size
    out: dict[str, Any] = {"cache_size": cfg.cache_size, "chunk_size": chunk}
    ratio = Series("store bytes / byte served")

    def store_bytes(run: Callable[[], int]) -> tuple[int, int]:
        before = ctx.metric(BYTES_READ)
        served = run()
        return int(ctx.metric(BYTES_READ) - before), served

    # sequential: one cold object read whole
    size = 8 * chunk
    key = _key("amp-seq")
    ctx.gw_put(key, size)
    read, served = store_bytes(lambda: (curl_get(ctx.gw_url(key), expect_bytes=size), size)[1])
    out["sequential"] = {"object_bytes": size, "store_bytes": read, "ratio": round(read / served, 4)}
    ctx.targets.append(Target("store bytes per byte served: sequential GET", "ratio", read / served, 1.05, False))

    # multi-range: 16 one-byte parts in the first chunk, the same request repeated
    key = _key("amp-multi")
    ctx.gw_put(key, chunk)
    header = "bytes=" + ",".join(f"{2 * n}-{2 * n}" for n in range(16))
    per_request: list[int] = []
    served_total = 0
    for _ in range(cfg.multirange_repeats):
        def one() -> int:
            response = ctx.pool.request("GET", ctx.gw_url(key), headers={"Range": header})
            ctx.check("multirange_206", response.status == 206 and response.data.count(b"Content-Range") == 16)
            return len(response.data)
        read, served = store_bytes(one)
        per_request.append(read)
        served_total += served
    out["multi_range"] = {"parts": 16, "repeats": cfg.multirange_repeats, "bytes_served_per_request": served_total // cfg.multirange_repeats,
                          "store_bytes_per_request": per_request,
                          "ratio_first": round(per_request[0] / (served_total / cfg.multirange_repeats), 2),
                          "ratio_all": round(sum(per_request) / served_total, 2)}
    ctx.targets.append(Target("multi-range repeat: store bytes after the first", "bytes", float(sum(per_request[1:])), 0.0, False,
                              "every repeat served from verified cached blocks"))

    # abandoned: GETs that close the connection right after sending
    keys_abandoned = [_key(f"amp-gone-{n}") for n in range(cfg.abandoned_gets)]
    for k in keys_abandoned:
        ctx.gw_put(k, 4 * chunk)
    time.sleep(1.2)  # let manifest caches expire: as cold as a stranger's GET
    before = ctx.metric(BYTES_READ)
    for k in keys_abandoned:
        _raw_get_and_leave(ctx.gw_url(k))
        time.sleep(0.3)
    time.sleep(2.0)  # whatever the gateway still fetches lands in the count
    per_get = (ctx.metric(BYTES_READ) - before) / len(keys_abandoned)
    out["abandoned"] = {"gets": len(keys_abandoned), "object_bytes": 4 * chunk, "store_bytes_per_get": round(per_get),
                        "chunks_per_get": round(per_get / chunk, 3)}
    ctx.targets.append(Target("abandoned GET: store bytes", "bytes per GET", per_get, float(chunk), False,
                              "at most one chunk (before: the first chunk plus 4 of read-ahead)"))

    # cache pressure: many concurrent readers of distinct objects, more than the cache holds
    readers, psize = cfg.pressure_readers, cfg.pressure_size
    pkeys = [_key(f"amp-press-{n}") for n in range(readers)]
    for k in pkeys:
        ctx.gw_put(k, psize)
    read, served = store_bytes(lambda: (_curl_many([ctx.gw_url(k) for k in pkeys], psize), readers * psize)[1])
    out["cache_pressure"] = {"readers": readers, "object_bytes": psize, "working_set": readers * psize,
                             "store_bytes": read, "ratio": round(read / served, 4)}
    ctx.targets.append(Target(f"store bytes per byte served: {readers} readers, working set {readers * psize // MiB} MiB "
                              f"> cache {cfg.cache_size // MiB} MiB", "ratio", read / served, 1.05, False))

    # listing: store requests for one page, first and repeated
    prefix = f"bench/list-{uuid.uuid4().hex[:8]}/"
    small = ctx.datadir / "one-kib"
    small.write_bytes(b"x" * 1024)
    for n in range(cfg.list_keys):
        seconds, body = curl_put(f"{ctx.gateway.url}/objects/{prefix}{n:05d}", small)
    time.sleep(1.2)
    pages = []
    for _ in range(2):
        before = ctx.metric(STORE_REQUESTS)
        response = ctx.pool.request("GET", f"{ctx.gateway.url}/objects?prefix={prefix}&limit={cfg.list_keys}")
        ctx.check("listing_complete", response.status == 200 and len(json.loads(response.data)["objects"]) == cfg.list_keys)
        pages.append(int(ctx.metric(STORE_REQUESTS) - before))
    out["listing"] = {"keys": cfg.list_keys, "store_requests_first": pages[0], "store_requests_repeat": pages[1]}
    ctx.targets.append(Target(f"listing page of {cfg.list_keys}: store requests (repeat)", "requests", float(pages[1]),
                              10.0, False, "bounded, not one per key"))
    ratio.values.extend([out["sequential"]["ratio"], out["cache_pressure"]["ratio"]])
    return out


# ------------------------------------------------------------------------------ 9. block size
def block_size_choice(ctx: Context) -> dict[str, Any]:
    """What a verified block size costs: manifest bytes and parse time of a 4 GiB object, store
    latency of fetching one aligned block (vs the 64 KiB a player asks for), and the time to
    hash a block. The measurement behind ``StoreOptions.block_size``."""
    from storage import hashing
    from storage.manifest import ChunkRef, Manifest

    cfg, chunk, span = ctx.cfg, ctx.cfg.chunk_size, ctx.cfg.seek_bytes
    keys_ = [_key(f"block-{n}") for n in range(8)]
    for key in keys_:
        ctx.raw_put(key, chunk)
    rng = random.Random(cfg.seed + 2)
    out: dict[str, Any] = {"object_bytes": 4 * GiB, "chunk_bytes": chunk, "range_bytes": span, "sizes": {}}
    ranged: list[float] = []
    fetch: dict[int, list[float]] = {bs: [] for bs in cfg.block_sizes}
    for n in range(cfg.store_probes):
        key = keys_[n % len(keys_)]
        start = rng.randrange(0, chunk - span)
        order: list[int] = [0, *cfg.block_sizes]
        for bs in order if n % 2 == 0 else order[::-1]:
            lo, length = (start, span) if bs == 0 else (start // bs * bs, bs)
            t0 = time.perf_counter()
            got = len(_timed_range(ctx.pool, ctx.raw_url(key), lo, length)[1])
            (ranged if bs == 0 else fetch[bs]).append((time.perf_counter() - t0) * 1000.0)
            ctx.check("block_probe_sizes", got == length)
    data = random.Random(1).randbytes(chunk)
    for bs in cfg.block_sizes:
        count = 4 * GiB // chunk
        refs = tuple(ChunkRef(i, i * chunk, chunk, "0" * 64, tuple(rng.randbytes(16).hex() for _ in range(chunk // bs)))
                     for i in range(count))
        manifest = Manifest(key="k", version="v1", size=count * chunk, content_type="video/mp4",
                            created=__import__("datetime").datetime.now(__import__("datetime").timezone.utc),
                            chunk_size=chunk, chunks=refs, block_size=bs)
        raw = manifest.to_json()
        t0 = time.perf_counter()
        Manifest.from_json(raw)
        parse_ms = (time.perf_counter() - t0) * 1000.0
        expected = list(hashing.hash_chunk(data[:bs], bs)[1] or ())
        t0 = time.perf_counter()
        for _ in range(20):
            hashing.first_bad_block(data[:bs], bs, expected)
        verify_ms = (time.perf_counter() - t0) * 1000.0 / 20
        out["sizes"][str(bs)] = {"manifest_bytes_4gib": len(raw), "manifest_parse_ms": round(parse_ms, 1),
                                 "fetch_ms": _latency(fetch[bs]), "verify_ms": round(verify_ms, 3),
                                 "fetch_over_ranged_p50": round(percentile(fetch[bs], 50) / percentile(ranged, 50), 2)}
    out["ranged_ms"] = _latency(ranged)
    return out


# ------------------------------------------------------------------------------ 7. locks
async def _lock_bench(ops: int, waiters: int) -> dict[str, Any]:
    from storage.locks import LockManager

    manager = LockManager(timeout=60.0)
    start = time.perf_counter()
    for _ in range(ops):
        lease = await manager.acquire("bench/key", owner="bench")
        await lease.release()
    uncontended = ops / (time.perf_counter() - start)

    holder = await manager.acquire("bench/storm", owner="holder")
    queued: list[int] = []
    granted: list[int] = []
    waits: list[float] = []

    async def waiter(n: int) -> None:
        queued.append(n)  # acquire enqueues before its first await: this is the queue order
        t0 = time.perf_counter()
        lease = await manager.acquire("bench/storm", owner=f"w{n}")
        waits.append((time.perf_counter() - t0) * 1000.0)
        granted.append(n)
        await asyncio.sleep(0)  # hold it across a loop turn, as a real critical section would
        await lease.release()

    tasks = [asyncio.create_task(waiter(n)) for n in range(waiters)]
    while manager.waiting() < waiters:
        await asyncio.sleep(0)
    start = time.perf_counter()
    await holder.release()
    await asyncio.gather(*tasks)
    drain = time.perf_counter() - start
    return {"uncontended_ops": ops, "uncontended_per_s": round(uncontended), "waiters": waiters,
            "fifo": granted == queued, "all_granted": len(granted) == waiters,
            "wait_ms": _latency(waits), "handoffs_per_s": round(waiters / drain), "left_entries": len(manager)}


def lock_manager(ctx: Context) -> dict[str, Any]:
    doc = asyncio.run(_lock_bench(ctx.cfg.lock_ops, ctx.cfg.lock_waiters))
    ctx.check("locks_fifo", doc["fifo"] and doc["all_granted"] and doc["left_entries"] == 0)
    ctx.targets.append(Target("lock acquire/release uncontended", "per second", doc["uncontended_per_s"], 200_000, True))
    return doc


SCENARIOS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "cold": cold_get,
    "warm": warm_get,
    "storm": viewer_storm,
    "seek": seek_probe,
    "put": put_object,
    "tus": tus_upload,
    "locks": lock_manager,
    "amplify": read_amplification,
    "blocks": block_size_choice,
    "tuslong": tus_long,
}
# Issue 8 numbers its scenarios; accept the numbers too.
BY_NUMBER = {str(n): name for n, name in enumerate(SCENARIOS, start=1)}
NEEDS_STORE = {"cold", "warm", "storm", "seek", "put", "tus", "tuslong", "amplify", "blocks"}
