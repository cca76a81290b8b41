"""Every message reembed sends through the queue: its declared type, and the one place that sends it.

A task's arguments are a pydantic model here, checked at the worker's boundary (``parse``): a
malformed message (another version of reembed, a hand-written ``send_task``) is refused with one
log line and acknowledged, so it neither crashes a worker nor loops through retries. Whether a
batch is written with ``add`` or ``upsert`` is a field of its message (``write``), never a
convention of its id.

Other services send ``reembed.migrate`` by name with the keyword arguments of ``MigrateRequest``.
"""

from __future__ import annotations

import time
from typing import Any, Literal, TypeVar

import redis
import structlog
from celery import Celery
from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from reembed.errors import QueueUnavailableError
from reembed.queue_depth import SENT_AT_HEADER
from reembed.queue import (
    TASK_BATCH,
    TASK_CHECK_VECTORS,
    TASK_EMBED,
    TASK_FINALIZE,
    TASK_MIGRATE,
    TASK_PUMP,
)

log = structlog.get_logger(__name__)


class Message(BaseModel):
    """A task's keyword arguments. Unknown fields are refused: a typo is an error, not a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MigrationRef(Message):
    """``reembed.pump`` and ``reembed.finalize``: the migration to feed or to verify."""

    migration_id: str


class BatchMessage(Message):
    """``reembed.batch``: up to ``batch_size`` documents of one migration, embedded and written together.

    ``write="add"`` is for a first pass (scan of a source, lines of a corpus file) whose ids the
    target cannot hold yet: Chroma's ``add`` is several times faster than ``upsert``. A
    redelivery of the same message, and every catch-up batch, writes with ``upsert``.
    """

    migration_id: str
    batch_id: str
    write: Literal["add", "upsert"]
    ids: list[str]
    documents: list[str]
    metadatas: list[dict[str, Any]]
    alias: str | None = None  # for the logs

    @model_validator(mode="after")
    def _same_lengths(self) -> BatchMessage:
        if not len(self.ids) == len(self.documents) == len(self.metadatas):
            raise ValueError(f"batch {self.batch_id}: {len(self.ids)} ids, {len(self.documents)} documents "
                             f"and {len(self.metadatas)} metadatas must be as many")
        return self


class BatchResult(Message):
    batch_id: str
    written: int
    failed: int
    dropped: str | None = None


class VectorCheck(BaseModel):
    """``reembed.check_vectors``' answer: do the stored vectors come from the claimed model?"""

    collection: str
    model: str
    fingerprint: str
    checked: int
    dimension_model: int
    dimension_stored: int | None
    probe: list[float]
    match: bool
    cosine_min: float | None
    cosine_mean: float | None


class Embeddings(BaseModel):
    """``reembed.embed``'s answer: float32 vectors as base64 with their shape, and who made them."""

    fingerprint: str
    device: str
    shape: list[int]
    vectors: str


class MigrateRequest(Message):
    """``reembed.migrate``: what another service sends to start a migration (returns its id)."""

    alias: str
    to_model: str
    batch_size: int | None = None
    cutover: Literal["auto", "manual"] = "auto"
    skip_missing_text: bool = False
    webhook_url: str | None = None
    re_embed: bool = False  # embed every document even where the Matryoshka shortcut applies


class CheckVectorsRequest(Message):
    """``reembed.check_vectors``: re-embed a few stored documents and compare (``adopt``)."""

    collection: str
    model: str
    sample: int = 8


class EmbedRequest(Message):
    """``reembed.embed``: embed documents for the caller (``evaluate`` on the workers' devices)."""

    model: str
    texts: list[str]


M = TypeVar("M", bound=Message)


def parse(kind: type[M], args: tuple[Any, ...], kwargs: dict[str, Any], task: str) -> M | None:
    """The message, or ``None`` after one error line when it is malformed (the caller returns)."""
    try:
        if args:
            raise ValueError(f"positional arguments {len(args)}: send keyword arguments only")
        return kind.model_validate(kwargs)
    except (ValidationError, ValueError) as exc:
        problems = exc.errors() if isinstance(exc, ValidationError) else [{"loc": (), "msg": str(exc)}]
        # Field names and what is wrong with them, never their values (they may be documents).
        where = "; ".join(f"{'.'.join(map(str, p['loc'])) or 'message'}: {p['msg']}" for p in problems[:5])
        log.error("malformed message refused", task=task, problems=where)
        return None


class Outbox:
    """Sends reembed's messages through a Celery app (the producer's bare one, or the worker's).

    A broker that cannot be reached raises ``QueueUnavailableError`` (retryable), whatever layer
    noticed it (kombu, redis-py).
    """

    def __init__(self, app: Celery) -> None:
        self.app = app

    def _send(self, task: str, message: Message, countdown: float | None = None) -> AsyncResult:
        try:
            return self.app.send_task(task, kwargs=message.model_dump(), countdown=countdown,
                                      headers={SENT_AT_HEADER: time.time()})  # the scale signal's wait
        except (OperationalError, redis.RedisError, OSError) as exc:
            raise QueueUnavailableError(f"Redis is unreachable while sending {task}: {exc}; is it running?") from exc

    def batch(self, message: BatchMessage) -> None:
        self._send(TASK_BATCH, message)

    def pump(self, migration_id: str, countdown: float | None = None) -> None:
        self._send(TASK_PUMP, MigrationRef(migration_id=migration_id), countdown)

    def finalize(self, migration_id: str) -> None:
        self._send(TASK_FINALIZE, MigrationRef(migration_id=migration_id))

    def migrate(self, request: MigrateRequest) -> AsyncResult:
        return self._send(TASK_MIGRATE, request)

    def check_vectors(self, request: CheckVectorsRequest) -> AsyncResult:
        return self._send(TASK_CHECK_VECTORS, request)

    def embed(self, request: EmbedRequest) -> AsyncResult:
        return self._send(TASK_EMBED, request)

    def workers(self, patience_s: float) -> list[str]:
        """The names of the workers that answer a ping, asking again for up to ``patience_s``
        seconds (a worker started a moment ago is still loading)."""
        deadline = time.monotonic() + patience_s
        while True:
            try:
                replies = self.app.control.ping(timeout=1.0) or []
            except (OperationalError, redis.RedisError, OSError) as exc:
                raise QueueUnavailableError(f"Redis is unreachable while looking for workers: {exc}") from exc
            names = sorted(name for reply in replies for name in reply)
            if names or time.monotonic() >= deadline:
                return names
