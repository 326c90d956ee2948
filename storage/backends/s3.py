"""The S3 backend: AWS S3 or any S3-compatible server (SeaweedFS, moto, MinIO...).

One boto3 client, shared by a bounded thread pool (boto3 clients are thread-safe; creating one
per call is slow and leaks connection pools). botocore's own "standard" retry mode retries
throttling, 5xx and connection errors with backoff; whatever still fails is mapped to the typed
errors of ``storage.backends.base`` in ``_map_error``.

This module must never return a short body as success, never put a key the bucket would
truncate or reject (checked before calling S3), and never block the event loop.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Callable, TypeVar

import boto3
import botocore.exceptions
from botocore.config import Config

from storage.backends.base import (
    BackendError,
    Blob,
    InvalidKey,
    NotFound,
    ObjectInfo,
    PermanentError,
    PreconditionFailed,
    TransientError,
)
from storage.keys import BadKey, MAX_KEY_BYTES, validate_key

T = TypeVar("T")

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}
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
        if code in _PERMANENT_CODES:
            return PermanentError(message)
        if code in _NOT_FOUND_CODES or status == 404:
            return NotFound(message)
        if code in _PRECONDITION_CODES or status in (409, 412):
            return PreconditionFailed(message)
        if code in _TRANSIENT_CODES or status in (429, 500, 502, 503, 504):
            return TransientError(message, retry_after=_retry_after(meta.get("HTTPHeaders", {})))
        return PermanentError(message)
    if isinstance(exc, _TRANSIENT_BOTOCORE):
        return TransientError(f"{what}: {exc}")
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return PermanentError(f"{what}: no AWS credentials found (set AWS_ACCESS_KEY_ID or a profile)")
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return PermanentError(f"{what}: {exc}")
    raise exc


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
        config = Config(
            retries={"mode": "standard", "max_attempts": max_attempts},
            max_pool_connections=max_workers + 4,
            # Third-party servers (SeaweedFS) reject the default CRC trailers on uploads.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            # Virtual-host addressing needs DNS for BUCKET.host, which custom endpoints lack.
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        self._client: Any = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=config
        )
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="s3-store")
        self._page_size = list_page_size
        self._closed = False
        # Set by storage.probe: SeaweedFS stores 'a\\b' as 'a/b', which would give two keys one value.
        self.refuse_backslashes = False

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
            except Exception as exc:  # noqa: BLE001 - map_error re-raises what it does not know
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
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._store_key(key)}
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

    async def get(self, key: str, *, start: int = 0, end: int | None = None) -> Blob:
        if start < 0 or (end is not None and end < start):
            raise ValueError(f"bad byte range [{start}, {end})")
        if end == start:
            info = await self.head(key)
            return Blob(b"", info.size, info.etag)
        return await self._call(f"get {key!r}", self._get_sync, key=key, start=start, end=end)

    async def head(self, key: str) -> ObjectInfo:
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
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._store_key(key)}
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
