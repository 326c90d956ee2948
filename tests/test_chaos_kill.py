"""kill -9 of ``chunkgate serve`` at random moments of concurrent PUTs and tus uploads, on the fs
store and on SeaweedFS, both with store leases (``--locks store``: the leases a killed gateway
held stay in the store and must go stale before the next one may take the keys).

Each trial runs 4 PUT workers (6 shared keys, some bodies sent slowly) and 2 tus workers against
one gateway, SIGKILLs it after a seeded delay, restarts it on the same port and store, and then
checks what a user would: every key is absent or exactly one version some client sent for it,
byte-exact and matching its manifest's SHA-256s; no acknowledged write (201, or the 204 that
finished an upload) is missing or replaced by an older one (tests/support/chaos.py: History);
every upload the client knows resumes from HEAD's offset (never below what a 204 acknowledged)
and completes byte-exact (tuspy for every other one); ``chunkgate fsck`` is clean; no answer is a
500. The store accumulates across trials. At the end, ``chunkgate gc --grace 0s`` leaves only
chunks of PUTs the kills cut off, protected by their write intents, and once those expire gc
leaves no unreferenced chunk at all.

CI runs 3 trials per store. By hand (about 5 s per trial and store):
    CHUNKGATE_CHAOS_TRIALS=50 python -m pytest tests/test_chaos_kill.py -s
``CHUNKGATE_CHAOS_SEED`` replays a workload (the timing of a kill is the machine's); the seed is
printed and named in every failure.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.chaos import (
    LARGE,
    History,
    Workload,
    census,
    check_objects,
    maintenance,
    peak_rss_and_threads,
    resume_uploads,
    version_of_chunk,
)
from tests.support.gateway import GatewayProcess

TRIALS = int(os.environ.get("CHUNKGATE_CHAOS_TRIALS", "3"))
SEED = int(os.environ.get("CHUNKGATE_CHAOS_SEED") or random.SystemRandom().randrange(2**32))
LOCKS = os.environ.get("CHUNKGATE_CHAOS_LOCKS", "store")
CHUNK = 16 * 1024
INTENT_LIFETIME = 3600.0  # serve keeps a PUT's intent max(--upload-expiry, 1h)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120 + 30 * TRIALS)]


@pytest.fixture(params=["fs", pytest.param("seaweedfs", marks=pytest.mark.seaweedfs)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str | None]]:
    if request.param == "fs":
        yield str(tmp_path / "store"), None
    else:
        server = request.getfixturevalue("seaweedfs")
        yield f"s3://{server.new_bucket()}", server.endpoint


async def test_kill_9_at_random_moments_loses_no_acknowledged_write(store: tuple[str, str | None]) -> None:
    store_url, endpoint = store
    store_args = ["--store", store_url, "--locks", LOCKS, *(["--s3-endpoint-url", endpoint] if endpoint else [])]
    serve_args = [*store_args, "--chunk-size", str(CHUNK), "--lock-stale-after", "2s", "--lock-timeout", "10s",
                  "--upload-expiry", "1h"]
    where = f"seed {SEED} ({'SeaweedFS' if endpoint else 'fs'}, --locks {LOCKS})"
    print(f"\nchaos: {where}, {TRIALS} trials")
    history = History()
    put_keys = [f"put/{n}.bin" for n in range(6)]
    figures: Counter = Counter()
    peak_rss = peak_threads = 0
    timeout = aiohttp.ClientTimeout(total=60)

    gw = GatewayProcess(serve_args)
    port = gw.port
    try:
        for trial in range(TRIALS):
            rng = random.Random(f"{SEED}:{trial}")
            workload = Workload(history, gw.url, seed=SEED, trial=trial, put_keys=put_keys, chunk=CHUNK)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                running = asyncio.ensure_future(workload.run(session))
                await asyncio.sleep(rng.uniform(0.15, 1.2))
                rss, threads = peak_rss_and_threads(gw.proc.pid)
                peak_rss, peak_threads = max(peak_rss, rss), max(peak_threads, threads)
                workload.stop.set()
                gw.stop(kill=True)
                await running
            gw = GatewayProcess([*serve_args, "--port", str(port)])
            history.settle(time.monotonic())

            async with aiohttp.ClientSession(timeout=timeout) as session:
                problems, seen = await check_objects(session, gw.url, history)
                assert not problems, f"{where}, trial {trial}:\n" + "\n".join(problems)
                problems, resumed = await resume_uploads(session, gw.url, history)
                assert not problems, f"{where}, trial {trial}:\n" + "\n".join(problems)
                # What the resumes wrote is checked as the next trial's history.
                problems, _ = await check_objects(session, gw.url, history)
                assert not problems, f"{where}, trial {trial}, after the resumes:\n" + "\n".join(problems)
            figures.update(resumed)
            figures.update(seen)
            fsck = maintenance("fsck", store_args, "--quiet")
            assert fsck.returncode == 0 and " 0 damaged" in fsck.stdout, f"{where}, trial {trial}: {fsck.stdout}{fsck.stderr}"
            assert not history.errors, f"{where}, trial {trial}:\n" + "\n".join(history.errors)
    finally:
        gw.stop()

    gc = maintenance("gc", store_args, "--grace", "0s")
    assert gc.returncode == 0, gc.stdout + gc.stderr
    after_gc = await census(store_url, endpoint)
    assert not after_gc.missing, f"{where}: gc deleted chunks a manifest references: {sorted(after_gc.missing)[:5]}"
    left = {version_of_chunk(k) for k in after_gc.unreferenced}
    cut_off = [w for w in history.writes if w.kind == "put" and not w.acked and not w.refused]
    assert left <= set(after_gc.intents), f"{where}: gc left unreferenced chunks no intent protects: {gc.stdout}"
    assert len(left) <= len(cut_off), (left, cut_off)

    # When those intents have expired, the same gc leaves nothing unreferenced.
    from storage.backends.open import open_backend
    from storage.gc import collect

    backend = open_backend(store_url, s3_endpoint_url=endpoint)
    try:
        later = await collect(backend, grace=0.0, now=time.time() + INTENT_LIFETIME + 120)
    finally:
        await backend.close()
    assert later.delete_errors == 0
    final = await census(store_url, endpoint)
    assert not final.unreferenced and not final.missing and not final.intents, (
        f"{where}: {len(final.unreferenced)} unreferenced chunks, {len(final.missing)} missing, "
        f"{len(final.intents)} intents left")
    fsck = maintenance("fsck", store_args, "--quiet")
    assert fsck.returncode == 0 and " 0 damaged" in fsck.stdout, fsck.stdout + fsck.stderr

    acked = [w for w in history.writes if w.acked]
    print(f"chaos: {where}: {TRIALS} trials, {len(history.writes)} writes sent, {len(acked)} acknowledged "
          f"({sum(w.kind == 'put' for w in acked)} PUT, {sum(w.kind == 'tus' for w in acked)} tus; "
          f"{sum(w.size >= LARGE for w in acked)} of 1 MiB or more), "
          f"0 lost, 0 corrupt, {history.statuses.get(500, 0)} 500s, {history.no_answer} answers cut off by kills, "
          f"uploads resumed {figures['resumed']} (tuspy {figures['by_tuspy']}, finished by HEAD "
          f"{figures['finished_by_head']}, never created {figures['never_created']}), "
          f"keys checked present/absent {figures['present']}/{figures['absent']}, statuses {dict(history.statuses)}, "
          f"gc at grace 0: {gc.stdout.strip()}; unreferenced after it {len(after_gc.unreferenced)} chunks of "
          f"{len(left)} cut-off PUTs (intents), after they expire {len(final.unreferenced)}; "
          f"lease records {final.leases}, upload records {final.uploads}; "
          f"peak RSS {peak_rss / 2**20:.1f} MiB, peak threads {peak_threads}")
