"""The embedded default store: one file per key under a root directory.

Layout: each '/'-segment of a key becomes a directory level, percent-encoded (see
``key_to_parts``), so any valid key maps to exactly one path inside the root and every stored
path maps back to exactly one key. Writes are atomic: a temp file in the target directory is
written, fsynced, then renamed (or hard-linked, for create-only) into place and the directory
fsynced, so a reader (in any process) sees the old value or the whole new one.

This module must never let a key name a path outside the root, never leave a partial file
under a key's name, and never block the event loop (all file I/O runs in a bounded thread pool).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import heapq
import itertools
import os
import secrets
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from operator import itemgetter
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator, ParamSpec, TypeVar

from storage.backends.base import (
    BackendError,
    Blob,
    InvalidKey,
    NotFound,
    ObjectInfo,
    PermanentError,
    PreconditionFailed,
    StoreFull,
    TransientError,
)
from storage.keys import BadKey, validate_key

# Bytes of a segment per path component. Every byte may need 3 characters ("%XX"), plus one
# marker: 3 * 80 + 1 = 241 stays under the usual 255-byte file name limit.
PIECE_BYTES = 80
FILE_MARK = "="  # ends every file name; the encoding never produces it
CONTINUED_MARK = "+"  # ends a directory holding the rest of a segment longer than PIECE_BYTES
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_TEMP_PREFIX = ".tmp-"  # a leading '.' never starts an encoded name, so temp files never list
_LIST_BATCH = 256
_PATH_MAX = os.pathconf("/", "PC_PATH_MAX") if hasattr(os, "pathconf") else 4096
_MAKE_DIR_ATTEMPTS = 10

P = ParamSpec("P")
T = TypeVar("T")


def _encode_piece(raw: bytes) -> str:
    out = "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in raw)
    # A leading '.' is escaped so no component is '.', '..' or a hidden (temp) name.
    return "%2E" + out[1:] if out.startswith(".") else out


def _decode_piece(name: str) -> bytes | None:
    """The bytes an encoded component stands for, or None if we would never have written it."""
    raw = urllib.parse.unquote_to_bytes(name)
    if not raw or _encode_piece(raw) != name:
        return None
    return raw


def _check_key(key: str) -> str:
    # Every key API.md allows is held: backslashes, '..' inside a segment and any non-control
    # UTF-8 are percent-encoded into safe file names (``_encode_piece``), so a key that works on
    # S3 works on the embedded default store too.
    try:
        validate_key(key)
    except BadKey as exc:
        raise InvalidKey(f"{key!r}: {exc}") from None
    return key


def key_to_parts(key: str) -> list[str]:
    """The path components (relative to the root) that hold ``key``; raises ``InvalidKey``.

    Each segment's UTF-8 bytes are percent-encoded except [A-Za-z0-9._-] (and a leading '.').
    A segment longer than PIECE_BYTES is cut into PIECE_BYTES pieces, each but the last a
    directory marked with '+'. The last segment's last piece is a file marked with '=', so the
    key "a" (file "a=") and the key "a/b" (directory "a") coexist.
    """
    segments = _check_key(key).encode("utf-8").split(b"/")
    parts: list[str] = []
    for i, segment in enumerate(segments):
        pieces = [segment[j : j + PIECE_BYTES] for j in range(0, len(segment), PIECE_BYTES)]
        parts.extend(_encode_piece(piece) + CONTINUED_MARK for piece in pieces[:-1])
        last = _encode_piece(pieces[-1])
        parts.append(last + FILE_MARK if i == len(segments) - 1 else last)
    return parts


def parts_to_key(parts: list[str]) -> str | None:
    """Inverse of ``key_to_parts``; None for paths this backend never writes."""
    raw = b""
    for i, name in enumerate(parts):
        last = i == len(parts) - 1
        if name.endswith(FILE_MARK) != last:
            return None
        if name.endswith((FILE_MARK, CONTINUED_MARK)):
            piece = _decode_piece(name[:-1])
            if piece is None or (name.endswith(CONTINUED_MARK) and len(piece) != PIECE_BYTES):
                return None
            raw += piece
        else:
            piece = _decode_piece(name)
            if piece is None or len(piece) > PIECE_BYTES:
                return None
            raw += piece + b"/"
    try:
        key = raw.decode("utf-8")
        return key if key_to_parts(key) == parts else None
    except (UnicodeDecodeError, InvalidKey):
        return None


def _etag(st: os.stat_result) -> str:
    # A replace always brings a new inode, and put stamps a nanosecond mtime, so the ETag
    # changes on every put without reading the file.
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"


def _mtime(st: os.stat_result) -> datetime:
    return datetime.fromtimestamp(st.st_mtime_ns / 1e9, tz=timezone.utc)


_TRANSIENT_ERRNOS = {
    errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.EIO, errno.EMFILE,
    errno.ENFILE, errno.ENOMEM, errno.ETIMEDOUT,
}
# No room (blocks, inodes or a quota): only freeing space helps, so it is not retried. Raised as
# ``StoreFull`` only where nothing of the write can have landed (see ``_put_sync``).
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def _os_errors(fn: Callable[P, T]) -> Callable[P, T]:
    """Turn the OSErrors a method did not handle itself into typed backend errors."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except BackendError:
            raise
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                raise InvalidKey(f"the key's path is too long for this filesystem: {exc}") from exc
            if exc.errno in _FULL_ERRNOS:
                raise StoreFull(f"fs store: {exc.strerror}") from exc
            if exc.errno in _TRANSIENT_ERRNOS:
                raise TransientError(f"fs store: {exc}") from exc
            raise PermanentError(f"fs store: {exc}") from exc

    return wrapper


@contextmanager
def _dir_lock(dirpath: str) -> Iterator[None]:
    """Exclusive flock on a directory: serialises compare-and-rename against every other
    writer and deleter in that directory, in this process (flock is per open file) or any other."""
    fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _fsync_dir(dirpath: str) -> None:
    fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FsBackend:
    """``Backend`` over a local directory (created if missing)."""

    def __init__(self, root: str | Path, *, max_workers: int = 8) -> None:
        self.root = os.path.abspath(os.fspath(root))
        os.makedirs(self.root, exist_ok=True)
        self.name = f"fs:{self.root}"
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="fs-store")
        self._closed = False

    def path_of(self, key: str) -> str:
        """The file that holds ``key`` (it may not exist); raises ``InvalidKey``."""
        path = os.path.join(self.root, *key_to_parts(key))
        # Defence in depth: the encoding cannot produce '..' or '/', but check anyway.
        if os.path.normpath(path) != path or not path.startswith(self.root + os.sep):
            raise InvalidKey(f"{key!r} would leave the store root")
        # The temp file beside it has a longer name than the key's own file: count that one.
        if len(path.encode("utf-8")) + len(_TEMP_PREFIX) + 16 >= _PATH_MAX:
            raise InvalidKey(f"{key!r}: its path under {self.root} is too long for this filesystem")
        return path

    def check_key(self, key: str) -> None:
        self.path_of(key)

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        if self._closed:
            raise PermanentError(f"{self.name} is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    # -- writes ---------------------------------------------------------------------------

    def _make_dirs(self, dirpath: str) -> list[str]:
        """Create ``dirpath`` and its missing parents; return the parents whose entries changed."""
        if os.path.isdir(dirpath):
            return []
        changed: list[str] = []
        parent = self.root
        for name in os.path.relpath(dirpath, self.root).split(os.sep):
            child = os.path.join(parent, name)
            try:
                os.mkdir(child)
                changed.append(parent)
            except FileExistsError:
                pass
            parent = child
        return changed

    def _create_temp(self, dirpath: str) -> tuple[int, str, list[str]]:
        for _ in range(_MAKE_DIR_ATTEMPTS):
            try:
                changed = self._make_dirs(dirpath)
                tmp = os.path.join(dirpath, _TEMP_PREFIX + secrets.token_hex(8))
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
                return fd, tmp, changed
            except FileNotFoundError:
                # A delete pruned a directory we had just made (it was empty); make it again.
                # Once our temp file is in it, the directory can no longer be pruned.
                continue
        raise TransientError(f"could not create a directory in {dirpath}: it kept vanishing")

    @_os_errors
    def _put_sync(self, key: str, data: bytes, if_none_match: bool, if_match: str | None) -> str:
        path = self.path_of(key)
        dirpath = os.path.dirname(path)
        fd, tmp, changed = self._create_temp(dirpath)
        pending: str | None = tmp
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                now = time.time_ns()
                os.utime(fd, ns=(now, now))
                os.fsync(fd)
                etag = _etag(os.fstat(fd))
            finally:
                os.close(fd)
            if if_none_match:
                # link() fails if the name exists, atomically and across processes: no lock needed.
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise PreconditionFailed(f"{key!r} already exists") from None
            else:
                with _dir_lock(dirpath):
                    if if_match is not None:
                        try:
                            current = _etag(os.stat(path))
                        except FileNotFoundError:
                            raise PreconditionFailed(f"{key!r} does not exist") from None
                        if current != if_match:
                            raise PreconditionFailed(f"{key!r} does not have ETag {if_match!r}")
                    os.rename(tmp, path)
                    pending = None
            # From here the value is in place and visible: a failure now (even ENOSPC) does not
            # mean "nothing landed", so it must never be reported as a refusal (StoreFull or
            # PermanentError would let the caller delete chunks a landed manifest names).
            try:
                _fsync_dir(dirpath)
                for parent in changed:
                    _fsync_dir(parent)
            except OSError as exc:
                raise TransientError(f"fs store: {key!r} was written but could not be made durable "
                                     f"({exc.strerror}); its outcome is unknown") from exc
            return etag
        finally:
            if pending is not None:
                try:
                    os.unlink(pending)
                except FileNotFoundError:
                    pass

    async def put(
        self,
        key: str,
        data: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        # Copy a mutable buffer now: the caller may reuse it while the thread still writes.
        return await self._run(self._put_sync, key, bytes(data), if_none_match, if_match)

    @_os_errors
    def _delete_sync(self, key: str, if_match: str | None) -> None:
        path = self.path_of(key)
        dirpath = os.path.dirname(path)
        try:
            # Under the directory lock so an if-match put cannot resurrect a key deleted
            # between its compare and its rename, and a conditional delete compares and
            # unlinks as one step against every other writer of the directory.
            with _dir_lock(dirpath):
                if if_match is not None and _etag(os.stat(path)) != if_match:
                    raise PreconditionFailed(f"{key!r} does not have ETag {if_match!r}")
                os.unlink(path)
        except FileNotFoundError:
            if if_match is not None:
                raise PreconditionFailed(f"{key!r} does not exist") from None
            return
        try:
            _fsync_dir(dirpath)
        except FileNotFoundError:
            return  # a concurrent delete already pruned the emptied directory: nothing left to sync
        # Prune now-empty directories, best effort; a put racing us recreates what it needs.
        while dirpath != self.root:
            try:
                os.rmdir(dirpath)
            except OSError:
                break
            dirpath = os.path.dirname(dirpath)

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        await self._run(self._delete_sync, key, if_match)

    # -- reads ----------------------------------------------------------------------------

    @_os_errors
    def _get_sync(self, key: str, start: int, end: int | None) -> Blob:
        path = self.path_of(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(key) from None
        try:
            # Files are never written in place (replaced by rename), so what this fd sees
            # is one whole value, and its fstat describes exactly those bytes.
            st = os.fstat(fd)
            stop = st.st_size if end is None else min(end, st.st_size)
            want = max(0, stop - start)
            data = os.pread(fd, want, start) if want else b""
            while len(data) < want:
                more = os.pread(fd, want - len(data), start + len(data))
                if not more:
                    raise TransientError(f"short read of {key!r}: {len(data)} of {want} bytes")
                data += more
            return Blob(data, st.st_size, _etag(st))
        finally:
            os.close(fd)

    async def get(self, key: str, *, start: int = 0, end: int | None = None, view: bool = False) -> Blob:
        if start < 0 or (end is not None and end < start):
            raise ValueError(f"bad byte range [{start}, {end})")
        return await self._run(self._get_sync, key, start, end)

    @_os_errors
    def _head_sync(self, key: str) -> ObjectInfo:
        try:
            st = os.stat(self.path_of(key))
        except FileNotFoundError:
            raise NotFound(key) from None
        return ObjectInfo(key, st.st_size, _etag(st), _mtime(st))

    async def head(self, key: str) -> ObjectInfo:
        return await self._run(self._head_sync, key)

    def _walk(
        self, dirpath: str, base: bytes, prefix: bytes, after: bytes | None
    ) -> Iterator[tuple[bytes, str]]:
        """Yield (key bytes, file path) under ``dirpath`` in ascending byte order.

        ``base`` is the key bytes ``dirpath`` stands for. Each child covers one contiguous
        run of keys (a file: its key; a directory "s": keys starting "s/"), so visiting
        children in order of their first possible key yields sorted keys, pruning runs that
        cannot match ``prefix`` or lie before ``after``. The one exception: a directory "p"
        and a continuation "p+" (p exactly PIECE_BYTES long) interleave, so they are merged.
        """
        try:
            names = os.listdir(dirpath)
        except (FileNotFoundError, NotADirectoryError):
            return  # pruned by a concurrent delete
        children: list[tuple[bytes, str, bytes, str]] = []  # (sort bound, kind, stem, name)
        for name in names:
            if name.startswith("."):
                continue  # temp files, and anything else we never write
            kind = {FILE_MARK: "file", CONTINUED_MARK: "cont"}.get(name[-1], "dir")
            raw = _decode_piece(name if kind == "dir" else name[:-1])
            if raw is None:
                continue
            if kind == "file":
                stem = base + raw
                if stem.startswith(prefix) and (after is None or stem > after):
                    children.append((stem, kind, stem, name))
                continue
            stem = base + raw + (b"/" if kind == "dir" else b"")
            if not (stem.startswith(prefix) or prefix.startswith(stem)):
                continue
            if after is not None and stem <= after and not after.startswith(stem):
                continue
            # A continuation's keys are stem + more bytes: they sort after the file "stem".
            children.append((stem + b"\0" if kind == "cont" else stem, kind, stem, name))
        children.sort(key=itemgetter(0))
        i = 0
        while i < len(children):
            _, kind, stem, name = children[i]
            if kind == "file":
                yield stem, os.path.join(dirpath, name)
            else:
                run = self._walk(os.path.join(dirpath, name), stem, prefix, after)
                if kind == "cont" and i + 1 < len(children) and children[i + 1][2] == stem + b"/":
                    _, _, dir_stem, dir_name = children[i + 1]
                    sub = self._walk(os.path.join(dirpath, dir_name), dir_stem, prefix, after)
                    run = heapq.merge(run, sub, key=itemgetter(0))
                    i += 1
                yield from run
            i += 1

    def _infos(self, prefix: str, start_after: str | None) -> Iterator[ObjectInfo]:
        after = None if start_after is None else start_after.encode("utf-8", "surrogatepass")
        for raw, path in self._walk(self.root, b"", prefix.encode("utf-8", "surrogatepass"), after):
            try:
                key = raw.decode("utf-8")
                if self.path_of(key) != path:
                    continue  # a name we would never write (foreign or non-canonical)
                st = os.stat(path)
            except (UnicodeDecodeError, InvalidKey, FileNotFoundError):
                continue  # not ours, or deleted since the directory was read
            yield ObjectInfo(key, st.st_size, _etag(st), _mtime(st))

    @staticmethod
    @_os_errors
    def _next_batch(it: Iterator[ObjectInfo]) -> list[ObjectInfo]:
        return list(itertools.islice(it, _LIST_BATCH))

    async def list(
        self, prefix: str = "", *, start_after: str | None = None
    ) -> AsyncIterator[ObjectInfo]:
        it = self._infos(prefix, start_after)
        while True:
            batch = await self._run(self._next_batch, it)
            for info in batch:
                yield info
            if len(batch) < _LIST_BATCH:
                return

    # -- lifecycle ------------------------------------------------------------------------

    def _check_sync(self) -> None:
        if not os.path.isdir(self.root):
            raise PermanentError(f"store directory {self.root} does not exist")
        probe = os.path.join(self.root, ".check-" + secrets.token_hex(8))
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.unlink(probe)
        except OSError as exc:
            if exc.errno in _FULL_ERRNOS:
                return  # writable, only full (no inode left): reads still work, writes get StoreFull
            raise PermanentError(f"store directory {self.root} is not writable: {exc.strerror}") from None

    async def check(self) -> None:
        """Raise ``PermanentError`` unless the root exists and is writable."""
        await self._run(self._check_sync)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Let in-flight writes finish their rename or cleanup before we report closed.
        await asyncio.to_thread(self._executor.shutdown, wait=True)
