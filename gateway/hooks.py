"""Hooks: the JSON events chunkgate POSTs to the application at ``--hook-url`` (API.md "Hooks").

Two uses of one HTTP client. ``pre-create`` is asked synchronously, before a PUT body is read or
a tus upload is created, and decides: 2xx allows, 4xx refuses (403 ``rejected_by_hook`` with the
hook's body cut to 1 KiB), anything else fails closed (503). ``post-finish`` and ``post-delete``
are built by the object layer (``storage.objects.ObjectStore.announcement``) and written into the
key's record by the commit itself; handlers only ask for them (``post_finish``/``post_delete``,
when hooks are on). ``storage.outbox`` delivers them, calling ``HookClient.deliver`` for one
attempt at a time and retrying each key on its own backoff schedule (``storage.outbox.backoff_delay``:
the outbox owns the clock, and must not hold a key's delivery lease while it waits).

The pre-create event and the refusal message are pure functions (table-tested); I/O is ``HookClient``.

Must never: let an upload go ahead when pre-create did not answer 2xx; follow a redirect (a
hook that moved is a misconfiguration, not a yes); wait on the app without a timeout; raise from
``deliver`` (an outcome is returned instead, so the outbox decides what happens next).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Mapping

import aiohttp
from aiohttp import web

from gateway.errors import HTTPError

log = logging.getLogger("chunkgate.hooks")

EVENT_TYPES = ("pre-create", "post-finish", "post-delete")
REFUSAL_LIMIT = 1024  # bytes of the hook's body a refused client gets back (API.md)
_BODY_READ_LIMIT = 64 * 1024  # what we read of a hook's answer at most: it is only ever shown cut


class HookRejected(HTTPError):
    """The pre-create hook answered 4xx: the client may not upload this."""

    def __init__(self, message: str) -> None:
        super().__init__(403, "rejected_by_hook", message)


class HookUnavailable(HTTPError):
    """The pre-create hook could not say yes (down, timed out, 5xx): fail closed."""

    def __init__(self, message: str) -> None:
        super().__init__(503, "hook_unavailable", message, headers={"Retry-After": "1"})


class Outcome(str, Enum):
    """What one delivery attempt came to: the ``outcome`` label of the metrics."""

    OK = "ok"  # 2xx: allowed, or delivered
    REFUSED = "refused"  # 4xx: pre-create refuses; a post-* event is retried all the same
    ERROR = "error"  # no answer, a timeout, 3xx or 5xx


# ------------------------------------------------------------------------------ pure parts
def new_event_id() -> str:
    return uuid.uuid4().hex


def rfc3339(when: datetime | None = None) -> str:
    """``2026-11-22T10:00:00.123Z``: UTC, milliseconds (a pre-create event's ``time``)."""
    when = when or datetime.now(timezone.utc)
    return when.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def forwarded_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The request headers that identify the caller to the app: ``Authorization`` and ``X-*``.
    Repeated headers are joined with ", " (RFC 9110 list syntax); names keep their case."""
    out: dict[str, str] = {}
    for name, value in headers.items():
        lowered = name.lower()
        if lowered == "authorization" or lowered.startswith("x-"):
            out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def pre_create_event(*, key: str, size: int | None, content_type: str, metadata: Mapping[str, str | None],
                     upload_id: str | None, headers: Mapping[str, str], event_id: str | None = None,
                     time: str | None = None) -> dict[str, Any]:
    """The pre-create event of API.md. ``metadata``: tus metadata (a value-less key becomes "")."""
    return {
        "id": event_id or new_event_id(),
        "type": "pre-create",
        "time": time or rfc3339(),
        "key": key,
        "size": size,
        "content_type": content_type,
        "metadata": {k: (v if v is not None else "") for k, v in metadata.items()},
        "upload_id": upload_id,
        "headers": forwarded_headers(headers),
    }


def classify(status: int) -> Outcome:
    if 200 <= status < 300:
        return Outcome.OK
    if 400 <= status < 500:
        return Outcome.REFUSED
    return Outcome.ERROR


def refusal_message(body: bytes, status: int) -> str:
    """What a refused client is told: the hook's own words, cut to 1 KiB (never mid-character),
    or a sentence naming the status when the hook said nothing."""
    text = body[:REFUSAL_LIMIT].decode("utf-8", errors="ignore").strip()
    return text or f"the upload was refused by the application's pre-create hook (HTTP {status})"


# ------------------------------------------------------------------------------ the client
class HookStats:
    """Plain counters; ``gateway.metrics`` exports them."""

    def __init__(self) -> None:
        self.deliveries: collections.Counter[tuple[str, str]] = collections.Counter()


class HookClient:
    """POSTs events to one URL with aiohttp's client and a bounded timeout."""

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        self.url = url
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.stats = HookStats()
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # Created on first use, inside the running loop; no cookies: each event stands alone.
            self._session = aiohttp.ClientSession(timeout=self.timeout, cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, event: Mapping[str, Any]) -> tuple[Outcome, int | None, bytes]:
        """One POST of ``event``: its outcome, the status (None without an answer) and the start
        of the answer's body. Never raises for anything the app or the network does."""
        try:
            async with self._client().post(self.url, json=event, allow_redirects=False) as resp:
                body = await resp.content.read(_BODY_READ_LIMIT)
                outcome = classify(resp.status)
                self.stats.deliveries[(str(event.get("type")), outcome.value)] += 1
                return outcome, resp.status, body
        except asyncio.CancelledError:
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            self.stats.deliveries[(str(event.get("type")), Outcome.ERROR.value)] += 1
            return Outcome.ERROR, None, repr(exc).encode()

    async def pre_create(self, event: Mapping[str, Any]) -> None:
        """Ask the app whether this upload may be created; raise unless it said 2xx."""
        outcome, status, body = await self.post(event)
        if outcome is Outcome.OK:
            return
        if outcome is Outcome.REFUSED:
            assert status is not None
            log.info("pre-create hook refused %r with %d", event.get("key"), status)
            raise HookRejected(refusal_message(body, status))
        what = f"answered {status}" if status is not None else f"did not answer ({body.decode(errors='replace')[:200]})"
        log.warning("pre-create hook %s for %r: refusing the upload", what, event.get("key"))
        raise HookUnavailable(f"the application's pre-create hook {what}; nothing was stored, try again later")

    async def deliver(self, event: Mapping[str, Any]) -> Outcome:
        """One delivery attempt of a post-* event (storage.outbox retries). 2xx is delivered;
        anything else — a 4xx too: the app must learn of every commit — is tried again later."""
        outcome, status, body = await self.post(event)
        if outcome is not Outcome.OK:
            log.info("hook delivery of %s %s for %r: %s", event.get("type"), event.get("id"), event.get("key"),
                     status if status is not None else body.decode(errors="replace")[:200])
        return outcome


# ------------------------------------------------------------------------------ handlers' calls
def announcing(request: web.Request) -> bool:
    """Whether commits announce themselves: only with ``--hook-url`` (else nobody would ever
    deliver the events, and every record would keep them)."""
    return "hooks" in request.app


def post_finish(request: web.Request) -> dict[str, Any] | None:
    """What a PUT handler passes as ``ObjectStore.put(event=...)``: the commit then carries the
    API.md post-finish (the object layer fills in its fields; a PUT has no metadata)."""
    return {"type": "post-finish", "metadata": {}} if announcing(request) else None


def post_delete(request: web.Request) -> dict[str, Any] | None:
    """What a DELETE handler passes as ``ObjectStore.delete(event=...)``."""
    return {} if announcing(request) else None


async def delivered(hooks: HookClient, event: Mapping[str, Any]) -> bool:
    """The outbox's ``deliver``: one attempt, True when the app answered 2xx."""
    return (await hooks.deliver(event)) is Outcome.OK


async def authorize(request: web.Request, *, key: str, size: int | None, content_type: str,
                    metadata: Mapping[str, str | None] | None = None, upload_id: str | None = None) -> None:
    """The pre-create check a handler makes before it reads a body or creates an upload; a
    no-op without ``--hook-url``. Raises ``HookRejected`` (403) or ``HookUnavailable`` (503)."""
    hooks: HookClient | None = request.app.get("hooks")
    if hooks is None:
        return
    await hooks.pre_create(pre_create_event(key=key, size=size, content_type=content_type, metadata=metadata or {},
                                            upload_id=upload_id, headers=request.headers))
