"""gateway/errors.py: every typed error a handler may raise answers from one table, object and
tus routes alike (status, JSON code and message, headers); anything else is a 500 for a bug."""

from __future__ import annotations

import json

import pytest

from gateway.errors import HTTPError, to_response
from storage import errors as se
from storage.backends.base import PermanentError, StoreFull, TransientError
from storage.backends.deadline import StoreTimeout
from storage.keys import BadKey
from storage.locks import LeaseLost, LockTimeout
from storage.quota import OpenUploadsFull, TooManyOpenUploads
from storage.uploads import (
    BadUploadRequest,
    OffsetMismatch,
    UploadChecksumMismatch,
    UploadConflict,
    UploadGone,
    UploadInterrupted,
    UploadNotFound,
    UploadTooLarge,
)


def answer(exc: BaseException) -> tuple[int, str, dict[str, str]]:
    response = to_response(exc)
    assert response is not None, exc
    body = json.loads(response.body)
    assert set(body) == {"error", "message"} and body["message"], body
    headers = {k: v for k, v in response.headers.items() if k in ("Retry-After", "Upload-Offset")}
    return response.status, body["error"], headers


CASES = [
    (HTTPError(418, "teapot", "short and stout", headers={"Retry-After": "3"}), 418, "teapot", {"Retry-After": "3"}),
    (BadKey("a key may not be empty"), 400, "bad_key", {}),
    (LockTimeout("k", 20.0), 503, "lock_timeout", {"Retry-After": "1"}),
    (LeaseLost("k", 3), 409, "conflict", {}),
    (se.StoreTimedOut("slow", retry_after=1.0), 504, "store_timeout", {"Retry-After": "1"}),
    (se.StoreUnavailable("down", retry_after=7.2), 503, "store_unavailable", {"Retry-After": "8"}),
    (se.StoreUnavailable("down"), 503, "store_unavailable", {"Retry-After": "1"}),
    (se.UploadStatusUnsettled("lease lost", retry_after=1), 503, "upload_busy", {"Retry-After": "1"}),
    (se.LockLapsed("lease lost before the commit", retry_after=1), 503, "lock_lapsed", {"Retry-After": "1"}),
    (se.StoreFull("no room"), 507, "store_full", {}),
    (se.StoreFailed("refused"), 502, "store_error", {}),
    (se.CorruptManifest("garbled"), 502, "corrupt_manifest", {}),
    (se.ObjectNotFound("no such"), 404, "not_found", {}),
    (se.PreconditionNotMet("etag"), 412, "precondition_failed", {}),
    (se.BodyTooLarge("big"), 413, "too_large", {}),
    (se.CommitConflict("busy"), 409, "conflict", {}),
    # tus statuses, from the same table
    (OffsetMismatch("offset is 10", offset=10), 409, "offset_mismatch", {"Upload-Offset": "10"}),
    (UploadInterrupted("stopped", offset=4), 409, "upload_interrupted", {"Upload-Offset": "4"}),
    (UploadGone("finished"), 410, "gone", {}),
    (UploadChecksumMismatch("bad sum"), 460, "checksum_mismatch", {}),
    (UploadNotFound("no upload"), 404, "not_found", {}),
    (UploadTooLarge("past the end"), 413, "too_large", {}),
    (UploadConflict("changed"), 409, "conflict", {}),
    (BadUploadRequest("Upload-Length"), 400, "bad_request", {}),
    (TooManyOpenUploads("cap", retry_after=30.0), 429, "too_many_open_uploads", {"Retry-After": "30"}),
    (OpenUploadsFull("cap", retry_after=60.0), 503, "open_uploads_full", {"Retry-After": "60"}),
    # backend errors that reached HTTP untranslated are still the store's failure
    (TransientError("reset"), 503, "store_unavailable", {"Retry-After": "1"}),
    (StoreTimeout("no answer"), 504, "store_timeout", {"Retry-After": "1"}),
    (StoreFull("ENOSPC"), 507, "store_full", {}),
    (PermanentError("denied"), 502, "store_error", {}),
]


@pytest.mark.parametrize("exc,status,code,headers", CASES, ids=[f"{type(c[0]).__name__}-{c[1]}" for c in CASES])
def test_each_error_answers_from_the_table(exc: BaseException, status: int, code: str, headers: dict[str, str]) -> None:
    assert answer(exc) == (status, code, headers)


@pytest.mark.parametrize("exc", [ValueError("a bug"), KeyError("x"), se.ObjectError("an unmapped storage error")])
def test_anything_else_is_left_for_the_500(exc: BaseException) -> None:
    assert to_response(exc) is None
