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


# ------------------------------------------------------------------ loans (gateway.sending's budget)
def fetcher(key: str, size: int, calls: list[str], gate: asyncio.Event | None = None):  # type: ignore[no-untyped-def]
    async def fetch() -> bytes:
        calls.append(key)
        if gate is not None:
            await gate.wait()
        await asyncio.sleep(0)
        return key.encode() * size

    return fetch


async def test_a_lent_chunk_counts_against_the_budget_and_a_miss_waits_for_room() -> None:
    c = cache(20)
    calls: list[str] = []
    a = await c.borrow("a", fetcher("a", 10, calls), size=10)
    b = await c.borrow("b", fetcher("b", 10, calls), size=10)
    waiting = asyncio.ensure_future(c.get("c", fetcher("c", 10, calls), size=10))
    await asyncio.sleep(0.01)
    assert not waiting.done() and c.waiting == 1 and calls == ["a", "b"]  # a busy loan is never taken back
    assert c.used <= 20
    a.release()
    assert await waiting == b"c" * 10 and c.used <= 20
    b.release()


async def test_an_idle_loan_is_taken_back_for_a_reader_that_waits_and_can_be_borrowed_again() -> None:
    c = cache(10)
    calls: list[str] = []
    stalled = await c.borrow("a", fetcher("a", 10, calls), size=10)
    stalled.set_idle(True)  # its client stopped reading; it holds no reference into the bytes
    assert await c.get("b", fetcher("b", 10, calls), size=10) == b"b" * 10  # no wait for the stalled one
    assert stalled.reclaimed and stalled.value is None and c.stats.reclaimed == 1
    again = await c.borrow("a", fetcher("a", 10, calls), size=10)  # it reads on: fetched again, in budget
    assert again.value == b"a" * 10 and calls == ["a", "b", "a"] and c.used <= 10
    stalled.release()  # giving back a reclaimed loan changes nothing
    again.release()
    assert c.held == 0


async def test_readers_share_one_lent_chunk_and_it_is_taken_back_only_when_all_are_idle() -> None:
    c = cache(10)
    calls: list[str] = []
    one = await c.borrow("a", fetcher("a", 10, calls), size=10)
    two = await c.borrow("a", fetcher("a", 10, calls), size=10)
    assert calls == ["a"] and c.held == 10
    one.set_idle(True)
    waiting = asyncio.ensure_future(c.get("b", fetcher("b", 10, calls), size=10))
    await asyncio.sleep(0.01)
    assert not waiting.done() and not one.reclaimed  # the other reader still sends from it
    two.set_idle(True)
    assert await waiting == b"b" * 10 and one.reclaimed and two.reclaimed


async def test_a_reader_joining_a_fetch_its_last_claimant_just_dropped_gets_the_value() -> None:
    c = cache(100)
    calls: list[str] = []
    gate = asyncio.Event()
    owner = object()
    assert c.prefetch("a", fetcher("a", 10, calls, gate), size=10, owner=owner)
    await asyncio.sleep(0)
    c.release(owner, ["a"])  # the read-ahead's reader stalled or left: its fetch is cancelled
    gate.set()
    assert await c.get("a", fetcher("a", 10, calls, gate), size=10) == b"a" * 10  # not a CancelledError
    assert calls == ["a", "a"]


async def test_a_waiting_reader_gives_up_its_own_read_ahead_so_readers_cannot_deadlock() -> None:
    c = cache(20)
    calls: list[str] = []
    lent = await c.borrow("x", fetcher("x", 10, calls), size=10)
    owner = object()
    assert c.prefetch("n", fetcher("n", 10, calls), size=10, owner=owner)  # its next chunk
    await asyncio.sleep(0.01)
    assert c.held == 20
    # The same reader now needs a chunk it did not claim: waiting while holding "n" would wait
    # for itself; its claim goes, and the chunk it needs fits.
    got = await asyncio.wait_for(c.get("w", fetcher("w", 10, calls), size=10, owner=owner), 5)
    assert got == b"w" * 10 and c.used <= 20
    lent.release()
