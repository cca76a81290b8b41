"""One mapping from reembed's errors to HTTP status codes, for search and control alike.

404 a thing named that does not exist; 409 a state that does not allow the request (a cutover
before the migration completed, an alias that exists, a model that does not match); 422 bad
input (the message names the part and the fix); 503 a dependency down or no worker, worth a
retry; 500 anything else, logged.
"""

from __future__ import annotations

from reembed.errors import (
    AliasExistsError,
    AliasNotFoundError,
    ConfigError,
    InputError,
    JobNotFoundError,
    MigrationNotFoundError,
    MigrationStateError,
    ModelMismatchError,
    ModelNotFoundError,
    NoWorkerError,
    ReembedError,
    RetryableError,
)

_CODES: tuple[tuple[tuple[type[ReembedError], ...], int], ...] = (
    ((AliasNotFoundError, MigrationNotFoundError, JobNotFoundError), 404),
    ((ModelMismatchError, AliasExistsError, MigrationStateError), 409),
    ((RetryableError, NoWorkerError), 503),
    ((InputError, ConfigError, ModelNotFoundError), 422),
)


def status_for(exc: ReembedError) -> int:
    for kinds, code in _CODES:
        if isinstance(exc, kinds):
            return code
    return 500


def error_body(exc: ReembedError) -> dict[str, str]:
    """What a client reads: the message (it names the thing and the fix) and the error's class."""
    return {"detail": str(exc), "error": type(exc).__name__}
