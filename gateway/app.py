"""The one place the aiohttp application is assembled: middlewares, routes, lifecycle."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway import objects, security, tus, webui
from gateway.auth import TOKEN_PATH, admin_sign, auth_middleware, redact_path
from gateway.body import BODY_RECEIVED_INTO
from gateway.config import ConfigError, ServeConfig
from gateway.errors import error_middleware, json_error
from gateway.hooks import HookClient, delivered
from gateway.metrics import Metrics, metrics_handler
from storage import stack
from storage.backends.base import Backend
from storage.locks import LockAdmin
from storage.objects import ObjectStore, StoreOptions
from storage.outbox import Outbox, OutboxOptions
from storage.probe import StoreCapabilities
from storage.stack import (
    StackOptions,
    build_outbox,
    build_store,
    check_store,
    close_store,
    store_name,
    uses_store_leases,
)
from storage.tolerance import SizeTolerance

access_log = logging.getLogger("chunkgate.access")

CORS_ALLOW_HEADERS = ("Range, If-Range, If-Match, If-None-Match, If-Modified-Since, If-Unmodified-Since, "
                      "Authorization, Content-Type, Content-MD5, X-Checksum-SHA256, X-Request-Id, "
                      "Tus-Resumable, Upload-Length, Upload-Offset, Upload-Metadata, Upload-Defer-Length, "
                      "Upload-Checksum, Upload-Concat, X-HTTP-Method-Override")
CORS_EXPOSE_HEADERS = ("Content-Range, Content-Length, Accept-Ranges, ETag, Last-Modified, X-Request-Id, "
                       "Location, Upload-Offset, Upload-Length, Upload-Expires, Upload-Metadata, Tus-Resumable, "
                       "Tus-Version, Tus-Extension, Tus-Max-Size, Tus-Checksum-Algorithm")
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_APP_HEADER = re.compile(r"^[Xx]-[A-Za-z0-9-]{1,64}$")


@dataclass
class Traffic:
    """Mutable per-app state (an app's own items are frozen once it starts): how many requests
    are being handled, and whether serve is draining them for a shutdown."""

    inflight: int = 0
    draining: bool = False


def store_options(cfg: ServeConfig) -> StoreOptions:
    return StoreOptions(
        chunk_size=cfg.chunk_size,
        cache_bytes=cfg.cache_size,
        write_concurrency=cfg.write_concurrency,
        readahead=cfg.readahead,
        tolerance=SizeTolerance(cfg.size_tolerance_bytes, cfg.size_tolerance_ratio),
        verify_reads=cfg.verify_reads != "none",
        verify_sha256=cfg.verify_reads == "sha256",
        grace_seconds=cfg.grace,
        max_object_size=cfg.max_object_size,
        lock_timeout=cfg.lock_timeout,
        intent_seconds=max(cfg.upload_expiry, 3600.0),
    )


def outbox_options(cfg: ServeConfig) -> OutboxOptions:
    # A pointer older than one scan interval is not its committing gateway's any more (that one
    # delivered at once, or is backing off): any gateway's pass takes it, so a dead one's events
    # are delivered within about two intervals plus --lock-stale-after.
    return OutboxOptions(interval=cfg.hook_scan_interval, takeover_after=cfg.hook_scan_interval,
                         retry_cap=cfg.hook_retry_max, retry_base=min(0.5, cfg.hook_retry_max))


def stack_options(cfg: ServeConfig) -> StackOptions:
    return StackOptions(
        store=cfg.store,
        s3_endpoint_url=cfg.s3_endpoint_url,
        s3_region=cfg.s3_region,
        lock_stale_after=cfg.lock_stale_after,
        lock_timeout=cfg.lock_timeout,
        locks=cfg.locks,
        store_max_concurrency=cfg.store_max_concurrency,
        store_max_rps=cfg.store_max_rps,
        store_connect_timeout=cfg.store_connect_timeout, store_read_timeout=cfg.store_read_timeout,
        store_timeout=cfg.store_timeout,
    )


def build_app(cfg: ServeConfig, *, backend: Backend | None = None, faults: Any = None) -> web.Application:
    """The gateway for ``cfg``. ``backend``: use this raw backend instead of opening ``cfg.store``
    (tests); ``faults``: a fault plan injected under the store (tests and debugging)."""
    _secure_aiohttp_error_answers()
    metrics = Metrics()
    opts = stack_options(cfg)
    if faults is None and cfg.fault_rate > 0:
        from storage.backends.faults import FaultPlan

        faults = FaultPlan.parse(cfg.fault_rate, cfg.fault_kinds)
    opts.faults = faults
    store = build_store(opts, store_options(cfg), metrics, raw=backend)
    metrics.attach_store(store, store.locks)

    app = web.Application(
        middlewares=[
            observe_middleware(metrics),
            cors_middleware(cfg.cors_origins),
            error_middleware,
            auth_middleware(cfg.auth_token, cfg.signing_key),
            upload_cap_middleware(cfg.max_concurrent_uploads),
        ],
        client_max_size=1024**2,  # bodies we buffer (tus metadata, JSON); object bodies stream
        handler_args={"max_field_size": 16 * 1024, "max_line_size": 16 * 1024},
    )
    app["config"] = cfg
    app["config_max_ranges"] = 16
    app["metrics"] = metrics
    app["store"] = store
    app["started"] = time.time()
    app["traffic"] = Traffic()
    outbox: Outbox | None = None
    if cfg.hook_url:
        hooks = app["hooks"] = HookClient(cfg.hook_url, timeout=cfg.hook_timeout)
        # post-* events: recorded by each commit in the key's record, delivered from there.
        outbox = app["outbox"] = build_outbox(store, functools.partial(delivered, hooks), outbox_options(cfg))
    metrics.attach_hooks(app.get("hooks"), outbox)  # at 0 without hooks: the dashboard's panels still have series
    _add_routes(app)
    app["uploads"].announce = outbox is not None  # a tus upload's commit carries post-finish
    app.on_response_prepare.append(decorate_response)
    # First: the store's check and probe come before anything that uses the store (the tus sweeper).
    app.on_startup.insert(0, _start)
    app.on_cleanup.append(_stop)
    return app


def _add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/admin/locks", admin_locks)
    app.router.add_post("/admin/sign", admin_sign)
    webui.setup(app)
    app.router.add_get("/objects", objects.list_objects)
    app.router.add_get("/objects/", objects.list_objects)
    tus.setup(app)
    # [\s\S] (not .) so that keys with a percent-encoded newline reach the handler and get a 400.
    app.router.add_route("*", r"/objects/{key:[\s\S]+}", objects.object_dispatch)
    app.router.add_route("*", r"/t/{token}/objects/{key:[\s\S]+}", objects.signed_object_dispatch)
    app.router.add_route("*", r"/{path:[\s\S]*}", fallback)


async def _start(app: web.Application) -> None:
    """The store answers and is probed, then the background work starts."""
    cfg: ServeConfig = app["config"]
    store: ObjectStore = app["store"]
    await check_store(store)
    await probe_store(app)
    app["background"] = [asyncio.ensure_future(_clear_stale_locks(store.locks, cfg.lock_stale_after))]
    if cfg.gc_interval > 0:
        from storage.gc import run_periodically

        def count(report: Any) -> None:
            app["metrics"].gc_ran(chunks=report.chunks_deleted, uploads=report.uploads_expired)

        # At least a day: --grace (default 5 min) is how long readers of a replaced version
        # get, but an unreferenced chunk may also belong to a PUT still running on another
        # gateway, which only its age protects (this gateway's own PUTs are protected), and
        # serve deletes the versions it replaces itself: periodic gc only sweeps crash leftovers.
        gc_grace = max(cfg.grace, MIN_PERIODIC_GC_GRACE)
        app["background"].append(asyncio.ensure_future(run_periodically(store, cfg.gc_interval, gc_grace, count)))
    if "outbox" in app:
        await app["outbox"].start()


async def _stop(app: web.Application) -> None:
    for task in app.get("background", []):
        task.cancel()
    await asyncio.gather(*app.get("background", []), return_exceptions=True)
    await app["uploads"].close()
    if "outbox" in app:  # an event cut off mid-delivery stays recorded: delivered after a restart
        await app["outbox"].close()
    if "hooks" in app:
        await app["hooks"].close()
    await close_store(app["store"])


MIN_PERIODIC_GC_GRACE = 86400.0
PROBE_EVERY_SECONDS = 60.0


async def probe_store(app: web.Application) -> StoreCapabilities:
    """Check once that the store honours the conditions every guarantee rests on (and apply what
    it found); at most every minute again for /readyz. Several gateways over a store that ignores
    them would silently lose writes, so ``--locks store`` is refused on it with one line."""
    store: ObjectStore = app["store"]
    caps = await stack.probe_store(store)
    # Not probed (a full store): ask again on the next /readyz instead of a minute later.
    app["store_caps"] = (float("-inf") if caps.full else time.monotonic(), caps)
    if not caps.conditional_put and uses_store_leases(store):
        raise ConfigError(f"--locks store: the store {store_name(store)} does not honour conditional writes "
                          f"({caps.describe()}), so several gateways cannot share it safely; "
                          "run one gateway with --locks local")
    if caps.problems or caps.full:
        logging.getLogger("chunkgate").warning("store probe: %s", caps.describe())
    return caps


async def _clear_stale_locks(locks: LockAdmin, every: float) -> None:
    """A lease that went stale while nobody waited for its key is cleared here, so its entry
    (and its place in /admin/locks and the lock gauges) does not linger forever."""
    while True:
        await asyncio.sleep(max(0.5, every))
        try:
            await locks.clear_stale()
        except Exception:  # never let housekeeping die
            logging.getLogger("chunkgate.locks").exception("clearing stale locks failed")


async def decorate_response(request: web.Request, response: web.StreamResponse) -> None:
    """Headers every response carries, set just before headers go out (streamed responses too)."""
    response.headers.setdefault("X-Request-Id", request.get("request_id", ""))
    # After aiohttp's own defaults (this hook runs once they are set), so its Server is replaced.
    response.headers.update(security.EVERY_RESPONSE)
    if security.is_gateway_page(request.path):
        response.headers.update(security.PAGE_HEADERS)  # whatever the page's handler set
    elif not request.get(objects.OBJECT_READ):
        response.headers.setdefault("Content-Security-Policy", security.API_CSP)
    if request.app["traffic"].draining or request.get(BODY_RECEIVED_INTO):
        # shutting down, or aiohttp's parser still expects a body that gateway.body read itself:
        # no more requests on this connection (the header too: aiohttp chose its headers before this hook)
        response.force_close()
        response.headers["Connection"] = "close"
    allow = request.get("cors_allow")
    if allow is not None and "Access-Control-Allow-Origin" not in response.headers:
        response.headers["Access-Control-Allow-Origin"] = allow
        response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSE_HEADERS
        if allow != "*":
            response.headers["Vary"] = "Origin"


def _secure_aiohttp_error_answers() -> None:
    """Make the answers aiohttp writes by itself like every other answer: JSON errors with the
    headers every response carries.

    A request aiohttp cannot parse (a bad request line or header, a line over 16 KiB) and an
    exception that escapes every middleware are answered by ``RequestHandler.handle_error``,
    which no application hook sees (aiohttp#3287, #8870). Those answers named Python's and
    aiohttp's versions, had no nosniff, echoed the bad request bytes as text (or, for a 500 to a
    browser, as HTML). aiohttp has no setting for this, so the method is wrapped, once per
    process; the original still runs first, for its logging and its check that nothing was sent.
    """
    original = web.RequestHandler.handle_error
    if getattr(original, "chunkgate_secured", False):
        return

    @functools.wraps(original)
    def handle_error(self: web.RequestHandler, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        plain = original(self, request, status, exc, message)
        if status < 500 and isinstance(plain, web.Response) and plain.text:
            # aiohttp's first words say what was wrong; what follows ":" is the request's own bytes.
            detail = plain.text.strip().split(":", 1)[0][:200]
            text = f"the request could not be parsed: {detail}"
        else:
            text = "the gateway failed unexpectedly; the error is logged"
        response = json_error(status, HTTPStatus(status).phrase.lower().replace(" ", "_"), text)
        response.headers.update(security.EVERY_RESPONSE)
        response.headers["Content-Security-Policy"] = security.API_CSP
        response.force_close()  # as aiohttp's own: the connection's state is unknown
        return response

    handle_error.chunkgate_secured = True  # type: ignore[attr-defined]
    web.RequestHandler.handle_error = handle_error  # type: ignore[method-assign]


async def fallback(request: web.Request) -> web.StreamResponse:
    # URL normalization (a '..' segment) can route /objects/... requests here: still a bad key.
    if request.raw_path.startswith("/objects/"):
        return await objects.object_dispatch(request)
    if request.raw_path.startswith(TOKEN_PATH):
        return await objects.signed_object_dispatch(request)
    return json_error(404, "not_found", f"no route for {request.method} {request.path}")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "uptime_seconds": round(time.time() - request.app["started"], 3)})


async def readyz(request: web.Request) -> web.Response:
    store: ObjectStore = request.app["store"]
    try:
        await check_store(store)
        probed_at, caps = request.app.get("store_caps", (0.0, None))
        if caps is None or time.monotonic() - probed_at > PROBE_EVERY_SECONDS:
            caps = await probe_store(request.app)
    except ConfigError as exc:
        return json_error(503, "store_unsafe", str(exc))
    except Exception as exc:  # noqa: BLE001 - whatever it is, the store is not usable now
        return json_error(503, "store_unavailable", f"the store does not answer: {exc}")
    return web.json_response({"status": "ready", "store": store_name(store),
                              "conditional_writes": caps.conditional_put,
                              "conditional_deletes": caps.conditional_delete,
                              # Full: reads are served, writes get 507 until space is freed.
                              "store_full": caps.full})


async def admin_locks(request: web.Request) -> web.Response:
    return web.json_response(request.app["store"].locks.snapshot())


def observe_middleware(metrics: Metrics) -> Any:
    """The one place a request is observed: its id (a client's X-Request-Id, or a new one), the
    in-flight count serve drains on SIGTERM, and — once answered — its metrics and its access
    log line, both from the same status and duration."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = request.headers.get("X-Request-Id", "")
        if not rid or len(rid) > 128 or not rid.isprintable():
            rid = uuid.uuid4().hex
        request["request_id"] = rid
        t0 = time.perf_counter()
        status = 500
        request.app["traffic"].inflight += 1
        metrics.http_in_flight.inc()
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            exc.headers["X-Request-Id"] = rid
            raise
        finally:
            seconds = time.perf_counter() - t0
            request.app["traffic"].inflight -= 1
            metrics.http_in_flight.dec()
            metrics.request_done(request, status, seconds)
            sent = request.get("chunkgate.bytes_sent", 0)
            fields = {"request_id": rid, "method": request.method, "path": redact_path(request.path), "status": status,
                      "bytes_sent": sent, "duration_s": round(seconds, 6), "remote": request.remote}
            line, args = "%s %s %s %d %d %.4f", [request.remote, request.method, _loggable_target(request), status, sent, seconds]
            offset = request.get("chunkgate.upload_offset")
            if offset is not None:  # tus HEAD/PATCH: where the upload stood, so a resume shows in the log
                fields["upload_offset"] = offset
                line += " upload_offset=%d"
                args.append(offset)
            access_log.info(line, *args, extra=fields)

    return middleware


def _loggable_target(request: web.Request) -> str:
    """Path and query for the access log, with a signed URL's signature and a path's prefix
    token blanked: until it expires, a logged credential is one anyone who reads the logs could
    replay."""
    if len(request.path_qs) >= 2048:
        return redact_path(request.path)
    if "signature" not in request.query:
        return redact_path(request.path_qs)
    return redact_path(str(request.rel_url.update_query(signature="REDACTED")))


def upload_cap_middleware(limit: int) -> Any:
    """At most ``limit`` request bodies are received at once. Each upload holds up to
    (N+1) chunks of memory, so the cap bounds the gateway's memory under an upload storm; the
    rest are told to come back (503 + Retry-After) before a byte of their body is read."""
    in_use = 0

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        nonlocal in_use
        if not limit or request.method not in ("PUT", "PATCH", "POST") or not request.body_exists:
            return await handler(request)
        if in_use >= limit:
            return json_error(503, "too_many_uploads", f"{limit} uploads are in progress; try again shortly",
                              {"Retry-After": "1"})
        in_use += 1
        try:
            return await handler(request)
        finally:
            in_use -= 1

    return middleware


def app_headers(request: web.Request) -> str:
    """The ``X-*`` headers a preflight asks for, to add to the allowed ones: a web app passes its
    own credentials that way (``X-App-Session``), and the pre-create hook receives them."""
    asked = request.headers.get("Access-Control-Request-Headers", "")
    names = [h.strip() for h in asked.split(",") if _APP_HEADER.match(h.strip())]
    return "".join(f", {name}" for name in names[:16])


def cors_middleware(origins_setting: str) -> Any:
    origins = {o.strip() for o in origins_setting.split(",") if o.strip()}
    any_origin = "*" in origins

    def allowed(origin: str, method: str) -> str | None:
        if origin in origins:
            return origin
        if any_origin and method in READ_METHODS:
            return "*"  # the default: anyone may read (auth still applies), not write
        return None

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if request.method == "OPTIONS" and origin and "Access-Control-Request-Method" in request.headers:
            wanted = request.headers["Access-Control-Request-Method"].upper()
            allow = allowed(origin, wanted)
            if allow is None:
                return json_error(403, "cors_forbidden", f"origin {origin} may not {wanted} here")
            methods = "GET, HEAD, OPTIONS" if allow == "*" else "GET, HEAD, PUT, DELETE, POST, PATCH, OPTIONS"
            return web.Response(status=204, headers={
                "Access-Control-Allow-Origin": allow,
                "Access-Control-Allow-Methods": methods,
                "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS + app_headers(request),
                "Access-Control-Expose-Headers": CORS_EXPOSE_HEADERS,
                "Access-Control-Max-Age": "600",
                "Vary": "Origin",
            })
        if request.method == "OPTIONS" and request.path.startswith("/objects/"):
            # A plain OPTIONS (no preflight): say what the resource allows.
            headers = {"Allow": "GET, HEAD, PUT, DELETE, OPTIONS", "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS,
                       "Access-Control-Expose-Headers": CORS_EXPOSE_HEADERS}
            if any_origin:
                headers["Access-Control-Allow-Origin"] = "*"
            return web.Response(status=204, headers=headers)
        if origin:
            request["cors_allow"] = allowed(origin, request.method)
        return await handler(request)

    return middleware
