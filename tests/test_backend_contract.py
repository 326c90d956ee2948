"""The one contract every store backend passes (storage/backends/base.py).

Each test runs against every backend in ``FACTORIES``; adding a backend is one factory there.
The S3 backends list with a tiny page size so every listing test also crosses page boundaries.
"""

from __future__ import annotations

import asyncio
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import pytest

from storage.backends.base import (
    Backend,
    InvalidKey,
    NotFound,
    ObjectInfo,
    PermanentError,
    PreconditionFailed,
    TransientError,
)
from storage.backends.fs import FsBackend
from storage.backends.memory import MemoryBackend
from storage.backends.s3 import S3Backend
from storage.probe import apply, probe
from tests.support.servers import S3Server, free_ports, use_dummy_credentials

Factory = Callable[[pytest.FixtureRequest, Path], Awaitable[Backend]]


async def _memory(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return MemoryBackend()


async def _fs(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return FsBackend(tmp_path / "store")


def _s3(server_fixture: str, prefix: str) -> Factory:
    async def make(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
        server = request.getfixturevalue(server_fixture)
        # No credentials passed: the backend must find them in the environment, as in production.
        backend = S3Backend(server.new_bucket(), prefix, endpoint_url=server.endpoint, list_page_size=3)
        apply(backend, await probe(backend))  # as serve does at startup
        return backend

    return make


class _CountingObserver:
    def __init__(self) -> None:
        self.calls = 0

    def backend_call(self, op: str, outcome: str, seconds: float, bytes_read: int, bytes_written: int) -> None:
        self.calls += 1


def _stack(faults: bool) -> Factory:
    """The stack serve assembles (storage.stack): observed, limited and retrying wrappers over a
    raw store, with fault injection under them when ``faults``: the wrappers keep the contract,
    the retrying one even while the store below fails 5% of calls (errors before and after a
    write lands, throttles, delays, short reads)."""
    async def make(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
        from storage.backends.faults import KINDS, FaultPlan
        from storage.stack import StackOptions, build_backend

        opts = StackOptions(store=str(tmp_path / "store"), store_max_concurrency=8, store_max_rps=0.0,
                            faults=FaultPlan(rate=0.05, kinds=set(KINDS), seed=7, max_latency=0.002) if faults else None)
        return build_backend(opts, _CountingObserver(), FsBackend(tmp_path / "store"))

    return make


FACTORIES: dict[str, Factory] = {
    "memory": _memory,
    "fs": _fs,
    "stack": _stack(faults=False),
    "stack-faulty": _stack(faults=True),
    "moto": _s3("moto_s3", ""),
    "moto-prefixed": _s3("moto_s3", "tenant/a"),
    "seaweedfs": _s3("seaweedfs", "tenant/a"),
}
SLOW_LISTING = {"moto", "moto-prefixed", "seaweedfs"}  # 1000+ puts take too long over HTTP


@pytest.fixture(
    params=[
        pytest.param(name, marks=[pytest.mark.seaweedfs] if name == "seaweedfs" else [])
        for name in FACTORIES
    ]
)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    store = await FACTORIES[request.param](request, tmp_path)
    try:
        yield store
    finally:
        await store.close()


def utf8_sorted(keys: list[str]) -> list[str]:
    return sorted(keys, key=lambda key: key.encode("utf-8"))


async def keys_of(store: Backend, prefix: str = "", start_after: str | None = None) -> list[str]:
    return [info.key async for info in store.list(prefix, start_after=start_after)]


# -- put, get, head -------------------------------------------------------------------------


async def test_put_then_get_returns_the_bytes_and_the_etag_put_returned(backend: Backend) -> None:
    data = bytes(range(256)) * 40
    etag = await backend.put("dir/value", data)
    blob = await backend.get("dir/value")
    assert (blob.data, blob.size, blob.etag) == (data, len(data), etag)
    assert (await backend.head("dir/value")).etag == etag


async def test_empty_value_round_trips(backend: Backend) -> None:
    etag = await backend.put("empty", b"")
    blob = await backend.get("empty")
    assert (blob.data, blob.size, blob.etag) == (b"", 0, etag)
    assert (await backend.head("empty")).size == 0
    assert (await backend.get("empty", start=0, end=10)).data == b""
    assert (await backend.get("empty", start=5)).data == b""


RANGE_CASES = [
    # (start, end, expected slice of a 1000-byte value)
    (0, None, slice(0, 1000)),
    (10, None, slice(10, 1000)),
    (0, 10, slice(0, 10)),
    (10, 20, slice(10, 20)),
    (999, None, slice(999, 1000)),
    (990, 2000, slice(990, 1000)),  # end past the size is clamped
    (0, 5000, slice(0, 1000)),
    (500, 500, slice(0, 0)),  # empty range
    (1000, None, slice(0, 0)),  # start at the end
    (1500, 1600, slice(0, 0)),  # start past the end
]


async def test_listing_reports_each_value_with_the_etag_a_read_returns(backend: Backend) -> None:
    # storage.listing remembers listing summaries under this ETag: it must be the same one.
    await backend.put("m/one", b"first")
    etag = await backend.put("m/two", b"second")
    etag = await backend.put("m/two", b"second, replaced", if_match=etag)
    listed = {info.key: info.etag async for info in backend.list("m/")}
    assert listed == {"m/one": (await backend.get("m/one")).etag, "m/two": etag}
    assert listed["m/two"] == (await backend.head("m/two")).etag


async def test_a_get_that_accepts_a_view_returns_the_same_bytes(backend: Backend) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    etag = await backend.put("chunks/big", data)
    whole = await backend.get("chunks/big", view=True)
    part = await backend.get("chunks/big", start=1000, end=2_000_000, view=True)
    assert bytes(whole.data) == data and (whole.size, whole.etag) == (len(data), etag)
    assert bytes(part.data) == data[1000:2_000_000] and part.size == len(data)
    assert (await backend.get("chunks/big")).data == data  # and bytes by default, as before
    assert isinstance((await backend.get("chunks/big")).data, bytes)


@pytest.mark.parametrize(("start", "end", "expected"), RANGE_CASES)
async def test_ranged_get_returns_the_slice_and_the_whole_size(
    backend: Backend, start: int, end: int | None, expected: slice
) -> None:
    data = os.urandom(1000)
    etag = await backend.put("ranged", data)
    blob = await backend.get("ranged", start=start, end=end)
    assert blob.data == data[expected]
    assert blob.size == 1000
    assert blob.etag == etag


async def test_get_rejects_a_backwards_range(backend: Backend) -> None:
    await backend.put("k", b"0123456789")
    with pytest.raises(ValueError):
        await backend.get("k", start=5, end=2)


async def test_head_reports_size_etag_and_a_recent_aware_time(backend: Backend) -> None:
    etag = await backend.put("headed", b"x" * 123)
    info = await backend.head("headed")
    assert (info.key, info.size, info.etag) == ("headed", 123, etag)
    assert info.last_modified.tzinfo is not None
    # Wide window: only catches a wrong epoch or time zone, never timing noise.
    assert abs(info.last_modified - datetime.now(timezone.utc)) < timedelta(hours=1)


async def test_absent_key_is_not_found_on_get_and_head(backend: Backend) -> None:
    with pytest.raises(NotFound):
        await backend.get("nope")
    with pytest.raises(NotFound):
        await backend.get("nope", start=3, end=9)
    with pytest.raises(NotFound):
        await backend.head("nope")


async def test_unconditional_put_overwrites_and_changes_the_etag(backend: Backend) -> None:
    first = await backend.put("k", b"first")
    second = await backend.put("k", b"second value")
    assert first != second
    blob = await backend.get("k")
    assert (blob.data, blob.etag) == (b"second value", second)


async def test_put_stores_a_copy_of_a_mutable_buffer(backend: Backend) -> None:
    buffer = bytearray(b"original")
    task = asyncio.ensure_future(backend.put("k", buffer))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    buffer[:] = b"CHANGED!"
    await task
    assert (await backend.get("k")).data == b"original"


@pytest.mark.parametrize(
    "key", ["", "/abs", "a//b", "a/./b", "a/../b", "..", "a/", "x" * 1025, "nul\0byte"]
)
async def test_invalid_keys_are_refused(backend: Backend, key: str) -> None:
    with pytest.raises(InvalidKey):
        await backend.put(key, b"x")
    with pytest.raises(InvalidKey):
        await backend.get(key)


def key_of_bytes(size: int) -> str:
    """A key of exactly ``size`` UTF-8 bytes, in short segments (SeaweedFS caps each at 255)."""
    body = "abcdéfg/" * ((size - 1) // 9)
    return body + "x" * (size - len(body.encode()))


async def test_a_key_of_1024_bytes_is_accepted_unless_a_prefix_makes_it_longer(
    backend: Backend,
) -> None:
    prefix_bytes = len(getattr(backend, "prefix", "").encode())
    if prefix_bytes:
        with pytest.raises(InvalidKey):
            await backend.put(key_of_bytes(1024), b"x")
    if prefix_bytes:
        with pytest.raises(InvalidKey):
            backend.check_key(key_of_bytes(1024))
    key = key_of_bytes(1024 - prefix_bytes)
    backend.check_key(key)
    await backend.put(key, b"long")
    assert (await backend.get(key)).data == b"long"
    assert await keys_of(backend) == [key]


# -- delete ---------------------------------------------------------------------------------


async def test_delete_removes_and_is_idempotent(backend: Backend) -> None:
    await backend.put("a/b/c", b"x")
    await backend.put("a/keep", b"y")
    await backend.delete("a/b/c")
    with pytest.raises(NotFound):
        await backend.get("a/b/c")
    await backend.delete("a/b/c")
    await backend.delete("never/existed")
    assert await keys_of(backend) == ["a/keep"]
    # The key can be written again after its directories were pruned.
    await backend.put("a/b/c", b"again")
    assert (await backend.get("a/b/c")).data == b"again"


async def test_conditional_delete_removes_only_the_value_it_names(backend: Backend) -> None:
    first = await backend.put("tomb", b"v1")
    second = await backend.put("tomb", b"v2")
    with pytest.raises(PreconditionFailed):
        await backend.delete("tomb", if_match=first)  # stale: a newer value must survive
    assert (await backend.get("tomb")).data == b"v2"
    await backend.delete("tomb", if_match=second)
    with pytest.raises(NotFound):
        await backend.head("tomb")
    with pytest.raises(PreconditionFailed):
        await backend.delete("tomb", if_match=second)  # absent: the condition cannot hold
    with pytest.raises(PreconditionFailed):
        await backend.delete("never/existed", if_match=second)


# Every key shape API.md allows (UTF-8, no control characters, no empty/./.. segments): each
# store holds each one as its own value and lists it back exactly. Segments stay under 255
# bytes, SeaweedFS's limit per path segment (a longer one is refused as InvalidKey up front).
KEY_SHAPES = [
    "back\\slash", "a\\..\\..\\outside", "..\\outside", "..x", "x..", "a..b", "...", "....",
    ".hidden/.dot", "sp ace/tab\u00a0nbsp", "%2e%2E/%00", "plus+/eq=/amp&/q?/hash#", "x=", "y+",
    "\u00e9t\u00e9/\u65e5\u672c\u8a9e/\U0001f3ac.mp4", "e\u0301/combining", "\uffff/\u2028line", "'quote\"/<tag>",
    "deep/" * 40 + "leaf", "s" * 81 + "/" + "t" * 160, "a", "a/b", "a/b/c",
]


async def test_every_key_shape_the_api_allows_is_held_and_listed(backend: Backend, request: pytest.FixtureRequest) -> None:
    from storage.keys import validate_key

    caps = await probe(backend)
    # Only a store the probe caught mapping backslashes to '/' may refuse a shape, and then it
    # refuses exactly the backslash keys, up front (SeaweedFS 4.48); every other store holds all.
    refused = {k for k in KEY_SHAPES if "\\" in k} if not caps.backslash_keys else set()
    held = [k for k in KEY_SHAPES if k not in refused]
    for key in refused:
        with pytest.raises(InvalidKey):
            backend.check_key(key)
    for n, key in enumerate(held):
        validate_key(key)  # the shapes are all legal object keys
        backend.check_key(key)
        await backend.put(key, f"value {n}".encode())
    for n, key in enumerate(held):
        assert (await backend.get(key)).data == f"value {n}".encode(), key
    listed = await keys_of(backend)
    assert utf8_sorted(listed) == utf8_sorted(held)
    if request.node.callspec.params["backend"] != "seaweedfs":  # its segment-wise order: see the xfail below
        assert listed == utf8_sorted(held)
    assert getattr(backend, "name", "").startswith("s3") or not refused


async def test_the_probe_finds_every_condition_honoured_and_leaves_nothing(backend: Backend) -> None:
    caps = await probe(backend)
    assert caps.conditional_put and caps.conditional_delete, caps.describe()
    assert await keys_of(backend) == []


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/./b", "a/../b", "..", "a/", "x" * 1025, "nul\0byte"])
def test_check_key_refuses_what_put_would_refuse(backend: Backend, key: str) -> None:
    with pytest.raises(InvalidKey):
        backend.check_key(key)


# -- conditional puts -----------------------------------------------------------------------


async def test_create_only_put_fails_when_the_key_exists(backend: Backend) -> None:
    etag = await backend.put("once", b"first", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        await backend.put("once", b"second", if_none_match=True)
    blob = await backend.get("once")
    assert (blob.data, blob.etag) == (b"first", etag)


async def test_create_only_put_succeeds_after_delete(backend: Backend) -> None:
    await backend.put("once", b"first", if_none_match=True)
    await backend.delete("once")
    await backend.put("once", b"again", if_none_match=True)
    assert (await backend.get("once")).data == b"again"


async def test_if_match_replaces_when_the_etag_is_current(backend: Backend) -> None:
    etag = await backend.put("cas", b"v1")
    new_etag = await backend.put("cas", b"v2", if_match=etag)
    assert new_etag != etag
    blob = await backend.get("cas")
    assert (blob.data, blob.etag) == (b"v2", new_etag)


async def test_if_match_with_a_stale_etag_fails_and_keeps_the_value(backend: Backend) -> None:
    stale = await backend.put("cas", b"v1")
    current = await backend.put("cas", b"v2")
    with pytest.raises(PreconditionFailed):
        await backend.put("cas", b"v3", if_match=stale)
    blob = await backend.get("cas")
    assert (blob.data, blob.etag) == (b"v2", current)


async def test_if_match_on_an_absent_key_fails_and_creates_nothing(backend: Backend) -> None:
    etag = await backend.put("gone", b"v1")
    await backend.delete("gone")
    with pytest.raises(PreconditionFailed):
        await backend.put("gone", b"v2", if_match=etag)
    with pytest.raises(PreconditionFailed):
        await backend.put("never", b"v2", if_match=etag)
    assert await keys_of(backend) == []


async def test_exactly_one_of_eight_concurrent_create_only_puts_wins(backend: Backend) -> None:
    values = [f"writer {i}".encode() for i in range(8)]
    results = await asyncio.gather(
        *(backend.put("race", value, if_none_match=True) for value in values),
        return_exceptions=True,
    )
    winners = [i for i, result in enumerate(results) if isinstance(result, str)]
    assert len(winners) == 1, results
    assert all(isinstance(r, PreconditionFailed) for r in results if not isinstance(r, str))
    blob = await backend.get("race")
    assert (blob.data, blob.etag) == (values[winners[0]], results[winners[0]])


async def test_exactly_one_of_eight_concurrent_if_match_puts_wins(backend: Backend) -> None:
    etag = await backend.put("race", b"base")
    values = [f"writer {i}".encode() for i in range(8)]
    results = await asyncio.gather(
        *(backend.put("race", value, if_match=etag) for value in values),
        return_exceptions=True,
    )
    winners = [i for i, result in enumerate(results) if isinstance(result, str)]
    assert len(winners) == 1, results
    assert all(isinstance(r, PreconditionFailed) for r in results if not isinstance(r, str))
    assert (await backend.get("race")).data == values[winners[0]]


# -- list -----------------------------------------------------------------------------------

LIST_KEYS = [
    "a", "a/b", "a/b/c", "a-", "a0", "ab", "a b", "a+b", "a=b", "a%2Fb", "a~", "a.b",
    "b/x", "b/y/z", "é", "é/1", "z", "\uff21", "\U0001f600", "日本/語",
]
LIST_CASES = [
    # (prefix, start_after)
    ("", None),
    ("a", None),
    ("a/", None),
    ("a/b", None),
    ("b/", None),
    ("é", None),
    ("nothing", None),
    ("", "a"),
    ("", "a/b"),
    ("", "a/"),
    ("", "a-"),
    ("a", "a/b/c"),
    ("", "b"),
    ("", "é"),
    ("", "\ufffd"),  # (moto answers 500 to a StartAfter of U+FFFF, which XML cannot carry)
    ("b/", "a"),  # start_after before the prefix
    ("a", "b"),  # start_after after the prefix
    ("", "\U0010ffff"),
]


async def test_list_yields_keys_in_utf8_order_by_prefix_and_start_after(
    backend: Backend, request: pytest.FixtureRequest
) -> None:
    if request.node.callspec.params["backend"] == "seaweedfs":
        # Measured with SeaweedFS 4.48: it lists segment by segment ("a", "a/b", "a b", "a-")
        # and StartAfter="a" skips "a/b" when "a" is also a key. strict: tells us when fixed.
        request.applymarker(pytest.mark.xfail(reason="SeaweedFS listing order", strict=True))
    for key in LIST_KEYS:
        await backend.put(key, key.encode())
    for prefix, start_after in LIST_CASES:
        expected = utf8_sorted(
            [k for k in LIST_KEYS if k.startswith(prefix) and (start_after is None or k > start_after)]
        )
        assert await keys_of(backend, prefix, start_after) == expected, (prefix, start_after)


async def test_list_reports_what_head_reports(backend: Backend) -> None:
    await backend.put("x/one", b"1")
    await backend.put("x/two", b"22")
    listed = [info async for info in backend.list("x/")]
    headed = [await backend.head(info.key) for info in listed]
    assert [(i.key, i.size, i.etag) for i in listed] == [(h.key, h.size, h.etag) for h in headed]
    assert [i.size for i in listed] == [1, 2]
    assert all(isinstance(i, ObjectInfo) and i.last_modified.tzinfo for i in listed)


async def test_list_can_be_abandoned_midway(backend: Backend) -> None:
    for i in range(10):
        await backend.put(f"k/{i}", b"")
    seen = []
    async for info in backend.list("k/"):
        seen.append(info.key)
        if len(seen) == 4:
            break
    assert seen == ["k/0", "k/1", "k/2", "k/3"]


async def test_list_crosses_page_boundaries(backend: Backend, request: pytest.FixtureRequest) -> None:
    # S3 backends list 3 keys a page here, so 10 keys already cross pages; local ones get 1100.
    count = 10 if request.node.callspec.params["backend"] in SLOW_LISTING else 1100
    keys = [f"p/{i:05d}" for i in range(count)]
    for chunk in range(0, count, 50):
        await asyncio.gather(*(backend.put(k, b"") for k in keys[chunk : chunk + 50]))
    assert await keys_of(backend, "p/") == keys
    assert await keys_of(backend, "p/", start_after=keys[count // 2]) == keys[count // 2 + 1 :]


async def test_check_passes_and_close_is_idempotent(backend: Backend) -> None:
    await backend.put("before-close", b"x")
    await backend.check()
    await backend.close()
    await backend.close()
    # Closed means closed: a call afterwards is refused with a typed error, never served.
    with pytest.raises((PermanentError, TransientError)):
        await backend.get("before-close")


# -- S3 only: how a store's failures map to the typed errors ------------------------------------
# A scripted raw-HTTP server answers each key with a canned response, so every mapping is
# exercised without waiting for a real server to misbehave. (Backend-specific; could move to
# its own module.)

_ERROR_XML = '<?xml version="1.0" encoding="UTF-8"?><Error><Code>{}</Code><Message>scripted</Message></Error>'
SCRIPTED = {
    # key: (status line, extra headers, body, bytes to really send (None: all))
    "nokey": ("404 Not Found", {}, _ERROR_XML.format("NoSuchKey"), None),
    "nobucket": ("404 Not Found", {}, _ERROR_XML.format("NoSuchBucket"), None),
    "denied": ("403 Forbidden", {}, _ERROR_XML.format("AccessDenied"), None),
    "badrequest": ("400 Bad Request", {}, _ERROR_XML.format("InvalidArgument"), None),
    "precondition": ("412 Precondition Failed", {}, _ERROR_XML.format("PreconditionFailed"), None),
    "conflict": ("409 Conflict", {}, _ERROR_XML.format("ConditionalRequestConflict"), None),
    "slowdown": ("503 Slow Down", {"Retry-After": "7"}, _ERROR_XML.format("SlowDown"), None),
    "internal": ("500 Internal Server Error", {}, _ERROR_XML.format("InternalError"), None),
    "short": ("200 OK", {"ETag": '"x"'}, "y" * 100, 50),
}


@pytest.fixture
async def scripted_s3() -> AsyncIterator[str]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            await reader.readexactly(length)
            key = head.split(" ")[1].split("?")[0].rsplit("/", 1)[-1]
            status, headers, body, send = SCRIPTED[key]
            raw = body.encode()
            lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(raw)}", "Connection: close"]
            lines += [f"{name}: {value}" for name, value in headers.items()]
            is_head = head.startswith("HEAD")
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if is_head else raw[:send]))
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


MAPPING_CASES = [
    ("get", "nokey", NotFound),
    ("head", "nokey", NotFound),
    ("get", "nobucket", PermanentError),
    ("get", "denied", PermanentError),
    ("get", "badrequest", PermanentError),
    ("put", "precondition", PreconditionFailed),
    ("put", "conflict", PreconditionFailed),
    ("put", "nokey", PreconditionFailed),  # S3's answer to If-Match on an absent key
    ("get", "slowdown", TransientError),
    ("get", "internal", TransientError),
    ("get", "short", TransientError),  # a body shorter than announced is never success
]


@pytest.mark.parametrize(("op", "key", "error"), MAPPING_CASES)
async def test_s3_failures_map_to_typed_errors(
    scripted_s3: str, op: str, key: str, error: type[Exception]
) -> None:
    use_dummy_credentials()
    store = S3Backend("bucket", endpoint_url=scripted_s3, max_attempts=1)
    try:
        call = {
            "get": lambda: store.get(key),
            "head": lambda: store.head(key),
            "put": lambda: store.put(key, b"data", if_match='"etag"'),
        }[op]
        with pytest.raises(error) as caught:
            await call()
        assert type(caught.value) is error or error is PermanentError
        if key == "slowdown":
            assert caught.value.retry_after == 7  # type: ignore[attr-defined]
    finally:
        await store.close()


async def test_s3_unreachable_endpoint_is_transient() -> None:
    use_dummy_credentials()
    (port,) = free_ports(1)
    store = S3Backend("bucket", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=1)
    try:
        with pytest.raises(TransientError):
            await store.get("k")
        with pytest.raises(TransientError):
            await store.check()
    finally:
        await store.close()


async def test_s3_check_names_a_missing_bucket(moto_s3: S3Server) -> None:
    store = S3Backend("no-such-bucket-here", endpoint_url=moto_s3.endpoint)
    try:
        with pytest.raises(PermanentError, match="no-such-bucket-here.*does not exist"):
            await store.check()
    finally:
        await store.close()
