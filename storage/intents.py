"""Write intents: a PUT says in the store which version it is writing before its first chunk.

A PUT's chunks exist before its manifest does, and ``chunkgate gc`` may run in another process
at any moment. Without a record of the write, gc could only guess from the version's age whether
unreferenced chunks belong to a crashed upload or to one still running, and a slow PUT outliving
``--grace`` lost its chunks and then committed a manifest naming them. So a PUT writes
``w/<version>`` (key, version, expiry) first and removes it once its commit has landed or its
chunks are cleaned up; gc leaves every version with a live intent alone (tus uploads are covered
the same way by their session records). An intent left by a crash expires, and gc then treats
the version like any other unreferenced one.

Must never: be removed before the commit it protects has landed or been given up; import
aiohttp or ``gateway``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from storage import keys
from storage.backends.base import Backend, NotFound, PermanentError, TransientError
from storage.errors import from_backend

log = logging.getLogger("chunkgate.intents")


@dataclass(frozen=True, slots=True)
class Intent:
    key: str
    version: str
    expires: float


def intent_key(version: str) -> str:
    return keys.INTENT_PREFIX + version


async def begin(backend: Backend, key: str, version: str, *, expires: float) -> None:
    """Record that ``version`` of ``key`` is being written (before its first chunk)."""
    doc = {"key": key, "version": version, "expires": expires}
    try:
        await backend.put(intent_key(version), json.dumps(doc, ensure_ascii=False).encode(), if_none_match=True)
    except (TransientError, PermanentError) as exc:
        raise from_backend(exc, "recording the upload's intent") from exc


async def end(backend: Backend, version: str) -> None:
    """The write is settled (committed, or its chunks removed): forget the intent. Best effort:
    a left-over intent only delays gc until it expires."""
    try:
        await backend.delete(intent_key(version))
    except (TransientError, PermanentError) as exc:
        log.warning("could not remove the intent of version %s (it expires by itself): %s", version, exc)


async def scan(backend: Backend) -> list[Intent]:
    """Every intent in the store (expired ones included: the caller judges)."""
    found: list[Intent] = []
    async for info in backend.list(keys.INTENT_PREFIX):
        try:
            doc = json.loads((await backend.get(info.key)).data)
            found.append(Intent(str(doc["key"]), str(doc["version"]), float(doc["expires"])))
        except NotFound:
            continue
        except (ValueError, KeyError, TypeError):
            # Unreadable: protect nothing by it, and let gc remove it once old (see gc).
            found.append(Intent("", info.key[len(keys.INTENT_PREFIX):], 0.0))
    return found
