"""storage.cache.ChunkCache: a bytes-bounded LRU with single-flight fetches (a table of
sequences, and the properties a viewer storm relies on)."""

from __future__ import annotations

import asyncio

import pytest

from storage.cache import ChunkCache


def cache(max_bytes: int) -> ChunkCache[bytes]:
    return ChunkCache(max_bytes, len)


async def fetched(c: ChunkCache[bytes], key: str, size: int, calls: list[str]) -> bytes:
    async def fetch() -> bytes:
        calls.append(key)
        await asyncio.sleep(0)
        return key.encode() * size

    return await c.get(key, fetch, size=size)


SEQUENCES = [
    # (name, budget, reads as (key, size), expected store fetches)
    ("a repeat is a hit", 100, [("a", 10), ("a", 10)], ["a"]),
    ("least recently used goes first", 25, [("a", 10), ("b", 10), ("a", 10), ("c", 10), ("a", 10), ("b", 10)],
     ["a", "b", "c", "b"]),
    ("nothing bigger than the budget is kept", 5, [("a", 10), ("a", 10)], ["a", "a"]),
    ("the budget is bytes, not entries", 30, [("a", 10), ("b", 10), ("c", 10), ("a", 10), ("b", 10), ("c", 10)],
     ["a", "b", "c"]),
]


@pytest.mark.parametrize(("name", "budget", "reads", "fetches"), SEQUENCES, ids=[s[0] for s in SEQUENCES])
async def test_sequences(name: str, budget: int, reads: list[tuple[str, int]], fetches: list[str]) -> None:
    c = cache(budget)
    calls: list[str] = []
    for key, size in reads:
        assert await fetched(c, key, size, calls) == key.encode() * size
    assert calls == fetches
    assert c.used <= budget


async def test_many_readers_of_a_cold_key_cost_one_fetch() -> None:
    c = cache(1000)
    calls: list[str] = []
    results = await asyncio.gather(*(fetched(c, "k", 10, calls) for _ in range(32)))
    assert calls == ["k"] and all(r == b"k" * 10 for r in results)
    assert c.stats.misses == 1 and c.stats.coalesced == 31


async def test_a_reader_that_leaves_does_not_cancel_the_fetch_others_wait_on() -> None:
    c = cache(1000)
    gate = asyncio.Event()

    async def fetch() -> bytes:
        await gate.wait()
        return b"x" * 10

    leaving = asyncio.ensure_future(c.get("k", fetch, size=10))
    staying = asyncio.ensure_future(c.get("k", fetch, size=10))
    await asyncio.sleep(0)
    leaving.cancel()
    gate.set()
    assert await staying == b"x" * 10


async def test_a_failed_fetch_is_not_cached_and_the_next_reader_tries_again() -> None:
    c = cache(1000)
    attempts = 0

    async def fetch() -> bytes:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise OSError("store down")
        return b"ok"

    with pytest.raises(OSError):
        await c.get("k", fetch, size=2)
    assert await c.get("k", fetch, size=2) == b"ok" and attempts == 2


async def test_discard_forgets_a_key() -> None:
    c = cache(1000)
    calls: list[str] = []
    await fetched(c, "k", 4, calls)
    c.discard("k")
    assert "k" not in c
    await fetched(c, "k", 4, calls)
    assert calls == ["k", "k"]
