"""The one place the store is assembled (backend, its wrappers, locks, the object layer), made
ready (``open_store``: the store answers, and what it honours is probed and applied) and taken
down (``close_store``). serve and the maintenance commands use these and the ObjectStore's own
methods, never the parts underneath.

Wrapper order, innermost first — each is one concern:
  raw backend -> fault injection (tests/debug) -> observation (metrics) -> limiter -> retries
  -> deadline
Observation sits inside the limiter so store latency excludes queueing, and outside fault
injection so injected faults count as the store's failures, as a real outage would. Retries are
outermost so every attempt passes the limiter (the store's budget counts retries too) and is
observed, while the backoff sleep holds no limiter slot. No retry wrapper over S3: botocore
retries there itself (standard mode), and two retry layers would multiply the attempts.
The deadline (``--store-timeout``) is outermost because it is what a client waits at most for one
store operation: its queueing for a limiter slot, every retry and backoff included. The lease
manager works under the limiter, so its stack gets a deadline of its own (``build_locks``), and the
probe, which talks to the raw client, gets one too (``direct``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from storage.backends.base import Backend
from storage.backends.deadline import DeadlineBackend
from storage.backends.faults import FaultyBackend
from storage.backends.limited import LimitedBackend
from storage.backends.observed import BackendObserver, ObservedBackend
from storage.backends.retrying import RetryingBackend
from storage.locks import LockManager
from storage.objects import ObjectStore, StoreOptions
from storage.outbox import Outbox, OutboxOptions
from storage.probe import StoreCapabilities, apply, probe


@dataclass
class StackOptions:
    store: str
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    lock_stale_after: float = 30.0
    lock_timeout: float = 20.0
    locks: str = "auto"
    store_max_concurrency: int = 0
    store_max_rps: float = 0.0
    store_connect_timeout: float = 3.0  # per store request: TCP/TLS connect (S3)
    store_read_timeout: float = 10.0  # per store request: no byte for this long (S3)
    store_timeout: float = 30.0  # per store operation, retries included (every backend); 0 = none
    faults: Any = None  # storage.backends.faults.FaultPlan, tests and --fault-* only


def build_backend(opts: StackOptions, observer: BackendObserver | None = None,
                  raw: Backend | None = None) -> Backend:
    if raw is None:
        from storage.backends.open import open_backend

        raw = open_backend(opts.store, s3_endpoint_url=opts.s3_endpoint_url, s3_region=opts.s3_region,
                           connect_timeout=opts.store_connect_timeout, read_timeout=opts.store_read_timeout,
                           total_timeout=opts.store_timeout)
    backend: Backend = raw
    if opts.faults is not None:
        backend = FaultyBackend(backend, opts.faults)
    if observer is not None:
        backend = ObservedBackend(backend, observer)
    if opts.store_max_concurrency or opts.store_max_rps:
        backend = LimitedBackend(backend, max_concurrency=opts.store_max_concurrency, max_rps=opts.store_max_rps)
    if not _retries_itself(backend):
        backend = RetryingBackend(backend)
    return _with_deadline(backend, opts.store_timeout)


def _with_deadline(backend: Backend, seconds: float) -> Backend:
    return DeadlineBackend(backend, seconds) if seconds > 0 else backend


def direct(backend: Backend) -> Backend:
    """The raw store client under every wrapper, still bounded by the stack's deadline: for the
    probe, which must see the store's own answers (no retries, no limiter) but must not hang."""
    raw = innermost(backend)
    node = backend
    while hasattr(node, "inner"):
        if isinstance(node, DeadlineBackend):
            return DeadlineBackend(raw, node.timeout)
        node = node.inner
    return raw


def innermost(backend: Backend) -> Backend:
    """The raw store client under every wrapper."""
    while hasattr(backend, "inner"):
        backend = backend.inner
    return backend


def _retries_itself(backend: Backend) -> bool:
    """Whether the raw store client under the wrappers already retries (botocore does)."""
    return innermost(backend).name.startswith("s3://")


def build_locks(opts: StackOptions, backend: Backend, on_wait: Callable[[float], None] | None = None) -> Any:
    kind = opts.locks
    if kind == "auto":
        # An S3 bucket is what several gateways behind a load balancer share, so it gets leases
        # in the store; a local directory is one gateway's, where in-process locks are correct
        # and cost no store requests.
        kind = "store" if opts.store.lower().startswith("s3://") else "local"
    if kind == "store":
        from storage.leases import StoreLockManager

        below = _below_limiter(backend)
        if not isinstance(below, DeadlineBackend):
            below = _with_deadline(below, opts.store_timeout)
        return StoreLockManager(below, stale_after=opts.lock_stale_after,
                                timeout=opts.lock_timeout, on_wait=on_wait)
    return LockManager(stale_after=opts.lock_stale_after, timeout=opts.lock_timeout, on_wait=on_wait)


def _below_limiter(backend: Backend) -> Backend:
    """The stack under the limiter (still observed): a lease renewal queued behind a burst of
    data requests could miss its deadline and lose a lease that its holder is using."""
    node = backend
    while hasattr(node, "inner"):
        if isinstance(node, LimitedBackend):
            return node.inner
        node = node.inner
    return backend


def build_store(opts: StackOptions, store_options: StoreOptions, observer: Any = None,
                raw: Backend | None = None) -> ObjectStore:
    backend = build_backend(opts, observer, raw)
    locks = build_locks(opts, backend, getattr(observer, "lock_waited", None))
    return ObjectStore(backend, locks, store_options)


async def open_store(store: ObjectStore) -> StoreCapabilities:
    """Check that the store answers (raises what the check raises: a store that is down, a
    bucket that is missing, a deadline), then probe what it honours and apply it."""
    await store.backend.check()
    return await probe_store(store)


async def probe_store(store: ObjectStore) -> StoreCapabilities:
    """Probe, on private keys, which conditions the store honours (storage.probe), and apply the
    answer: tombstones and lease records are removed only where conditional deletes hold."""
    caps = await probe(direct(store.backend))
    apply(store.backend, caps)
    store.manifests.conditional_deletes = caps.conditional_delete
    from storage.leases import StoreLockManager

    if isinstance(store.locks, StoreLockManager):  # else lease records are marked released, never deleted
        store.locks.conditional_deletes = caps.conditional_delete
    return caps


async def check_store(store: ObjectStore) -> None:
    """One cheap call that fails when the store does not answer (for /readyz)."""
    await store.backend.check()


def store_name(store: ObjectStore) -> str:
    """The store as a user named it (``s3://bucket/prefix``, a directory), for logs and /readyz."""
    return store.backend.name


def uses_store_leases(store: ObjectStore) -> bool:
    """Whether the store's locks are leases in the store itself (several gateways may share it)."""
    from storage.leases import StoreLockManager

    return isinstance(store.locks, StoreLockManager)


async def close_store(store: ObjectStore) -> None:
    """Stop what runs in the background, release store leases still held, close the client."""
    await store.close()
    await store.locks.close()  # store leases: stop renewals, release records still held
    await store.backend.close()


def build_outbox(store: ObjectStore, deliver: Callable[..., Any], options: OutboxOptions) -> Outbox:
    """The hook outbox over this store: every commit's events are kicked to it."""
    owner = f"outbox {getattr(store.locks, 'gateway', '')}".strip()  # store leases name their gateway
    outbox = Outbox(store.backend, store.manifests, store.locks, deliver, options=options, owner=owner)
    store.on_committed = outbox.kick
    return outbox
