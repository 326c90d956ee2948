"""``python -m ops.bench``: start SeaweedFS and chunkgate on loopback, run the chosen scenarios
against their peers, write ``result.json`` and PNG charts, print a summary.

Exit status: 0 when every scenario ran and every byte check passed, 1 otherwise. Missed
performance goals do not change the exit status (they are findings, recorded in the result);
this command must never be used as a timed pass/fail gate.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gateway.config import parse_size
from ops.bench import procs
from ops.bench.measure import MiB, sha256_floor
from ops.bench.scenarios import (
    BY_NUMBER,
    NEEDS_STORE,
    SCENARIOS,
    BenchConfig,
    Context,
    GiB,
)

RESULTS_DIR = procs.REPO_ROOT / "ops" / "bench" / "results"

# (flag, BenchConfig field, parser, full-run default is the dataclass's, --quick value)
_SIZED: list[tuple[str, str, Any, Any]] = [
    ("--reps", "reps", int, 2),
    ("--cold-size", "cold_size", parse_size, 16 * MiB),
    ("--warm-size", "warm_size", parse_size, 16 * MiB),
    ("--storm-size", "storm_size", parse_size, 8 * MiB),
    ("--readers", "readers", int, 8),
    ("--seek-size", "seek_size", parse_size, 16 * MiB),
    ("--seeks", "seeks", int, 20),
    ("--store-probes", "store_probes", int, 10),
    ("--tus-size", "tus_size", parse_size, 24 * MiB),
    ("--tus-chunk", "tus_chunk", parse_size, 8 * MiB),
    ("--tus-long-size", "tus_long_size", parse_size, 64 * MiB),
    ("--lock-ops", "lock_ops", int, 20_000),
    ("--lock-waiters", "lock_waiters", int, 1000),
    ("--pressure-readers", "pressure_readers", int, 6),
    ("--pressure-size", "pressure_size", parse_size, 8 * MiB),
    ("--list-keys", "list_keys", int, 30),
    ("--abandoned-gets", "abandoned_gets", int, 2),
    ("--multirange-repeats", "multirange_repeats", int, 4),
    ("--chunk-size", "chunk_size", parse_size, None),
    ("--write-concurrency", "write_concurrency", int, None),
    ("--cache-size", "cache_size", parse_size, None),
]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ops.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated names or numbers 1-7: {', '.join(SCENARIOS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 reps: a smoke run, not a measurement")
    parser.add_argument("--big", action="store_true", help="also PUT/GET 1 GiB")
    parser.add_argument("--put-size", type=parse_size, default=None, help="PUT scenario size (default 256MiB)")
    for flag, dest, kind, quick in _SIZED:
        parser.add_argument(flag, dest=dest, type=kind, default=None,
                            help=f"default {getattr(BenchConfig(scenarios=[]), dest)}" + (f", --quick {quick}" if quick else ""))
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="result directory (default ops/bench/results/<time>)")
    parser.add_argument("--no-charts", action="store_true")
    parser.add_argument("--profile", action="store_true", help="record the gateway with py-spy during each timed section (collapsed stacks + top frames in the result)")
    parser.add_argument("--gateway-arg", action="append", default=[], help="extra argument for chunkgate serve")
    parser.add_argument("--weed-arg", action="append", default=None,
                        help="flag for weed mini (repeatable), e.g. -filer.maxMB=1; it replaces a WEED_ARGS flag of the "
                             "same name, and --weed-arg= runs weed mini as it comes")
    parser.add_argument("--redraw", type=Path, default=None, help="only redraw the charts of a saved result.json")
    return parser.parse_args(argv)


# SeaweedFS (weed/filer/reader_pattern.go, SeqTolerance) treats a GET whose range starts within
# 8 MiB of the object's start as a sequential read and fetches the whole -filer.maxMB filer chunk
# (4 MiB by default) before it answers; further in, only the range. Measured here on one weed
# mini, 64 KiB ranges of one 64 MiB object: offsets below 8 MiB 4.0-4.2 ms p50, beyond it 1.5 ms.
# Every offset of an 8 MiB chunk object is in that window; with -filer.maxMB=1 the chunk it
# fetches is 1 MiB (1.2 ms). The README reports runs with --weed-arg=-filer.maxMB=1 beside the
# table (the peers run on the same server either way).
#
# Volumes: `weed mini` sizes them at disk/100, capped at 1 GiB (weed/command/mini.go,
# calculateOptimalVolumeSizeMB), where `weed master` defaults to 30000 MB. Each time a bucket's
# volume fills, SeaweedFS grows the next one and every PUT in flight to that bucket waits ~1.1 s
# (the INFO log's "reaches full capacity", copied into the result's logs/). With 1 GiB volumes
# a fill lands inside whichever timed transfer happens to be running when the bucket's running
# total passes a GiB: it moved tus vs boto3 between 0.80x and 1.00x on one commit. So the bench
# runs SeaweedFS with the production volume size; --weed-arg= (empty) runs weed mini as it comes.
WEED_ARGS: list[str] = ["-master.volumeSizeLimitMB=30000"]


def weed_args(given: Sequence[str] | None) -> list[str]:
    """The flags ``weed mini`` runs with: WEED_ARGS, each replaced by a ``--weed-arg`` of the same
    flag, then the other ``--weed-arg`` flags; an empty ``--weed-arg=`` drops WEED_ARGS."""
    given = list(given or [])
    extra = [a for a in given if a]
    named = {a.split("=", 1)[0] for a in extra}
    base = [] if "" in given else [a for a in WEED_ARGS if a.split("=", 1)[0] not in named]
    return base + extra


def build_config(ns: argparse.Namespace) -> BenchConfig:
    names: list[str] = []
    for part in (p.strip() for p in ns.scenarios.split(",") if p.strip()):
        name = BY_NUMBER.get(part, part)
        if name not in SCENARIOS:
            raise SystemExit(f"python -m ops.bench: unknown scenario {part!r} (choose from {', '.join(SCENARIOS)} or 1-7)")
        names.append(name)
    cfg = BenchConfig(scenarios=names, seed=ns.seed)
    for _flag, dest, _kind, quick in _SIZED:
        value = getattr(ns, dest)
        if value is not None:
            setattr(cfg, dest, value)
        elif ns.quick and quick is not None:
            setattr(cfg, dest, quick)
    cfg.put_sizes = [ns.put_size or (16 * MiB if ns.quick else 256 * MiB)]
    if ns.big:
        cfg.put_sizes.append(GiB)
    return cfg


def _version(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        return (done.stdout + done.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "absent"


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    packages = {}
    for name in ("aiohttp", "boto3", "tuspy", "matplotlib"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = "absent"
    tus_versions = {}
    lock = procs.TUS_PEER_DIR / "package-lock.json"
    if lock.exists():
        doc = json.loads(lock.read_text())
        for pkg in ("@tus/server", "@tus/s3-store"):
            tus_versions[pkg] = doc.get("packages", {}).get(f"node_modules/{pkg}", {}).get("version", "?")
    import psutil

    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / GiB, 1),
        "kernel": platform.release(), "python": platform.python_version(), "packages": packages,
        "weed": _version(["weed", "version"]), "nginx": _version(["nginx", "-v"]), "curl": _version(["curl", "--version"]),
        "node": _version(["node", "--version"]), "tus_peer": tus_versions, "load_average_start": os.getloadavg(),
        "git_commit": _version(["git", "-C", str(procs.REPO_ROOT), "rev-parse", "HEAD"]),
        "sha256_cpu_s_per_gib_start": sha256_floor(),
    }


def _summary_lines(result: dict[str, Any]) -> list[str]:
    lines = ["", "comparison                                   chunkgate        peer    ratio  goal     met"]
    for c in result["comparisons"]:
        met = "-" if c["met"] is None else ("yes" if c["met"] else "NO")
        lines.append(f"{c['name'][:44]:44} {c['chunkgate']:>10.2f} {c['peer']:>10.2f} {c['ratio']:>6.3f}x "
                     f"{c['goal_text']:8} {met}")
    for t in result["targets"]:
        lines.append(f"{t['name'][:44]:44} {t['value']:>10.4g} ({t['metric']}) goal {t['goal_text']} "
                     f"{'yes' if t['met'] else 'NO'}")
    for name, doc in result.get("cpu", {}).items():
        peers = ", ".join(f"{k} {v['median']:.2f}" for k, v in doc.items() if k != "chunkgate")
        lines.append(f"CPU-s/GiB {name[:34]:34} chunkgate {doc['chunkgate']['median']:.2f}" + (f"; {peers}" if peers else ""))
    machine = result.get("machine", {})
    if "sha256_cpu_s_per_gib_start" in machine:
        lines.append(f"SHA-256 on this machine (the hashing floor): {machine['sha256_cpu_s_per_gib_start']:.2f} CPU-s/GiB "
                     f"at the start, {machine.get('sha256_cpu_s_per_gib_end', float('nan')):.2f} at the end")
    lines.append(f"byte checks: {result['checks']}")
    if result["errors"]:
        lines.append(f"errors: {list(result['errors'])}")
    return lines


def run(cfg: BenchConfig, ns: argparse.Namespace, out: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(),
                              "config": asdict(cfg), "scenarios": {}, "errors": {}}
    def log(msg):
        return print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="chunkgate-bench-"))
    shm = Path("/dev/shm")
    datadir = Path(tempfile.mkdtemp(prefix="chunkgate-bench-data-", dir=shm if shm.is_dir() else None))
    try:
        with ExitStack() as stack:
            ctx = Context(cfg=cfg, workdir=workdir, datadir=datadir, stack=stack)
            if NEEDS_STORE & set(cfg.scenarios):
                log("starting SeaweedFS")
                ctx._store = procs.start_seaweedfs(workdir, args=weed_args(ns.weed_arg))
                result["machine"]["weed_args"] = weed_args(ns.weed_arg)
                stack.callback(ctx._store.stop)
                ctx.s3 = procs.s3_client(ctx.store.url)
                for bucket in (ctx.raw_bucket, ctx.gw_bucket, ctx.tus_bucket):
                    ctx.s3.create_bucket(Bucket=bucket)
                args = ["--chunk-size", str(cfg.chunk_size), "--write-concurrency", str(cfg.write_concurrency),
                        "--cache-size", str(cfg.cache_size), *ns.gateway_arg]
                ctx._gateway = procs.start_gateway(workdir, endpoint=ctx.store.url, bucket=ctx.gw_bucket, args=args)
                stack.callback(ctx._gateway.stop)
                log(f"SeaweedFS {ctx.store.url}, chunkgate {ctx.gateway.url} (pid {ctx.gateway.pid})")
                if ns.profile:
                    ctx.profile_dir = out
            for name in cfg.scenarios:
                log(f"scenario {name}")
                started = time.perf_counter()
                try:
                    result["scenarios"][name] = SCENARIOS[name](ctx)
                except Exception as exc:  # noqa: BLE001 - one failed scenario must not void the others
                    result["errors"][name] = "".join(traceback.format_exception(exc))
                    log(f"scenario {name} FAILED: {exc!r}")
                log(f"scenario {name} took {time.perf_counter() - started:.1f}s")
            if ctx.profiles:
                result["profiles"] = ctx.profiles
            result["comparisons"] = [c.to_json() for c in ctx.comparisons]
            result["targets"] = [t.to_json() for t in ctx.targets]
            result["cpu"] = ctx.cpu
            result["checks"] = ctx.checks
            if ctx._gateway is not None and any("Traceback" in line for line in ctx.gateway.log_tail(2000).splitlines()):
                result["gateway_log_has_tracebacks"] = True
    finally:
        shutil.rmtree(datadir, ignore_errors=True)
        logs = out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for path in workdir.glob("*.log"):
            shutil.copy(path, logs / path.name)
        for path in (workdir / procs.WEED_GLOG_DIR).glob("weed.*.log.*.*"):  # the files, not glog's links
            shutil.copy(path, logs / f"seaweedfs-{path.name.split('.log.', 1)[1].split('.', 1)[0]}.log")
        shutil.rmtree(workdir, ignore_errors=True)
    result["machine"]["load_average_end"] = os.getloadavg()
    result["machine"]["sha256_cpu_s_per_gib_end"] = sha256_floor()
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    if ns.redraw is not None:
        from ops.bench.charts import draw_all

        result = json.loads(ns.redraw.read_text())
        for path in draw_all(result, ns.out or ns.redraw.parent):
            print(path)
        return 0
    cfg = build_config(ns)
    out: Path = ns.out or RESULTS_DIR / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    result = run(cfg, ns, out)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    if not ns.no_charts:
        from ops.bench.charts import draw_all

        result["charts"] = [str(p) for p in draw_all(result, out)]
        (out / "result.json").write_text(json.dumps(result, indent=1))
    print("\n".join(_summary_lines(result)), file=sys.stderr)
    print(out / "result.json")
    ok = not result["errors"] and all(result["checks"].values())
    return 0 if ok else 1
