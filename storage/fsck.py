"""fsck: check every committed manifest against its chunks in the store, and repair what can be.

Per object: the manifest parses and is for its key; every chunk exists; its stored size equals
the manifest's (or drifts within the size tolerance -- repairable: ``ObjectStore.repair``
re-records the chunk as stored); its SHA-256 equals the manifest's. Damage that cannot be
repaired (a missing chunk, a size beyond tolerance, other bytes at the right size, an unreadable
manifest) is reported, never "fixed" by guessing.

Must never: change a manifest except through ``ObjectStore.repair`` (under the key's lock, with
a conditional write); delete anything; import aiohttp or ``gateway``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from storage import keys
from storage.backends.base import NotFound, PermanentError, TransientError
from storage.errors import CorruptManifest, ObjectError, from_backend
from storage.locks import LockTimeout
from storage.objects import sha256_hex
from storage.tolerance import Verdict

OK = "ok"
DAMAGED = "damaged"
REPAIRED = "repaired"

_CONCURRENCY = 4  # objects checked at once; each reads one chunk at a time (memory: 4 chunks)


@dataclass
class ObjectCheck:
    key: str
    status: str = OK
    version: str = ""
    chunks: int = 0
    problems: list[str] = field(default_factory=list)  # damage that remains
    repairable: list[str] = field(default_factory=list)  # damage --repair can fix
    repaired: list[str] = field(default_factory=list)

    def line(self) -> str:
        if self.status == OK:
            return f"ok        {self.key} ({self.chunks} chunks)"
        if self.status == REPAIRED:
            return f"repaired  {self.key}: " + "; ".join(self.repaired)
        return f"damaged   {self.key}: " + "; ".join(self.problems + self.repairable)


@dataclass
class FsckReport:
    objects: list[ObjectCheck] = field(default_factory=list)
    total_objects: int = 0  # in the store (more than ``objects`` when sampling)

    @property
    def damaged(self) -> list[ObjectCheck]:
        return [o for o in self.objects if o.status == DAMAGED]

    @property
    def repaired(self) -> list[ObjectCheck]:
        return [o for o in self.objects if o.status == REPAIRED]

    @property
    def clean(self) -> bool:
        return not self.damaged

    def summary(self) -> str:
        ok = sum(1 for o in self.objects if o.status == OK)
        sampled = f" (a sample of {self.total_objects})" if len(self.objects) < self.total_objects else ""
        return (f"fsck: {len(self.objects)} objects checked{sampled}: {ok} ok, {len(self.repaired)} repaired, "
                f"{len(self.damaged)} damaged")


async def check_object(store: Any, key: str) -> ObjectCheck | None:
    """Check one object's manifest and every chunk it references; no changes. None when the
    key has no object (deleted during the check, or a tombstone a DELETE left)."""
    result = ObjectCheck(key)
    backend = store.backend
    try:
        current = await store.manifests.read(key)
    except CorruptManifest as exc:
        result.problems.append(f"the manifest is unreadable: {exc}")
        result.status = DAMAGED
        return result
    if current is None or current.manifest is None:
        return None
    manifest = current.manifest
    result.version, result.chunks = manifest.version, len(manifest.chunks)
    tolerance = store.options.tolerance
    for ref in manifest.chunks:
        ck = keys.chunk_key(key, manifest.version, ref.index)
        try:
            chunk = await backend.get(ck)
        except NotFound:
            result.problems.append(f"chunk {ref.index} is missing")
            continue
        except (TransientError, PermanentError) as exc:
            raise from_backend(exc, f"reading chunk {ref.index} of {key!r}") from exc
        actual = len(chunk.data)
        if actual != chunk.size:
            result.problems.append(f"chunk {ref.index} read short ({actual} of {chunk.size} bytes); try again")
            continue
        digest = await sha256_hex(chunk.data)
        verdict = tolerance.verdict(ref.size, actual)
        if verdict is Verdict.EXACT:
            if ref.sha256 is None:
                result.repairable.append(f"chunk {ref.index} has no SHA-256 recorded")
            elif digest != ref.sha256:
                result.problems.append(f"chunk {ref.index} has the right size but the wrong SHA-256")
        elif verdict is Verdict.REJECTED:
            result.problems.append(f"chunk {ref.index} is {actual} bytes, the manifest says {ref.size} (beyond tolerance)")
        else:
            result.repairable.append(f"chunk {ref.index} is {actual} bytes, the manifest says {ref.size} (within tolerance)")
    if result.problems or result.repairable:
        result.status = DAMAGED
    return result


async def fsck(
    store: Any,
    *,
    repair: bool = False,
    sample: int | None = None,
    prefix: str = "",
    progress: Callable[[ObjectCheck], None] | None = None,
    rng: random.Random | None = None,
) -> FsckReport:
    """Check every object (or ``sample`` of them, chosen at random) of ``store`` (an
    ``ObjectStore``); with ``repair``, fix what can be fixed and check again."""
    report = FsckReport()
    names = [name async for name in store.manifests.scan(prefix)]
    report.total_objects = len(names)
    if sample is not None and sample < len(names):
        names = sorted((rng or random.Random()).sample(names, sample))
    sem = asyncio.Semaphore(_CONCURRENCY)

    async def one(key: str) -> ObjectCheck | None:
        async with sem:
            result = await check_object(store, key)
            if result is not None and repair and result.status == DAMAGED and result.repairable and not result.problems:
                result = await _repair(store, key, result)
            if progress is not None and result is not None:
                progress(result)
            return result

    report.objects = [r for r in await asyncio.gather(*(one(k) for k in names)) if r is not None]
    report.total_objects -= len(names) - len(report.objects) if sample is None else 0
    return report


async def _repair(store: Any, key: str, before: ObjectCheck) -> ObjectCheck:
    try:
        changes = await store.repair(key, owner="fsck")
    except (ObjectError, LockTimeout) as exc:
        before.problems.append(f"repair failed: {exc}")
        return before
    after = await check_object(store, key)
    if after is None:
        before.problems.append("the object was deleted during the repair")
        return before
    if after.status == OK:
        after.status = REPAIRED
        after.repaired = [f"chunk {i}: {old} -> {new} bytes" for i, old, new in changes] or list(before.repairable)
    return after
