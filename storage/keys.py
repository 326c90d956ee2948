"""Object key rules (API.md) and where each kind of record lives in the store.

Pure functions only: no I/O. The gateway validates keys with ``validate_key`` before anything
touches the store; the object layer derives every store key from here, so the layout is written
down in exactly one place:

    m/<object key>                     the key's record (JSON): its manifest, or a tombstone;
                                       the single source of truth per object (storage.manifests)
    c/<kid[:2]>/<kid>/<version>/<index:08d>  chunk bytes, immutable, never overwritten
    u/<upload id>/...                  tus upload sessions
    w/<version>                        a PUT writing that version's chunks (gc leaves them alone)
    l/<kid>                            store-backed lock leases
    o/<ms time>-<event id>             pointers to records carrying undelivered events (hooks)
    p/<random>/...                     the startup probe's private keys (storage.probe)

``kid`` is a hash of the object key, so chunk keys have a fixed length whatever the object key
is, and a version id is fresh per upload, so no writer can touch bytes a reader may be reading.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time

MAX_KEY_BYTES = 1024
MANIFEST_PREFIX = "m/"
CHUNK_PREFIX = "c/"
UPLOAD_PREFIX = "u/"
INTENT_PREFIX = "w/"
LEASE_PREFIX = "l/"
OUTBOX_PREFIX = "o/"


class BadKey(ValueError):
    """An object key that API.md does not allow. The message says why, for the client."""


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid object key, else raise ``BadKey``."""
    if not key:
        raise BadKey("the key is empty")
    try:
        raw = key.encode("utf-8")
    except UnicodeEncodeError:
        raise BadKey("the key is not valid UTF-8") from None
    if len(raw) > MAX_KEY_BYTES:
        raise BadKey(f"the key is {len(raw)} bytes long; at most {MAX_KEY_BYTES} are allowed")
    if any(ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F for ch in key):  # C0, DEL and C1
        raise BadKey("the key contains a NUL or control character")
    if key.startswith("/"):
        raise BadKey("the key must not start with '/'")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise BadKey("the key has an empty, '.' or '..' segment")
    return key


@functools.lru_cache(maxsize=4096)  # asked for every chunk a read touches: hash each hot key once
def key_id(key: str) -> str:
    """A fixed-length id for an object key, used to group its chunks and its lease."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


def new_version(now: float | None = None) -> str:
    """A fresh version id: millisecond time first (so ids sort by creation, which gc and
    humans reading a bucket listing both like), then 64 random bits (so two uploads in the
    same millisecond, on any gateway, never share one). ``now``: the caller's clock."""
    return f"{int((time.time() if now is None else now) * 1000):013x}{os.urandom(8).hex()}"


def version_time(version: str) -> float:
    """Creation time (unix seconds) encoded in a version id from ``new_version``."""
    return int(version[:13], 16) / 1000.0


def manifest_key(key: str) -> str:
    return MANIFEST_PREFIX + key


def object_key_of_manifest(store_key: str) -> str:
    return store_key[len(MANIFEST_PREFIX):]


def chunk_prefix(key: str, version: str) -> str:
    kid = key_id(key)
    # Two hex digits of fan-out keep any one directory of the fs store small.
    return f"{CHUNK_PREFIX}{kid[:2]}/{kid}/{version}/"


def chunk_key(key: str, version: str, index: int) -> str:
    return f"{chunk_prefix(key, version)}{index:08d}"


def lease_key(key: str) -> str:
    return LEASE_PREFIX + key_id(key)
