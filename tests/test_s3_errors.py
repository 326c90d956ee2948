"""How the S3 backend types what boto3/botocore and obstore raise (storage/backends/s3.py): the
gateway's status for a store failure follows from these types, in one table (gateway/errors.py)."""

from __future__ import annotations

import botocore.exceptions
import pytest

from storage.backends.base import InvalidKey, NotFound, PermanentError, PreconditionFailed, StoreFull, TransientError
from storage.backends.deadline import StoreTimeout
from storage.backends.s3 import map_error


def client_error(code: str, status: int, headers: dict[str, str] | None = None) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": headers or {}}},
        "PutObject")


@pytest.mark.parametrize("code,status,expected", [
    ("NoSuchKey", 404, NotFound),
    ("", 404, NotFound),
    ("PreconditionFailed", 412, PreconditionFailed),
    ("ConditionalRequestConflict", 409, PreconditionFailed),
    ("SlowDown", 503, TransientError),
    ("InternalError", 500, TransientError),
    ("", 502, TransientError),
    ("KeyTooLongError", 400, InvalidKey),
    ("AccessDenied", 403, PermanentError),
    ("XMinioStorageFull", 507, StoreFull),  # a full store: 507 to the client, no Retry-After
    ("", 507, StoreFull),
    ("EntityTooLarge", 400, PermanentError),  # a per-object limit, not a full store
])
def test_client_errors_are_typed(code: str, status: int, expected: type) -> None:
    got = map_error(client_error(code, status), "putting x")
    assert type(got) is expected, got
    assert "putting x" in str(got)


def test_throttling_carries_the_stores_retry_after() -> None:
    got = map_error(client_error("SlowDown", 503, {"retry-after": "7"}), "putting x")
    assert isinstance(got, TransientError) and got.retry_after == 7


def test_client_timeouts_are_store_timeouts() -> None:
    got = map_error(botocore.exceptions.ReadTimeoutError(endpoint_url="http://s3"), "getting x")
    assert isinstance(got, StoreTimeout)
    got = map_error(botocore.exceptions.ConnectTimeoutError(endpoint_url="http://s3"), "getting x")
    assert isinstance(got, StoreTimeout)


def test_a_dropped_connection_is_transient() -> None:
    got = map_error(botocore.exceptions.EndpointConnectionError(endpoint_url="http://s3"), "getting x")
    assert type(got) is TransientError
