"""post-finish / post-delete delivered at least once across crashes, end to end (issue 17, "Must show").

Real ``chunkgate serve`` processes with ``--hook-url`` pointing at a real receiver in the test, and
100 uploads over 20 keys mixing PUT (aiohttp) and tus (tuspy), with a few DELETEs in between.
Per key the uploads run one after another (so the order the client saw them acknowledged is the
commit order); the keys run at once. While they run:

- the receiver goes down (connection refused: pre-create fails closed with 503, committed
  uploads' events wait), then comes back answering 500 to every post-* event for a while;
- a gateway is SIGKILLed while events of its commits are undelivered, uploads are in flight, and
  deliveries are in the app's hands (it answers them 2xx a second later, to a dead gateway), and
  restarted on the same store (its uploads resume there, or on the other gateway);
- some uploads are made to fail for sure: a PUT with a wrong X-Checksum-SHA256, a tus upload
  terminated half-way, and every upload the hook's absence refused.

Every upload attempt has a size of its own, so each event names the attempt it is about. Checked
afterwards: every acknowledged upload has a post-finish naming its version (and tus upload id),
every acknowledged DELETE a post-delete naming the version it deleted; no event at all (accepted
or not) is about an attempt that certainly did not commit; per key, events arrive in commit
order (redeliveries included; with one gateway there must be one: what the app had when the
gateway died); and the outbox is empty: no ``o/`` pointer, no record carrying an
event, ``chunkgate_hook_outbox_pending`` 0 on every gateway. Once over a local directory with one
gateway, once with two gateways over one real SeaweedFS bucket with store leases.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from tusclient import client as tus_client
from tusclient.exceptions import TusCommunicationError

from storage import keys
from storage.backends.base import Backend
from storage.backends.open import open_backend
from storage.manifests import ManifestStore
from tests.support.gateway import GatewayProcess
from tests.support.hooks import HookReceiver
from tests.support.servers import ACCESS_KEY, REGION, SECRET_KEY

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parent.parent
ENV = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION,
       "PYTHONPATH": str(REPO)}
CHUNK = 64 * 1024
KEYS = 20
UPLOADS_PER_KEY = 5  # 100 uploads
WAIT = 90.0  # seconds any one phase may take before the test gives up (a hang, not a speed goal)


@dataclass
class Attempt:
    key: str
    op: int  # position in its key's sequence of operations: the commit order
    kind: str  # put | tus | delete
    size: int = 0  # unique per upload attempt
    outcome: str = "pending"  # acked | refused (certainly not committed) | doubt (may have)
    version: str | None = None  # acked upload: its version; delete: the version it deletes
    upload_id: str | None = None


def plan(k: int) -> list[tuple[str, bool]]:
    """Key ``k``'s operations: (kind, spoil the first attempt so that it certainly fails)."""
    ops: list[tuple[str, bool]] = [("put" if (k + j) % 2 else "tus", (k * UPLOADS_PER_KEY + j) % 9 == 4)
                                   for j in range(UPLOADS_PER_KEY)]
    if k % 4 == 0:
        ops.insert(3, ("delete", False))
    if k % 10 == 3:
        ops.append(("delete", False))
    return ops


@dataclass
class Run:
    """The clients' side of one run: which gateways are up, every attempt, what the conductor waits on."""

    urls: list[str | None]
    records: ManifestStore  # the test's own reader of the store
    http: aiohttp.ClientSession
    attempts: list[Attempt] = field(default_factory=list)
    sizes: Any = field(default_factory=lambda: itertools.count())
    hook_refusals: int = 0
    routed: Any = field(default_factory=lambda: itertools.count())
    dead: str = ""  # the URL of the gateway that was killed

    def url(self) -> str:
        live = [u for u in self.urls if u] or [self.dead]  # all down: a refused connection, as for a user
        return live[next(self.routed) % len(live)]

    def new(self, key: str, op: int, kind: str) -> Attempt:
        attempt = Attempt(key, op, kind, size=96 * 1024 + 13 * next(self.sizes) if kind != "delete" else 0)
        self.attempts.append(attempt)
        return attempt

    @property
    def acked_uploads(self) -> int:
        return sum(1 for a in self.attempts if a.outcome == "acked" and a.kind != "delete")


# ------------------------------------------------------------------------------ the clients
async def put_attempt(run: Run, a: Attempt, data: bytes, spoil: bool) -> None:
    headers = {"Content-Type": "video/mp4"}
    if spoil:
        headers["X-Checksum-SHA256"] = "0" * 64  # the body's is another: 400, nothing committed
    try:
        async with run.http.put(f"{run.url()}/objects/{a.key}", data=data, headers=headers) as resp:
            doc = await resp.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        a.outcome = "doubt"  # the gateway died under it, say
        return
    if resp.status == 201:
        a.outcome, a.version = "acked", doc["version"]
    elif resp.status == 400 and spoil and doc.get("error") == "checksum_mismatch":
        a.outcome = "refused"
    elif resp.status == 503 and doc.get("error") in ("hook_unavailable", "too_many_uploads"):
        a.outcome = "refused"  # refused before a byte was read
        run.hook_refusals += doc["error"] == "hook_unavailable"
    else:
        a.outcome = "doubt"


def _tus_sync(run: Run, a: Attempt, data: bytes, spoil: bool) -> None:
    """One tus attempt (tuspy is synchronous): create, then send it all, resuming after any
    failure from the offset the gateway reports, on whichever gateway is up, until it is done
    or the upload is gone."""
    def uploader(url: str | None = None) -> Any:
        client = tus_client.TusClient(f"{run.url()}/uploads/")
        return client.uploader(file_stream=io.BytesIO(data), chunk_size=CHUNK, url=url,
                               metadata={"key": a.key, "filetype": "video/mp4"})

    up = uploader()
    try:
        up.set_url(up.create_url())
    except TusCommunicationError as exc:
        body = bytes(exc.response_content or b"")
        if exc.status_code == 503 and (b"hook_unavailable" in body or b"too_many_uploads" in body):
            a.outcome = "refused"
            run.hook_refusals += b"hook_unavailable" in body
        else:
            a.outcome = "doubt"  # created or not, it has no byte: it can never complete
        return
    a.upload_id = up.url.rsplit("/", 1)[1]
    if spoil:
        try:
            up.upload(stop_at=CHUNK)
            gone = requests.delete(up.url, headers={"Tus-Resumable": "1.0.0"}, timeout=30)
        except (TusCommunicationError, requests.RequestException):
            a.outcome = "doubt"
            return
        a.outcome = "refused" if gone.status_code == 204 else "doubt"
        return
    for _ in range(200):
        try:
            up.upload()
            a.outcome = "acked"  # the last PATCH (or a HEAD at the full length) answered: committed
            return
        except TusCommunicationError as exc:
            if exc.status_code in (404, 410):
                a.outcome = "doubt"
                return
        time.sleep(0.1)
        try:
            up = uploader(f"{run.url()}/uploads/{a.upload_id}")  # HEAD: the stored offset
        except TusCommunicationError as exc:
            if exc.status_code in (404, 410):
                a.outcome = "doubt"
                return
    a.outcome = "doubt"


async def tus_attempt(run: Run, a: Attempt, data: bytes, spoil: bool) -> None:
    await asyncio.to_thread(_tus_sync, run, a, data, spoil)
    if a.outcome == "acked":
        current = await run.records.read(a.key)
        assert current is not None and current.manifest is not None
        assert current.manifest.extra.get("upload") == a.upload_id, (a, current.manifest.extra)
        a.version = current.version


async def delete_op(run: Run, key: str, op: int) -> None:
    current = await run.records.read(key)
    assert current is not None and current.version is not None, f"{key} should exist before op {op}"
    a = run.new(key, op, "delete")
    a.version = current.version
    tried = False
    while True:
        try:
            async with run.http.delete(f"{run.url()}/objects/{key}") as resp:
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError):
            status = None
        if status == 204 or (status == 404 and tried):  # 404 after a try in doubt: that try did it
            a.outcome = "acked"
            return
        assert status != 404, f"DELETE {key}: 404 on a first try"
        tried = True
        await asyncio.sleep(0.1)


async def key_worker(run: Run, k: int) -> None:
    key = f"media/{k:02d}.mp4"
    for op, (kind, spoil) in enumerate(plan(k)):
        if kind == "delete":
            await delete_op(run, key, op)
            continue
        for n in itertools.count():
            a = run.new(key, op, kind)
            data = os.urandom(a.size)
            await (put_attempt if kind == "put" else tus_attempt)(run, a, data, spoil and n == 0)
            if a.outcome == "acked":
                break
            await asyncio.sleep(0.1)


# ------------------------------------------------------------------------------ the conductor
PHASES: list[tuple[str, float]] = []  # (what was waited for, when it held): printed with the summary


async def until(what: str, predicate: Callable[[], Awaitable[bool] | bool], workers: Any = None) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            PHASES.append((what, loop.time()))
            return
        if workers is not None and workers.done():
            workers.result()  # a worker's assertion surfaces here
        assert loop.time() < deadline, f"gave up waiting for: {what}"
        await asyncio.sleep(0.05)


async def store_keys(backend: Backend, prefix: str) -> list[str]:
    return [info.key async for info in backend.list(prefix)]


async def records_with_events(records: ManifestStore) -> list[str]:
    out = []
    async for key in records.scan():
        current = await records.read(key)
        if current is not None and current.events:
            out.append(key)
    return out


async def scrape(http: aiohttp.ClientSession, url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with http.get(f"{url}/metrics") as resp:
        text = await resp.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples}


async def outbox_gauges(http: aiohttp.ClientSession, url: str) -> tuple[float, float]:
    values = await scrape(http, url)
    return values[("chunkgate_hook_outbox_pending", ())], values[("chunkgate_hook_outbox_oldest_age_seconds", ())]


async def failed_post_deliveries(http: aiohttp.ClientSession, urls: list[str]) -> float:
    """post-* deliveries that got no answer (the app down), over ``urls``."""
    total = 0.0
    for url in urls:
        values = await scrape(http, url)
        total += sum(values[("chunkgate_hook_deliveries_total", (("outcome", "error"), ("type", kind)))]
                     for kind in ("post-finish", "post-delete"))
    return total


def start(args: list[str]) -> GatewayProcess:
    return GatewayProcess(args, env=ENV, cwd=REPO, ready_timeout=60)


async def scenario(store: str, args: list[str], *, gateways: int, store_kwargs: dict[str, Any],
                   expect_redelivery: bool) -> None:
    posts = "ok"  # how the app answers post-* events: ok | failing (500) | slow (1 s, then 204)
    in_handler = 0

    async def respond(event: dict[str, Any]) -> tuple[int, str]:
        nonlocal in_handler
        if event["type"] == "pre-create" or posts == "ok":
            return 204, ""
        if posts == "failing":
            return 500, "the app's event handler is broken"
        in_handler += 1
        try:
            await asyncio.sleep(1.0)  # a killed gateway never hears this 204: the app has the event, the store too
        finally:
            in_handler -= 1
        return 204, ""

    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(32))  # tuspy threads
    PHASES[:] = [("start", asyncio.get_running_loop().time())]
    backend = open_backend(store, **store_kwargs)
    records = ManifestStore(backend)
    async with HookReceiver(respond) as receiver:
        common = ["--store", store, "--hook-url", receiver.url, "--hook-timeout", "2s", "--hook-retry-max", "1s",
                  "--hook-scan-interval", "1s", "--chunk-size", "64KiB", "--grace", "1h", "--log-level", "warning",
                  *args]
        procs = list(await asyncio.gather(*(asyncio.to_thread(start, common) for _ in range(gateways))))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            run = Run([p.url for p in procs], records, http)
            workers = asyncio.ensure_future(asyncio.gather(*(key_worker(run, k) for k in range(KEYS))))
            try:
                await until("20 uploads acknowledged", lambda: run.acked_uploads >= 20, workers)
                await receiver.stop()  # the app is down: uploads are refused, events wait
                await until("uploads refused while the hook is down", lambda: run.hook_refusals >= 3, workers)
                await until("a post-* delivery failed while the hook is down",
                            lambda: failed_post_deliveries(http, [p.url for p in procs]), workers)
                posts = "failing"
                await receiver.start()  # back on the same port, but failing every post-* event
                await until("50 uploads acknowledged", lambda: run.acked_uploads >= 50, workers)
                posts = "slow"
                await until("deliveries in the app's hands", lambda: in_handler >= 1, workers)
                pending_at_kill = await store_keys(backend, keys.OUTBOX_PREFIX)
                victim = procs[0]
                run.dead, run.urls[0] = victim.url, None
                await asyncio.to_thread(victim.stop, kill=True)  # SIGKILL, uploads and deliveries in flight
                posts = "failing"
                assert pending_at_kill, "the killed gateway had no undelivered event: the crash proved nothing"
                undelivered = await records_with_events(records)
                assert undelivered, "no record carried an undelivered event when the gateway was killed"
                procs[0] = await asyncio.to_thread(start, common)  # restarted on the same store
                run.urls[0] = procs[0].url
                await until("70 uploads acknowledged", lambda: run.acked_uploads >= 70, workers)
                posts = "ok"
                await asyncio.wait_for(workers, WAIT)
                PHASES.append(("every operation acknowledged", asyncio.get_running_loop().time()))

                async def outbox_empty() -> bool:
                    if await store_keys(backend, keys.OUTBOX_PREFIX) or await records_with_events(records):
                        return False
                    gauges = [await outbox_gauges(http, p.url) for p in procs]
                    return all(g == (0, 0) for g in gauges)

                await until("the outbox to empty", outbox_empty)
                await verify(run, receiver, records)
                ids = [e["id"] for e in receiver.accepted if e["type"] != "pre-create"]
                if expect_redelivery:  # what the app had when the gateway died came again, same id
                    assert len(ids) > len(set(ids)), "no event was redelivered after the kill"
                print(summary(run, receiver, len(pending_at_kill), len(undelivered)))
            except BaseException:
                for p in procs:
                    print("".join(p.stderr_lines[-60:]))
                raise
            finally:
                workers.cancel()
                await asyncio.gather(workers, return_exceptions=True)
                await asyncio.gather(*(asyncio.to_thread(p.stop) for p in procs))
    await backend.close()


async def verify(run: Run, receiver: HookReceiver, records: ManifestStore) -> None:
    uploads = {a.size: a for a in run.attempts if a.kind != "delete"}
    deletes = {(a.key, a.version): a for a in run.attempts if a.kind == "delete"}
    posts = [e for e in receiver.events if e["type"] != "pre-create"]  # every POST, answered 2xx or not
    delivered = [e for e in receiver.accepted if e["type"] != "pre-create"]

    def attempt_of(event: dict[str, Any]) -> Attempt:
        if event["type"] == "post-finish":
            a = uploads.get(event["size"])
            assert a is not None and a.key == event["key"], f"a post-finish no upload attempt made: {event}"
        else:
            assert event["type"] == "post-delete", event
            a = deletes.get((event["key"], event["version"]))
            assert a is not None, f"a post-delete no DELETE made: {event}"
        return a

    # No event, delivered or only tried, is about an attempt that certainly did not commit.
    for event in posts:
        a = attempt_of(event)
        assert a.outcome in ("acked", "doubt"), f"an event for an upload that did not commit: {event} {a}"
        if a.outcome == "acked" and a.kind != "delete":
            assert event["version"] == a.version, (event, a)
            assert event["upload_id"] == (a.upload_id if a.kind == "tus" else None), (event, a)
        assert event["id"] and all(e["id"] != event["id"] or e == event for e in posts)  # one id, one event
    # Every acknowledged commit has at least one accepted event naming its version.
    accepted = {(e["key"], e["type"], e["version"]) for e in delivered}
    for a in run.attempts:
        if a.outcome == "acked":
            kind = "post-delete" if a.kind == "delete" else "post-finish"
            assert (a.key, kind, a.version) in accepted, f"no {kind} delivered for {a}"
    # Per key, in commit order: first deliveries never go backwards. A repeat may come later:
    # a dead gateway's request still in flight when another took over can land after newer
    # events (at least once means an app deduplicates by id), but it repeats a delivered id.
    by_key: dict[str, list[int]] = {}
    seen_ids: set[str] = set()
    for event in delivered:
        if event["id"] in seen_ids:
            continue
        seen_ids.add(event["id"])
        by_key.setdefault(event["key"], []).append(attempt_of(event).op)
    for key, ops in by_key.items():
        assert ops == sorted(ops), f"{key}: events out of commit order: {ops}"
    # The store ends as the clients left it.
    for k in range(KEYS):
        key = f"media/{k:02d}.mp4"
        last = [a for a in run.attempts if a.key == key and a.outcome == "acked"][-1]
        current = await records.read(key)
        if last.kind == "delete":
            assert current is None or current.manifest is None, (key, current)
        else:
            assert current is not None and current.version == last.version, (key, current, last)


def summary(run: Run, receiver: HookReceiver, pointers_at_kill: int, records_at_kill: int) -> str:
    outcomes = {o: sum(1 for a in run.attempts if a.outcome == o and a.kind != "delete") for o in ("acked", "refused", "doubt")}
    ids = [e["id"] for e in receiver.accepted if e["type"] != "pre-create"]
    return (f"upload attempts {outcomes}, deletes {sum(1 for a in run.attempts if a.kind == 'delete')}; "
            f"at the kill {pointers_at_kill} pointers and {records_at_kill} records with undelivered events; "
            f"post-* POSTs {sum(1 for e in receiver.events if e['type'] != 'pre-create')}, accepted {len(ids)}, "
            f"distinct {len(set(ids))}; phases: " + ", ".join(f"{what} +{t - PHASES[0][1]:.1f}s" for what, t in PHASES[1:]))


# ------------------------------------------------------------------------------ the tests
async def test_one_gateway_killed_and_restarted_delivers_every_committed_event_once_at_least(tmp_path: Path) -> None:
    await scenario(str(tmp_path / "store"), ["--lock-stale-after", "2s"], gateways=1, store_kwargs={},
                   expect_redelivery=True)


@pytest.mark.seaweedfs
async def test_two_gateways_over_one_seaweedfs_bucket_one_killed(seaweedfs: Any) -> None:
    bucket = seaweedfs.new_bucket()
    await scenario(f"s3://{bucket}", ["--s3-endpoint-url", seaweedfs.endpoint, "--locks", "store",
                                      "--lock-stale-after", "2s", "--lock-timeout", "30s"],
                   gateways=2, store_kwargs={"s3_endpoint_url": seaweedfs.endpoint},
                   expect_redelivery=False)  # the deliveries in flight at the kill may all be the other gateway's
