"""The upload sweeper (``UploadSweeper``): keeps ``UploadSessions.index`` up to date with the
store, expires live uploads past their expiry, finishes commits a crash left, and drops old
terminal records and orphaned tails.

Works from the index (``storage.quota``): one listing of ``u/`` per sweep, then a read of only
the records whose listed ETag is new, so N idle uploads cost one listing, not N reads. A record
is read again under its lease before anything is done to it, and an upload whose lock is held
is in use and skipped. Must never: import aiohttp or ``gateway``; touch an upload without its
lease; stop sweeping because one upload failed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from storage import keys
from storage.backends.base import NotFound, ObjectInfo, PermanentError, TransientError
from storage.errors import StoreFailed, StoreUnavailable, UploadGone, UploadNotFound
from storage.quota import UploadSummary
from storage.upload_layout import (
    guarded,
    info_key,
    lock_key,
    valid_upload_id,
)
from storage.upload_layout import summary as summary_of
from storage.upload_record import (
    LIVE_STATES,
    UploadRecord,
    UploadState,
    is_live,
    overdue,
)

if TYPE_CHECKING:
    from storage.uploads import UploadSessions

log = logging.getLogger("chunkgate.uploads")

_DAMAGED = "damaged"  # the index's state for a record it cannot parse
_SCAN_READS = 16  # upload records read at once by a sweep


class UploadSweeper:
    """The background sweep of one ``UploadSessions`` (``start``/``close``), and the index
    refresh its upload caps ask for (``refresh``)."""

    def __init__(self, sessions: UploadSessions) -> None:
        self.sessions = sessions
        self._scanning = asyncio.Lock()
        self._scanned_at = float("-inf")  # monotonic
        self._task: asyncio.Task[None] | None = None

    @property
    def never_scanned(self) -> bool:
        """No listing has counted the store's uploads yet (just started)."""
        return self._scanned_at == float("-inf")

    async def sweep(self) -> int:
        """Expire live uploads past their expiry (their data is deleted) and drop old terminal
        records. Uploads whose lock is held right now are active and skipped. Returns how many
        uploads expired."""
        sessions = self.sessions
        async with self._scanning:
            listed, tails = await self._scan()
        now = sessions.clock()
        expired = 0
        await self._sweep_orphan_tails(tails, set(listed), now)
        for summary in sessions.index.summaries():
            if summary.id not in listed or summary.state == _DAMAGED:
                continue  # created since the listing; or unreadable (left alone, as before)
            due_live = overdue(summary.state, summary.expires, now)
            due_tomb = not is_live(summary.state) and \
                (summary.finished or summary.created) + sessions.options.tombstone_seconds <= now
            if due_live or due_tomb:
                expired += await self._sweep_one(summary.id, due_live=due_live)
        return expired

    async def _sweep_one(self, upload_id: str, *, due_live: bool) -> int:
        """One upload the index says is due, under its lease (skipped if held). ``due_live``:
        it expires (1 is returned) or finishes a crashed commit; else its terminal record goes."""
        sessions = self.sessions
        try:
            lease = await sessions.locks.acquire(lock_key(upload_id), owner="tus-sweep", timeout=0.0)
        except Exception:  # noqa: BLE001 - held, or the store cannot say now: the next sweep tries again
            return 0
        try:
            if due_live:
                try:
                    # Expires it (and deletes its data), or finishes a crashed commit.
                    await sessions.status(upload_id, lease)
                except UploadGone:
                    return 1
                except UploadNotFound:
                    pass
            else:
                record, _etag = await sessions.read_record(upload_id)
                if record.state in LIVE_STATES:
                    return 0  # cannot be (terminal states are final); leave it to the next sweep
                if record.state is not UploadState.COMPLETE:
                    await sessions.delete_data(record, lease)  # in case a crash interrupted it
                else:  # a tail a stalled request wrote after the upload completed
                    await sessions.remove(await sessions.leftovers(upload_id), lease)
                lease.check()
                await guarded("deleting an upload record", sessions.backend.delete(info_key(upload_id)))
                sessions.index.forget(upload_id)
        except Exception as exc:  # noqa: BLE001 - one bad upload must not stop the sweep
            log.warning("sweeping upload %s failed: %s", upload_id, exc)
        finally:
            await lease.release()
        return 0

    async def refresh(self, *, max_age: float = 0.0) -> None:
        """Bring the index up to date with the store, unless it is at most ``max_age`` seconds
        old; one refresh at a time however many callers ask."""
        async with self._scanning:
            if self.sessions.monotonic() - self._scanned_at <= max_age:
                return
            await self._scan()

    async def _scan(self) -> tuple[dict[str, str], dict[str, list[ObjectInfo]]]:
        """List ``u/`` once; read the records whose ETag is new to the index; merge. Returns the
        listed records (id -> ETag) and the tails by upload id. Caller holds ``_scanning``."""
        sessions = self.sessions
        mark = sessions.index.mark()
        listed: dict[str, str] = {}
        tails: dict[str, list[ObjectInfo]] = {}
        async for info in sessions.listing(keys.UPLOAD_PREFIX):
            rest = info.key[len(keys.UPLOAD_PREFIX):]
            upload_id, _, tail = rest.partition("/")
            if tail == "info" and valid_upload_id(upload_id):
                listed[upload_id] = info.etag
            elif tail.startswith(("t/", "b/")):  # a tail or a digest segment: left over if the record is gone
                tails.setdefault(upload_id, []).append(info)
        read: list[UploadSummary] = []
        slots = asyncio.Semaphore(_SCAN_READS)  # after a restart every record is read once: not one by one

        async def read_one(upload_id: str) -> None:
            async with slots:
                try:
                    blob = await guarded("reading the upload record", sessions.backend.get(info_key(upload_id)))
                except NotFound:
                    listed.pop(upload_id, None)  # gone since the listing
                    return
                except (StoreFailed, StoreUnavailable) as exc:
                    log.warning("could not read the record of upload %s (tried again next sweep): %s", upload_id, exc)
                    if sessions.index.get(upload_id) is None:
                        listed.pop(upload_id, None)  # neither counted nor swept until it can be read
                    # Its record exists: its tails are not orphans (the bytes a PATCH acknowledged).
                    tails.pop(upload_id, None)
                    return
            try:
                record = UploadRecord.from_json(blob.data)
            except StoreFailed as exc:
                log.warning("upload record %s is unreadable and left alone: %s", upload_id, exc)
                read.append(UploadSummary(upload_id, "", _DAMAGED, 0.0, 0.0, None, listed[upload_id]))
                return
            # Under the listed ETag: if the record changed since the listing, the next listing
            # shows another ETag and it is read again.
            read.append(summary_of(record, listed[upload_id]))

        await asyncio.gather(*(read_one(upload_id) for upload_id in sessions.index.changed(listed)))
        sessions.index.merge(mark, listed, read)
        self._scanned_at = sessions.monotonic()
        return listed, tails

    async def _sweep_orphan_tails(self, tails: dict[str, list[ObjectInfo]], records: set[str], now: float) -> None:
        """Tails (and digest segments) whose upload record is gone (a write delayed on the wire
        landed after the upload ended and was swept): nobody can resume them, so they go once
        old enough that the record is surely not just being created."""
        for upload_id, infos in tails.items():
            if upload_id in records:
                continue
            old = [i.key for i in infos if now - i.last_modified.timestamp() > self.sessions.options.tombstone_seconds]
            for k in old:
                try:
                    await self.sessions.backend.delete(k)
                except (TransientError, PermanentError) as exc:
                    log.warning("could not delete the orphaned tail %s: %s", k, exc)

    async def start(self) -> None:
        """Run the sweeper in the background (first sweep right away: it also counts the live
        uploads a previous process left)."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._sweep_forever())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _sweep_forever(self) -> None:
        while True:
            try:
                n = await self.sweep()
                if n:
                    log.info("expired %d upload(s)", n)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the store may be down for a while; try again later
                log.warning("upload sweep failed: %s", exc)
            await asyncio.sleep(self.sessions.options.sweep_interval)
