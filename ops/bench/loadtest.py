"""A bounded load test of chunkgate on loopback.

Starts its own ``chunkgate serve`` (fs store in a temporary directory), seeds a few objects, then
runs ``--connections`` concurrent clients for ``--duration`` seconds doing a mix of whole-object
reads, range reads and writes. Every answer is checked byte for byte against what was written.
It stops by itself, stops the gateway, removes the store, and prints p50/p99 latency per kind,
the error count, and the gateway's RSS at the start and the end. The last line is the same
figures as JSON (``RESULT {...}``) for scripts and tests. Exit status: 0 when there were no
errors, 1 otherwise.

Must never: run without a time bound, or touch anything but its own temporary store.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[2]
READY = re.compile(r"chunkgate listening on (http://\S+)")
KINDS = ("read", "range", "write")


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    errors: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    bytes: int = 0
    examples: list[str] = field(default_factory=list)

    def error(self, kind: str, what: str) -> None:
        self.errors[kind] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{kind}: {what}")


def rss_bytes(pid: int) -> int:
    """Resident set size from /proc (Linux), without a psutil dependency."""
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def start_gateway(store: str, extra: list[str]) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "gateway.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--store", store,
           "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=str(REPO))
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = READY.search(line)
        if m:
            return proc, m.group(1)
    proc.kill()
    proc.wait()
    raise SystemExit("loadtest: chunkgate serve did not become ready")


def stop_gateway(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def run_load(url: str, args: argparse.Namespace, pid: int) -> tuple[Tally, int, int, float]:
    rng = random.Random(args.seed)
    seeds = {f"load/seed-{i:03d}.bin": rng.randbytes(args.object_size) for i in range(args.objects)}
    connector = aiohttp.TCPConnector(limit=args.connections)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for key, data in seeds.items():
            async with session.put(f"{url}/objects/{key}", data=data) as r:
                if r.status != 201:
                    raise SystemExit(f"loadtest: seeding {key} failed with {r.status}: {await r.text()}")
        rss_start = rss_bytes(pid)
        tally = Tally()
        names = list(seeds)
        weights = (args.read_weight, args.range_weight, args.write_weight)
        t_start = time.monotonic()
        deadline = t_start + args.duration

        async def client(n: int) -> None:
            crng = random.Random(args.seed * 1000 + n)
            writes = 0
            while time.monotonic() < deadline:
                kind = crng.choices(KINDS, weights)[0]
                t0 = time.perf_counter()
                try:
                    if kind == "write":
                        data = crng.randbytes(crng.randrange(1, args.write_size + 1))
                        key = f"load/w-{n:03d}-{writes % 4}.bin"
                        writes += 1
                        async with session.put(f"{url}/objects/{key}", data=data) as r:
                            body = await r.read()
                            if r.status != 201 or json.loads(body)["size"] != len(data):
                                tally.error(kind, f"PUT {key} -> {r.status} {body[:120]!r}")
                                continue
                            tally.bytes += len(data)
                    else:
                        key = crng.choice(names)
                        want = seeds[key]
                        headers = {}
                        status = 200
                        if kind == "range":
                            start = crng.randrange(len(want))
                            end = min(len(want), start + crng.randrange(1, args.range_size + 1))
                            headers["Range"] = f"bytes={start}-{end - 1}"
                            want, status = want[start:end], 206
                        async with session.get(f"{url}/objects/{key}", headers=headers) as r:
                            body = await r.read()
                            if r.status != status or body != want:
                                tally.error(kind, f"GET {key} {headers} -> {r.status}, {len(body)} bytes")
                                continue
                            tally.bytes += len(body)
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                    tally.error(kind, f"{type(exc).__name__}: {exc}")
                    continue
                tally.latencies[kind].append(time.perf_counter() - t0)

        await asyncio.gather(*(client(n) for n in range(args.connections)))
        elapsed = time.monotonic() - t_start
        rss_end = rss_bytes(pid)
    return tally, rss_start, rss_end, elapsed


def report(tally: Tally, rss_start: int, rss_end: int, elapsed: float, args: argparse.Namespace) -> dict[str, object]:
    result: dict[str, object] = {
        "connections": args.connections, "duration_s": round(elapsed, 2),
        "errors": sum(tally.errors.values()), "rss_start_mib": round(rss_start / 2**20, 1),
        "rss_end_mib": round(rss_end / 2**20, 1), "mib_per_s": round(tally.bytes / 2**20 / elapsed, 1),
    }
    print(f"chunkgate load test: {args.connections} connections, {elapsed:.1f} s, objects {args.objects} x "
          f"{args.object_size} bytes")
    print(f"{'kind':<6} {'ops':>8} {'ops/s':>8} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7}")
    for kind in KINDS:
        lat = tally.latencies[kind]
        p50, p99 = percentile(lat, 50) * 1000, percentile(lat, 99) * 1000
        print(f"{kind:<6} {len(lat):>8} {len(lat) / elapsed:>8.1f} {p50:>9.2f} {p99:>9.2f} {tally.errors[kind]:>7}")
        result[kind] = {"ops": len(lat), "p50_ms": round(p50, 2), "p99_ms": round(p99, 2), "errors": tally.errors[kind]}
    print(f"errors: {result['errors']}   throughput: {result['mib_per_s']} MiB/s   "
          f"gateway RSS: {result['rss_start_mib']} MiB at start, {result['rss_end_mib']} MiB at end")
    for example in tally.examples:
        print(f"  error: {example}")
    print("RESULT " + json.dumps(result, sort_keys=True))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (the run stops by itself)")
    parser.add_argument("--objects", type=int, default=16, help="objects seeded for reads")
    parser.add_argument("--object-size", type=int, default=2 * 1024 * 1024)
    parser.add_argument("--write-size", type=int, default=1024 * 1024, help="largest write")
    parser.add_argument("--range-size", type=int, default=256 * 1024, help="longest range read")
    parser.add_argument("--read-weight", type=float, default=5)
    parser.add_argument("--range-weight", type=float, default=4)
    parser.add_argument("--write-weight", type=float, default=1)
    parser.add_argument("--chunk-size", default="1MiB")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--serve-arg", action="append", default=[], help="extra flag for chunkgate serve (repeatable)")
    args = parser.parse_args(argv)
    if args.connections < 1 or args.duration <= 0 or args.objects < 1 or args.object_size < 1:
        parser.error("--connections, --duration, --objects and --object-size must be positive")
    with tempfile.TemporaryDirectory(prefix="chunkgate-load-") as tmp:
        proc, url = start_gateway(str(Path(tmp) / "store"), ["--chunk-size", args.chunk_size, *args.serve_arg])
        try:
            tally, rss_start, rss_end, elapsed = asyncio.run(run_load(url, args, proc.pid))
        finally:
            stop_gateway(proc)
    result = report(tally, rss_start, rss_end, elapsed, args)
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
