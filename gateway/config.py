"""Configuration of ``chunkgate serve``: the flags of API.md, their environment variables, and the
pure parsers for sizes and durations. Parsing raises ``ConfigError`` naming the bad setting; the
CLI prints it as one line and exits 2."""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from gateway.security import ACTIVE_CONTENT_MODES


class ConfigError(ValueError):
    """A bad setting. The message names it (``--chunk-size: ...``)."""


_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3, "ti": 1024**4, "tib": 1024**4,
}
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def parse_size(text: str) -> int:
    """``8MiB`` -> 8388608, ``5MB`` -> 5000000, ``1024`` -> 1024. Units are case-insensitive."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size (examples: 8MiB, 5MB, 1048576)")
    value = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if value != int(value):
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(value)


def parse_duration(text: str) -> float:
    """``30s`` -> 30.0, ``500ms`` -> 0.5, ``1h`` -> 3600.0, ``2`` -> 2.0 (seconds)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _DURATION_UNITS:
        raise ValueError(f"{text!r} is not a duration (examples: 30s, 500ms, 2m, 1h)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]


def parse_ratio(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise ValueError(f"{text!r} is not a ratio between 0 and 1")
    return value


def parse_nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"{text!r} is negative")
    return value


def parse_port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"{text!r} is not a port number (0-65535)")
    return value


def parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{text!r} is not true or false")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    store: str = "./chunkgate-data"
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    chunk_size: int = 8 * 1024 * 1024
    cache_size: int = 256 * 1024 * 1024
    lock_stale_after: float = 30.0
    lock_timeout: float = 20.0
    size_tolerance_bytes: int = 2048
    size_tolerance_ratio: float = 0.001
    auth_token: list[str] = field(default_factory=list)
    auth_token_file: str | None = None
    signing_key: str | None = None
    allow_anonymous_writes: bool = False
    verify_reads: str = "blocks"
    write_concurrency: int = 4
    readahead: int = 8
    cors_origins: str = "*"
    max_object_size: int | None = None
    grace: float = 300.0
    gc_interval: float = 0.0
    log_format: str = "text"
    log_level: str = "info"
    shutdown_timeout: float = 30.0
    body_timeout: float = 60.0
    max_upload_size: int = 1 << 40
    upload_expiry: float = 86400.0
    locks: str = "auto"
    store_max_concurrency: int = 64
    store_max_rps: float = 0.0
    store_connect_timeout: float = 3.0  # per store request: TCP/TLS connect
    store_read_timeout: float = 10.0  # per store request: no byte from the store for this long
    store_timeout: float = 30.0  # per store operation, retries and queueing included (0 = none)
    max_concurrent_uploads: int = 64
    max_open_uploads: int = 10000  # tus uploads open at once over all clients (0 = no cap)
    max_open_uploads_per_token: int = 1000  # ... per bearer token; anonymous clients count as one
    max_upload_metadata: int = 4096  # bytes of a tus Upload-Metadata header (0 = only the 16 KiB header limit)
    min_upload_rate: int = 1024  # bytes/s a request body must average after --body-timeout seconds
    send_timeout: float = 60.0  # a response the client takes no byte of for this long is closed (gateway.sending)
    min_download_rate: int = 16 * 1024  # bytes/s a response must be taken at, over each --send-timeout window
    hook_url: str | None = None  # pre-create / post-finish / post-delete events go here (gateway.hooks)
    hook_timeout: float = 10.0
    hook_retry_max: float = 60.0  # post-* deliveries back off exponentially up to this (storage.outbox)
    hook_scan_interval: float = 5.0  # how often the outbox is listed (finished pointers, dead gateways' events)
    fault_rate: float = 0.0  # debugging only: inject store faults at this rate
    fault_kinds: str = "all"
    active_content: str = "sandbox"  # how uploads that are not media are served (gateway.security)


# (flag, dest, parser, help). The env variable is CHUNKGATE_<FLAG> (upper case, '-' -> '_').
_FLAGS: list[tuple[str, str, Callable[[str], Any], str]] = [
    ("--host", "host", str, "address to listen on"),
    ("--port", "port", parse_port, "port to listen on (0 picks a free one)"),
    ("--store", "store", str, "a directory, file:///abs/path, or s3://BUCKET[/PREFIX]"),
    ("--s3-endpoint-url", "s3_endpoint_url", str, "S3-compatible endpoint (also AWS_ENDPOINT_URL)"),
    ("--s3-region", "s3_region", str, "S3 region"),
    ("--chunk-size", "chunk_size", parse_size, "chunk size for new objects (8MiB, 5MB, bytes)"),
    ("--cache-size", "cache_size", parse_size, "bytes of hot chunks kept in memory"),
    ("--lock-stale-after", "lock_stale_after", parse_duration, "a lock not renewed this long is stale"),
    ("--lock-timeout", "lock_timeout", parse_duration, "how long a request waits for a lock"),
    ("--size-tolerance-bytes", "size_tolerance_bytes", parse_nonneg_int, "accepted chunk size drift in bytes"),
    ("--size-tolerance-ratio", "size_tolerance_ratio", parse_ratio, "accepted chunk size drift as a ratio"),
    ("--auth-token-file", "auth_token_file", str, "a file with one bearer token per line"),
    ("--signing-key", "signing_key", str, "when set, reads need a signed URL"),
    ("--verify-reads", "verify_reads", str,
     "blocks (default: every byte against the manifest's block digests), sha256 (recompute each chunk's SHA-256), or none"),
    ("--write-concurrency", "write_concurrency", parse_nonneg_int, "chunk uploads in flight per PUT"),
    ("--readahead", "readahead", parse_nonneg_int, "chunks fetched ahead of a sequential read"),
    ("--cors-origins", "cors_origins", str, "allowed CORS origins for reads, comma-separated, or *"),
    ("--max-object-size", "max_object_size", parse_size, "largest object accepted"),
    ("--grace", "grace", parse_duration, "how long replaced versions stay readable before deletion"),
    ("--gc-interval", "gc_interval", parse_duration, "run gc inside serve this often (0 = never)"),
    ("--log-format", "log_format", str, "text or json"),
    ("--log-level", "log_level", str, "debug, info, warning, error"),
    ("--shutdown-timeout", "shutdown_timeout", parse_duration, "how long in-flight requests may finish on SIGTERM"),
    ("--body-timeout", "body_timeout", parse_duration, "a request body idle this long is abandoned (408)"),
    ("--upload-expiry", "upload_expiry", parse_duration, "tus uploads expire after this long without progress"),
    ("--locks", "locks", str, "local, store or auto (store for s3, local otherwise)"),
    ("--store-max-concurrency", "store_max_concurrency", parse_nonneg_int, "store requests in flight at most"),
    ("--max-concurrent-uploads", "max_concurrent_uploads", parse_nonneg_int,
     "request bodies (PUT, tus PATCH/POST) received at once; more get 503 + Retry-After (0 = no cap)"),
    ("--max-open-uploads", "max_open_uploads", parse_nonneg_int,
     "tus uploads open at once over all clients; more get 503 (0 = no cap)"),
    ("--max-open-uploads-per-token", "max_open_uploads_per_token", parse_nonneg_int,
     "tus uploads open at once per bearer token (anonymous clients share one count); more get 429 (0 = no cap)"),
    ("--max-upload-metadata", "max_upload_metadata", parse_size,
     "largest tus Upload-Metadata header accepted; larger gets 431 (0 = only the 16KiB header limit)"),
    ("--min-upload-rate", "min_upload_rate", parse_size,
     "bytes/s a request body must average once --body-timeout has passed; slower gets 408 (0 = off)"),
    ("--send-timeout", "send_timeout", parse_duration,
     "a response body the client takes no byte of for this long is closed (0 = never)"),
    ("--min-download-rate", "min_download_rate", parse_size,
     "bytes/s a client must take a response body at, averaged over --send-timeout; slower is closed (0 = off)"),
    ("--store-max-rps", "store_max_rps", float, "store requests per second at most (0 = unlimited)"),
    ("--store-connect-timeout", "store_connect_timeout", parse_duration,
     "a store request whose connection is not up within this long fails (and is retried)"),
    ("--store-read-timeout", "store_read_timeout", parse_duration,
     "a store request that receives no byte for this long fails (and is retried)"),
    ("--store-timeout", "store_timeout", parse_duration,
     "a store operation (retries included) not done within this long fails: 504 store_timeout (0 = no deadline)"),
    ("--active-content", "active_content", str,
     "how uploads that are not media are served: sandbox (default), attachment, or inline (only on a host of its own)"),
    ("--hook-url", "hook_url", str, "POST pre-create, post-finish and post-delete events (JSON) to this http(s) URL"),
    ("--hook-timeout", "hook_timeout", parse_duration, "how long one hook request may take"),
    ("--hook-retry-max", "hook_retry_max", parse_duration,
     "a failed post-* delivery is retried with exponential backoff up to this long between attempts"),
    ("--hook-scan-interval", "hook_scan_interval", parse_duration,
     "how often the store's undelivered post-* events are listed; an event this old is taken over from its gateway"),
    ("--fault-rate", "fault_rate", parse_ratio, "DEBUG: inject store faults into this share of store calls"),
    ("--fault-kinds", "fault_kinds", str, "DEBUG: comma-separated error, throttle, latency, truncate, or all"),
]


def env_name(flag: str) -> str:
    return "CHUNKGATE_" + flag.lstrip("-").upper().replace("-", "_")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, dest, _parser, help_text in _FLAGS:
        parser.add_argument(flag, dest=dest, default=None, help=f"{help_text} [env {env_name(flag)}]")
    parser.add_argument("--auth-token", dest="auth_token", action="append", default=None,
                        help=f"bearer token that may write and administer (repeatable) [env {env_name('--auth-token')}, comma-separated]")
    parser.add_argument("--allow-anonymous-writes", dest="allow_anonymous_writes", action="store_const", const="true",
                        default=None,
                        help=f"permit writes without tokens on a non-loopback host [env {env_name('--allow-anonymous-writes')}]")


def resolve(ns: argparse.Namespace, environ: dict[str, str] | None = None) -> ServeConfig:
    """Flags win over environment variables, which win over defaults."""
    env = os.environ if environ is None else environ
    cfg = ServeConfig()
    specs = _FLAGS + [("--allow-anonymous-writes", "allow_anonymous_writes", parse_bool, "")]
    for flag, dest, parse, _ in specs:
        raw = getattr(ns, dest, None)
        if raw is None:
            raw = env.get(env_name(flag))
        if raw is None:
            continue
        try:
            setattr(cfg, dest, parse(raw))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{flag}: {exc}") from None
    tokens = list(ns.auth_token or [])
    if not tokens and env.get(env_name("--auth-token")):
        tokens = [t.strip() for t in env[env_name("--auth-token")].split(",") if t.strip()]
    if cfg.auth_token_file:
        try:
            with open(cfg.auth_token_file, encoding="utf-8") as fh:
                tokens += [line.strip() for line in fh if line.strip() and not line.startswith("#")]
        except OSError as exc:
            raise ConfigError(f"--auth-token-file: cannot read {cfg.auth_token_file}: {exc.strerror}") from None
    cfg.auth_token = tokens
    if cfg.s3_endpoint_url is None:
        cfg.s3_endpoint_url = env.get("AWS_ENDPOINT_URL") or None
    cfg.hook_url = cfg.hook_url or None  # CHUNKGATE_HOOK_URL= (empty) means no hooks
    validate(cfg)
    return cfg


def validate(cfg: ServeConfig) -> None:
    if cfg.chunk_size < 1024:
        raise ConfigError("--chunk-size: must be at least 1KiB")
    if cfg.chunk_size > 5 * 1024**3:
        raise ConfigError("--chunk-size: must be at most 5GiB (the S3 object limit)")
    if cfg.lock_stale_after <= 0:
        raise ConfigError("--lock-stale-after: must be positive")
    if cfg.lock_timeout <= 0:
        raise ConfigError("--lock-timeout: must be positive")
    if cfg.verify_reads not in ("blocks", "sha256", "none"):
        raise ConfigError("--verify-reads: must be blocks, sha256 or none")
    if cfg.active_content not in ACTIVE_CONTENT_MODES:
        raise ConfigError("--active-content: must be sandbox, attachment or inline")
    if cfg.log_format not in ("text", "json"):
        raise ConfigError("--log-format: must be text or json")
    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError("--log-level: must be debug, info, warning or error")
    if cfg.locks not in ("auto", "local", "store"):
        raise ConfigError("--locks: must be local, store or auto")
    if cfg.write_concurrency < 1:
        raise ConfigError("--write-concurrency: must be at least 1")
    if not cfg.store:
        raise ConfigError("--store: must not be empty")
    if cfg.send_timeout < 0:
        raise ConfigError("--send-timeout: must not be negative")
    if cfg.store_connect_timeout <= 0:
        raise ConfigError("--store-connect-timeout: must be positive")
    if cfg.store_read_timeout <= 0:
        raise ConfigError("--store-read-timeout: must be positive")
    if cfg.store_timeout < 0:
        raise ConfigError("--store-timeout: must not be negative")
    if cfg.store_max_rps < 0:
        raise ConfigError("--store-max-rps: must not be negative")
    fault_kinds = {k.strip() for k in cfg.fault_kinds.split(",") if k.strip()} - {"all"}
    if fault_kinds - {"error", "throttle", "latency", "truncate"}:
        raise ConfigError("--fault-kinds: must be a comma-separated list of error, throttle, latency, truncate, or all")
    if cfg.hook_url is not None:
        parsed = urllib.parse.urlsplit(cfg.hook_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(f"--hook-url: {cfg.hook_url!r} is not an http:// or https:// URL")
    if cfg.hook_timeout <= 0:
        raise ConfigError("--hook-timeout: must be positive")
    if cfg.hook_retry_max <= 0:
        raise ConfigError("--hook-retry-max: must be positive")
    if cfg.hook_scan_interval <= 0:
        raise ConfigError("--hook-scan-interval: must be positive")
    if not is_loopback(cfg.host) and not cfg.auth_token and not cfg.allow_anonymous_writes:
        raise ConfigError(
            f"--host: {cfg.host} is not a loopback address; set --auth-token (or --allow-anonymous-writes) to serve on it"
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_serve_args(argv: Sequence[str], environ: dict[str, str] | None = None) -> ServeConfig:
    parser = argparse.ArgumentParser(prog="chunkgate serve")
    add_serve_arguments(parser)
    return resolve(parser.parse_args(list(argv)), environ)
