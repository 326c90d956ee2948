"""A listing page costs a bounded number of store requests: summaries are remembered under the
ETag of each manifest record, which the store's own listing reports (storage.listing)."""

from __future__ import annotations

import os
from typing import Any

from storage import keys
from storage.backends.base import Blob
from storage.backends.memory import MemoryBackend
from storage.locks import LockManager
from storage.objects import ObjectStore, StoreOptions


class CountingBackend(MemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.manifest_gets = 0
        self.lists = 0

    async def get(self, key: str, **kw: Any) -> Blob:
        if key.startswith(keys.MANIFEST_PREFIX):
            self.manifest_gets += 1
        return await super().get(key, **kw)

    async def list(self, prefix: str = "", *, start_after: str | None = None) -> Any:
        self.lists += 1
        async for info in super().list(prefix, start_after=start_after):
            yield info


async def body(data: bytes) -> Any:
    yield data


def store_on(backend: MemoryBackend) -> ObjectStore:
    return ObjectStore(backend, LockManager(), StoreOptions(chunk_size=4096, manifest_ttl=0.0))


async def test_a_repeated_listing_page_reads_no_manifest_and_a_changed_record_is_read_again() -> None:
    backend = CountingBackend()
    writer, reader = store_on(backend), store_on(backend)  # two gateways on one store
    for n in range(40):
        await writer.put(f"dir/{n:03d}", body(os.urandom(100 + n)), content_type="video/mp4")
    first, _ = await reader.list("dir/")
    assert [o.key for o in first] == [f"dir/{n:03d}" for n in range(40)]
    assert [o.size for o in first] == [100 + n for n in range(40)]

    backend.manifest_gets = backend.lists = 0
    again, _ = await reader.list("dir/")
    assert again == first
    assert (backend.lists, backend.manifest_gets) == (1, 0)

    # Another gateway replaces one object and deletes another: only those records are read.
    await writer.put("dir/007", body(b"x" * 5000), content_type="text/plain")
    await writer.delete("dir/010")
    backend.manifest_gets = 0
    third, _ = await reader.list("dir/")
    by_key = {o.key: o for o in third}
    assert "dir/010" not in by_key and len(third) == 39
    assert (by_key["dir/007"].size, by_key["dir/007"].content_type) == (5000, "text/plain")
    assert by_key["dir/007"].etag == (await writer.head("dir/007")).etag
    assert backend.manifest_gets <= 4  # the records that changed, not all 40


async def test_pages_continue_after_the_last_key_and_say_when_there_is_no_more() -> None:
    backend = CountingBackend()
    store = store_on(backend)
    for n in range(5):
        await store.put(f"p/{n}", body(b"abc"), content_type="x/y")
    page, after = await store.list("p/", limit=3)
    assert [o.key for o in page] == ["p/0", "p/1", "p/2"] and after == "p/2"
    page, after = await store.list("p/", after=after, limit=3)
    assert [o.key for o in page] == ["p/3", "p/4"] and after is None


def test_the_listing_cache_answers_only_for_the_etag_it_was_told() -> None:
    from datetime import datetime, timezone

    from storage.listing import UNKNOWN, Listed, ListingCache

    cache = ListingCache(max_entries=2)
    entry = Listed("a", 1, '"e"', datetime.now(timezone.utc), "x/y")
    cache.remember("a", '"r1"', entry)
    assert cache.lookup("a", '"r1"') == entry
    assert cache.lookup("a", '"r2"') is UNKNOWN
    cache.remember("b", '"r"', None)  # a tombstone: known, not listed
    assert cache.lookup("b", '"r"') is None
    cache.remember("c", '"r"', entry)
    assert cache.lookup("a", '"r1"') is UNKNOWN and len(cache) == 2  # bounded: the oldest went
