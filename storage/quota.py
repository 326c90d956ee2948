"""Open tus uploads, counted per client and in all: the cap on open uploads, and the index the
upload sweeper works from.

``UploadIndex`` is an in-memory summary of every upload record in the store (``u/<id>/info``):
its state, expiry, client and the ETag it was last seen with. It is filled from the store (a
listing, then a read of only the records whose listed ETag is new: ``changed``), and kept current
by this gateway's own writes (``note``). So a sweep of N idle uploads costs one listing, not N
reads, and the count survives restarts (the first sweep reads every record once) and is shared by
several gateways over one store (each reads the records the others wrote, once per change).

The guarantee of the cap: on one gateway the count is exact (a creation reserves its slot before
its first await). With several gateways, uploads created or finished by another gateway are seen
at this gateway's next refresh: every sweep, and before a creation whenever the index is older
than ``refresh_seconds`` and the count is at least half a cap. So gateways together may exceed a
cap by what the others created within about ``refresh_seconds``; they never refuse for longer
than that because of uploads that finished elsewhere.

Pure bookkeeping: no I/O here (``storage.uploads`` lists and reads). Must never: import aiohttp
or ``gateway``; count an upload past its expiry as open (it frees its slot when it expires, even
before the sweeper removes it).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterable

from storage.errors import ObjectError

ANONYMOUS = "anonymous"
_OPEN_STATES = frozenset({"pending", "receiving", "committing"})


def client_id(token: str | None) -> str:
    """Who an upload counts against: a bearer token's hash (never the token itself: the id is
    stored in the upload record), or ``anonymous`` for every client without one."""
    if not token:
        return ANONYMOUS
    return "t:" + hashlib.sha256(b"chunkgate upload client\n" + token.encode("utf-8")).hexdigest()[:20]


class TooManyOpenUploads(ObjectError):
    """This client has ``limit`` uploads open (HTTP 429): finish or terminate one first."""

    code = "too_many_open_uploads"

    def __init__(self, message: str, *, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OpenUploadsFull(ObjectError):
    """The gateway has its cap of open uploads over all clients (HTTP 503): try again later."""

    code = "open_uploads_full"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class UploadCaps:
    total: int = 10000  # 0: no cap
    per_client: int = 1000  # 0: no cap
    refresh_seconds: float = 5.0


@dataclass(frozen=True, slots=True)
class UploadSummary:
    """What the index keeps of one upload record."""

    id: str
    client: str  # "" for records written before clients were recorded: counted in the total only
    state: str
    created: float
    expires: float
    finished: float | None
    etag: str  # the ETag this summary was read (or written) with; "" for a reservation

    def open_at(self, now: float) -> bool:
        if self.state not in _OPEN_STATES:
            return False
        # A commit in progress finishes whatever its expiry; anything else frees its slot when
        # it expires, whether or not the sweeper got to it yet.
        return self.state == "committing" or self.expires > now


class UploadIndex:
    def __init__(self) -> None:
        self._entries: dict[str, UploadSummary] = {}
        # Bumped by every local change, so a refresh that was listing meanwhile keeps it.
        self._changes = 0
        self._changed_at: dict[str, int] = {}
        # Ids whose state is open (expiry not judged), per client: counting stays O(1) per
        # creation; only at a cap are those ids' expiries looked at.
        self._open: dict[str, set[str]] = {}
        self._open_count = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, upload_id: str) -> UploadSummary | None:
        return self._entries.get(upload_id)

    def summaries(self) -> list[UploadSummary]:
        return list(self._entries.values())

    def _set(self, upload_id: str, summary: UploadSummary | None) -> None:
        old = self._entries.pop(upload_id, None)
        if old is not None and old.state in _OPEN_STATES:
            ids = self._open[old.client]
            ids.discard(upload_id)
            self._open_count -= 1
            if not ids:
                del self._open[old.client]
        if summary is not None:
            self._entries[upload_id] = summary
            if summary.state in _OPEN_STATES:
                self._open.setdefault(summary.client, set()).add(upload_id)
                self._open_count += 1

    # -- this gateway's own writes ----------------------------------------------------------
    def note(self, summary: UploadSummary) -> None:
        self._changes += 1
        self._set(summary.id, summary)
        self._changed_at[summary.id] = self._changes

    def forget(self, upload_id: str) -> None:
        self._changes += 1
        self._set(upload_id, None)
        self._changed_at[upload_id] = self._changes

    def mark(self) -> int:
        """A point in this index's history: pass it to ``merge`` after reading the store."""
        return self._changes

    # -- what the store says -----------------------------------------------------------------
    def changed(self, listed: dict[str, str]) -> list[str]:
        """Of the listed upload ids (id -> listed ETag), those whose record must be read: new
        to the index, or listed with another ETag than the summary's."""
        return [i for i, etag in listed.items() if (s := self._entries.get(i)) is None or s.etag != etag]

    def merge(self, mark: int, listed: dict[str, str], read: Iterable[UploadSummary]) -> None:
        """Apply a listing taken after ``mark`` and the records read for it. Local changes made
        since ``mark`` win (they are newer than what the listing saw); an upload not listed is
        gone (swept, terminated elsewhere) unless it changed here since."""
        def newer_here(upload_id: str) -> bool:
            return self._changed_at.get(upload_id, 0) > mark

        for summary in read:
            if not newer_here(summary.id):
                self._set(summary.id, summary)
        for upload_id in [i for i in self._entries if i not in listed and not newer_here(i)]:
            self._set(upload_id, None)
        # Only changes since the oldest refresh that may still be running matter; keep it small.
        self._changed_at = {i: n for i, n in self._changed_at.items() if n > mark}

    # -- counting ----------------------------------------------------------------------------
    def _open_now(self, ids: Iterable[str], now: float) -> list[UploadSummary]:
        return [s for i in ids if (s := self._entries[i]).open_at(now)]

    def open_counts(self, client: str, now: float) -> tuple[int, int]:
        """(open uploads of ``client``, open uploads in all), expiry judged at ``now``."""
        mine = len(self._open_now(self._open.get(client, ()), now))
        total = sum(len(self._open_now(ids, now)) for ids in self._open.values())
        return mine, total

    def open_total(self, now: float) -> int:
        return sum(len(self._open_now(ids, now)) for ids in self._open.values())

    def check(self, caps: UploadCaps, client: str, now: float) -> None:
        """Raise ``TooManyOpenUploads`` (the client's cap first) or ``OpenUploadsFull`` when
        one more upload of ``client`` would exceed a cap. O(1) below the caps: the open-state
        counts bound the open ones; only at a cap are expiries judged."""
        mine_ids = self._open.get(client, set())
        if caps.per_client and len(mine_ids) >= caps.per_client:
            mine = self._open_now(mine_ids, now)
            if len(mine) >= caps.per_client:
                expiries = [s.expires for s in mine if s.state != "committing"]
                wait = max(1.0, math.ceil(min(expiries) - now)) if expiries else None
                who = "anonymous clients have" if client == ANONYMOUS else "this token has"
                raise TooManyOpenUploads(
                    f"{who} {len(mine)} open uploads, the most allowed ({caps.per_client}); finish or terminate "
                    f"(DELETE) one before creating another"
                    + (f"; the first idle one expires in {wait:.0f} s" if wait is not None else ""),
                    retry_after=wait)
        if caps.total and self._open_count >= caps.total:
            total = self.open_total(now)
            if total >= caps.total:
                raise OpenUploadsFull(f"the gateway has {total} open uploads, the most it keeps ({caps.total}); "
                                      f"try again later", retry_after=60.0)

    def near_cap(self, caps: UploadCaps, client: str, now: float) -> bool:
        """Whether a creation is close enough to a cap that the count should be fresh (by the
        open-state counts, an upper bound: O(1))."""
        mine = len(self._open.get(client, ()))
        return bool((caps.per_client and 2 * mine >= caps.per_client) or (caps.total and 2 * self._open_count >= caps.total))
