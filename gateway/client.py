"""``chunkgate put`` and ``chunkgate get``: the command-line client of a gateway.

``put`` uploads through tus (tuspy), resumes an interrupted upload of the same file by itself
(the upload URL is remembered under a fingerprint of path, size, mtime, gateway and key in a
small JSON file), and verifies the committed object against the local file chunk by chunk
(SHA-256) before it reports success. ``get`` streams an object into a temp file and renames it
into place only when every byte announced has arrived.

Must never: report success for an object it has not verified; leave a partial or 0-byte
output file under the requested name; corrupt the state file when several ``put`` run at once
(it is locked and replaced atomically); print a traceback for a failure a user can cause.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import quote

from gateway.cli import fail
from gateway.config import parse_size
from storage.keys import BadKey, validate_key
from storage.manifest import ChunkRef, compute_etag

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_PATCH_SIZE = 8 * 1024 * 1024


class ClientError(Exception):
    """A failure to report as one line (exit 1)."""


# ------------------------------------------------------------------------------ resume state
def state_dir() -> Path:
    configured = os.environ.get("CHUNKGATE_STATE_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "chunkgate"


def fingerprint(path: Path, url: str, key: str) -> str:
    """Same file (path, size, mtime), same gateway, same key: the same upload to resume."""
    st = path.stat()
    raw = "\0".join([str(path.resolve()), str(st.st_size), str(st.st_mtime_ns), url.rstrip("/"), key])
    return hashlib.sha256(raw.encode("utf-8", "surrogateescape")).hexdigest()


class ResumeState:
    """``uploads.json``: fingerprint -> {url, key, saved}. Every change is a locked
    read-modify-write ending in an atomic replace, so concurrent ``put`` commands never lose or
    garble each other's entries."""

    def __init__(self, directory: Path | None = None) -> None:
        self.dir = directory or state_dir()
        self.path = self.dir / "uploads.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "uploads.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                doc = self._read()
                before = json.dumps(doc, sort_keys=True)
                yield doc
                if json.dumps(doc, sort_keys=True) != before:
                    self._write(doc)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            return doc if isinstance(doc, dict) else {}
        except (OSError, ValueError):
            return {}  # missing or unreadable: start afresh; it is only a cache of URLs

    def _write(self, doc: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".uploads-", dir=self.dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(doc, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def get(self, fp: str) -> str | None:
        with self._locked() as doc:
            entry = doc.get(fp)
            return entry.get("url") if isinstance(entry, dict) else None

    def put(self, fp: str, url: str, key: str) -> None:
        with self._locked() as doc:
            doc[fp] = {"url": url, "key": key, "saved": int(time.time())}

    def forget(self, fp: str) -> None:
        with self._locked() as doc:
            doc.pop(fp, None)


# ------------------------------------------------------------------------------ helpers
def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help=f"gateway URL [env CHUNKGATE_URL, default {DEFAULT_URL}]")
    parser.add_argument("--token", default=None, help="bearer token [env CHUNKGATE_TOKEN]")


def _url(args: argparse.Namespace) -> str:
    return (args.url or os.environ.get("CHUNKGATE_URL") or DEFAULT_URL).rstrip("/")


def _auth(args: argparse.Namespace) -> dict[str, str]:
    token = args.token or os.environ.get("CHUNKGATE_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _progress(total: int | None, initial: int, label: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                disable=not sys.stdout.isatty(), leave=False)


def _server_message(resp: Any) -> str:
    try:
        doc = resp.json()
        return f"HTTP {resp.status_code}: {doc.get('message') or doc.get('error')}"
    except ValueError:
        return f"HTTP {resp.status_code}"


def object_url(base: str, key: str) -> str:
    return f"{base}/objects/{quote(key, safe='/')}"


def local_chunks(path: Path, chunk_size: int) -> Iterator[tuple[int, str]]:
    """(size, SHA-256) of each ``chunk_size`` piece of the file."""
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk_size)
            if not block:
                return
            yield len(block), hashlib.sha256(block).hexdigest()


def verify_against_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Raise ``ClientError`` unless the committed object is the local file, chunk for chunk."""
    size = path.stat().st_size
    if manifest.get("size") != size:
        raise ClientError(f"verification failed: the object is {manifest.get('size')} bytes, the file {size}")
    chunks = manifest.get("chunks") or []
    chunk_size = int(manifest.get("chunk_size") or 0)
    if size and chunk_size <= 0:
        raise ClientError("verification failed: the manifest has no chunk size")
    refs: list[ChunkRef] = []
    offset = 0
    for index, (csize, digest) in enumerate(local_chunks(path, chunk_size) if size else []):
        remote = chunks[index] if index < len(chunks) else None
        if remote is None or remote.get("size") != csize or remote.get("sha256") != digest:
            raise ClientError(f"verification failed: chunk {index} (bytes {offset}-{offset + csize - 1}) differs from the file")
        refs.append(ChunkRef(index, offset, csize, digest))
        offset += csize
    if len(chunks) != len(refs):
        raise ClientError(f"verification failed: the object has {len(chunks)} chunks, the file {len(refs)}")
    expected = compute_etag(str(manifest.get("version", "")), size, refs)
    if manifest.get("etag") != expected:
        raise ClientError(f"verification failed: ETag {manifest.get('etag')} is not the file's {expected}")


# ------------------------------------------------------------------------------ put
def put(path: Path, key: str, base: str, headers: dict[str, str], patch_size: int,
        state: ResumeState | None = None) -> dict[str, Any]:
    """Upload (or resume uploading) ``path`` to ``key``; return the verified manifest."""
    import requests
    from tusclient import client as tus_client
    from tusclient.exceptions import TusCommunicationError

    state = state or ResumeState()
    size = path.stat().st_size
    fp = fingerprint(path, base, key)
    tus = tus_client.TusClient(base + "/uploads/", headers=headers)
    kwargs = dict(chunk_size=patch_size, metadata={"key": key}, retries=3, retry_delay=1)
    uploader = None
    known = state.get(fp)
    try:
        if known:
            try:
                uploader = tus.uploader(str(path), url=known, **kwargs)  # asks the server for the offset
            except TusCommunicationError as exc:
                if exc.status_code not in (404, 410):
                    raise
                state.forget(fp)  # expired or terminated: start over
        if uploader is None:
            uploader = tus.uploader(str(path), **kwargs)
            uploader.set_url(uploader.create_url())
            uploader.offset = 0
            state.put(fp, uploader.url, key)
        with _progress(size, uploader.offset, key) as bar:
            while uploader.offset < size:
                before = uploader.offset
                uploader.upload_chunk()
                bar.update(uploader.offset - before)
    except TusCommunicationError as exc:
        detail = exc.response_content.decode("utf-8", "replace") if isinstance(exc.response_content, bytes) else ""
        try:
            detail = json.loads(detail).get("message", detail)
        except ValueError:
            pass
        where = f"HTTP {exc.status_code}" if exc.status_code else "no answer"
        raise ClientError(f"upload failed ({where}): {detail or exc}; run the same command again to resume") from None
    except requests.RequestException as exc:
        raise ClientError(f"cannot reach {base}: {exc.__class__.__name__}; run the same command again to resume") from None
    state.forget(fp)
    try:
        resp = requests.get(object_url(base, key) + "?manifest", headers=headers, timeout=60)
    except requests.RequestException as exc:
        raise ClientError(f"uploaded, but cannot fetch the manifest to verify it: {exc.__class__.__name__}") from None
    if resp.status_code != 200:
        raise ClientError(f"uploaded, but the object cannot be verified: {_server_message(resp)}")
    manifest = resp.json()
    verify_against_manifest(path, manifest)
    return manifest


def cmd_put(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="chunkgate put", description="Upload a file (resumable, tus) and verify it.")
    parser.add_argument("file")
    parser.add_argument("key")
    _common(parser)
    parser.add_argument("--chunk-size", default=None, help="bytes per PATCH request (8MiB, 5MB, bytes) [default 8MiB]")
    args = parser.parse_args(list(argv))
    try:
        validate_key(args.key)
    except BadKey as exc:
        return fail(f"KEY: {exc}")
    try:
        patch_size = parse_size(args.chunk_size) if args.chunk_size else DEFAULT_PATCH_SIZE
    except ValueError as exc:
        return fail(f"--chunk-size: {exc}")
    if patch_size <= 0:
        return fail("--chunk-size: must be positive")
    path = Path(args.file)
    if not path.is_file():
        return fail(f"FILE: {args.file} is not a readable file", 1)
    try:
        manifest = put(path, args.key, _url(args), _auth(args), patch_size)
    except ClientError as exc:
        return fail(str(exc), 1)
    except OSError as exc:
        return fail(f"FILE: cannot read {args.file}: {exc.strerror or exc}", 1)
    print(f"{args.key}: {manifest['size']} bytes, {len(manifest.get('chunks') or [])} chunks, etag {manifest['etag']} (verified)")
    return 0


# ------------------------------------------------------------------------------ get
def get(key: str, base: str, headers: dict[str, str], output: str) -> int:
    """Download ``key`` into ``output`` ("-" for stdout); return the number of bytes."""
    import requests

    try:
        resp = requests.get(object_url(base, key), headers=headers, stream=True, timeout=60)
    except requests.RequestException as exc:
        raise ClientError(f"cannot reach {base}: {exc.__class__.__name__}") from None
    with resp:
        if resp.status_code != 200:
            raise ClientError(f"cannot download {key}: {_server_message(resp)}")
        total = int(resp.headers["Content-Length"]) if "Content-Length" in resp.headers else None
        if output == "-":
            received = _copy(resp, sys.stdout.buffer, total, key)
            sys.stdout.buffer.flush()
        else:
            target = Path(output)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.part-", dir=target.parent if str(target.parent) else ".")
            try:
                with os.fdopen(fd, "wb") as fh:
                    received = _copy(resp, fh, total, key)
                    fh.flush()
                    os.fsync(fh.fileno())
                if total is not None and received != total:
                    raise ClientError(f"download of {key} ended after {received} of {total} bytes; nothing was written")
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        if total is not None and received != total:
            raise ClientError(f"download of {key} ended after {received} of {total} bytes")
        return received


def _copy(resp: Any, out: Any, total: int | None, label: str) -> int:
    import requests

    received = 0
    with _progress(total, 0, label) as bar:
        try:
            for block in resp.iter_content(chunk_size=1 << 20):
                out.write(block)
                received += len(block)
                bar.update(len(block))
        except requests.RequestException:
            pass  # reported as a short download by the caller
    return received


def cmd_get(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="chunkgate get", description="Download an object.")
    parser.add_argument("key")
    parser.add_argument("-o", "--output", default=None, help="file to write (default: the key's last segment; - for stdout)")
    _common(parser)
    args = parser.parse_args(list(argv))
    try:
        validate_key(args.key)
    except BadKey as exc:
        return fail(f"KEY: {exc}")
    output = args.output or args.key.rsplit("/", 1)[-1]
    try:
        n = get(args.key, _url(args), _auth(args), output)
    except ClientError as exc:
        return fail(str(exc), 1)
    except OSError as exc:
        return fail(f"-o: cannot write {output}: {exc.strerror or exc}", 1)
    if output != "-":
        print(f"{args.key}: {n} bytes -> {output}")
    return 0
