"""What the store really does with the conditions every guarantee rests on, tried once.

Every commit is a conditional write on a manifest record, and every lease a conditional write on
a lease record, so chunkgate is only correct on a store that refuses ``If-None-Match: *`` on an
existing key and a stale ``If-Match``. Some S3-compatible stores ignore headers they do not
implement, and then every guarantee across gateways silently vanishes. ``probe`` writes a few
bytes under a private key and checks each condition is honoured, plus two facts the layers above
adapt to: whether a conditional delete is honoured (else tombstones and lease records are kept,
never deleted unconditionally), and whether a backslash in a key is kept as itself (SeaweedFS
4.48 turns it into '/', so two keys would share one value: such a store refuses them up front).

Must never: touch a key outside its own ``p/<random>/`` prefix; leave a probe key behind when the
store works; import aiohttp or ``gateway``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from storage.backends.base import (
    Backend,
    InvalidKey,
    NotFound,
    PreconditionFailed,
    StoreFull,
)

PROBE_PREFIX = "p/"


@dataclass(frozen=True)
class StoreCapabilities:
    """What the probe found. ``problems`` names each condition the store ignored."""

    conditional_put: bool = True
    conditional_delete: bool = True
    backslash_keys: bool = True
    problems: tuple[str, ...] = field(default_factory=tuple)
    # The store had no room for the probe's keys (it raised StoreFull): the fields above are
    # assumed, not found. Only the fs store reports a full store, and it honours every condition;
    # a full store takes no writes anyway. Probed again (``/readyz``) once it has room.
    full: bool = False

    def describe(self) -> str:
        if self.full:
            return "the store is full, so it could not be probed; probed again once it has room"
        return "; ".join(self.problems) if self.problems else "conditional writes and deletes honoured"


async def probe(backend: Backend) -> StoreCapabilities:
    """Try each condition under a fresh private key; raises the backend's errors (a store that
    cannot be written at all is not a capability question)."""
    base = f"{PROBE_PREFIX}{os.urandom(8).hex()}/"
    cas = base + "cas"
    problems: list[str] = []
    try:
        first = await backend.put(cas, b"first", if_none_match=True)
        create_only = await _refused(backend.put(cas, b"second", if_none_match=True))
        if not create_only:
            problems.append("a create-only put (If-None-Match: *) replaced an existing value")
        current = (await backend.head(cas)).etag
        stale = '"' + "0" * 32 + '"' if current == first else first
        if_match = await _refused(backend.put(cas, b"third", if_match=stale))
        if not if_match:
            problems.append("a put with a stale If-Match replaced the value")
        current = (await backend.head(cas)).etag
        await backend.put(cas, b"fourth", if_match=current)  # a current If-Match must work
        delete_refused = await _refused(backend.delete(cas, if_match=current))
        try:
            await backend.head(cas)
            kept = True
        except NotFound:
            kept = False
        conditional_delete = delete_refused and kept
        if not conditional_delete:
            problems.append("a delete with a stale If-Match removed the value")
        backslash = await _holds_backslash(backend, base)
        if not backslash:
            problems.append("a backslash in a key is stored as '/'")
        return StoreCapabilities(create_only and if_match, conditional_delete, backslash, tuple(problems))
    except StoreFull:
        # A full store still serves reads: starting (or staying ready) must not need room.
        return StoreCapabilities(full=True)
    finally:
        async for info in backend.list(base):
            await backend.delete(info.key)


def apply(backend: Backend, caps: StoreCapabilities) -> None:
    """Tell the raw store client under the wrappers what the probe found (it refuses keys with
    backslashes when they would not be kept as themselves)."""
    node = backend
    while hasattr(node, "inner"):
        node = node.inner
    if hasattr(node, "refuse_backslashes"):
        node.refuse_backslashes = not caps.backslash_keys


async def _refused(call: object) -> bool:
    try:
        await call  # type: ignore[misc]
    except PreconditionFailed:
        return True
    return False


async def _holds_backslash(backend: Backend, base: str) -> bool:
    try:
        await backend.put(base + "back\\slash", b"x")
    except InvalidKey:
        return False  # already known and refused (a second probe)
    listed = {info.key async for info in backend.list(base)}
    return base + "back\\slash" in listed and base + "back/slash" not in listed
