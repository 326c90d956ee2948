"""``chunkgate put`` and ``chunkgate get``: the command-line client of a gateway.

``put`` uploads a file (or, given a directory, every file under it: an HLS or DASH ladder) through
tus (tuspy), resumes an interrupted upload of the same file by itself
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
import hashlib
import json
import os
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import quote

from gateway.cli import fail
from gateway.cli.resume import ResumeState, fingerprint
from gateway.config import parse_size
from storage.keys import BadKey, validate_key
from storage.manifest import ChunkRef, compute_etag

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_PATCH_SIZE = 8 * 1024 * 1024


class ClientError(Exception):
    """A failure to report as one line (exit 1)."""


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
        state: ResumeState | None = None, progress: Callable[[int], None] | None = None,
        content_type: str | None = None) -> dict[str, Any]:
    """Upload (or resume uploading) ``path`` to ``key``; return the verified manifest.

    ``progress`` is told every number of bytes sent (else a bar of its own is shown);
    ``content_type`` goes into the upload's metadata (else the gateway takes the key's)."""
    import requests
    from tusclient import client as tus_client
    from tusclient.exceptions import TusCommunicationError

    state = state or ResumeState()
    size = path.stat().st_size
    fp = fingerprint(path, base, key)
    tus = tus_client.TusClient(base + "/uploads/", headers=headers)
    metadata = {"key": key, **({"content-type": content_type} if content_type else {})}
    kwargs = dict(chunk_size=patch_size, metadata=metadata, retries=3, retry_delay=1)
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
            url = uploader.create_url()
            uploader.set_url(url)
            uploader.offset = 0
            state.put(fp, url, key)
        with contextlib.ExitStack() as stack:
            if progress is None:
                progress = stack.enter_context(_progress(size, uploader.offset, key)).update
            else:
                progress(uploader.offset)  # a resumed upload: what is already in counts as done
            while uploader.offset < size:
                before = uploader.offset
                uploader.upload_chunk()  # type: ignore[no-untyped-call]  # tuspy has no annotations
                progress(uploader.offset - before)
    except TusCommunicationError as exc:
        detail = exc.response_content.decode("utf-8", "replace") if isinstance(exc.response_content, bytes) else ""
        try:
            detail = json.loads(detail).get("message", detail)
        except ValueError:
            pass
        where = f"HTTP {exc.status_code}" if exc.status_code else "no answer"
        # A refusal (too large, forbidden, bad metadata) will be refused again: no resume hint.
        retryable = not exc.status_code or exc.status_code >= 500 or exc.status_code in (408, 409, 423, 429)
        hint = "; run the same command again to resume" if retryable else ""
        raise ClientError(f"upload failed ({where}): {detail or exc}{hint}") from None
    except requests.RequestException as exc:
        raise ClientError(f"cannot reach {base}: {exc.__class__.__name__}; run the same command again to resume") from None
    state.forget(fp)
    manifest = fetch_manifest(base, key, headers, "uploaded, but ")
    if manifest is None:
        raise ClientError("uploaded, but the object cannot be verified: HTTP 404: it is not there")
    verify_against_manifest(path, manifest)
    return manifest


def fetch_manifest(base: str, key: str, headers: dict[str, str], context: str = "") -> dict[str, Any] | None:
    """The object's manifest, or None when there is no such object."""
    import requests

    try:
        resp = requests.get(object_url(base, key) + "?manifest", headers=headers, timeout=60)
    except requests.RequestException as exc:
        raise ClientError(f"{context}cannot fetch the manifest to verify it: {exc.__class__.__name__}") from None
    if resp.status_code == 404:
        return None
    if resp.status_code != 200:
        raise ClientError(f"{context}the object cannot be verified: {_server_message(resp)}")
    return dict(resp.json())


# ------------------------------------------------------------------------------ put DIR PREFIX
@dataclass
class TreeReport:
    """What ``put_tree`` did: keys stored now, keys already stored (verified, not sent again),
    files that failed (their path relative to the tree and one line why), bytes in the tree."""

    stored: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    total_bytes: int = 0
    done_bytes: int = 0


def tree_files(root: Path) -> tuple[list[tuple[Path, str]], list[str]]:
    """(every regular file under ``root`` with its ``/``-separated path relative to it, sorted;
    the relative paths of entries that are not regular files and are skipped). Symlinks are not
    followed: a link to a file outside the tree must not upload it."""
    files: list[tuple[Path, str]] = []
    skipped: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in dirnames:
            if (here / name).is_symlink():
                skipped.append((here / name).relative_to(root).as_posix())
        for name in filenames:
            path = here / name
            rel = path.relative_to(root).as_posix()
            if path.is_file() and not path.is_symlink():
                files.append((path, rel))
            else:
                skipped.append(rel)
    return sorted(files, key=lambda f: f[1]), sorted(skipped)


def upload_order(files: list[tuple[Path, str]]) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """(segments and everything else, then playlists and manifests): a player that fetches a new
    playlist must find the segments it names already there."""
    from gateway.caching import media_kind
    from gateway.mediatypes import guess_content_type

    last = [f for f in files if media_kind(guess_content_type(f[1])) == "playlist"]
    return [f for f in files if f not in last], last


def put_tree(root: Path, prefix: str, base: str, headers: dict[str, str], patch_size: int, *, jobs: int = 4,
             state: ResumeState | None = None) -> TreeReport:
    """Upload every regular file under ``root`` to ``prefix`` + its relative path, ``jobs`` at a
    time, with one progress bar. A file already stored with the same bytes (its manifest checks
    out chunk by chunk) is not sent again, and an interrupted one resumes, so rerunning resumes the
    tree. One file's failure doesn't stop the others."""
    from concurrent.futures import ThreadPoolExecutor

    from gateway.mediatypes import guess_content_type

    state = state or ResumeState()
    files, skipped = tree_files(root)
    report = TreeReport(skipped=skipped, total_bytes=sum(p.stat().st_size for p, _ in files))
    lock = threading.Lock()

    with _progress(report.total_bytes, 0, prefix or str(root)) as bar:
        def advance(n: int) -> None:
            with lock:
                bar.update(n)

        def one(path: Path, rel: str) -> None:
            key = prefix + rel
            try:
                validate_key(key)
                size = path.stat().st_size
                if state.get(fingerprint(path, base, key)) is None:  # nothing to resume: maybe done already
                    manifest = fetch_manifest(base, key, headers)
                    if manifest is not None:
                        with contextlib.suppress(ClientError):
                            verify_against_manifest(path, manifest)
                            advance(size)
                            with lock:
                                report.unchanged.append(key)
                                report.done_bytes += size
                            return
                put(path, key, base, headers, patch_size, state, progress=advance,
                    content_type=guess_content_type(key))
                with lock:
                    report.stored.append(key)
                    report.done_bytes += size
            except BadKey as exc:
                message = f"cannot be a key: {exc}"
            except ClientError as exc:
                message = str(exc)
            except OSError as exc:
                message = f"cannot read it: {exc.strerror or exc}"
            else:
                return
            with lock:
                report.failed.append((rel, message))

        segments, playlists = upload_order(files)
        for batch in (segments, playlists):
            with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
                for future in [pool.submit(one, path, rel) for path, rel in batch]:
                    future.result()
    report.failed.sort()
    return report


def cmd_put(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="chunkgate put", description="Upload a file to KEY, or every file under a directory to PREFIX + its "
                                          "path relative to it (resumable, tus), and verify what is stored.")
    parser.add_argument("file", metavar="FILE|DIR")
    parser.add_argument("key", metavar="KEY|PREFIX")
    _common(parser)
    parser.add_argument("--chunk-size", default=None, help="bytes per PATCH request (8MiB, 5MB, bytes) [default 8MiB]")
    parser.add_argument("--jobs", type=int, default=4, help="files of a directory uploaded at once [default 4]")
    args = parser.parse_args(list(argv))
    path = Path(args.file)
    if path.is_dir():
        return _put_dir(path, args)
    try:
        validate_key(args.key)
    except BadKey as exc:
        return fail(f"KEY: {exc}")
    patch_size = _patch_size(args)
    if isinstance(patch_size, str):
        return fail(patch_size)
    if not path.is_file():
        return fail(f"FILE: {args.file} is not a readable file", 1)
    from gateway.mediatypes import guess_content_type

    try:
        manifest = put(path, args.key, _url(args), _auth(args), patch_size, content_type=guess_content_type(args.key))
    except ClientError as exc:
        return fail(str(exc), 1)
    except OSError as exc:
        return fail(f"FILE: cannot read {args.file}: {exc.strerror or exc}", 1)
    print(f"{args.key}: {manifest['size']} bytes, {len(manifest.get('chunks') or [])} chunks, etag {manifest['etag']} (verified)")
    return 0


def _patch_size(args: argparse.Namespace) -> int | str:
    """The PATCH size, or the one-line complaint."""
    try:
        patch_size = parse_size(args.chunk_size) if args.chunk_size else DEFAULT_PATCH_SIZE
    except ValueError as exc:
        return f"--chunk-size: {exc}"
    return patch_size if patch_size > 0 else "--chunk-size: must be positive"


def _shown(rel: str) -> str:
    """A path fit for one line on a terminal: control characters and undecodable bytes
    escaped (a file name must not move the cursor or break the line)."""
    return rel if rel.isprintable() else ascii(rel)


def _put_dir(root: Path, args: argparse.Namespace) -> int:
    prefix = args.key
    try:
        validate_key(prefix + "x")  # what every key under it starts with must be allowed
    except BadKey as exc:
        return fail(f"PREFIX: {exc}")
    patch_size = _patch_size(args)
    if isinstance(patch_size, str):
        return fail(patch_size)
    if args.jobs < 1:
        return fail("--jobs: must be at least 1")
    try:
        report = put_tree(root, prefix, _url(args), _auth(args), patch_size, jobs=args.jobs)
    except OSError as exc:
        return fail(f"DIR: cannot read {root}: {exc.strerror or exc}", 1)
    for rel in report.skipped:
        print(f"chunkgate: {_shown(rel)}: skipped: not a regular file", file=sys.stderr)
    for rel, message in report.failed:
        print(f"chunkgate: {_shown(rel)}: {message}", file=sys.stderr)
    done = len(report.stored) + len(report.unchanged)
    if not done and not report.failed:
        return fail(f"DIR: no regular files under {root}", 1)
    print(f"{prefix}: {done} files, {report.done_bytes} bytes stored and verified "
          f"({len(report.stored)} uploaded, {len(report.unchanged)} already there)")
    if report.failed:
        print(f"chunkgate: {len(report.failed)} of {done + len(report.failed)} files failed; "
              "run the same command again to resume", file=sys.stderr)
        return 1
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
