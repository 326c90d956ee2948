"""The one function that assembles the store: backend, its wrappers, locks and the object layer.

Wrapper order, innermost first — each is one concern:
  raw backend -> fault injection (tests/debug) -> observation (metrics) -> limiter -> retries
Observation sits inside the limiter so store latency excludes queueing, and outside fault
injection so injected faults count as the store's failures, as a real outage would. Retries are
outermost so every attempt passes the limiter (the store's budget counts retries too) and is
observed, while the backoff sleep holds no limiter slot. No retry wrapper over S3: botocore
retries there itself (standard mode), and two retry layers would multiply the attempts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from storage.backends.base import Backend
from storage.backends.faults import FaultyBackend
from storage.backends.limited import LimitedBackend
from storage.backends.observed import BackendObserver, ObservedBackend
from storage.backends.retrying import RetryingBackend
from storage.locks import LockManager
from storage.objects import ObjectStore, StoreOptions


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
    faults: Any = None  # storage.backends.faults.FaultPlan, tests and --fault-* only


def build_backend(opts: StackOptions, observer: BackendObserver | None = None,
                  raw: Backend | None = None) -> Backend:
    if raw is None:
        from storage.backends.open import open_backend

        raw = open_backend(opts.store, s3_endpoint_url=opts.s3_endpoint_url, s3_region=opts.s3_region)
    backend: Backend = raw
    if opts.faults is not None:
        backend = FaultyBackend(backend, opts.faults)
    if observer is not None:
        backend = ObservedBackend(backend, observer)
    if opts.store_max_concurrency or opts.store_max_rps:
        backend = LimitedBackend(backend, max_concurrency=opts.store_max_concurrency, max_rps=opts.store_max_rps)
    if not _retries_itself(backend):
        backend = RetryingBackend(backend)
    return backend


def innermost(backend: Backend) -> Backend:
    """The raw store client under every wrapper."""
    while hasattr(backend, "inner"):
        backend = backend.inner  # type: ignore[attr-defined]
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

        return StoreLockManager(_below_limiter(backend), stale_after=opts.lock_stale_after,
                                timeout=opts.lock_timeout, on_wait=on_wait)
    return LockManager(stale_after=opts.lock_stale_after, timeout=opts.lock_timeout, on_wait=on_wait)


def _below_limiter(backend: Backend) -> Backend:
    """The stack under the limiter (still observed): a lease renewal queued behind a burst of
    data requests could miss its deadline and lose a lease that its holder is using."""
    node = backend
    while hasattr(node, "inner"):
        if isinstance(node, LimitedBackend):
            return node.inner
        node = node.inner  # type: ignore[attr-defined]
    return backend


def build_store(opts: StackOptions, store_options: StoreOptions, observer: Any = None,
                raw: Backend | None = None) -> ObjectStore:
    backend = build_backend(opts, observer, raw)
    locks = build_locks(opts, backend, getattr(observer, "lock_waited", None))
    return ObjectStore(backend, locks, store_options)
