"""Errors of the object layer, typed where they arise. The gateway maps them to HTTP in one place
(``gateway.errors``); nothing here knows about status codes."""

from __future__ import annotations


class ObjectError(Exception):
    """Base of object-layer errors. ``code`` is the stable machine-readable error code."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ObjectNotFound(ObjectError):
    code = "not_found"


class PreconditionNotMet(ObjectError):
    """If-Match / If-None-Match on a write did not hold (HTTP 412)."""

    code = "precondition_failed"


class ChecksumMismatch(ObjectError):
    """A client-supplied Content-MD5 / X-Checksum-SHA256 did not match the body (HTTP 400)."""

    code = "checksum_mismatch"


class BadRequest(ObjectError):
    code = "bad_request"


class BodyTooLarge(ObjectError):
    code = "too_large"


class IncompleteBody(ObjectError):
    """The client announced more bytes than it sent (disconnect or stall)."""

    code = "incomplete_body"


class CommitConflict(ObjectError):
    """The writer lost its lease (stale-cleared) or lost the conditional manifest write to
    another writer and the request's semantics forbid retrying (HTTP 409)."""

    code = "conflict"


class StoreUnavailable(ObjectError):
    """The store failed transiently; the client may retry (HTTP 503, Retry-After)."""

    code = "store_unavailable"

    def __init__(self, message: str, *, retry_after: float | None = None, outcome_unknown: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        # True when a write may have landed: its chunks must be left for gc, not deleted.
        self.outcome_unknown = outcome_unknown


class ManifestRepairing(StoreUnavailable):
    """A read met tolerated size drift again after its manifest was repaired once (HTTP 503,
    Retry-After): the repair has not settled yet."""

    code = "chunk_size_drift"


class LockLapsed(StoreUnavailable):
    """A PUT or DELETE whose lease on the key lapsed before it wrote anything: the store did
    not take the lease's renewals in time (it was down or slow), or the request stalled past
    ``--lock-stale-after`` and another one cleared it. Nothing was committed, and the same
    request sent again can succeed: HTTP 503 with Retry-After, not a 409 ("conflict" tells a
    client that trying again will not help)."""

    code = "lock_lapsed"


class UploadStatusUnsettled(StoreUnavailable):
    """A status read (HEAD) lost its lease on the upload before it could answer: the store
    stopped taking the lease's renewals, or another request cleared it as stale. What it read
    may be torn, so no offset is reported; nothing was written. HTTP 503 with Retry-After, not
    the 409 a fenced PATCH gets: a 4xx to HEAD says the upload cannot be resumed
    (tus-js-client then removes it from its URL storage), a 503 that the store or a lock was in
    the way this once (the upload is there; ask again)."""

    code = "upload_busy"


class StoreTimedOut(StoreUnavailable):
    """The store did not answer within ``--store-timeout`` (HTTP 504, Retry-After). A write's
    outcome is unknown: it may still land, so nothing it may have made reachable is deleted."""

    code = "store_timeout"


class StoreFailed(ObjectError):
    """The store failed permanently or returned something we cannot use (HTTP 502)."""

    code = "store_error"


class StoreFull(StoreFailed):
    """The store has no room for a write (a full disk or a quota). Nothing was committed and
    retrying cannot help until space is freed (HTTP 507, no Retry-After)."""

    code = "store_full"


class ChunkRejected(StoreFailed):
    """A chunk's stored bytes contradict its manifest beyond tolerance, or its SHA-256 differs
    at the exact size. Never served."""

    code = "chunk_corrupt"

    def __init__(self, message: str, *, key: str, index: int, expected: int, actual: int) -> None:
        super().__init__(message)
        self.key, self.index, self.expected, self.actual = key, index, expected, actual


class ChunkSizeDrift(ObjectError):
    """A chunk's stored size differs from the manifest within tolerance. The manifest has been
    (or is being) repaired; a response whose headers used the old size must not go on."""

    code = "chunk_size_drift"

    def __init__(self, message: str, *, key: str, index: int, expected: int, actual: int) -> None:
        super().__init__(message)
        self.key, self.index, self.expected, self.actual = key, index, expected, actual


class CorruptManifest(StoreFailed):
    code = "corrupt_manifest"


def from_backend(exc: BaseException, what: str) -> Exception:
    """The object-layer error for a backend error raised while doing ``what`` (the one place
    backend errors are translated; ``what`` completes "the store failed ..."). ``NotFound`` and
    ``PreconditionFailed`` are answers, not failures: callers handle them before calling this."""
    from storage.backends.base import InvalidKey, PermanentError, TransientError
    from storage.backends.base import StoreFull as BackendStoreFull
    from storage.backends.deadline import StoreTimeout
    from storage.keys import BadKey

    if isinstance(exc, ObjectError):
        return exc
    if isinstance(exc, StoreTimeout):
        return StoreTimedOut(f"the store did not answer in time {what}: {exc}", retry_after=1.0)
    if isinstance(exc, TransientError):
        return StoreUnavailable(f"the store failed {what}: {exc}", retry_after=exc.retry_after)
    if isinstance(exc, (InvalidKey, BadKey)):
        # API.md allows 1024-byte keys, but an S3 store adds its prefix and the records their
        # 'm/': the client's key, not a store failure (400 bad_key).
        return BadKey(f"this store cannot hold the key ({exc}); use a shorter or simpler key")
    if isinstance(exc, BackendStoreFull):
        return StoreFull(f"the store ran out of space {what or 'writing'} ({exc}); nothing was committed: "
                         "free space on the store, then send the request again")
    if isinstance(exc, PermanentError):
        return StoreFailed(f"the store refused {what}: {exc}")
    return StoreFailed(f"the store gave an unexpected answer {what}: {exc}")


# ------------------------------------------------------------------------------------ uploads
# The tus upload sessions' errors (``storage.uploads``), mapped to HTTP by ``gateway.errors``.
class UploadNotFound(ObjectNotFound):
    code = "not_found"


class UploadGone(ObjectError):
    """The upload was terminated or has expired (HTTP 410)."""

    code = "gone"


class OffsetMismatch(ObjectError):
    """The request's Upload-Offset is not the durable offset; nothing was changed (HTTP 409)."""

    code = "offset_mismatch"

    def __init__(self, message: str, *, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


class UploadChecksumMismatch(ObjectError):
    """The PATCH body does not match its Upload-Checksum; it was discarded (tus: HTTP 460)."""

    code = "checksum_mismatch"


class UploadInterrupted(ObjectError):
    """Another request for the upload asked this PATCH to stop before its body was all read,
    and its Upload-Checksum covers the whole body, so none of it was kept (HTTP 409 with the
    durable Upload-Offset): the bytes were not wrong, so this is never a 460."""

    code = "upload_interrupted"

    def __init__(self, message: str, *, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


class BodyInterrupted(Exception):
    """Raised by a PATCH body iterator that stops early because another request asked for the
    upload's lock (``Lease.release_requested``)."""


class UploadTooLarge(BodyTooLarge):
    code = "too_large"


class UploadConflict(CommitConflict):
    """The upload changed underneath this request (another holder wrote); nothing more was
    written. HEAD tells the durable offset."""

    code = "conflict"


class BadUploadRequest(BadRequest):
    code = "bad_request"
