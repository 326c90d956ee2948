"""A large plain tus PATCH body received straight into the upload's chunk buffers (gateway/body.py
``readinto_some``, storage/upload_append.py ``receive_into``): unlike a PUT, a PATCH keeps every
byte that arrived, so each way a body can end early is tried here with raw sockets (the pieces and
the Content-Length are the test's): a stall (408), a client that leaves, another request asking
for the upload, and a slow body whose partly filled chunk is checkpointed while it is sent."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from typing import Any

import aiohttp
import pytest

from gateway.body import RECEIVE_INTO_FROM, BodyReceiver
from gateway.config import ServeConfig
from tests.support.gateway import in_process_gateway
from tests.test_put_body import answer, read_answer, send_in_pieces, stored
from tests.test_tus_protocol import create, offset_of

pytestmark = pytest.mark.timeout(90)

CHUNK = 256 * 1024 + 3  # odd, so chunk ends fall inside the socket's pieces
TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = "application/offset+octet-stream"


async def patch(session: aiohttp.ClientSession, location: str, offset: int, data: bytes) -> aiohttp.ClientResponse:
    headers = {**TUS, "Upload-Offset": str(offset), "Content-Type": OCTETS}
    async with session.patch(location, headers=headers, data=data) as r:
        await r.read()
        return r


async def open_patch(url: str, location: str, offset: int, length: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    path = location.removeprefix(url)
    writer.write(f"PATCH {path} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: {offset}\r\n"
                 f"Content-Type: {OCTETS}\r\nContent-Length: {length}\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def no_content_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status, headers, _ = answer(await reader.readuntil(b"\r\n\r\n"))
    return status, headers


async def tail_keys(app: Any) -> dict[str, int]:
    return {i.key: i.size async for i in app["store"].backend.list("u/") if "/t/" in i.key}


async def test_a_large_patch_sent_in_odd_pieces_continues_the_tail_and_stores_each_chunk_exactly() -> None:
    data = os.urandom(3 * RECEIVE_INTO_FROM + 12345)
    async with in_process_gateway(ServeConfig(chunk_size=CHUNK)) as (url, app), aiohttp.ClientSession() as session:
        location = await create(session, url, len(data), key="clip")
        small = await patch(session, location, 0, data[:1000])  # aiohttp's reader; leaves a tail
        assert small.status == 204 and small.headers.get("Connection", "").lower() != "close"
        reader, writer = await open_patch(url, location, 1000, len(data) - 1000)
        await send_in_pieces(writer, data[1000:], seed=11)
        status, headers = await asyncio.wait_for(no_content_answer(reader), timeout=30)
        writer.close()
        assert status == 204 and headers["upload-offset"] == str(len(data))
        assert headers["connection"] == "close"  # the sign that the body was read straight into the chunks
        got, manifest = await stored(session, url, "clip")
        assert got == data
        assert [c["sha256"] for c in manifest["chunks"]] == [
            hashlib.sha256(data[i:i + CHUNK]).hexdigest() for i in range(0, len(data), CHUNK)]
        assert app["store"].buffers.lent == 0


async def test_a_large_patch_that_stalls_gets_408_and_keeps_the_bytes_that_came() -> None:
    data = os.urandom(4 * RECEIVE_INTO_FROM)
    sent = RECEIVE_INTO_FROM + 777  # four full chunks and part of a fifth
    async with in_process_gateway(ServeConfig(chunk_size=CHUNK, body_timeout=0.5)) as (url, app), \
            aiohttp.ClientSession() as session:
        location = await create(session, url, len(data), key="clip")
        reader, writer = await open_patch(url, location, 0, len(data))
        await send_in_pieces(writer, data[:sent], seed=12)
        status, headers, body = await asyncio.wait_for(read_answer(reader), timeout=20)
        writer.close()
        assert status == 408 and json.loads(body)["error"] == "body_timeout"
        assert "kept" in json.loads(body)["message"]
        assert await offset_of(session, location) == sent
        assert (await patch(session, location, sent, data[sent:])).status == 204
        assert (await stored(session, url, "clip"))[0] == data
        assert app["store"].buffers.lent == 0


async def test_a_client_that_leaves_mid_patch_keeps_what_it_sent_and_resumes_there() -> None:
    data = os.urandom(4 * RECEIVE_INTO_FROM)
    sent = 2 * RECEIVE_INTO_FROM + 5
    async with in_process_gateway(ServeConfig(chunk_size=CHUNK)) as (url, app), aiohttp.ClientSession() as session:
        location = await create(session, url, len(data), key="clip")
        _reader, writer = await open_patch(url, location, 0, len(data))
        await send_in_pieces(writer, data[:sent], seed=13)
        writer.close()
        offset = -1
        for _ in range(200):  # the PATCH saves what came, then lets go of the upload
            offset = await offset_of(session, location)
            if offset == sent:
                break
            await asyncio.sleep(0.05)
        assert offset == sent
        assert (await patch(session, location, sent, data[sent:])).status == 204
        assert (await stored(session, url, "clip"))[0] == data
        assert app["store"].buffers.lent == 0


async def test_a_stalled_large_patch_lets_go_when_another_request_asks_and_keeps_its_bytes() -> None:
    data = os.urandom(4 * RECEIVE_INTO_FROM)
    sent = RECEIVE_INTO_FROM + 100
    async with in_process_gateway(ServeConfig(chunk_size=CHUNK, body_timeout=10)) as (url, app), \
            aiohttp.ClientSession() as session:
        location = await create(session, url, len(data), key="clip")
        reader, writer = await open_patch(url, location, 0, len(data))
        await send_in_pieces(writer, data[:sent], seed=14)
        await asyncio.sleep(0.2)  # the bytes are in; the client goes quiet, as a dead one would
        # The resuming client's HEAD must not wait for the body timeout (10 s) or the stale limit.
        assert await asyncio.wait_for(offset_of(session, location), timeout=4) == sent
        status, headers = await asyncio.wait_for(no_content_answer(reader), timeout=4)
        writer.close()
        assert status == 204 and headers["upload-offset"] == str(sent)
        assert (await patch(session, location, sent, data[sent:])).status == 204
        assert (await stored(session, url, "clip"))[0] == data
        assert app["store"].locks.stats.release_requests >= 1
        assert app["store"].buffers.lent == 0


async def test_a_slow_large_patch_makes_its_partly_filled_chunk_durable_while_it_is_sent() -> None:
    data = os.urandom(2 * RECEIVE_INTO_FROM)
    async with in_process_gateway(ServeConfig(chunk_size=CHUNK, body_timeout=10)) as (url, app), \
            aiohttp.ClientSession() as session:
        app["uploads"].options.checkpoint_seconds = 0.3
        location = await create(session, url, len(data), key="clip")
        reader, writer = await open_patch(url, location, 0, len(data))
        sent = RECEIVE_INTO_FROM + 1000
        await send_in_pieces(writer, data[:sent], seed=15)
        tails: dict[str, int] = {}
        for _ in range(40):  # a byte now and then, for up to 4 s: the body never fills its chunk
            writer.write(data[sent:sent + 1])
            sent += 1
            await writer.drain()
            await asyncio.sleep(0.1)
            tails = await tail_keys(app)
            if tails:
                break
        # A crash now would keep these bytes: the partly filled chunk is in the store as the tail.
        assert len(tails) == 1 and 0 < next(iter(tails.values())) <= sent % CHUNK
        writer.write(data[sent:])
        await writer.drain()
        status, _ = await asyncio.wait_for(no_content_answer(reader), timeout=20)
        writer.close()
        assert status == 204
        assert (await stored(session, url, "clip"))[0] == data
        assert await tail_keys(app) == {}


async def test_a_large_patch_whose_client_goes_quiet_is_not_polled_while_it_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two whole chunks, then silence: nothing is left to checkpoint, so the read waits a second
    # at a time (to renew the lease) instead of returning every few milliseconds.
    calls = 0
    real = BodyReceiver.readinto_some

    async def counted(self: BodyReceiver, buf: memoryview, within: float | None = None) -> int:
        nonlocal calls
        calls += 1
        return await real(self, buf, within)

    monkeypatch.setattr(BodyReceiver, "readinto_some", counted)
    data = os.urandom(2 * RECEIVE_INTO_FROM)
    async with in_process_gateway(ServeConfig(chunk_size=CHUNK, body_timeout=10)) as (url, app), \
            aiohttp.ClientSession() as session:
        app["uploads"].options.checkpoint_seconds = 0.2
        location = await create(session, url, len(data), key="clip")
        reader, writer = await open_patch(url, location, 0, len(data))
        await asyncio.sleep(1.0)  # past the checkpoint time before the first byte
        await send_in_pieces(writer, data[:2 * CHUNK], seed=16)
        await asyncio.sleep(0.3)
        before = calls
        await asyncio.sleep(2.0)
        assert calls - before <= 4, calls - before
        writer.write(data[2 * CHUNK:])
        await writer.drain()
        status, _ = await asyncio.wait_for(no_content_answer(reader), timeout=20)
        writer.close()
        assert status == 204
        assert (await stored(session, url, "clip"))[0] == data


async def test_a_slow_large_patch_keeps_its_store_lease_while_its_chunk_fills() -> None:
    # With store leases, a holder that does not renew within --lock-stale-after loses its lease
    # even when nobody waits. A chunk here fills in ~1.6 s at this client's rate, nearly twice
    # the stale time: the read still returns often enough to renew, and the PATCH completes.
    data = os.urandom(2 * RECEIVE_INTO_FROM)
    slow = 3 * CHUNK
    config = ServeConfig(chunk_size=CHUNK, locks="store", lock_stale_after=0.9, body_timeout=10)
    async with in_process_gateway(config) as (url, app), aiohttp.ClientSession() as session:
        location = await create(session, url, len(data), key="clip")
        reader, writer = await open_patch(url, location, 0, len(data))
        for at in range(0, slow, 8192):  # ~160 KiB/s
            writer.write(data[at:min(at + 8192, slow)])
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(data[slow:])
        await writer.drain()
        status, headers = await asyncio.wait_for(no_content_answer(reader), timeout=20)
        writer.close()
        assert status == 204 and headers["upload-offset"] == str(len(data))
        assert (await stored(session, url, "clip"))[0] == data
