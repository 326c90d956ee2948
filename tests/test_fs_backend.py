"""What only the fs backend promises: keys never leave the root, the key <-> path mapping is
reversible and injective, writes are atomic (no partial file ever visible, temp files never
listed), and conditional writes hold across processes."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.backends.base import InvalidKey, PermanentError, PreconditionFailed, TransientError
from storage.backends.fs import PIECE_BYTES, FsBackend, key_to_parts, parts_to_key


@pytest.fixture
async def store(tmp_path: Path) -> FsBackend:
    backend = FsBackend(tmp_path / "root")
    yield backend  # type: ignore[misc]
    await backend.close()


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# -- keys never leave the root ---------------------------------------------------------------

ESCAPES = [
    "../outside", "a/../../outside", "..", "a/..", "/etc/passwd", "//etc/passwd", "a/./b",
    "nul\0/x", "a//b",
]


@pytest.mark.parametrize("key", ESCAPES)
async def test_keys_that_could_escape_the_root_are_refused(store: FsBackend, key: str) -> None:
    for attempt in (store.put(key, b"x"), store.get(key), store.head(key), store.delete(key)):
        with pytest.raises(InvalidKey):
            await attempt
    assert files_under(Path(store.root).parent) == []


# Legal keys (API.md) that look like escapes on some platform: each is held as one file inside
# the root, under a name with no separator or dot segment, and reads back as itself.
WINDOWS_LOOKING = ["a\\..\\..\\outside", "..\\outside", "\\..\\", "C:\\x", "a\\.\\b"]


@pytest.mark.parametrize("key", WINDOWS_LOOKING)
async def test_backslash_keys_are_held_inside_the_root(store: FsBackend, key: str) -> None:
    await store.put(key, b"x")
    assert (await store.get(key)).data == b"x"
    files = files_under(Path(store.root).parent)
    assert len(files) == 1 and Path(store.root) in files[0].parents
    assert "\\" not in str(files[0]) and [i.key async for i in store.list()] == [key]


LOOKALIKES = [
    "%2e%2e/outside", "%2E%2E%2Foutside", "..%2f..%2foutside", ".hidden", "...", ".tmp-1234",
    "a/.b", "\u2025/x", "\uff0e\uff0e/x", "~/x", "a=", "a+", "a%3D",
]


@pytest.mark.parametrize("key", LOOKALIKES)
async def test_encoded_and_lookalike_dots_are_stored_literally_inside_the_root(
    store: FsBackend, key: str
) -> None:
    await store.put(key, key.encode())
    (stored,) = files_under(Path(store.root).parent)
    assert stored.is_relative_to(store.root)
    assert not any(part.startswith(".") for part in stored.relative_to(store.root).parts)
    assert (await store.get(key)).data == key.encode()
    assert [info.key async for info in store.list()] == [key]


# -- the mapping ------------------------------------------------------------------------------

segment_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\\\0"),
    min_size=1,
    max_size=30,
).filter(lambda s: s not in (".", ".."))
# Long runs of few characters hit the piece boundaries (PIECE_BYTES) and shared prefixes.
long_segment = st.builds(
    lambda c, n, tail: c * n + tail,
    st.sampled_from(["p", "é", "%"]),
    st.sampled_from([PIECE_BYTES // 2 - 1, PIECE_BYTES // 2, PIECE_BYTES - 1, PIECE_BYTES, PIECE_BYTES + 1, 2 * PIECE_BYTES]),
    st.sampled_from(["", "!", "z", "-", " ", "é"]),
)
segment = st.one_of(segment_text, long_segment)
keys = st.lists(segment, min_size=1, max_size=4).map("/".join).filter(
    lambda k: len(k.encode("utf-8")) <= 1024 and not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in k)
)


@given(key=keys)
def test_mapping_round_trips_and_every_component_is_a_safe_short_name(key: str) -> None:
    parts = key_to_parts(key)
    assert parts_to_key(parts) == key
    for part in parts:
        assert part not in (".", "..") and not part.startswith(".")
        assert "/" not in part and "\\" not in part and "\0" not in part
        assert len(part.encode()) <= 255


@given(a=keys, b=keys)
def test_distinct_keys_never_share_a_path(a: str, b: str) -> None:
    if a != b:
        assert key_to_parts(a) != key_to_parts(b)


@settings(max_examples=40, deadline=None)
@given(key_set=st.sets(keys, min_size=1, max_size=12), probe=keys)
def test_list_returns_exactly_the_stored_keys_in_utf8_order(
    tmp_path_factory: pytest.TempPathFactory, key_set: set[str], probe: str
) -> None:
    async def run() -> None:
        store = FsBackend(tmp_path_factory.mktemp("prop"))
        try:
            for key in key_set:
                await store.put(key, key.encode())
            ordered = sorted(key_set, key=lambda k: k.encode())
            assert [i.key async for i in store.list()] == ordered
            assert [i.key async for i in store.list(start_after=probe)] == [k for k in ordered if k > probe]
            prefix = probe[: len(probe) // 2]
            assert [i.key async for i in store.list(prefix)] == [k for k in ordered if k.startswith(prefix)]
        finally:
            await store.close()

    asyncio.run(run())


async def test_a_directory_and_a_continued_long_segment_interleave_in_order(store: FsBackend) -> None:
    piece = "p" * PIECE_BYTES
    stored = [piece, piece + "!", piece + "/x", piece + "/x/y", piece + "z", piece + " ", piece + "p" * 5]
    for key in stored:
        await store.put(key, b"")
    expected = sorted(stored, key=lambda k: k.encode())
    assert [i.key async for i in store.list()] == expected
    assert [i.key async for i in store.list(piece + "/")] == [piece + "/x", piece + "/x/y"]
    after = piece + "!"
    assert [i.key async for i in store.list(start_after=after)] == [k for k in expected if k > after]


async def test_pruned_directories_leave_the_root_clean(store: FsBackend) -> None:
    await store.put("a/b/c/d", b"x")
    await store.delete("a/b/c/d")
    assert os.listdir(store.root) == []


# -- atomicity --------------------------------------------------------------------------------


async def test_a_reader_never_sees_a_partial_value(store: FsBackend) -> None:
    values = [bytes([65 + i]) * (100_000 + 7919 * i) for i in range(6)]
    await store.put("hot", values[0])
    stop = asyncio.Event()

    async def writer() -> None:
        for round_ in range(30):
            await store.put("hot", values[round_ % len(values)])
        stop.set()

    async def reader() -> int:
        reads = 0
        while not stop.is_set():
            blob = await store.get("hot")
            assert blob.data in values and blob.size == len(blob.data)
            reads += 1
        return reads

    results = await asyncio.gather(writer(), reader(), reader())
    assert sum(results[1:]) > 0


async def test_a_failed_write_leaves_the_old_value_and_no_temp_file(
    store: FsBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.put("k", b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(TransientError):  # EIO may pass; the caller may retry
        await store.put("k", b"new value")
    monkeypatch.undo()
    assert (await store.get("k")).data == b"old"
    assert [p.name for p in files_under(Path(store.root))] == ["k="]


async def test_temp_and_foreign_files_are_never_listed(store: FsBackend) -> None:
    await store.put("d/k", b"x")
    for stray in (".tmp-deadbeef", "not-encoded-dir-marker+", "%zz=", "%2e=", "a%2fb="):
        (Path(store.root) / "d" / stray).write_bytes(b"junk")
    assert [i.key async for i in store.list()] == ["d/k"]


async def test_check_fails_when_the_root_is_gone(tmp_path: Path) -> None:
    backend = FsBackend(tmp_path / "gone")
    try:
        await backend.check()
        os.rmdir(tmp_path / "gone")
        with pytest.raises(PermanentError, match="does not exist"):
            await backend.check()
    finally:
        await backend.close()


# -- across processes ---------------------------------------------------------------------------


def _create_only_in_process(root: str, value: bytes) -> bool:
    async def run() -> bool:
        backend = FsBackend(root)
        try:
            await backend.put("once", value, if_none_match=True)
            return True
        except PreconditionFailed:
            return False
        finally:
            await backend.close()

    return asyncio.run(run())


def _increment_in_process(root: str, times: int) -> None:
    async def run() -> None:
        backend = FsBackend(root)
        try:
            done = 0
            while done < times:
                blob = await backend.get("counter")
                try:
                    await backend.put("counter", str(int(blob.data) + 1).encode(), if_match=blob.etag)
                    done += 1
                except PreconditionFailed:
                    pass
        finally:
            await backend.close()

    asyncio.run(run())


async def test_conditional_puts_hold_across_processes(store: FsBackend) -> None:
    await store.put("counter", b"0")
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        wins = await asyncio.to_thread(
            pool.starmap, _create_only_in_process, [(store.root, f"p{i}".encode()) for i in range(4)]
        )
        await asyncio.to_thread(pool.starmap, _increment_in_process, [(store.root, 20)] * 4)
    assert sum(wins) == 1
    assert (await store.get("counter")).data == b"80"


async def test_concurrent_deletes_in_one_directory_never_fail(tmp_path) -> None:
    # Deleting the last files of a directory prunes it; the other deleters must not trip over
    # the vanished directory (gc deletes a version's chunks concurrently).
    import asyncio

    from storage.backends.fs import FsBackend

    backend = FsBackend(tmp_path / "root", max_workers=8)
    for round_ in range(20):
        names = [f"c/ab/v{round_}/{i:08d}" for i in range(16)]
        for n in names:
            await backend.put(n, b"x")
        await asyncio.gather(*(backend.delete(n) for n in names))
        assert [i.key async for i in backend.list("c/")] == []
    await backend.close()
