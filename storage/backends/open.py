"""Turn a ``--store`` value (API.md) into a backend.

Accepted: a directory path (relative or absolute; created if missing), ``file:///abs/path``,
``s3://BUCKET[/PREFIX]``, and ``memory://`` (tests). Anything else raises ``ValueError`` with
a one-line message naming the problem, which the CLI prints before exiting 2. This module must
never contact a store (that is ``check()``'s job) nor wrap the backend (the wrapper stack is
built elsewhere, in one place).
"""

from __future__ import annotations

import os
import re
import urllib.parse

from storage.backends.base import Backend
from storage.backends.fs import FsBackend
from storage.backends.memory import MemoryBackend
from storage.backends.s3 import S3Backend

# The S3 bucket naming rules (lower case, 3-63 characters, no leading/trailing dot or dash).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_FORMS = "use a directory path, file:///abs/path, s3://BUCKET[/PREFIX] or memory://"


def _fs(path: str, store: str) -> FsBackend:
    path = os.path.expanduser(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"store {store!r}: {path} exists and is not a directory")
    try:
        return FsBackend(path)
    except OSError as exc:
        raise ValueError(f"store {store!r}: cannot create directory {path}: {exc.strerror}") from None


def open_backend(
    store: str, *, s3_endpoint_url: str | None = None, s3_region: str | None = None,
    connect_timeout: float = 3.0, read_timeout: float = 10.0, total_timeout: float = 30.0,
) -> Backend:
    """The backend ``store`` names (not yet checked: call ``await backend.check()``).

    The timeouts are per request of a network store's client (S3: connect, idle read, and the
    whole request); the deadline per operation is the stack's (``storage.backends.deadline``)."""
    if not store.strip():
        raise ValueError(f"store is empty; {_FORMS}")
    if "\n" in store or "\0" in store:
        raise ValueError(f"store {store!r} contains a newline or NUL")
    scheme = _SCHEME.match(store)
    if scheme is None:
        return _fs(store, store)
    name = scheme.group(1).lower()
    parsed = urllib.parse.urlsplit(store)
    if parsed.query or parsed.fragment:
        raise ValueError(f"store {store!r}: a store URL takes no '?query' or '#fragment'")
    if name == "memory":
        if store.lower() != "memory://":
            raise ValueError(f"store {store!r}: memory:// takes no host or path")
        return MemoryBackend()
    if name == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"store {store!r}: file URLs name a local path, as file:///abs/path")
        path = urllib.parse.unquote(parsed.path)
        if not path.startswith("/"):
            raise ValueError(f"store {store!r}: a file URL needs an absolute path (file:///abs/path)")
        return _fs(path, store)
    if name == "s3":
        bucket = parsed.netloc
        if not bucket:
            raise ValueError(f"store {store!r}: no bucket; use s3://BUCKET[/PREFIX]")
        if not _BUCKET.fullmatch(bucket) or ".." in bucket:
            raise ValueError(
                f"store {store!r}: {bucket!r} is not a valid S3 bucket name "
                "(3-63 lower-case letters, digits, '.' or '-')"
            )
        prefix = urllib.parse.unquote(parsed.path).strip("/")
        if any(segment in ("", ".", "..") for segment in prefix.split("/")) and prefix:
            raise ValueError(f"store {store!r}: the prefix has an empty, '.' or '..' segment")
        return S3Backend(bucket, prefix, endpoint_url=s3_endpoint_url, region=s3_region,
                         connect_timeout=connect_timeout, read_timeout=read_timeout, total_timeout=total_timeout)
    raise ValueError(f"store {store!r}: unsupported scheme '{name}://'; {_FORMS}")
