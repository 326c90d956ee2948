"""The S3 backend: AWS S3 or any S3-compatible server (SeaweedFS, moto, MinIO...).

Two clients over the same bucket, each for what it does best (ops/bench and NOTES.md have the
figures):
- obstore (Rust ``object_store``, async, no thread hop) for get/put/head/delete of keys made of
  plain characters — every chunk, manifest and lease key the object layer writes for ordinary
  object names. On this workload it used about half the client CPU of boto3 per uploaded byte
  (0.45 vs 0.9 CPU-s/GiB, without payload hashing for either) and answered 64 KiB ranged GETs
  ~2 ms sooner, and a ``get(view=True)`` hands its buffer over without a copy. Payloads are sent
  UNSIGNED-PAYLOAD: the object layer already hashes every byte once (storage.hashing) and checks
  it on every read; botocore's SigV4 payload hash was a second full SHA-256 pass.
- boto3 (in a bounded thread pool; clients are thread-safe) for listing, the bucket check, and
  keys with other characters: object_store's paths percent-encode some characters that boto3
  sends as they are, so such a key must go through the client that wrote it in earlier releases.
Both retry throttling, 5xx and connection errors themselves (botocore "standard" mode, object
store's RetryConfig with the same attempt count); whatever still fails is mapped to the typed
errors of ``storage.backends.base`` in ``map_error`` / ``map_obstore_error``.

This module must never return a short body as success, never put a key the bucket would
truncate or reject (checked before calling S3), and never block the event loop.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, TypeVar

import boto3
import botocore.exceptions

import obstore.exceptions as obx
from botocore.config import Config
from obstore.store import S3Store

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
from storage.backends.deadline import StoreTimeout
from storage.keys import BadKey, MAX_KEY_BYTES, validate_key

if TYPE_CHECKING:  # obstore's option types exist in its stubs only
    from obstore._get import GetOptions
    from obstore._store import ClientConfig

T = TypeVar("T")

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}
# The store has no room (MinIO documents XMinioStorageFull as HTTP 507 Insufficient Storage):
# a refusal, nothing landed, retried only once space is freed. EntityTooLarge is not one (a
# per-object limit).
_FULL_CODES = {"XMinioStorageFull", "InsufficientStorage"}
_TRANSIENT_CODES = {
    "SlowDown", "RequestTimeout", "RequestTimeoutException", "InternalError",
    "ServiceUnavailable", "Throttling", "ThrottlingException", "RequestLimitExceeded",
    "PriorRequestNotComplete", "TooManyRequestsException",
}
_PERMANENT_CODES = {"NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
# Failures of the connection itself, after botocore's retries gave up.
_TRANSIENT_BOTOCORE = (
    botocore.exceptions.ConnectionError,  # endpoint, connect/read timeouts, closed connections
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.ResponseStreamingError,
)


def _retry_after(headers: dict[str, str]) -> float | None:
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


# Keys obstore sends exactly as boto3 does (no percent-encoding differences): see the docstring.
_PLAIN_KEY = re.compile(r"[A-Za-z0-9._/-]+")
_STATUS = re.compile(r"status code: (\d{3})")
_S3_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")


class _Throttled(Exception):
    """obstore gave up on a 429/503: its errors do not carry the store's Retry-After, so the
    call is made once more through boto3, whose error does (and which backs off itself)."""


def map_obstore_error(exc: Exception, what: str) -> BackendError:
    """The typed backend error for an obstore exception raised while doing ``what``."""
    if isinstance(exc, BackendError):
        return exc
    text = str(exc)
    first_line = text.split("\n", 1)[0][:500]
    code_match = _S3_CODE.search(text)
    code = code_match.group(1) if code_match else ""
    message = f"{what}: {code + ' ' if code else ''}{first_line}"
    if code == "KeyTooLongError":
        return InvalidKey(message)
    if code in _PERMANENT_CODES or isinstance(exc, (obx.PermissionDeniedError, obx.UnauthenticatedError)):
        return PermanentError(message)
    if isinstance(exc, (obx.NotFoundError, FileNotFoundError)):  # obstore raises the builtin
        return NotFound(message)
    if isinstance(exc, (obx.PreconditionError, obx.AlreadyExistsError)):
        return PreconditionFailed(message)
    if isinstance(exc, obx.InvalidPathError):
        return InvalidKey(message)
    status_match = _STATUS.search(text)
    status = int(status_match.group(1)) if status_match else 0
    if code in _FULL_CODES or status == 507:
        return StoreFull(message)
    if not status and "kind: Timeout" in text:  # reqwest's connect/read/request timeout, after retries
        return StoreTimeout(f"{what}: the store did not answer in time: {first_line}")
    if status in (429, 503):
        raise _Throttled(message) from exc
    if code in _TRANSIENT_CODES or status in (408, 429) or status >= 500 or status == 0:
        return TransientError(message)  # 0: no answer at all (connection refused, reset, timeout)
    return PermanentError(message)


async def _fast_call(what: str, call: Any) -> Any:
    try:
        return await call
    except Exception as exc:  # map_obstore_error types every failure
        raise map_obstore_error(exc, what) from exc


def map_error(exc: Exception, what: str) -> BackendError:
    """The typed backend error for a boto3/botocore exception raised while doing ``what``."""
    if isinstance(exc, BackendError):
        return exc
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        meta = exc.response.get("ResponseMetadata", {})
        status = int(meta.get("HTTPStatusCode") or 0)
        message = f"{what}: {code or status} {error.get('Message', '')}".rstrip()
        if code == "KeyTooLongError":
            # AWS caps keys at 1024 bytes (checked before calling), SeaweedFS each segment at 255.
            return InvalidKey(message)
        if code in _FULL_CODES or status == 507:
            return StoreFull(message)
        if code in _PERMANENT_CODES:
            return PermanentError(message)
        if code in _NOT_FOUND_CODES or status == 404:
            return NotFound(message)
        if code in _PRECONDITION_CODES or status in (409, 412):
            return PreconditionFailed(message)
        if code in _TRANSIENT_CODES or status in (429, 500, 502, 503, 504):
            return TransientError(message, retry_after=_retry_after(meta.get("HTTPHeaders", {})))
        return PermanentError(message)
    if isinstance(exc, (botocore.exceptions.ConnectTimeoutError, botocore.exceptions.ReadTimeoutError)):
        return StoreTimeout(f"{what}: the store did not answer in time: {exc}")
    if isinstance(exc, _TRANSIENT_BOTOCORE):
        return TransientError(f"{what}: {exc}")
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return PermanentError(f"{what}: no AWS credentials found (set AWS_ACCESS_KEY_ID or a profile)")
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return PermanentError(f"{what}: {exc}")
    raise exc


def _boto_config(endpoint_url: str | None, max_workers: int, max_attempts: int, connect_timeout: float,
                 read_timeout: float, total_timeout: float) -> Config:
    # Timeouts per request, so a store that accepts connections and never answers fails in
    # seconds, not botocore's 60 s x 5 attempts (storage.backends.deadline bounds the whole
    # operation on top). The read timeout is between two received bytes, not for a whole
    # body: a slow but moving 8 MiB chunk is not a stalled store.
    # botocore has no deadline of its own: attempts that cannot fit in --store-timeout would
    # keep a worker thread waiting for an answer nobody awaits any more (a stalled store
    # held each for 5 x the read timeout plus backoff, and the pool has max_workers).
    boto_attempts = max_attempts
    if total_timeout > 0:
        boto_attempts = max(2, min(max_attempts, int(total_timeout // (connect_timeout + read_timeout)) + 1))
    return Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"mode": "standard", "max_attempts": boto_attempts},
        max_pool_connections=max_workers + 4,
        # Third-party servers (SeaweedFS) reject the default CRC trailers on uploads.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        # Virtual-host addressing needs DNS for BUCKET.host, which custom endpoints lack.
        s3={"addressing_style": "path"} if endpoint_url else None,
    )


class S3Backend:
    """``Backend`` over one bucket, every key stored as ``prefix + key``."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_workers: int = 16,
        max_attempts: int = 5,
        list_page_size: int = 1000,
        connect_timeout: float = 3.0,
        read_timeout: float = 10.0,
        total_timeout: float = 30.0,
    ) -> None:
        self.bucket = bucket
        # "p" and "p/" name the same prefix; without the '/' a prefix "p" would also see "pq/...".
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.name = f"s3://{bucket}/{self.prefix}".rstrip("/")
        endpoint_url = (
            endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )
        self.endpoint_url = endpoint_url
        session = boto3.session.Session()
        config = _boto_config(endpoint_url, max_workers, max_attempts, connect_timeout, read_timeout, total_timeout)
        self._client: Any = session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="s3-store")
        self._credentials = session.get_credentials()  # botocore's chain: env, profile, IMDS...
        self._fast: S3Store | None = None
        self._fast_reads: S3Store | None = None
        if self._credentials is not None:
            self._fast, self._fast_reads = self._obstore_clients(bucket, endpoint_url, max_workers, max_attempts,
                                                                 connect_timeout, read_timeout, total_timeout)
        self._page_size = list_page_size
        self._closed = False
        # Set by storage.probe: SeaweedFS stores 'a\\b' as 'a/b', which would give two keys one value.
        self.refuse_backslashes = False


    def _obstore_clients(self, bucket: str, endpoint_url: str | None, max_workers: int, max_attempts: int,
                         connect_timeout: float, read_timeout: float, total_timeout: float) -> tuple[S3Store, S3Store]:
        """obstore clients for writes and for reads (see below why two), sharing botocore's credentials."""
        options: dict[str, Any] = {}
        if endpoint_url:
            options["endpoint"] = endpoint_url
            options["virtual_hosted_style_request"] = False
        client_options: ClientConfig = {
            "allow_http": True, "pool_max_idle_per_host": str(max_workers + 4),
            "connect_timeout": timedelta(seconds=connect_timeout),
        }
        if total_timeout > 0:  # one request (its body included) never outlives the deadline
            client_options["timeout"] = timedelta(seconds=total_timeout)

        def fast_store(extra: ClientConfig) -> S3Store:
            return S3Store(
                bucket,
                region=self._client.meta.region_name or "us-east-1",
                client_options={**client_options, **extra},
                conditional_put="etag",
                unsigned_payload=True,
                credential_provider=self._credentials_now,  # type: ignore[arg-type]
                # Retries stop starting once the deadline would be over (default: 3 minutes).
                retry_config={"max_retries": max_attempts - 1,
                              "retry_timeout": timedelta(seconds=total_timeout if total_timeout > 0 else 60)},
                **options,
            )

        writes = fast_store({})
        # reqwest's read timeout also runs while a request body is being sent (no answer can
        # come before it is all sent): on writes it would cut off an 8 MiB chunk that takes
        # longer than --store-read-timeout to upload. So only reads (whose bodies come back)
        # get it, from a client of their own; writes are bounded by the request timeout.
        return writes, fast_store({"read_timeout": timedelta(seconds=read_timeout)})

    def _credentials_now(self) -> dict[str, Any]:
        """obstore asks for credentials when it needs them; botocore's refresh them (roles)."""
        frozen = self._credentials.get_frozen_credentials()
        creds: dict[str, Any] = {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key,
                                 "expires_at": datetime.now(timezone.utc) + timedelta(minutes=5)}
        if frozen.token:
            creds["token"] = frozen.token
        return creds

    def _fast_for(self, store_key: str, *, reading: bool = False) -> S3Store | None:
        if self._closed:
            raise PermanentError(f"{self.name} is closed")
        fast = self._fast_reads if reading else self._fast
        return fast if fast is not None and _PLAIN_KEY.fullmatch(store_key) else None

    def _store_key(self, key: str) -> str:
        try:
            validate_key(key)
        except BadKey as exc:
            raise InvalidKey(f"{key!r}: {exc}") from None
        if self.refuse_backslashes and "\\" in key:
            raise InvalidKey(f"{key!r}: this store turns backslashes into '/', so the key cannot be held as itself")
        full = self.prefix + key
        size = len(full.encode("utf-8"))
        if size > MAX_KEY_BYTES:
            raise InvalidKey(f"{key!r}: {size} bytes with the prefix; S3 allows {MAX_KEY_BYTES}")
        return full

    async def _call(self, what: str, fn: Callable[..., T], **kwargs: Any) -> T:
        if self._closed:
            raise PermanentError(f"{self.name} is closed")

        def run() -> T:
            try:
                return fn(**kwargs)
            except Exception as exc:  # map_error re-raises what it does not know
                raise map_error(exc, what) from exc

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    async def put(
        self,
        key: str,
        data: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        store_key = self._store_key(key)
        fast = self._fast_for(store_key)
        if fast is not None:
            try:
                return await self._put_fast(fast, key, store_key, data, if_none_match, if_match)
            except _Throttled:
                pass
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": store_key}
        # Copy a mutable buffer now: the caller may reuse it while the thread still sends.
        args["Body"] = bytes(data)
        if if_none_match:
            args["IfNoneMatch"] = "*"
        if if_match is not None:
            args["IfMatch"] = if_match
        try:
            response = await self._call(f"put {key!r}", self._client.put_object, **args)
        except NotFound as exc:
            # S3 answers If-Match on an absent key with 404; the contract calls that a lost condition.
            raise PreconditionFailed(str(exc)) from exc
        return str(response["ETag"])

    async def _put_fast(self, fast: S3Store, key: str, store_key: str, data: bytes, if_none_match: bool,
                        if_match: str | None) -> str:
        mode: Any = "create" if if_none_match else ({"e_tag": if_match} if if_match is not None else "overwrite")
        # A mutable buffer is copied now: the caller may reuse it while the request still sends.
        # A read-only view is the caller's promise that it does not change until put returns
        # (storage.buffers lends chunk buffers that way): sent as it is, without a copy.
        body = data if isinstance(data, bytes) or (isinstance(data, memoryview) and data.readonly) else bytes(data)
        try:
            result = await fast.put_async(store_key, body, mode=mode, use_multipart=False)
        except Exception as exc:  # map_obstore_error types every failure
            raise map_obstore_error(exc, f"put {key!r}") from exc
        return str(result["e_tag"])

    async def _get_fast(self, fast: S3Store, key: str, store_key: str, start: int, end: int | None, view: bool) -> Blob:
        options: GetOptions = {}
        if start or end is not None:
            options["range"] = (start, end) if end is not None else {"offset": start}
        try:
            result = await fast.get_async(store_key, options=options)
            data = await result.bytes_async()
        except Exception as exc:
            mapped = map_obstore_error(exc, f"get {key!r}")
            if "InvalidRange" not in str(exc):
                raise mapped from exc
            # 416: the range starts at or past the end (or the value is empty): say how big it is.
            info = await self.head(key)
            if start < info.size:
                raise TransientError(f"get {key!r}: the value changed while being read") from exc
            return Blob(b"", info.size, info.etag)
        meta = result.meta
        first, last = result.range
        if first != start or last - first != len(data) or (end is not None and last > end):
            raise TransientError(f"get {key!r}: the store answered bytes [{first}, {last}) for [{start}, {end})")
        payload: Any = memoryview(data) if view else bytes(data)
        return Blob(payload, int(meta["size"]), str(meta["e_tag"]))

    def _get_sync(self, key: str, start: int, end: int | None) -> Blob:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._store_key(key)}
        if start or end is not None:
            args["Range"] = f"bytes={start}-" + ("" if end is None else str(end - 1))
        try:
            response = self._client.get_object(**args)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "InvalidRange":
                raise
            # 416: the range starts at or past the end (or the value is empty): say how big it is.
            head = self._client.head_object(Bucket=args["Bucket"], Key=args["Key"])
            if start < int(head["ContentLength"]):
                raise TransientError(f"get {key!r}: the value changed while being read") from exc
            return Blob(b"", int(head["ContentLength"]), str(head["ETag"]))
        body = response["Body"]
        try:
            data = body.read()
        finally:
            body.close()
        announced = int(response["ContentLength"])
        if len(data) != announced:
            raise TransientError(f"short read of {key!r}: {len(data)} of {announced} bytes")
        match = _CONTENT_RANGE.fullmatch(response.get("ContentRange") or "")
        if match:
            first, last, total = match.groups()
            if int(first) != start or int(last) - int(first) + 1 != len(data) or total == "*":
                raise TransientError(f"get {key!r}: unexpected Content-Range {match.group(0)}")
            size = int(total)
        else:
            # Whole value: no Range sent, or a server that ignored it; cut the range ourselves.
            size = len(data)
            data = data[start:end]
        return Blob(data, size, str(response["ETag"]))

    async def get(self, key: str, *, start: int = 0, end: int | None = None, view: bool = False) -> Blob:
        if start < 0 or (end is not None and end < start):
            raise ValueError(f"bad byte range [{start}, {end})")
        if end == start:
            info = await self.head(key)
            return Blob(b"", info.size, info.etag)
        store_key = self._store_key(key)
        fast = self._fast_for(store_key, reading=True)
        if fast is not None:
            try:
                return await self._get_fast(fast, key, store_key, start, end, view)
            except _Throttled:
                pass
        return await self._call(f"get {key!r}", self._get_sync, key=key, start=start, end=end)

    async def head(self, key: str) -> ObjectInfo:
        store_key = self._store_key(key)
        fast = self._fast_for(store_key, reading=True)
        meta: Any = None
        if fast is not None:
            try:
                meta = await _fast_call(f"head {key!r}", fast.head_async(store_key))
            except _Throttled:
                pass
        if meta is not None:
            return ObjectInfo(key, int(meta["size"]), str(meta["e_tag"]), meta["last_modified"].astimezone(timezone.utc))
        response = await self._call(
            f"head {key!r}", self._client.head_object, Bucket=self.bucket, Key=self._store_key(key)
        )
        return ObjectInfo(
            key,
            int(response["ContentLength"]),
            str(response["ETag"]),
            response["LastModified"].astimezone(timezone.utc),
        )

    async def delete(self, key: str, *, if_match: str | None = None) -> None:
        # S3 DELETE is already idempotent: an absent key answers 204. If-Match on DeleteObject is
        # honoured by AWS, SeaweedFS 4.48 and moto 5 (storage.probe checks it at startup).
        store_key = self._store_key(key)
        fast = self._fast_for(store_key) if if_match is None else None  # object_store has no conditional delete
        if fast is not None:
            try:
                await _fast_call(f"delete {key!r}", fast.delete_async(store_key))
                return
            except _Throttled:
                pass
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": store_key}
        if if_match is not None:
            args["IfMatch"] = if_match
        try:
            await self._call(f"delete {key!r}", self._client.delete_object, **args)
        except NotFound as exc:
            if if_match is None:
                return
            raise PreconditionFailed(str(exc)) from exc

    def check_key(self, key: str) -> None:
        self._store_key(key)

    async def list(
        self, prefix: str = "", *, start_after: str | None = None
    ) -> AsyncIterator[ObjectInfo]:
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": self.prefix + prefix,
            "MaxKeys": self._page_size,
        }
        if start_after is not None:
            args["StartAfter"] = self.prefix + start_after
        while True:
            page = await self._call(f"list {prefix!r}", self._client.list_objects_v2, **args)
            for item in page.get("Contents", []):
                yield ObjectInfo(
                    item["Key"][len(self.prefix) :],
                    int(item["Size"]),
                    str(item["ETag"]),
                    item["LastModified"].astimezone(timezone.utc),
                )
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            args["ContinuationToken"] = token

    def _check_sync(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404:
                raise PermanentError(f"S3 bucket {self.bucket!r} does not exist") from None
            if status in (401, 403):
                raise PermanentError(
                    f"S3 bucket {self.bucket!r}: access denied (check the AWS credentials)"
                ) from None
            raise

    async def check(self) -> None:
        """Raise ``PermanentError`` naming the problem if the bucket is missing or refuses us
        (``TransientError`` if the endpoint cannot be reached)."""
        await self._call(f"check {self.name}", self._check_sync)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        self._client.close()
