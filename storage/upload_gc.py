"""What ``chunkgate gc`` needs from the tus upload sessions (``storage.gc.UploadsHook``): which
object versions live uploads are still writing, and expiring the uploads past their expiry.

``chunkgate gc`` is a separate process, so no lock manager is shared with the gateways: expiring
is a conditional write on the record instead. Must never: import aiohttp or ``gateway``; delete
the chunks of an upload a gateway renewed meanwhile.
"""

from __future__ import annotations

import json

from storage import keys
from storage.backends.base import Backend, NotFound, PreconditionFailed
from storage.errors import StoreFailed
from storage.upload_layout import info_key, leftover_prefixes, valid_upload_id
from storage.upload_record import TERMINAL_STATES, UploadRecord, UploadState, expired


class UploadsGcHook:
    """What ``storage.gc`` needs from upload sessions, for ``chunkgate gc`` (a separate process,
    so no lock manager is shared): which versions live uploads are still writing, and expiry.
    Expiring is a conditional write on the record, so a gateway that renews the same record
    meanwhile wins and the upload stays."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    async def _records(self) -> list[tuple[UploadRecord, str]]:
        found: list[tuple[UploadRecord, str]] = []
        async for info in self.backend.list(keys.UPLOAD_PREFIX):
            upload_id, _, rest = info.key[len(keys.UPLOAD_PREFIX):].partition("/")
            if rest != "info" or not valid_upload_id(upload_id):
                continue
            try:
                blob = await self.backend.get(info.key)
                found.append((UploadRecord.from_json(blob.data), blob.etag))
            except (NotFound, StoreFailed):
                continue
        return found

    async def protected_versions(self) -> set[tuple[str, str]]:
        # Lenient on purpose: a record this version cannot fully parse (older, newer, damaged)
        # still protects the version it names unless it says it is finished. Keeping garbage a
        # while is cheap; deleting an upload's chunks is not.
        terminal = {s.value for s in TERMINAL_STATES}
        found: set[tuple[str, str]] = set()
        async for info in self.backend.list(keys.UPLOAD_PREFIX):
            if not info.key.endswith("/info"):
                continue
            try:
                doc = json.loads((await self.backend.get(info.key)).data)
            except (NotFound, ValueError):
                continue
            if isinstance(doc, dict) and doc.get("state") not in terminal \
                    and isinstance(doc.get("key"), str) and isinstance(doc.get("version"), str):
                found.add((doc["key"], doc["version"]))
        return found

    async def sweep_expired(self, now: float, *, dry_run: bool) -> int:
        count = 0
        for record, etag in await self._records():
            if not expired(record.state, record.expires, now):
                continue
            count += 1
            if dry_run:
                continue
            record.enter(UploadState.EXPIRED, now)
            try:
                await self.backend.put(info_key(record.id), record.to_json(), if_match=etag)
            except PreconditionFailed:
                count -= 1  # a gateway touched it meanwhile: not expired after all
                continue
            doomed = [i.key async for i in self.backend.list(keys.chunk_prefix(record.key, record.version))]
            for prefix in leftover_prefixes(record.id):
                doomed += [i.key async for i in self.backend.list(prefix)]
            for k in doomed:
                await self.backend.delete(k)
        return count


def gc_hook(backend: Backend) -> UploadsGcHook:
    """``storage.gc``'s entry point (see ``storage.gc.UploadsHook``)."""
    return UploadsGcHook(backend)
