"""One error tree for reembed. Every message names the thing and the fix.

::

    ReembedError
    ├── ConfigError                 a REEMBED_* setting is wrong
    ├── InputError                  a corpus file, name or argument is wrong
    │   ├── MissingTextError        documents that have no text to embed
    │   └── ApiInputError           an embeddings endpoint refused some inputs (400, 413, 422)
    ├── ModelError
    │   ├── ModelNotFoundError      unknown or not installed
    │   └── ModelMismatchError      vectors/fingerprint do not belong to the claimed model
    ├── StoreError                  Chroma
    │   ├── CollectionNotFoundError
    │   ├── CollectionExistsError
    │   ├── StoreAuthError          Chroma (or its proxy) refused the credentials: 401/403
    │   └── StoreUnavailableError   (also RetryableError)
    ├── QueueUnavailableError       Redis (also RetryableError)
    ├── ApiUnavailableError         an embeddings endpoint kept failing (also RetryableError)
    ├── BudgetReachedError          a migration's --max-cost would be passed (pauses it)
    ├── AliasNotFoundError
    ├── AliasExistsError
    ├── MigrationNotFoundError
    ├── MigrationStateError         the migration is not in a state that allows this
    ├── LocalStackError             the data folder's own Redis/Chroma/workers cannot be run
    ├── NoWorkerError               a command waits for work that no worker is alive to do
    └── WaitTimeoutError            a migration did not end within the time a caller waited

Workers retry ``RetryableError`` with backoff; anything else in a batch is permanent and is
isolated by splitting the batch (see ``worker.embedding``).
"""

from __future__ import annotations


class ReembedError(Exception):
    """Base of every error reembed raises on purpose."""

    #: Process exit code used by the CLI for this kind of error.
    exit_code = 2


class RetryableError(ReembedError):
    """A transient failure (a service down, a timeout): trying again later may succeed."""

    exit_code = 3


class ConfigError(ReembedError):
    """A setting is missing, malformed or out of bounds."""


class InputError(ReembedError):
    """An input file, a name or an argument is invalid."""


class MissingTextError(InputError):
    """Documents without text cannot be re-embedded."""

    def __init__(self, collection: str, count: int, first_ids: list[str]) -> None:
        self.collection = collection
        self.count = count
        self.first_ids = first_ids
        shown = ", ".join(first_ids)
        super().__init__(
            f"{count} document(s) in collection {collection!r} have no text and cannot be re-embedded "
            f"(first: {shown}); add their text or pass --skip-missing-text to record them as skipped"
        )


class ApiInputError(InputError):
    """An embeddings endpoint refused a request's inputs; splitting the batch finds which."""


class ModelError(ReembedError):
    """Something is wrong with an embedding model."""


class ModelNotFoundError(ModelError):
    """The model name is unknown, or its weights are not installed."""


class ModelMismatchError(ModelError):
    """Vectors or a fingerprint do not belong to the model they are claimed to come from."""


class StoreError(ReembedError):
    """Chroma refused an operation."""


class CollectionNotFoundError(StoreError):
    """The named Chroma collection does not exist."""


class CollectionExistsError(StoreError):
    """The named Chroma collection already exists."""


class StoreAuthError(StoreError):
    """Chroma, or the proxy in front of it, refused the credentials (HTTP 401 or 403)."""


class StoreUnavailableError(StoreError, RetryableError):
    """The Chroma server cannot be reached."""


class QueueUnavailableError(RetryableError):
    """Redis (the queue and the progress) cannot be reached."""


class ApiUnavailableError(RetryableError):
    """An embeddings endpoint did not answer within its retries (down, overloaded, rate-limited)."""


class BudgetReachedError(RetryableError):
    """The next request to an API model could pass the migration's ``--max-cost``: the migration
    pauses (resumable with a higher limit) and the batch waits in the queue."""


class AliasNotFoundError(ReembedError):
    """No alias of that name is registered."""


class AliasExistsError(ReembedError):
    """The alias is already registered."""


class MigrationNotFoundError(ReembedError):
    """No migration with that id (or none for that alias)."""


class MigrationStateError(ReembedError):
    """The migration's state does not allow the operation (e.g. cutover before complete)."""


class LocalStackError(ReembedError):
    """The data folder's local services (Redis, Chroma, workers) cannot be started, found or used."""


class NoWorkerError(ReembedError):
    """A command waits for a migration, but no worker is alive to work on it."""

    exit_code = 5


class WaitTimeoutError(ReembedError):
    """A caller waited for a migration longer than it allowed; the migration itself goes on."""

    exit_code = 4


class JobNotFoundError(ReembedError):
    """No control-API job with that id (or it expired)."""
