"""Seeded workloads for the simulator, and the driver that runs one and checks it.

A workload is ``Settings`` and a list of ``Op``s. The driver starts each op as a task on a
gateway (writes, reads and maintenance overlap), lets the loop run a seeded slice of virtual
time, and checks the invariants after every step; then it stops issuing, lets everything
finish, moves time past every grace period and expiry, runs the sweeps, gc and fsck once
more, and checks that nothing is left behind (I4).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from storage import keys
from storage.errors import ChunkSizeDrift, ManifestRepairing, ObjectNotFound, StoreUnavailable
from storage.locks import LockTimeout
from storage.fsck import fsck
from storage.gc import collect
from storage.uploads import UploadGone, UploadNotFound, UploadState, info_key

from tests.sim.invariants import Checker, OpRecord, UploadModel, Violation
from tests.sim.vloop import Deadlock, VirtualTimeLoop
from tests.sim.world import GatewayCrashed, Settings, SimGateway, World

try:  # the fix for "a correct checksummed PATCH is told its data is corrupt" (absent when reverted)
    from storage.uploads import BodyInterrupted
except ImportError:  # pragma: no cover - only when the fix is reverted to test the simulator
    BodyInterrupted = None  # type: ignore[assignment,misc]

KINDS = ("put", "put", "put", "get", "get", "get", "delete", "tus_create", "tus_create", "tus_patch", "tus_patch",
         "tus_patch", "tus_patch", "tus_head", "tus_head", "tus_terminate", "gc", "fsck", "drift", "sweep", "crash",
         "cancel", "wait")
KEYS = ("a", "b", "v/c", "long/" + "x" * 100)  # the last fits API.md but not this store (max_key_bytes)


@dataclass(frozen=True)
class _Span:
    """The bytes a GET op reads of an object: all of it (flag 0) or a slice the op's n picks."""

    start: int
    end: int

    @property
    def spans(self) -> list[tuple[int, int]]:
        return [(self.start, self.end)]

    @classmethod
    def of(cls, manifest: Any, op: Any) -> "_Span":
        if manifest.size == 0:
            return cls(0, 0)
        if op.flag == 0:
            return cls(0, manifest.size)
        start = op.n % manifest.size
        return cls(start, min(manifest.size, start + 1 + (op.n * 7) % (8 << op.flag)))


@dataclass(frozen=True)
class Op:
    kind: str
    gw: int = 0
    key: int = 0
    n: int = 0  # a size, an offset or an index, by kind
    flag: int = 0  # a condition or a variant, by kind

    def __str__(self) -> str:
        return f"{self.kind}(gw={self.gw}, key={KEYS[self.key % len(KEYS)]!r}, n={self.n}, flag={self.flag})"


@dataclass
class Workload:
    seed: int
    settings: Settings
    ops: list[Op]


def random_workload(seed: int, *, max_ops: int = 40) -> Workload:
    """The workload of ``seed`` (the soak and the CI seeds)."""
    rng = random.Random(seed)
    stale = 3.0
    settings = Settings(
        gateways=rng.choice((1, 2, 2, 3)),
        p_error=rng.choice((0.0, 0.01, 0.03, 0.08, 0.2)),
        p_throttle=rng.choice((0.0, 0.0, 0.02)),
        p_stall=rng.choice((0.0, 0.0, 0.01, 0.03)),
        clock_skew=rng.choice((0.0, 0.0, 0.5 * stale, 0.9 * stale)),
        stale_after=stale,
    )
    # A third of the workloads aim everything at one key and its uploads: races need company.
    keys_in_play = 1 if rng.random() < 0.33 else 3
    ops = [random_op(rng, keys_in_play) for _ in range(rng.randint(5, max_ops))]
    return Workload(seed, settings, ops)


def aims_at_chunk_writes(op: Op) -> bool:
    """A crash op aimed between two chunk writes (``Driver._aim_crash``) instead of striking at
    once. Chosen by (flag, n) rather than by a kind of its own, so the seeds the soak found bugs
    at keep meaning the same workloads (a new kind would reshuffle every seed's ops)."""
    return op.kind == "crash" and op.flag == 3 and op.n % 4 >= 2


def random_op(rng: random.Random, keys_in_play: int = 3) -> Op:
    return Op(rng.choice(KINDS), rng.randrange(3), rng.randrange(keys_in_play) if rng.random() < 0.95 else 3,
              rng.randrange(400), rng.randrange(4))


def content(tag: str, size: int) -> bytes:
    """Deterministic, distinct bytes for each write."""
    out = b""
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{tag}:{counter}".encode()).digest()
        counter += 1
    return out[:size]


@dataclass
class Driver:
    workload: Workload
    trace: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.workload.seed * 7919 + 1)
        self.settings = self.workload.settings
        self.loop = VirtualTimeLoop()
        self.world = World(self.loop, self.settings, random.Random(self.workload.seed))
        self.checker = Checker(self.world, self.trace)
        self.ops: list[OpRecord] = []
        self.running: list[tuple[OpRecord, asyncio.Task[Any]]] = []
        self.uploads: list[UploadModel] = []
        self.aimed: list[tuple[Any, asyncio.TimerHandle]] = []  # armed crashes (aims_at_chunk_writes)

    # ------------------------------------------------------------------------- running
    def run(self) -> None:
        """Run the workload; raises ``Violation`` at the first broken invariant.

        Every source of chance the code under test uses is fixed by the seed for the run: ids
        and ETags (``os.urandom``) and the jitter of backoffs and polls (``random``)."""
        ids = random.Random(self.workload.seed ^ 0x5EED)
        saved_urandom, saved_random = os.urandom, random.getstate()
        os.urandom = ids.randbytes  # type: ignore[assignment]
        random.seed(self.workload.seed)
        try:
            self.loop.run_until_complete(self._main())
        except Deadlock as exc:
            raise Violation(f"deadlock: {exc}") from None
        finally:
            try:
                self._shutdown()
            finally:
                os.urandom = saved_urandom  # type: ignore[assignment]
                random.setstate(saved_random)

    def _shutdown(self) -> None:
        pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            try:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            except (Deadlock, BaseException):  # noqa: BLE001 - tearing down a failed world
                pass
        self.loop.close()

    async def _main(self) -> None:
        for n, op in enumerate(self.workload.ops):
            self.trace.append(f"t={self.loop.time():9.3f} step {n}: {op}")
            await self._start(op)
            await asyncio.sleep(self.rng.choice((0.0, 0.0, 0.001, 0.003, 0.01, 0.03, 0.2)))
            self.checker.step()
        for disarm, timer in self.aimed:  # no crash after the workload: the final checks need every gateway
            disarm()
            timer.cancel()
        await self._quiesce()
        await self._final()

    async def _quiesce(self, limit: float = 120.0) -> None:
        deadline = self.loop.time() + limit
        while any(not t.done() for _, t in self.running):
            if self.loop.time() > deadline:
                stuck = [str(r) for r, t in self.running if not t.done()]
                raise Violation(f"I4: operations still running {limit:.0f} s after the workload: {stuck}")
            await asyncio.sleep(0.5)
            self.checker.step()

    # ------------------------------------------------------------------------- ops
    def _gateway(self, op: Op) -> SimGateway:
        return self.world.gateways[op.gw % len(self.world.gateways)]

    async def _start(self, op: Op) -> None:
        kind = op.kind
        if kind == "crash":
            if aims_at_chunk_writes(op):
                self._aim_crash(op)
                return
            old = self._gateway(op)
            self.world.crash(old.index)
            self.trace.append(f"    crashed {old.name}; started {self.world.gateways[old.index].name}")
            return
        if kind == "cancel":
            live = [(r, t) for r, t in self.running if not t.done() and r.kind != "gc"]
            if live:
                record, task = live[-1 - op.n % len(live)]
                record.cancelled = True
                task.cancel()
                self.trace.append(f"    cancelled op {record.id} ({record.kind})")
            return
        if kind == "wait":
            await asyncio.sleep((0.05, 0.5, 2.0, 4.0)[op.flag])
            return
        if kind == "drift":
            self._drift(op)
            return
        gw = self._gateway(op)
        record = OpRecord(len(self.ops), kind, gw.name, KEYS[op.key % len(KEYS)], self.loop.time())
        self.ops.append(record)
        self.checker.ops[record.id] = record  # known while it runs: its writes are judged then
        coro = getattr(self, f"_op_{kind}")(gw, record, op)
        task = gw.spawn(self._observe(record, coro), record.id)
        self.running.append((record, task))

    def _aim_crash(self, op: Op, limit: float = 2.0) -> None:
        """Arm every gateway to die at its next chunk write that starts while another of its
        chunk writes is on the wire (one PATCH or PUT handing several chunks to its ChunkWriter):
        that write lands and the earlier ones vanish -- chunk N+1 stored and chunk N not, the kill
        the chaos test found with real processes. The first to get there dies and disarms the
        rest; if none does within ``limit`` of virtual time, the op's gateway crashes then."""
        armed = list(self.world.gateways)

        def disarm() -> None:
            for gw in armed:
                gw.net.crash_between_chunks = None

        def strike(gw: SimGateway, why: str) -> None:
            disarm()
            if self.world.gateways[gw.index] is gw:  # not already replaced by another crash
                self.world.crash(gw.index)
                self.trace.append(f"t={self.loop.time():9.3f}   crashed {gw.name} {why}; started {self.world.gateways[gw.index].name}")

        for gw in armed:
            gw.net.crash_between_chunks = lambda gw=gw: strike(gw, "between two chunk writes (the later landed)")
        fallback = self._gateway(op)
        self.aimed.append((disarm, self.loop.call_later(
            limit, lambda: fallback.net.crash_between_chunks is not None
            and strike(fallback, "(an aimed crash that found no two chunk writes in flight)"))))
        self.trace.append(f"    crash aimed between two chunk writes of any of {[g.name for g in armed]}")

    async def _observe(self, record: OpRecord, coro: Any) -> None:
        try:
            record.result = await coro
            record.outcome = "ok"
        except asyncio.CancelledError:
            record.outcome = "cancelled"
        except GatewayCrashed:
            record.outcome = "crashed"
        except Exception as exc:  # noqa: BLE001 - classified by the checker (I5)
            record.outcome = "error"
            record.error = exc
        record.responded = self.loop.time()
        try:
            self.checker.op_done(record)
        except Violation:
            pass  # recorded; the driver raises it at its next step

    async def _op_put(self, gw: SimGateway, rec: OpRecord, op: Op) -> Any:
        size = op.n % 300
        data = content(f"put{rec.id}", size)
        rec.data = data
        check = None
        if op.flag == 1:
            rec.cond = ("if-none-match", None)

            def check(etag: str | None) -> None:
                if etag is not None:
                    from storage.errors import PreconditionNotMet
                    raise PreconditionNotMet("exists")
        elif op.flag == 2:
            current = self.world.store.peek(rec.key)
            expected = current.manifest.etag if current is not None and current.manifest is not None else '"none"'
            rec.cond = ("if-match", expected)

            def check(etag: str | None, expected: str = expected) -> None:
                if etag != expected:
                    from storage.errors import PreconditionNotMet
                    raise PreconditionNotMet("changed")
        manifest = await gw.store.put(rec.key, self._body(data, op.flag), content_type="video/mp4",
                                      content_length=size, check=check, owner=f"op{rec.id}")
        rec.version = manifest.version
        return manifest

    async def _body(self, data: bytes, pace: int) -> AsyncIterator[bytes]:
        step = max(1, len(data) // (1 + pace))
        for i in range(0, len(data), step):
            if self.rng.random() < 0.3:
                await asyncio.sleep(self.rng.choice((0.0, 0.002, 0.02)))
            yield data[i:i + step]

    async def _op_get(self, gw: SimGateway, rec: OpRecord, op: Op) -> Any:
        for _ in range(2):
            try:  # as the HTTP handler reads: one call, drift before the first byte dealt with
                read = await gw.store.open(rec.key, lambda manifest: _Span.of(manifest, op))
            except ManifestRepairing:
                return None
            try:
                data = b"".join([bytes(v) async for v in read.views()])
            except ChunkSizeDrift:
                continue  # found after the first byte (the handler cuts the connection): read again
            finally:
                await read.aclose()
            rec.read = (read.manifest, read.plan.start, read.plan.end, data)
            return read.manifest.version
        return None

    async def _op_delete(self, gw: SimGateway, rec: OpRecord, op: Op) -> Any:
        check = None
        if op.flag >= 2:
            current = self.world.store.peek(rec.key)
            expected = current.manifest.etag if current is not None and current.manifest is not None else '"none"'
            rec.cond = ("if-match", expected)

            def check(etag: str | None, expected: str = expected) -> None:
                if etag != expected:
                    from storage.errors import PreconditionNotMet
                    raise PreconditionNotMet("changed")
        await gw.store.delete(rec.key, check=check, owner=f"op{rec.id}")
        return True

    async def _op_tus_create(self, gw: SimGateway, rec: OpRecord, op: Op) -> Any:
        length = op.n % 300 if op.flag == 3 else op.n % 140  # mostly one or two chunks: uploads complete
        upload = UploadModel(key=rec.key, length=length, data=content(f"tus{rec.id}", length))
        status = await gw.sessions.create(rec.key, length=length, metadata="", content_type="video/mp4",
                                          owner=f"op{rec.id}")
        upload.id = status.id
        self.uploads.append(upload)
        rec.upload = upload
        self._saw_status(upload, status, rec)
        return status

    def _upload(self, op: Op) -> UploadModel | None:
        """An upload the op's client knows of: of the op's key when it has one (as a client
        resuming its own upload would), else any."""
        live = [u for u in self.uploads if u.id]
        own = [u for u in live if u.key == KEYS[op.key % len(KEYS)]]
        pool = own or live
        return pool[op.n % len(pool)] if pool else None

    async def _op_tus_patch(self, gw: SimGateway, rec: OpRecord, op: Op) -> Any:
        upload = self._upload(op)
        if upload is None:
            return None
        rec.upload = upload
        offset = upload.known_offset
        piece = upload.data[offset:offset + (len(upload.data) if op.flag < 2 else 1 + (op.n * 13) % 160)]
        checksum = ("sha256", hashlib.sha256(piece).digest()) if op.flag in (1, 3) else None
        rec.checksum_ok = checksum is not None
        try:
            async with gw.sessions.lock(upload.id, owner=f"op{rec.id}") as lease:
                status = await gw.sessions.append(upload.id, lease, offset=offset, checksum=checksum,
                                                  content_length=len(piece),
                                                  body=self._patch_body(piece, lease.release_requested, rec)
                                                  if checksum is not None or op.n % 2 else
                                                  SimBodyInto(self, piece, lease.release_requested, rec))
        except Exception as exc:
            new_offset = getattr(exc, "offset", None)
            if isinstance(new_offset, int):
                self.checker.saw_offset(upload, new_offset, rec, acked=False, state=f"refused: {type(exc).__name__}: {exc}")
                upload.known_offset = new_offset
            raise
        self._saw_status(upload, status, rec, acked=True)
        return status

    async def _patch_body(self, data: bytes, stop: asyncio.Event, rec: OpRecord) -> AsyncIterator[bytes]:
        """As gateway.tus.patch_body: stops when another request asks for the upload's lock."""
        step = max(1, len(data) // 3)
        for i in range(0, len(data), step):
            if stop.is_set():
                if BodyInterrupted is None:
                    return
                raise BodyInterrupted("another request asked for the upload")
            if self.rng.random() < 0.5:
                await asyncio.sleep(self.rng.choice((0.0, 0.001, 0.01)))
            if not rec.sent:
                rec.first_byte_at = self.loop.time()
            rec.sent += len(data[i:i + step])
            yield data[i:i + step]

    async def _op_tus_head(self, gw: SimGateway, rec: OpRecord, op: Op) -> Any:
        upload = self._upload(op)
        if upload is None:
            return None
        rec.upload = upload
        async with gw.sessions.lock(upload.id, owner=f"op{rec.id}") as lease:
            status = await gw.sessions.status(upload.id, lease)
        self._saw_status(upload, status, rec)
        return status

    async def _op_tus_terminate(self, gw: SimGateway, rec: OpRecord, op: Op) -> Any:
        upload = self._upload(op)
        if upload is None:
            return None
        rec.upload = upload
        async with gw.sessions.lock(upload.id, owner=f"op{rec.id}") as lease:
            await gw.sessions.terminate(upload.id, lease)
        upload.terminated = True
        return True

    async def _op_gc(self, gw: SimGateway, rec: OpRecord, op: Op) -> Any:
        grace = 0.0 if op.flag % 2 else self.settings.grace
        return await collect(gw.store.backend, grace=grace, now=gw.wall())

    async def _op_fsck(self, gw: SimGateway, rec: OpRecord, op: Op) -> Any:
        return await fsck(gw.store, repair=bool(op.flag % 2))

    async def _op_sweep(self, gw: SimGateway, rec: OpRecord, op: Op) -> Any:
        # The uploads' sweep and the lease records' sweep (serve runs both in the background),
        # racing holders, waiters and releases.
        if op.flag == 3:
            return await gw.locks.clear_stale()
        swept = await asyncio.gather(gw.sessions.sweep(), gw.locks.clear_stale())
        return swept[0]

    def _saw_status(self, upload: UploadModel, status: Any, rec: OpRecord, *, acked: bool = False) -> None:
        self.checker.saw_offset(upload, status.offset, rec, acked=acked, state=status.state.value)
        upload.known_offset = status.offset
        if status.state is UploadState.COMPLETE and status.offset == upload.length:
            rec.acked_upload = True

    def _drift(self, op: Op) -> None:
        """The store changes a chunk's size within tolerance (what the replaced system saw)."""
        key = KEYS[op.key % len(KEYS)]
        current = self.world.store.peek(key)
        if current is None or current.manifest is None or not current.manifest.chunks:
            return
        ref = current.manifest.chunks[op.n % len(current.manifest.chunks)]
        ck = keys.chunk_key(key, current.manifest.version, ref.index)
        entry = self.world.store.mem._entries.get(ck)
        if entry is None or len(entry.data) < 10 or len(entry.data) != ref.size:
            return  # drift from the recorded size only (twice would be corruption at the right size)
        delta = 1 + op.flag % self.settings.tolerance_bytes
        data = entry.data + b"+" * delta if op.n % 2 else entry.data[:-delta]
        self.world.store.mem._entries[ck] = type(entry)(data, entry.etag + "~", entry.last_modified)
        self.world.store.chunk_history.setdefault(ck, []).append(data)
        self.checker.drifted.add(ck)
        self.trace.append(f"    drifted {ck} to {len(data)} bytes")

    # ------------------------------------------------------------------------- the end
    async def _final(self) -> None:
        """No more faults; time passes every grace and expiry; the housekeeping runs; then
        nothing may be left behind (I4)."""
        s = self.settings
        for g in self.world.gateways:
            g.net.settings = Settings(**{**s.__dict__, "p_error": 0.0, "p_throttle": 0.0, "p_stall": 0.0})
        gw = self.world.gateways[0]
        self.trace.append(f"t={self.loop.time():9.3f} final: housekeeping on {gw.name}")
        # Leases of crashed gateways expire; then every upload the clients know of is asked
        # for, as a client resuming it would (HEAD, retried while the answer says "later").
        await asyncio.sleep(3 * s.stale_after)
        for upload in self.uploads:
            if upload.id:
                await gw.spawn(self._final_head(gw, upload), len(self.ops))
        await asyncio.sleep(s.upload_expiry + s.grace + 1)
        for _ in range(3):
            await gw.sessions.sweep()
            await asyncio.sleep(s.tombstone_seconds + 1)
        await collect(gw.store.backend, grace=s.grace, now=gw.wall())
        await gw.locks.clear_stale()
        report = await fsck(gw.store, repair=True)
        await asyncio.sleep(s.stale_after * 3)
        # A second lease sweep, over stale_after after the first: a record (or release request)
        # only seen unchanged since then is gone now too.
        await gw.locks.clear_stale()
        self.checker.step()
        self.checker.final(report, self.uploads)
        self.checker.raise_if_failed()

    async def _final_head(self, gw: SimGateway, upload: UploadModel) -> None:
        rec = OpRecord(len(self.ops), "tus_head", gw.name, upload.key, self.loop.time())
        rec.upload = upload
        self.ops.append(rec)
        self.checker.ops[rec.id] = rec
        try:
            for attempt in range(5):
                try:
                    async with gw.sessions.lock(upload.id, owner="final") as lease:
                        status = await gw.sessions.status(upload.id, lease)
                    break
                except (LockTimeout, StoreUnavailable):
                    if attempt == 4:
                        raise
                    await asyncio.sleep(2.0)  # Retry-After
            self._saw_status(upload, status, rec)
            rec.outcome = "ok"
            upload.final_state = status.state.value
        except (UploadGone, UploadNotFound) as exc:
            rec.outcome, rec.error = "error", exc
            upload.final_state = "gone"
        except Exception as exc:  # noqa: BLE001 - a stuck upload: I4 says so
            rec.outcome, rec.error = "error", exc
            upload.final_state = f"error: {exc!r}"
        rec.responded = self.loop.time()
        self.checker.op_done(rec)


def record_of_upload(world: World, upload_id: str) -> dict[str, Any] | None:
    entry = world.store.mem._entries.get(info_key(upload_id))
    return None if entry is None else json.loads(entry.data)


def run_seed(seed: int, *, max_ops: int = 40) -> tuple[bool, list[str], str]:
    """Run the workload of ``seed``: (passed, trace, message)."""
    workload = random_workload(seed, max_ops=max_ops)
    return run_workload(workload)


def run_workload(workload: Workload) -> tuple[bool, list[str], str]:
    driver = Driver(workload)
    driver.trace.append(f"seed {workload.seed}: {workload.settings}")
    try:
        driver.run()
    except Violation as exc:
        return False, driver.trace, str(exc)
    return True, driver.trace, ""


__all__ = ["Op", "Workload", "random_workload", "run_seed", "run_workload", "Driver", "ObjectNotFound"]


class SimBodyInto:
    """As gateway.body.BodyReceiver for a large tus PATCH (``readinto_some``): the body writes
    itself into the upload's chunk buffer, in the pieces and with the pauses ``_patch_body``
    has, and ends early when another request asks for the upload's lock."""

    def __init__(self, workload: Any, data: bytes, stop: asyncio.Event, rec: OpRecord) -> None:
        self.w, self.stop, self.rec = workload, stop, rec
        step = max(1, len(data) // 3)
        self.pieces = [memoryview(data)[i:i + step] for i in range(0, len(data), step)]
        self.pending = memoryview(b"")  # what of the last piece did not fit the caller's buffer

    @property
    def ended(self) -> bool:
        return not self.pieces and not self.pending

    async def readinto_some(self, buf: memoryview, within: float | None = None) -> int:
        if not self.pending:
            if self.stop.is_set():
                if BodyInterrupted is None:
                    self.pieces = []
                    return 0
                raise BodyInterrupted("another request asked for the upload")
            if self.w.rng.random() < 0.5:
                await asyncio.sleep(self.w.rng.choice((0.0, 0.001, 0.01)))
            if not self.rec.sent:
                self.rec.first_byte_at = self.w.loop.time()
            self.pending = self.pieces.pop(0)
            self.rec.sent += len(self.pending)
        n = min(len(buf), len(self.pending))
        buf[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n
