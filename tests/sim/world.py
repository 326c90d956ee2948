"""The simulated world: one shared store, the network to it from each gateway, and the gateways.

``SimStore`` is a ``MemoryBackend`` that every gateway shares, with a god's-eye log of every
change of a manifest record (who changed it, from what, to what, when) and of every chunk's
bytes, which the invariants are checked against. ``SimNet`` is one gateway's view of it: it
yields control at seeded points around every call, injects failures before a write applies or
after (a lost answer), throttles, delays (rarely for longer than a lease lives), and models a
write in flight as the store's own task, which goes on when the caller is cancelled. A crashed
gateway's calls raise ``GatewayCrashed`` and its in-flight writes either land or not, by seed.
``SimGateway`` is the real stack: RetryingBackend, StoreLockManager, ObjectStore, UploadSessions.
"""

from __future__ import annotations

import asyncio
import contextvars
import random
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from storage import keys
from storage.backends.base import Blob, ObjectInfo, TransientError
from storage.backends.memory import MemoryBackend
from storage.backends.retrying import RetryingBackend
from storage.leases import StoreLockManager
from storage.manifests import Current, ManifestStore
from storage.objects import ObjectStore, StoreOptions
from storage.tolerance import SizeTolerance
from storage.uploads import UploadOptions, UploadSessions

EPOCH = 1_800_000_000.0  # wall-clock seconds at virtual time 0
GATEWAY: contextvars.ContextVar["SimGateway | None"] = contextvars.ContextVar("sim_gateway", default=None)
OP: contextvars.ContextVar[int | None] = contextvars.ContextVar("sim_op", default=None)


class GatewayCrashed(BaseException):
    """The calling gateway has crashed: no call of it reaches the store any more (a
    ``BaseException`` so that no ``except Exception`` in the code under test swallows it)."""


@dataclass(frozen=True)
class Settings:
    """The knobs of one simulated world (drawn per workload)."""

    gateways: int = 2
    chunk_size: int = 64
    block_size: int = 16
    grace: float = 5.0
    stale_after: float = 3.0
    lock_timeout: float = 2.0
    manifest_ttl: float = 1.0
    upload_expiry: float = 60.0
    tombstone_seconds: float = 60.0
    tolerance_bytes: int = 8
    max_key_bytes: int = 100  # the store's own limit, below API.md's 1024 (an S3 prefix does this)
    p_error: float = 0.0  # per store call: a transient failure (half before, half after a write applies)
    p_throttle: float = 0.0
    p_stall: float = 0.0  # per store call: a delay of up to 3 x stale_after before it applies
    clock_skew: float = 0.0  # each gateway's wall clock is off by up to this much


@dataclass
class Transition:
    time: float
    key: str
    before: Current | None
    after: Current | None
    op: int | None


@dataclass
class SimStore:
    """The one store all gateways share, and what the simulator knows about it."""

    loop: asyncio.AbstractEventLoop
    settings: Settings
    mem: MemoryBackend = field(init=False)
    transitions: list[Transition] = field(default_factory=list)
    chunk_history: dict[str, list[bytes]] = field(default_factory=dict)
    record_writes: list[tuple[float, str, bytes, int | None]] = field(default_factory=list)  # u/ records
    intent_ops: dict[str, int | None] = field(default_factory=dict)  # PUT version -> the op writing it
    chunk_deletes: list[tuple[float, str, int | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.mem = MemoryBackend(max_key_bytes=self.settings.max_key_bytes)
        self.parser = ManifestStore(self.mem)

    def peek(self, key: str) -> Current | None:
        """The record of object ``key`` now (no await: atomic)."""
        entry = self.mem._entries.get(keys.manifest_key(key))
        return None if entry is None else self.parser.parse(key, entry.data, entry.etag)

    async def put(self, key: str, data: bytes, op: int | None, **cond: Any) -> str:
        before = self.peek(keys.object_key_of_manifest(key)) if key.startswith(keys.MANIFEST_PREFIX) else None
        etag = await self.mem.put(key, data, **cond)
        self._log(key, before, op)
        if key.startswith(keys.CHUNK_PREFIX) or key.startswith(keys.UPLOAD_PREFIX) and "/t/" in key:
            self.chunk_history.setdefault(key, []).append(bytes(data))
        if key.startswith(keys.INTENT_PREFIX):
            self.intent_ops.setdefault(key[len(keys.INTENT_PREFIX):], op)
        if key.startswith(keys.UPLOAD_PREFIX) and key.endswith("/info"):
            self.record_writes.append((self.loop.time(), key, bytes(data), op))
        return etag

    async def delete(self, key: str, op: int | None, **cond: Any) -> None:
        before = self.peek(keys.object_key_of_manifest(key)) if key.startswith(keys.MANIFEST_PREFIX) else None
        existed = key in self.mem._entries
        await self.mem.delete(key, **cond)
        self._log(key, before, op)
        if existed and key.startswith(keys.CHUNK_PREFIX):
            self.chunk_deletes.append((self.loop.time(), key, op))

    def _log(self, key: str, before: Current | None, op: int | None) -> None:
        if not key.startswith(keys.MANIFEST_PREFIX):
            return
        name = keys.object_key_of_manifest(key)
        after = self.peek(name)
        if (before.etag if before else None) != (after.etag if after else None):
            self.transitions.append(Transition(self.loop.time(), name, before, after, op))


class SimNet:
    """One gateway's connection to the shared store (the ``Backend`` protocol)."""

    def __init__(self, store: SimStore, rng: random.Random, settings: Settings, *, retries_itself: bool = False) -> None:
        self.store = store
        self.rng = rng
        self.settings = settings
        # Like botocore: the client retries failed requests itself, so a conditional write whose
        # answer was lost is sent again and then refused by its own first attempt.
        self.retries_itself = retries_itself
        self.name = "sim"
        self.alive = True
        self.in_flight: dict[asyncio.Task[Any], str] = {}  # write -> its key; ordered: the seed decides, not addresses
        # Armed by an aimed crash: called at this gateway's next chunk write that starts while
        # another is on the wire; that write lands, the earlier ones vanish, the gateway dies.
        self.crash_between_chunks: Callable[[], None] | None = None
        self._landing: asyncio.Task[Any] | None = None

    def check_key(self, key: str) -> None:
        self.store.mem.check_key(key)

    async def check(self) -> None:
        self._alive()

    async def close(self) -> None:
        pass

    def _alive(self) -> None:
        if not self.alive:
            raise GatewayCrashed()

    async def _pause(self) -> None:
        for _ in range(self.rng.choice((0, 0, 0, 1, 1, 2, 3))):
            await asyncio.sleep(0)
        if self.rng.random() < 0.2:
            await asyncio.sleep(self.rng.uniform(0, 0.004))
        self._alive()

    def _latency(self) -> float:
        if self.rng.random() < self.settings.p_stall:
            return self.rng.uniform(0.5, 3 * self.settings.stale_after)
        return self.rng.uniform(0, 0.003)

    def _fault(self) -> str | None:
        r = self.rng.random()
        if r < self.settings.p_error:
            return "before" if self.rng.random() < 0.5 else "after"
        if r < self.settings.p_error + self.settings.p_throttle:
            return "throttle"
        return None

    async def _write(self, op: str, key: str, apply: Callable[[], Any]) -> Any:
        if not self.retries_itself:
            return await self._write_once(op, key, apply)
        for attempt in range(3):
            try:
                return await self._write_once(op, key, apply)
            except TransientError:
                if attempt == 2:
                    raise
                await asyncio.sleep(self.rng.uniform(0, 0.05 * 2 ** attempt))
        raise AssertionError("unreachable")

    async def _write_once(self, op: str, key: str, apply: Callable[[], Any]) -> Any:
        await self._pause()
        fault = self._fault()
        if fault == "throttle":
            raise TransientError(f"sim: throttled {op} {key}", retry_after=0.05)
        if fault == "before":
            raise TransientError(f"sim: {op} {key} failed before reaching the store")
        delay = self._latency()

        async def land() -> Any:
            await asyncio.sleep(delay)
            return await apply()

        # The store's own task, outside any gateway: cancelling the caller does not stop it.
        task = asyncio.get_running_loop().create_task(land(), context=_outside())
        self.in_flight[task] = key
        task.add_done_callback(lambda t: self.in_flight.pop(t, None))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        if self.crash_between_chunks is not None and key.startswith(keys.CHUNK_PREFIX):
            earlier = [t for t, k in self.in_flight.items() if t is not task and k.startswith(keys.CHUNK_PREFIX)]
            if earlier:
                strike, self.crash_between_chunks = self.crash_between_chunks, None
                for t in earlier:
                    t.cancel()  # still on the wire when the gateway died: never reaches the store
                self._landing = task  # all of it reached the store: it lands
                strike()
        result = await asyncio.shield(task)
        self._alive()  # crashed meanwhile: the answer never arrives
        await self._pause()
        if fault == "after":
            raise TransientError(f"sim: the answer to {op} {key} was lost after it applied")
        return result

    async def _read(self, op: str, call: Callable[[], Any]) -> Any:
        await self._pause()
        fault = self._fault()
        if fault == "throttle":
            raise TransientError(f"sim: throttled {op}", retry_after=0.05)
        if fault is not None:
            raise TransientError(f"sim: {op} failed")
        await asyncio.sleep(self._latency() if self.rng.random() < 0.5 else 0)
        self._alive()
        result = await call()
        await self._pause()
        return result

    async def put(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        self._alive()
        op = OP.get()  # the operation on whose behalf this call is made, for the god's-eye log
        return await self._write("put", key, lambda: self.store.put(key, bytes(data), op, if_none_match=if_none_match,
                                                                      if_match=if_match))

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        self._alive()
        op = OP.get()
        await self._write("delete", key, lambda: self.store.delete(key, op, if_match=if_match))

    async def get(self, key: str, *, start: int = 0, end: int | None = None, view: bool = False) -> Blob:
        self._alive()
        blob: Blob = await self._read(f"get {key}", lambda: self.store.mem.get(key, start=start, end=end))
        if blob.data and self.rng.random() < self.settings.p_error / 4:
            if self.retries_itself:  # a client that checks Content-Length (S3Backend) says so
                raise TransientError(f"sim: short read of {key}")
            return Blob(blob.data[: self.rng.randrange(len(blob.data))], blob.size, blob.etag)  # a short read
        return blob

    async def head(self, key: str) -> ObjectInfo:
        self._alive()
        info: ObjectInfo = await self._read(f"head {key}", lambda: self.store.mem.head(key))
        return info

    async def list(self, prefix: str = "", *, start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        self._alive()

        async def snapshot() -> list[ObjectInfo]:
            return [i async for i in self.store.mem.list(prefix, start_after=start_after)]

        infos: list[ObjectInfo] = await self._read(f"list {prefix}", snapshot)
        for n, info in enumerate(infos):
            if n and n % 8 == 0:  # a page boundary: the world moves on between pages
                await self._pause()
            yield info

    def crash(self) -> None:
        """The gateway dies: in-flight writes already on the wire land or vanish, by seed."""
        self.alive = False
        self.crash_between_chunks = None
        for task in list(self.in_flight):
            if task is not self._landing and self.rng.random() < 0.5:
                task.cancel()


def _outside() -> contextvars.Context:
    ctx = contextvars.copy_context()
    ctx.run(GATEWAY.set, None)
    ctx.run(OP.set, None)
    return ctx


class SimGateway:
    """One gateway process: the real storage stack over its ``SimNet``."""

    def __init__(self, world: "World", index: int, generation: int) -> None:
        s = world.settings
        self.world = world
        self.index = index
        self.generation = generation
        self.name = f"g{index}.{generation}"
        self.offset = world.rng.uniform(-s.clock_skew, s.clock_skew) if s.clock_skew else 0.0
        loop = world.loop
        # Half the gateways talk to the store as the S3 stack does (the client retries itself),
        # half as fs and memory do (a RetryingBackend that resolves lost answers by reading back).
        retries_itself = world.rng.random() < 0.5
        self.net = SimNet(world.store, random.Random(world.rng.random()), s, retries_itself=retries_itself)
        backend = self.net if retries_itself else RetryingBackend(self.net, rng=random.Random(world.rng.random()))
        wall = self.wall
        self.locks = StoreLockManager(backend, stale_after=s.stale_after, timeout=s.lock_timeout, gateway=self.name,
                                      clock=wall, monotonic=loop.time)
        self.store = ObjectStore(backend, self.locks, StoreOptions(
            chunk_size=s.chunk_size, block_size=s.block_size, cache_bytes=4096, write_concurrency=2, readahead=1,
            tolerance=SizeTolerance(s.tolerance_bytes, 0.0), grace_seconds=s.grace, manifest_ttl=s.manifest_ttl,
            small_read_bytes=16, lock_timeout=s.lock_timeout, intent_seconds=s.upload_expiry,
        ), clock=wall)
        self.sessions = UploadSessions(self.store, UploadOptions(
            chunk_size=s.chunk_size, expiry=s.upload_expiry, lock_timeout=s.lock_timeout, checkpoint_seconds=0.5,
            tombstone_seconds=s.tombstone_seconds, checksum_body_limit=1 << 20,
        ), clock=wall, monotonic=loop.time)
        self.tasks: dict[asyncio.Task[Any], None] = {}  # ordered, so crashes replay exactly
        self.leases: list[Any] = []
        acquire = self.locks.acquire

        async def tracked(*args: Any, **kwargs: Any) -> Any:
            lease = await acquire(*args, **kwargs)
            self.leases.append(lease)
            return lease

        self.locks.acquire = tracked  # type: ignore[method-assign]

    def wall(self) -> float:
        return EPOCH + self.world.loop.time() + self.offset

    @property
    def alive(self) -> bool:
        return self.net.alive

    def spawn(self, coro: Any, op: int | None) -> asyncio.Task[Any]:
        ctx = contextvars.copy_context()
        ctx.run(GATEWAY.set, self)
        ctx.run(OP.set, op)
        return self.world.loop.create_task(coro, context=ctx)

    def crash(self) -> None:
        self.net.crash()
        for task in list(self.tasks):
            task.cancel()


class World:
    """The store, the gateways (replaced by a fresh one on a crash), the loop and the seed."""

    def __init__(self, loop: asyncio.AbstractEventLoop, settings: Settings, rng: random.Random) -> None:
        self.loop = loop
        self.settings = settings
        self.rng = rng
        self.store = SimStore(loop, settings)
        self.generations = [0] * settings.gateways
        self.gateways = [SimGateway(self, i, 0) for i in range(settings.gateways)]
        self.retired: list[SimGateway] = []
        loop.set_task_factory(self._task_factory)

    def _task_factory(self, loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        ctx = kwargs.pop("context", None) or contextvars.copy_context()
        task = asyncio.Task(coro, loop=loop, context=ctx, **kwargs)
        owner = ctx.get(GATEWAY)
        if owner is not None:
            owner.tasks[task] = None
            task.add_done_callback(lambda t: owner.tasks.pop(t, None))
        return task

    def crash(self, index: int) -> SimGateway:
        old = self.gateways[index]
        old.crash()
        self.retired.append(old)
        self.generations[index] += 1
        self.gateways[index] = SimGateway(self, index, self.generations[index])
        return self.gateways[index]

    def live_leases(self) -> list[Any]:
        """Leases that their holder would still act on (a crashed gateway holds nothing)."""
        return [lease for g in self.gateways for lease in g.leases if lease.valid]
