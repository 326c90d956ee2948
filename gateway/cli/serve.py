"""``chunkgate serve``: logging, the server's lifecycle (ready line, drain on SIGTERM), the loop."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import json
import logging
import os
import signal
import sys
import threading
from typing import Any, Sequence

from gateway.cli import fail
from gateway.config import ConfigError, ServeConfig, add_serve_arguments, resolve
from storage.backends.deadline import StoreTimeout
from storage.stack import store_name


# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is data.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line; fields passed with ``extra=`` (request_id, key, ...) become
    top-level fields, so log pipelines can filter on them without parsing the message."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field, value in vars(record).items():
            if field not in _RECORD_ATTRIBUTES and not field.startswith("_") and field not in doc:
                doc[field] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        # default=str: an odd extra must never cost the log line (or raise inside logging).
        return json.dumps(doc, ensure_ascii=False, default=str)


def setup_logging(cfg: ServeConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if cfg.log_format == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(cfg.log_level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # ours carries the request id
    logging.getLogger("botocore").setLevel(logging.WARNING)




# ------------------------------------------------------------------------------------ serve
async def serve(cfg: ServeConfig) -> int:
    from aiohttp import web

    from gateway.app import build_app

    try:
        app = build_app(cfg)
    except ValueError as exc:  # open_backend's one-line complaints about --store
        return fail(f"--store: {exc}")
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=cfg.shutdown_timeout,
                           keepalive_timeout=75.0, handle_signals=False)
    # The store's check and probe run in setup, each store call bounded by --store-timeout;
    # this bounds the whole (a store that answers the check and then stalls in the probe).
    # A store that does not answer is a startup failure (exit 2, one line naming the endpoint),
    # not a gateway that starts not-ready: run by hand, the operator sees why at once; under a
    # supervisor the restart (with its backoff) is the retry, and a gateway that says nothing
    # while never becoming ready is what users could not diagnose.
    bound = 3 * cfg.store_timeout if cfg.store_timeout > 0 else None
    where = _store_location(cfg)
    try:
        async with asyncio.timeout(bound):
            await runner.setup()
    except ConfigError as exc:  # the store's probe: --locks store on a store that ignores conditions
        await runner.cleanup()
        return fail(str(exc))
    except TimeoutError:
        return fail(f"--store: the store {where} did not finish the startup check within {bound:g}s "
                    "(it answers too slowly or stalls); check it, or raise --store-timeout")
    except StoreTimeout as exc:
        within = f"within {exc.seconds:g}s" if exc.seconds else "in time"
        return fail(f"--store: the store {where} did not answer {within} "
                    "(nothing listens, or it accepts connections and never answers); "
                    "check that it is reachable, or raise --store-timeout")
    except Exception as exc:  # noqa: BLE001 - the store's startup check: missing bucket, bad credentials
        return fail(f"--store: the store {where} is not usable: {_one_line(exc)}")
    site = web.TCPSite(runner, cfg.host, cfg.port, backlog=512)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        return fail(f"--port: cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}")
    sockets = [s for s in (site._server.sockets if site._server else [])]  # type: ignore[attr-defined]  # aiohttp's Server has them; the ABC does not
    port = sockets[0].getsockname()[1] if sockets else cfg.port
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    print(f"chunkgate listening on http://{host}:{port} (store: {store_name(app['store'])})", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logging.getLogger("chunkgate").info("shutting down: finishing in-flight requests (up to %gs)", cfg.shutdown_timeout)
    # Stop accepting first and drain ourselves: once aiohttp's own shutdown starts it drops
    # incoming bytes, so an upload whose body is still arriving could never finish. After the
    # drain (bounded), aiohttp cancels what is left; a cancelled PUT or PATCH aborts its upload,
    # so nothing half-done is committed.
    app["traffic"].draining = True
    await site.stop()
    deadline = loop.time() + cfg.shutdown_timeout
    while app["traffic"].inflight > 0 and loop.time() < deadline:
        await asyncio.sleep(0.05)
    await runner.cleanup()
    return 0


def _store_location(cfg: ServeConfig) -> str:
    """The store as the operator knows it: for S3 its endpoint too (the part that stalls)."""
    if not cfg.store.lower().startswith("s3://"):
        return cfg.store
    endpoint = (cfg.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                or "AWS's default endpoint")
    return f"{cfg.store} at {endpoint}"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _exit_now_if_store_threads_hang(code: int) -> None:
    """A store client's worker thread still blocked on a store that does not answer (botocore:
    up to its attempts x --store-read-timeout) would hold the interpreter's exit, which joins
    every worker thread: the gateway has already stopped (or never started) and nothing is
    half-done, so exit at once instead of hanging on in silence."""
    stuck = [t for t in threading.enumerate()
             if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if not stuck:
        return
    for t in stuck:
        t.join(timeout=0.2)
    if any(t.is_alive() for t in stuck):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def cmd_serve(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="chunkgate serve", description="Run the gateway.")
    add_serve_arguments(parser)
    try:
        cfg = resolve(parser.parse_args(list(argv)))
    except ConfigError as exc:
        return fail(str(exc))
    setup_logging(cfg)
    try:
        code = run_loop(serve(cfg))
    except KeyboardInterrupt:
        code = 0
    _exit_now_if_store_threads_hang(code)
    return code


def _keep_freed_memory() -> None:
    """Serve chunk-sized buffers from glibc's heap instead of fresh mmaps. By default every 8 MiB
    buffer (a fetched chunk, a joined upload chunk) is mapped anew and its pages faulted in one by
    one: ~5 ms per chunk here, 0.3-0.6 CPU-s/GiB in ops/bench. With the mmap threshold at glibc's
    maximum (32 MiB) and trimming off, freed chunks are reused; the heap stays as large as the
    cache plus the chunks in flight, which --cache-size and --write-concurrency already bound."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
        libc.mallopt(-8, 2)  # M_ARENA_MAX: chunks fetched in threads reuse what the loop freed (gateway.sending)
    except (OSError, AttributeError):  # not glibc (musl, macOS): their allocators decide
        pass


def run_loop(main: Any) -> int:
    """Run the server on uvloop unless CHUNKGATE_LOOP=asyncio. On Python 3.11 asyncio's socket
    transport copies every body that does not fit the socket buffer into a bytearray (and its
    request reader into another): in ops/bench profiles that was the largest cost of a GET after
    hashing. uvloop writes the caller's buffers as they are."""
    _keep_freed_memory()
    if os.environ.get("CHUNKGATE_LOOP", "uvloop") != "asyncio":
        import uvloop

        return int(uvloop.run(main))
    return int(asyncio.run(main))
