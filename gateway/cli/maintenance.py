"""``chunkgate gc`` and ``chunkgate fsck``: store maintenance from the command line.

Both take the store flags of ``serve`` (``--store``, ``--s3-endpoint-url``, ``--s3-region`` and
their ``CHUNKGATE_*`` environment variables), build the store through ``storage.stack`` (so
fsck's repairs take the same locks -- store leases on S3 -- as running gateways), show progress
with tqdm (quiet when stderr is not a terminal) and end with a one-line summary.

Exit codes: 0 success (fsck: no damage left), 1 damage found or the store failed mid-run,
2 bad configuration (one line on stderr, no traceback). Must never hold HTTP code: the work
itself lives in ``storage.gc`` and ``storage.fsck``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from gateway.config import (
    ConfigError,
    ServeConfig,
    env_name,
    parse_duration,
    parse_nonneg_int,
    resolve,
)
from storage.stack import close_store, open_store

DEFAULT_GC_GRACE = 3600.0

# (flag, dest, help): the subset of serve's flags that name and configure the store; parsing,
# environment variables and validation are serve's own (gateway.config.resolve).
_STORE_FLAGS = [
    ("--store", "store", "a directory, file:///abs/path, or s3://BUCKET[/PREFIX]"),
    ("--s3-endpoint-url", "s3_endpoint_url", "S3-compatible endpoint (also AWS_ENDPOINT_URL)"),
    ("--s3-region", "s3_region", "S3 region"),
    ("--locks", "locks", "local, store or auto (store for s3, local otherwise)"),
    ("--lock-stale-after", "lock_stale_after", "a lock not renewed this long is stale"),
    ("--lock-timeout", "lock_timeout", "how long to wait for an object's lock"),
]
_TOLERANCE_FLAGS = [
    ("--size-tolerance-bytes", "size_tolerance_bytes", "accepted chunk size drift in bytes"),
    ("--size-tolerance-ratio", "size_tolerance_ratio", "accepted chunk size drift as a ratio"),
]


def _fail(message: str, code: int = 2) -> int:
    print(f"chunkgate: {message}", file=sys.stderr)
    return code


def _parser(prog: str, description: str, flags: list[tuple[str, str, str]]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for flag, dest, help_text in flags:
        parser.add_argument(flag, dest=dest, default=None, help=f"{help_text} [env {env_name(flag)}]")
    parser.set_defaults(auth_token=None)  # resolve() reads it; maintenance serves nobody
    return parser


def _config(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[argparse.Namespace, ServeConfig]:
    try:
        ns = parser.parse_args(list(argv))
    except SystemExit as exc:  # argparse already printed its one-line usage error
        raise _Exit(int(exc.code or 0)) from None
    return ns, resolve(ns)


class _Exit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _build_store(cfg: ServeConfig) -> Any:
    from gateway.app import stack_options, store_options
    from storage.stack import build_store

    try:
        return build_store(stack_options(cfg), store_options(cfg))
    except ValueError as exc:  # open_backend's one-line complaints about --store
        raise ConfigError(f"--store: {exc}") from None


async def _open(cfg: ServeConfig) -> Any:
    store = _build_store(cfg)
    try:
        # As serve does: what the store honours decides whether tombstones may be removed. The
        # probe is bounded by --store-timeout as every store call is.
        await open_store(store)
    except Exception as exc:  # noqa: BLE001 - any failure to open the store is one line on the CLI
        await close_store(store)
        raise ConfigError(f"--store: the store {cfg.store} is not usable: {exc}") from None
    return store


def _bar(desc: str, unit: str) -> Any:
    from tqdm import tqdm

    return tqdm(desc=desc, unit=unit, disable=not sys.stderr.isatty(), file=sys.stderr, leave=False)


def _run(main: Callable[[], Any]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)
    try:
        return int(asyncio.run(main()))
    except ConfigError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


def _command(parser: argparse.ArgumentParser, argv: Sequence[str], flag: str, convert: Callable[[argparse.Namespace], Any],
             what: str, unit: str, work: Callable[[Any, argparse.Namespace, Any, Any], Awaitable[int]]) -> int:
    """Parse (``convert`` reads the command's own ``flag``), open the store, run ``work(store,
    ns, value, bar)`` with a progress bar, close the store: every failure is one line."""
    try:
        ns, cfg = _config(parser, argv)
        value = convert(ns)
    except _Exit as exc:
        return exc.code
    except ConfigError as exc:
        return _fail(str(exc))
    except ValueError as exc:
        return _fail(f"{flag}: {exc}")

    async def main() -> int:
        store = await _open(cfg)
        bar = _bar(what, unit)
        try:
            return await work(store, ns, value, bar)
        except Exception as exc:  # noqa: BLE001 - one line on the CLI, whatever stopped the pass
            return _fail(f"{what} stopped: the store failed: {exc}", 1)
        finally:
            bar.close()
            await close_store(store)

    return _run(main)


# ------------------------------------------------------------------------------------ gc
def cmd_gc(argv: Sequence[str]) -> int:
    parser = _parser("chunkgate gc", "Delete chunks no manifest references (after a grace period) "
                     "and expired upload sessions.", _STORE_FLAGS)
    parser.add_argument("--grace", default=None,
                        help=f"keep unreferenced chunks younger than this (default 1h) [env {env_name('--grace')}]")
    parser.add_argument("--dry-run", action="store_true", help="report what would be deleted, delete nothing")

    def grace_of(ns: argparse.Namespace) -> float:
        raw = ns.grace if ns.grace is not None else os.environ.get(env_name("--grace"))
        return DEFAULT_GC_GRACE if raw is None else parse_duration(raw)

    async def work(store: Any, ns: argparse.Namespace, grace: float, bar: Any) -> int:
        from storage.gc import collect_store

        report = await collect_store(store, grace=grace, dry_run=ns.dry_run, progress=bar.update)
        print(report.summary())
        return 1 if report.delete_errors else 0

    return _command(parser, argv, "--grace", grace_of, "gc", "chunks", work)


# ------------------------------------------------------------------------------------ fsck
def cmd_fsck(argv: Sequence[str]) -> int:
    parser = _parser("chunkgate fsck", "Check every manifest against its chunks (existence, size, SHA-256).",
                     _STORE_FLAGS + _TOLERANCE_FLAGS)
    parser.add_argument("--repair", action="store_true", help="fix what can be fixed (tolerated size drift)")
    parser.add_argument("--sample", default=None, help="check only N objects chosen at random")
    parser.add_argument("--prefix", default="", help="check only objects whose key starts with this")
    parser.add_argument("--quiet", action="store_true", help="print only damaged objects and the summary")

    def sample_of(ns: argparse.Namespace) -> int | None:
        return None if ns.sample is None else parse_nonneg_int(ns.sample)

    async def work(store: Any, ns: argparse.Namespace, sample: int | None, bar: Any) -> int:
        from storage.fsck import OK, fsck

        def progress(result: Any) -> None:
            bar.update(1)
            if result.status != OK or not ns.quiet:
                bar.write(result.line(), file=sys.stdout)

        report = await fsck(store, repair=ns.repair, sample=sample, prefix=ns.prefix, progress=progress)
        print(report.summary())
        return 0 if report.clean else 1

    return _command(parser, argv, "--sample", sample_of, "fsck", "objects", work)
