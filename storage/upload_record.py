"""The upload session record (``u/<id>/info``): its JSON format, its states and the moves
between them, and when an upload has expired. Pure: no I/O (``storage.uploads`` reads and writes
records; ``storage.upload_layout`` says where they are).

State machine: pending -> receiving -> committing -> complete | aborted | expired (``NEXT``).
``committing`` is written (with every chunk's SHA-256) before the manifest is committed, so a
crash between the two is finished by the next request on the upload; a committing upload never
expires (a manifest may name its chunks), it is finished instead.

Must never: import aiohttp or ``gateway``; do I/O; accept a record of another format silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum

from storage import keys
from storage.errors import StoreFailed

RECORD_FORMAT = "chunkgate.upload/1"


class UploadState(str, Enum):
    PENDING = "pending"
    RECEIVING = "receiving"
    COMMITTING = "committing"
    COMPLETE = "complete"
    ABORTED = "aborted"
    EXPIRED = "expired"


LIVE_STATES = frozenset({UploadState.PENDING, UploadState.RECEIVING, UploadState.COMMITTING})
TERMINAL_STATES = frozenset({UploadState.COMPLETE, UploadState.ABORTED, UploadState.EXPIRED})
_EXPIRABLE_VALUES = frozenset({UploadState.PENDING.value, UploadState.RECEIVING.value})
_LIVE_VALUES = frozenset(s.value for s in LIVE_STATES)

# What each state may become. ``committing`` may be written again (an older record that did not
# yet say what it replaces); a terminal state is final.
NEXT: dict[UploadState, frozenset[UploadState]] = {
    UploadState.PENDING: frozenset({UploadState.RECEIVING, UploadState.COMMITTING, UploadState.COMPLETE,
                                    UploadState.ABORTED, UploadState.EXPIRED}),
    UploadState.RECEIVING: frozenset({UploadState.COMMITTING, UploadState.COMPLETE, UploadState.ABORTED,
                                      UploadState.EXPIRED}),
    UploadState.COMMITTING: frozenset({UploadState.COMMITTING, UploadState.COMPLETE, UploadState.ABORTED}),
    UploadState.COMPLETE: frozenset(),
    UploadState.ABORTED: frozenset(),
    UploadState.EXPIRED: frozenset(),
}


def _value(state: str) -> str:
    # A str Enum hashes by its name, not its value: compare values, so that the index's plain
    # strings (``storage.quota.UploadSummary.state``) and ``UploadState`` members both work.
    return state.value if isinstance(state, UploadState) else state


def is_live(state: str) -> bool:
    """Not in a terminal state (``LIVE_STATES``); also for the index's plain strings."""
    return _value(state) in _LIVE_VALUES


def overdue(state: str, expires: float, now: float) -> bool:
    """Live and past its expiry: nothing has renewed it for ``UploadOptions.expiry`` seconds."""
    return is_live(state) and expires <= now


def expired(state: str, expires: float, now: float) -> bool:
    """Overdue with no commit under way: the upload expires now (its data is deleted). The one
    expiry rule: the sessions, the sweeper and ``chunkgate gc`` all ask this."""
    return overdue(state, expires, now) and _value(state) in _EXPIRABLE_VALUES


@dataclass
class UploadRecord:
    id: str
    key: str
    version: str
    length: int | None  # None: deferred (creation-defer-length) until a PATCH names it
    chunk_size: int
    content_type: str
    metadata: str  # the client's Upload-Metadata header, echoed by HEAD
    created: float
    expires: float
    state: UploadState = UploadState.PENDING
    hashes: dict[int, str] = field(default_factory=dict)  # SHA-256 of chunks known to be written
    blocks: dict[int, list[str]] = field(default_factory=dict)  # their per-block SHA-256, when known
    finished: float | None = None  # when it entered a terminal state
    # Recorded under the object key's lock when the upload enters ``committing``: what its commit
    # replaces (``storage.manifests.identity``: a version, a tombstone, or None for no record).
    # A retry commits only over exactly that, so it can never replace what came after its own.
    replaces: str | None = None
    replaces_known: bool = False
    # Completed without its own commit: a later write replaced what this upload was to replace
    # before its commit could land, so the upload took effect and was replaced at once.
    superseded: bool = False
    meta: dict[str, str] = field(default_factory=dict)  # the tus metadata as a map (hook events)
    client: str = ""  # who it counts against (storage.quota.client_id); "" in older records

    def enter(self, state: UploadState, now: float) -> None:
        """Move to ``state`` (``NEXT``); a terminal state records when (``finished``). Raises
        ``ValueError`` for a move the state machine does not have: a bug, never a store failure."""
        if state not in NEXT[self.state]:
            raise ValueError(f"upload {self.id}: no move from {self.state.value} to {state.value}")
        self.state = state
        if state in TERMINAL_STATES:
            self.finished = now

    def to_json(self) -> bytes:
        doc = {
            "format": RECORD_FORMAT, "id": self.id, "key": self.key, "version": self.version,
            "length": self.length, "chunk_size": self.chunk_size, "content_type": self.content_type,
            "metadata": self.metadata, "created": self.created, "expires": self.expires,
            "state": self.state.value, "hashes": {str(i): h for i, h in sorted(self.hashes.items())},
            "blocks": {str(i): b for i, b in sorted(self.blocks.items())},
            "finished": self.finished, "replaces": self.replaces, "replaces_known": self.replaces_known,
            "superseded": self.superseded, "meta": self.meta, "client": self.client,
        }
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> UploadRecord:
        try:
            doc = json.loads(raw)
            if doc.get("format") != RECORD_FORMAT:
                raise ValueError(f"unknown format {doc.get('format')!r}")
            length = doc["length"]
            return cls(
                id=str(doc["id"]), key=keys.validate_key(doc["key"]), version=str(doc["version"]),
                length=None if length is None else int(length), chunk_size=int(doc["chunk_size"]),
                content_type=str(doc["content_type"]), metadata=str(doc.get("metadata") or ""),
                created=float(doc["created"]), expires=float(doc["expires"]), state=UploadState(doc["state"]),
                hashes={int(i): str(h) for i, h in (doc.get("hashes") or {}).items()},
                blocks={int(i): [str(h) for h in b] for i, b in (doc.get("blocks") or {}).items()},
                finished=None if doc.get("finished") is None else float(doc["finished"]),
                replaces=None if doc.get("replaces") is None else str(doc["replaces"]),
                replaces_known=bool(doc.get("replaces_known", False)),
                superseded=bool(doc.get("superseded", False)),
                meta={str(k): str(v) for k, v in (doc.get("meta") or {}).items()},
                client=str(doc.get("client") or ""),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StoreFailed(f"an upload record is damaged: {exc}") from None


