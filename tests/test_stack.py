"""storage.stack: the one place the wrapper stack is assembled -- which wrappers, in which order,
and where the lock manager's leases attach (below the limiter)."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.backends.deadline import DeadlineBackend
from storage.backends.faults import FaultPlan, FaultyBackend
from storage.backends.fs import FsBackend
from storage.backends.limited import LimitedBackend
from storage.backends.memory import MemoryBackend
from storage.backends.observed import ObservedBackend
from storage.backends.retrying import RetryingBackend
from storage.leases import StoreLockManager
from storage.locks import LockManager
from storage.stack import StackOptions, build_backend, build_locks, innermost


class Observer:
    def backend_call(self, *args: object) -> None:
        pass


def layers(backend: object) -> list[type]:
    out = []
    while True:
        out.append(type(backend))
        if not hasattr(backend, "inner"):
            return out
        backend = backend.inner  # type: ignore[attr-defined]


CASES = [
    # (name, options, with observer, outermost -> innermost)
    ("a bare store: retries under the deadline", dict(), False, [DeadlineBackend, RetryingBackend, MemoryBackend]),
    ("no deadline when --store-timeout is 0", dict(store_timeout=0.0), False, [RetryingBackend, MemoryBackend]),
    ("observed", dict(), True, [DeadlineBackend, RetryingBackend, ObservedBackend, MemoryBackend]),
    ("limited: retries outside the limiter, observation inside, the deadline over both", dict(store_max_rps=5.0), True,
     [DeadlineBackend, RetryingBackend, LimitedBackend, ObservedBackend, MemoryBackend]),
    ("faults under observation (they count as the store's failures)", dict(faults=FaultPlan(rate=0.1)), True,
     [DeadlineBackend, RetryingBackend, ObservedBackend, FaultyBackend, MemoryBackend]),
]


@pytest.mark.parametrize(("name", "options", "observed", "expected"), CASES, ids=[c[0] for c in CASES])
def test_the_wrapper_order(name: str, options: dict, observed: bool, expected: list[type]) -> None:
    raw = MemoryBackend()
    backend = build_backend(StackOptions(store="mem", **options), Observer() if observed else None, raw)
    assert layers(backend) == expected
    assert innermost(backend) is raw


@pytest.mark.parametrize(("store", "locks", "expected"), [
    ("./data", "auto", LockManager), ("s3://bucket", "auto", StoreLockManager),
    ("./data", "store", StoreLockManager), ("s3://bucket", "local", LockManager),
])
def test_which_locks(tmp_path: Path, store: str, locks: str, expected: type) -> None:
    backend = build_backend(StackOptions(store=str(tmp_path), store_max_concurrency=4), Observer(), FsBackend(tmp_path))
    manager = build_locks(StackOptions(store=store, locks=locks), backend)
    assert isinstance(manager, expected)
    if isinstance(manager, StoreLockManager):
        # Lease traffic never queues behind data requests: it sits below the limiter.
        assert not any(t is LimitedBackend for t in layers(manager.backend))
        # ...and still ends within the store deadline.
        assert layers(manager.backend)[0] is DeadlineBackend
