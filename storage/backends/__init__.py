"""Store backends behind the one protocol in ``base``, and the wrappers that stack on them."""

from storage.backends.base import (  # noqa: F401
    Backend,
    BackendError,
    Blob,
    InvalidKey,
    NotFound,
    ObjectInfo,
    PermanentError,
    PreconditionFailed,
    TransientError,
)
