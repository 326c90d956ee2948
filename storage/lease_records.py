"""The lease record: its format, how a sweeper judges a stored one, and the store leases'
statistics. Pure (no I/O), so ``storage.leases`` keeps only the protocol of taking, renewing and
releasing records.

A record ``l/<kid>`` is JSON: ``format``, ``key``, ``owner``, ``gateway``, ``token``, ``acquired``,
``renewed``, ``expires`` (the holder's wall clock) and ``released``. A release request
``l/<kid>.release`` is ``{"at": <wall time>}``.
"""

from __future__ import annotations

import json
import os
import socket
from typing import TYPE_CHECKING, Any

from storage import keys

if TYPE_CHECKING:
    from storage.leases import StoreLockManager

LEASE_FORMAT = "chunkgate.lease/1"


def gateway_id() -> str:
    """An id for this process, unique across hosts and restarts (shown in /admin/locks)."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


def release_request_key(key: str) -> str:
    """Where a waiter on another gateway asks the holder of ``key`` to let go. A sibling of the
    lease record (not below it: on the fs store ``l/<kid>`` is a file, not a directory)."""
    return keys.lease_key(key) + ".release"


class StoreLockStats:
    """The ``LockStats`` counters (duck-typed) plus ``lease_conflicts`` (conditional lease writes
    that lost a race) and ``takeovers`` (expired records of other holders taken over), which the
    metrics adapter reads. Stale clears and release requests of the in-process layer are added in."""

    def __init__(self, manager: StoreLockManager) -> None:
        self._m = manager
        self.acquisitions = 0
        self.timeouts = 0
        self.wait_seconds_sum = 0.0
        self.lease_conflicts = 0
        self.takeovers = 0
        self.remote_release_requests = 0
        self.records_removed = 0  # lease records (and release requests) removed by sweep_records

    @property
    def stale_cleared(self) -> int:
        return self._m.local.stats.stale_cleared + self.takeovers

    @property
    def release_requests(self) -> int:
        return self._m.local.stats.release_requests + self.remote_release_requests

    def active(self) -> int:
        return self._m.local.active()

    def waiting(self) -> int:
        return self._m.local.waiting()

    def oldest_age(self) -> float:
        return self._m.local.oldest_age()


def new_record(key: str, owner: str, token: int, *, gateway: str, now: float, stale_after: float,
               acquired: float | None = None) -> dict[str, Any]:
    """A fresh record of ``owner`` holding ``key`` from ``now`` for ``stale_after`` seconds."""
    return {
        "format": LEASE_FORMAT,
        "key": key,
        "owner": owner,
        "gateway": gateway,
        "token": token,
        "acquired": now if acquired is None else acquired,
        "renewed": now,
        "expires": now + stale_after,
        "released": False,
    }


def parse_record(data: bytes) -> dict[str, Any] | None:
    """A stored lease record, or None for anything that is not one of this format."""
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("format") != LEASE_FORMAT or not isinstance(doc.get("token"), int):
        return None
    return doc


def judged_record(lkey: str, data: bytes, stale_after: float) -> dict[str, Any]:
    """What a lease sweep judges a stored record by: the lease record itself; for a release
    request, an expiry ``stale_after`` after it was asked (a live holder looks for requests at
    every renewal, ``stale_after / 3``); an unreadable one never expires by content, only by
    being seen unchanged."""
    if lkey.endswith(".release"):
        try:
            doc = json.loads(data)
            return {"expires": float(doc["at"]) + stale_after}
        except (ValueError, KeyError, TypeError):
            return {}
    return parse_record(data) or {}
