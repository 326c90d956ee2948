"""Where ``chunkgate put`` remembers its tus uploads, so that a rerun resumes them: one JSON file
per machine user, keyed by a fingerprint of (file, gateway, key), written atomically under a lock
(several ``put`` processes may run at once)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator


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


