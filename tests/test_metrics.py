"""The gateway's Prometheus exposition: names, buckets, and counters that move with their events.

What this module is for: proving GET /metrics tells an operator the truth. Histogram buckets span
a cache hit (ms) to a multi-gigabyte transfer (minutes); every name in
``gateway.metrics.METRIC_NAMES`` is exposed by a fresh gateway; each event an operator cares about
(a PUT, a cold and a warm GET, a 404, a 412, a tus upload, a lock wait, a stale lock, drifted or
corrupt chunks, ...) moves exactly the counters it should (a table: event -> metric deltas); and
the lock gauges and /admin/locks show a lock held at scrape time.

What it must never do: assert on timings, or reach into the gateway other than through HTTP,
except to hold a lock (``app["store"].locks``) or damage a chunk in the in-memory store, which
stand in for a slow writer and a misbehaving object store.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import ServeConfig
from gateway.metrics import METRIC_NAMES
from storage import keys
from storage.backends.memory import MemoryBackend
from tests.support.gateway import in_process_gateway

pytestmark = pytest.mark.timeout(60)

CHUNK = 64 * 1024
OBJ = "m/clip.mp4"
OBJ_PATH = "/objects/" + OBJ
BODY = bytes(range(256)) * (3 * CHUNK // 256) + b"tail!"  # 3 full chunks and a 5-byte one
N_CHUNKS = 4

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (like PromQL's sum())."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


async def scrape(session: aiohttp.ClientSession, url: str) -> Samples:
    async with session.get(url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return parse(await r.text())


# ------------------------------------------------------------------------------ buckets
def bucket_bounds(samples: Samples, name: str) -> list[float]:
    return sorted({float(dict(ls)["le"]) for (n, ls) in samples if n == name + "_bucket"})


@pytest.mark.parametrize("histogram, smallest_at_most, largest_at_least", [
    # A cache hit is ~1 ms; a multi-GB upload or a slow viewer takes minutes.
    ("chunkgate_http_request_duration_seconds", 0.001, 600),
    # A local store answers in well under 5 ms; an S3 put of a big chunk can take a minute.
    ("chunkgate_backend_request_duration_seconds", 0.001, 60),
    # An uncontended lock is granted at once; waits end at the 20 s default lock timeout.
    ("chunkgate_lock_wait_seconds", 0.001, 20),
])
async def test_histogram_buckets_span_media_latencies(histogram: str, smallest_at_most: float, largest_at_least: float) -> None:
    async with in_process_gateway(ServeConfig(chunk_size=CHUNK)) as (url, _app):
        async with aiohttp.ClientSession() as session:
            async with session.put(url + OBJ_PATH, data=BODY) as r:
                assert r.status == 201
            samples = await scrape(session, url)
    bounds = bucket_bounds(samples, histogram)
    assert bounds, f"{histogram} has no buckets"
    finite = [b for b in bounds if b != float("inf")]
    assert bounds[-1] == float("inf")
    assert finite[0] <= smallest_at_most, finite
    assert finite[-1] >= largest_at_least, finite
    # No decade without a bucket in between, so a quantile is never a wild interpolation.
    assert all(b / a <= 10 for a, b in zip(finite, finite[1:])), finite


# The names API.md promises ("Metrics that must exist", "Hooks"), written out here on purpose:
# the module's own METRIC_NAMES cannot vouch for itself.
API_METRIC_NAMES = {
    "chunkgate_backend_bytes_read_total",
    "chunkgate_backend_request_duration_seconds",
    "chunkgate_backend_requests_total",
    "chunkgate_cache_hits_total",
    "chunkgate_cache_misses_total",
    "chunkgate_chunk_size_mismatch_total",
    "chunkgate_hook_deliveries_total",
    "chunkgate_hook_outbox_oldest_age_seconds",
    "chunkgate_http_request_duration_seconds",
    "chunkgate_http_requests_total",
    "chunkgate_lock_acquisitions_total",
    "chunkgate_lock_oldest_age_seconds",
    "chunkgate_lock_stale_cleared_total",
    "chunkgate_lock_timeouts_total",
    "chunkgate_lock_wait_seconds",
    "chunkgate_locks_active",
    "chunkgate_locks_waiting",
}


def api_metric_names() -> set[str]:
    """API_METRIC_NAMES, checked against API.md itself where the shared contract is beside us."""
    import re

    api = Path(__file__).resolve().parents[2] / "shared" / "API.md"
    if api.exists():
        assert set(re.findall(r"`(chunkgate_[a-z_]+)", api.read_text())) == API_METRIC_NAMES
    return API_METRIC_NAMES


# ------------------------------------------------------------------------------ names
async def test_every_agreed_metric_name_is_exposed() -> None:
    async with in_process_gateway(ServeConfig(chunk_size=CHUNK)) as (url, _app):
        async with aiohttp.ClientSession() as session:
            async with session.put(url + OBJ_PATH, data=BODY) as r:  # request bytes, a commit
                assert r.status == 201
            async with session.get(url + OBJ_PATH) as r:  # response bytes, store reads, cache
                assert await r.read() == BODY
            samples = await scrape(session, url)
    exposed = {name for name, _ in samples}
    # The names API.md promises, read from the contract itself (a name dropped from both the
    # module and its own list would otherwise pass), and then the module's own longer list.
    promised = api_metric_names()
    assert len(promised) >= 15, promised
    missing = sorted(n for n in promised | set(METRIC_NAMES) if n not in exposed and n + "_bucket" not in exposed)
    assert not missing, f"in METRIC_NAMES but not on /metrics: {missing}"
    # The API.md labels exist from the start, so ratios and alerts have series before any error.
    for verdict in ("tolerated", "rejected"):
        assert ("chunkgate_chunk_size_mismatch_total", (("verdict", verdict),)) in samples
    for outcome in ("ok", "not_found", "precondition_failed", "transient", "permanent"):
        assert ("chunkgate_backend_requests_total", (("op", "get"), ("outcome", outcome))) in samples
    # Process metrics ride along (the dashboard's memory/CPU/fd panels use them).
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"} <= exposed


# ------------------------------------------------------------------------------ counters move
@dataclass
class Ctx:
    session: aiohttp.ClientSession
    url: str
    app: Any
    backend: MemoryBackend
    notes: dict[str, Any] = field(default_factory=dict)


Step = Callable[[Ctx], Awaitable[None]]


class AtLeast(float):
    """An expected delta that may be exceeded (retries, readahead, manifest reads)."""


async def _put(ctx: Ctx, path: str = OBJ_PATH, body: bytes = BODY, expect: int = 201, **headers: str) -> None:
    async with ctx.session.put(ctx.url + path, data=body, headers=headers) as r:
        assert r.status == expect, await r.text()


async def _get(ctx: Ctx, path: str = OBJ_PATH, expect: int = 200, **headers: str) -> bytes:
    async with ctx.session.get(ctx.url + path, headers=headers) as r:
        assert r.status == expect, r.status
        return await r.read()


async def put_object(ctx: Ctx) -> None:
    await _put(ctx)


async def get_object(ctx: Ctx) -> None:
    assert await _get(ctx) == BODY


async def get_range(ctx: Ctx) -> None:
    assert await _get(ctx, expect=206, Range="bytes=100-1099") == BODY[100:1100]


async def get_missing(ctx: Ctx) -> None:
    await _get(ctx, "/objects/m/missing.mp4", expect=404)


async def put_stale_if_match(ctx: Ctx) -> None:
    await _put(ctx, body=b"new", expect=412, **{"If-Match": '"stale"'})


async def delete_object(ctx: Ctx) -> None:
    async with ctx.session.delete(ctx.url + OBJ_PATH) as r:
        assert r.status == 204


TUS = {"Tus-Resumable": "1.0.0"}


async def tus_create(ctx: Ctx) -> None:
    meta = "key " + base64.b64encode(b"m/upload.webm").decode()
    async with ctx.session.post(ctx.url + "/uploads/", headers={**TUS, "Upload-Length": str(len(BODY)),
                                                                "Upload-Metadata": meta}) as r:
        assert r.status == 201
        ctx.notes["upload"] = ctx.url + r.headers["Location"] if r.headers["Location"].startswith("/") else r.headers["Location"]


async def tus_send_all(ctx: Ctx) -> None:
    async with ctx.session.patch(ctx.notes["upload"], data=BODY, headers={
            **TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}) as r:
        assert r.status == 204, await r.text()
    assert await _get(ctx, "/objects/m/upload.webm") == BODY


async def tus_terminate(ctx: Ctx) -> None:
    async with ctx.session.delete(ctx.notes["upload"], headers=TUS) as r:
        assert r.status == 204


async def put_while_key_locked(ctx: Ctx) -> None:
    """A slow writer holds the key; a PUT queues behind it and commits once it lets go."""
    locks = ctx.app["store"].locks
    lease = await locks.acquire(OBJ, owner="slow writer")
    put = asyncio.ensure_future(_put(ctx))
    while locks.waiting() == 0:
        await asyncio.sleep(0.01)
    await lease.release()
    await put


async def put_while_key_locked_too_long(ctx: Ctx) -> None:
    lease = await ctx.app["store"].locks.acquire(OBJ, owner="stuck writer")
    await _put(ctx, expect=503)  # lock_timeout is short in this row's config
    await lease.release()


async def put_over_stale_lock(ctx: Ctx) -> None:
    await ctx.app["store"].locks.acquire(OBJ, owner="crashed writer")  # never renewed nor released
    await asyncio.sleep(0.3)  # > lock_stale_after of this row's config
    await _put(ctx)


def damage_chunk(index: int, change: Callable[[bytes], bytes]) -> Step:
    async def damage(ctx: Ctx) -> None:
        manifest = await _get(ctx, OBJ_PATH + "?manifest")
        import json

        version = json.loads(manifest)["version"]
        ck = keys.chunk_key(OBJ, version, index)
        blob = await ctx.backend.get(ck)
        await ctx.backend.put(ck, change(blob.data))

    return damage


async def get_object_ignoring_cut(ctx: Ctx) -> None:
    """Read whatever the gateway sends: a damaged chunk ends the body early or fails the request."""
    async with ctx.session.get(ctx.url + OBJ_PATH) as r:
        try:
            await r.read()
        except aiohttp.ClientPayloadError:
            pass


@dataclass
class Event:
    name: str
    act: list[Step]
    deltas: dict[tuple[str, tuple[tuple[str, str], ...]], float]
    prepare: list[Step] = field(default_factory=list)
    cfg: dict[str, Any] = field(default_factory=dict)


def m(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return (name, tuple(sorted(labels.items())))


OBJ_ROUTE = "/objects/{key}"
EVENTS = [
    Event("PUT of a 4-chunk object", [put_object], {
        m("chunkgate_http_requests_total", method="PUT", route=OBJ_ROUTE, status="201"): 1,
        m("chunkgate_http_request_duration_seconds_count", method="PUT", route=OBJ_ROUTE): 1,
        m("chunkgate_http_request_bytes_total", route=OBJ_ROUTE): len(BODY),
        m("chunkgate_objects_committed_total"): 1,
        m("chunkgate_backend_bytes_written_total"): AtLeast(len(BODY)),
        m("chunkgate_backend_requests_total", op="put", outcome="ok"): AtLeast(N_CHUNKS + 1),
        m("chunkgate_backend_request_duration_seconds_count", op="put"): AtLeast(N_CHUNKS + 1),
        m("chunkgate_lock_acquisitions_total"): AtLeast(1),
        m("chunkgate_lock_wait_seconds_count"): AtLeast(1),
        m("chunkgate_cache_hits_total"): 0,
    }),
    Event("cold GET", [get_object], prepare=[put_object], deltas={
        m("chunkgate_http_requests_total", method="GET", route=OBJ_ROUTE, status="200"): 1,
        m("chunkgate_http_response_bytes_total", route=OBJ_ROUTE): len(BODY),
        m("chunkgate_backend_bytes_read_total"): AtLeast(len(BODY)),
        m("chunkgate_cache_misses_total"): AtLeast(1),
        m("chunkgate_cache_readahead_total"): AtLeast(1),  # readahead=2 by default
        m("chunkgate_cache_bytes"): AtLeast(len(BODY)),  # a gauge: the chunks now held
        m("chunkgate_backend_requests_total", op="get", outcome="ok"): AtLeast(N_CHUNKS),
        m("chunkgate_objects_committed_total"): 0,
    }),
    Event("warm GET", [get_object], prepare=[put_object, get_object], deltas={
        m("chunkgate_cache_hits_total"): N_CHUNKS,
        m("chunkgate_cache_misses_total"): 0,
        m("chunkgate_backend_bytes_read_total"): 0,
        m("chunkgate_http_response_bytes_total", route=OBJ_ROUTE): len(BODY),
    }),
    Event("cache smaller than the object", [get_object], prepare=[put_object], cfg={"cache_size": 2 * CHUNK}, deltas={
        m("chunkgate_cache_evictions_total"): AtLeast(1),
    }),
    Event("range GET", [get_range], prepare=[put_object], deltas={
        m("chunkgate_http_requests_total", method="GET", route=OBJ_ROUTE, status="206"): 1,
        m("chunkgate_http_response_bytes_total", route=OBJ_ROUTE): 1000,
    }),
    Event("GET of a missing key", [get_missing], deltas={
        m("chunkgate_http_requests_total", method="GET", route=OBJ_ROUTE, status="404"): 1,
        m("chunkgate_backend_requests_total", outcome="not_found"): AtLeast(1),
        m("chunkgate_backend_requests_total", outcome="transient"): 0,
    }),
    Event("PUT with a stale If-Match", [put_stale_if_match], prepare=[put_object], deltas={
        m("chunkgate_http_requests_total", method="PUT", route=OBJ_ROUTE, status="412"): 1,
        m("chunkgate_objects_committed_total"): 0,
    }),
    Event("DELETE", [delete_object], prepare=[put_object], deltas={
        m("chunkgate_http_requests_total", method="DELETE", route=OBJ_ROUTE, status="204"): 1,
        # The record becomes a tombstone (a conditional put); gc removes it later, and the
        # version's chunks go after --grace: nothing is deleted at once.
        m("chunkgate_backend_requests_total", op="put", outcome="ok"): AtLeast(1),
        m("chunkgate_backend_requests_total", op="delete", outcome="ok"): 0,
    }),
    Event("tus upload to the end", [tus_create, tus_send_all], deltas={
        m("chunkgate_uploads_created_total"): 1,
        m("chunkgate_uploads_completed_total"): 1,
        m("chunkgate_uploads_aborted_total"): 0,
        m("chunkgate_upload_bytes_total"): len(BODY),
        m("chunkgate_uploads_in_progress"): 0,
        m("chunkgate_objects_committed_total"): 1,
        m("chunkgate_http_requests_total", method="POST", route="/uploads/", status="201"): 1,
        m("chunkgate_http_requests_total", method="PATCH", route="/uploads/{id}", status="204"): 1,
    }),
    Event("tus upload started", [tus_create], deltas={
        m("chunkgate_uploads_created_total"): 1,
        m("chunkgate_uploads_in_progress"): 1,
    }),
    Event("tus upload terminated", [tus_terminate], prepare=[tus_create], deltas={
        m("chunkgate_uploads_aborted_total"): 1,
        m("chunkgate_uploads_completed_total"): 0,
        m("chunkgate_uploads_in_progress"): -1,
    }),
    Event("PUT waits for a held key", [put_while_key_locked], deltas={
        m("chunkgate_lock_acquisitions_total"): AtLeast(2),
        m("chunkgate_lock_wait_seconds_count"): AtLeast(2),
        m("chunkgate_lock_timeouts_total"): 0,
        m("chunkgate_locks_active"): 0,
        m("chunkgate_locks_waiting"): 0,
    }),
    Event("PUT gives up on a held key", [put_while_key_locked_too_long], cfg={"lock_timeout": 0.2}, deltas={
        m("chunkgate_lock_timeouts_total"): 1,
        m("chunkgate_http_requests_total", method="PUT", route=OBJ_ROUTE, status="503"): 1,
        m("chunkgate_objects_committed_total"): 0,
    }),
    Event("PUT clears a stale lock", [put_over_stale_lock], cfg={"lock_stale_after": 0.1}, deltas={
        m("chunkgate_lock_stale_cleared_total"): 1,
        m("chunkgate_objects_committed_total"): 1,
    }),
    Event("chunk grew by 100 bytes (tolerated)", [get_object_ignoring_cut],
          prepare=[put_object, damage_chunk(1, lambda b: b + b"\0" * 100)], deltas={
        m("chunkgate_chunk_size_mismatch_total", verdict="tolerated"): 1,
        m("chunkgate_chunk_size_mismatch_total", verdict="rejected"): 0,
        m("chunkgate_manifest_repairs_total"): 1,
    }),
    Event("chunk lost half its bytes (rejected)", [get_object_ignoring_cut],
          prepare=[put_object, damage_chunk(1, lambda b: b[: len(b) // 2])], deltas={
        m("chunkgate_chunk_size_mismatch_total", verdict="rejected"): AtLeast(1),
        m("chunkgate_chunk_size_mismatch_total", verdict="tolerated"): 0,
        m("chunkgate_manifest_repairs_total"): 0,
    }),
    Event("chunk bytes changed, same size", [get_object_ignoring_cut],
          prepare=[put_object, damage_chunk(0, lambda b: bytes(reversed(b)))], deltas={
        m("chunkgate_chunk_checksum_mismatch_total"): AtLeast(1),
        m("chunkgate_chunk_size_mismatch_total", verdict="tolerated"): 0,
    }),
]


def unmet(before: Samples, after: Samples, deltas: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> list[str]:
    problems = []
    for (name, labels), want in deltas.items():
        got = total(after, name, **dict(labels)) - total(before, name, **dict(labels))
        ok = got >= want if isinstance(want, AtLeast) else got == want
        if not ok:
            problems.append(f"{name}{dict(labels)}: moved by {got:g}, expected {'>= ' if isinstance(want, AtLeast) else ''}{want:g}")
    return problems


@pytest.mark.parametrize("event", EVENTS, ids=[e.name for e in EVENTS])
async def test_counters_move_with_their_events(event: Event) -> None:
    backend = MemoryBackend()
    cfg = ServeConfig(chunk_size=CHUNK, **event.cfg)
    async with in_process_gateway(cfg, backend=backend) as (url, app):
        async with aiohttp.ClientSession() as session:
            ctx = Ctx(session, url, app, backend)
            for step in event.prepare:
                await step(ctx)
            before = await scrape(session, url)
            for step in event.act:
                await step(ctx)
            # Some effects land just after the response (a manifest repair, a lease release):
            # poll briefly rather than guess a sleep.
            deadline = time.monotonic() + 5
            while True:
                after = await scrape(session, url)
                problems = unmet(before, after, event.deltas)
                if not problems or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
    assert not problems, f"{event.name}:\n" + "\n".join(problems)


# ------------------------------------------------------------------------------ lock gauges
async def test_lock_gauges_and_admin_locks_show_a_held_lock_at_scrape_time() -> None:
    async with in_process_gateway(ServeConfig(chunk_size=CHUNK)) as (url, app):
        locks = cast(Any, app)["store"].locks
        async with aiohttp.ClientSession() as session:
            idle = await scrape(session, url)
            assert [total(idle, n) for n in ("chunkgate_locks_active", "chunkgate_locks_waiting",
                                             "chunkgate_lock_oldest_age_seconds")] == [0, 0, 0]

            lease = await locks.acquire("m/held.mp4", owner="editor-1")
            put = asyncio.ensure_future(_put(Ctx(session, url, app, MemoryBackend()), "/objects/m/held.mp4"))
            while locks.waiting() == 0:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)  # so the holder's age is visibly above zero
            held = await scrape(session, url)
            assert total(held, "chunkgate_locks_active") == 1
            assert total(held, "chunkgate_locks_waiting") == 1
            assert total(held, "chunkgate_lock_oldest_age_seconds") > 0
            async with session.get(url + "/admin/locks") as r:
                assert r.status == 200
                snapshot = await r.json()
            text = repr(snapshot)
            assert "m/held.mp4" in text and "editor-1" in text, snapshot

            await lease.release()
            await put
            released = await scrape(session, url)
            assert total(released, "chunkgate_locks_active") == 0
            assert total(released, "chunkgate_locks_waiting") == 0
            assert total(released, "chunkgate_lock_oldest_age_seconds") == 0
            async with session.get(url + "/admin/locks") as r:
                assert "m/held.mp4" not in repr(await r.json())
