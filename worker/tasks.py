"""Thin Celery tasks with stable names; the work lives in plain functions.

"A Celery task is much like a web view": each task here unpacks its arguments, calls a
function of ``worker.embedding`` or ``reembed.pipeline``, logs once, and decides retry or not.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from celery import Task

from reembed import pipeline
from reembed.errors import RetryableError, StoreAuthError
from reembed.lifecycle import Migration
from reembed.messages import (
    BatchMessage,
    BatchResult,
    CheckVectorsRequest,
    Embeddings,
    EmbedRequest,
    MigrateRequest,
    MigrationRef,
    Outbox,
    VectorCheck,
    parse,
)
from reembed.queue import (
    TASK_BATCH,
    TASK_CHECK_VECTORS,
    TASK_EMBED,
    TASK_FINALIZE,
    TASK_MIGRATE,
    TASK_PUMP,
)
from reembed.vectors import encode_vectors
from worker import app as worker_app
from worker import context
from worker.app import app
from worker.embedding import PausedError, reembed_batch

log = structlog.get_logger(__name__)

#: Seconds between two runs of a migration's pump while batches are in flight.
PUMP_INTERVAL_S = 0.5
#: A paused migration's batches are looked at again after this many seconds.
PAUSED_RETRY_S = 5
outbox = Outbox(app)


def _migration(migration_id: str) -> Migration:
    return Migration.load(migration_id, context.registry(), context.redis_conn(), outbox)


@app.task(name=TASK_BATCH, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=20)
def batch_task(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
    """Re-embed one batch into the migration's target collection."""
    message = parse(BatchMessage, args, kwargs, TASK_BATCH)
    if message is None:
        return None
    started = time.perf_counter()
    try:
        outcome = reembed_batch(
            message, first_delivery=self.request.retries == 0, store=context.store(), registry=context.registry(),
            client=context.redis_conn(), outbox=outbox, load=context.model, turns=context.write_turns(),
        )
    except PausedError as exc:
        raise self.retry(exc=exc, countdown=PAUSED_RETRY_S, max_retries=None) from None
    except (RetryableError, StoreAuthError) as exc:
        log.warning("batch will be retried", error=str(exc), attempt=self.request.retries + 1)
        context.reset()
        raise self.retry(exc=exc, countdown=min(60, 2 ** self.request.retries)) from None
    if outcome.dropped:
        log.info("batch dropped", reason=outcome.dropped)
    else:
        log.info("batch done", written=outcome.written, failed=len(outcome.failed),
                 seconds=round(time.perf_counter() - started, 3))
    for doc_id, reason in outcome.failed.items():
        log.error("document failed", id=doc_id, reason=reason)
    return BatchResult(batch_id=message.batch_id, written=outcome.written, failed=len(outcome.failed),
                       dropped=outcome.dropped).model_dump()


@app.task(name=TASK_PUMP, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def pump_task(self: Task, *args: Any, **kwargs: Any) -> None:
    """Feed a migration's batches under backpressure, then re-send itself until all are sent."""
    message = parse(MigrationRef, args, kwargs, TASK_PUMP)
    if message is None:
        return
    try:
        again = pipeline.pump(_migration(message.migration_id), context.store(),
                              context.settings().max_waiting_batches,
                              keep_feeding_s=pipeline.PUMP_FEED_S if worker_app.control_only else 0.0,
                              lost_after_s=2.0 * context.settings().visibility_timeout_s)
    except RetryableError as exc:
        log.warning("pump will be retried", error=str(exc))
        context.reset()
        raise self.retry(exc=exc, countdown=5) from None
    if again:
        outbox.pump(message.migration_id, countdown=PUMP_INTERVAL_S)


@app.task(name=TASK_FINALIZE, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def finalize_task(self: Task, *args: Any, **kwargs: Any) -> str | None:
    """Verify the target against the source; complete, or start a catch-up round."""
    message = parse(MigrationRef, args, kwargs, TASK_FINALIZE)
    if message is None:
        return None
    try:
        return pipeline.finalize(_migration(message.migration_id), context.store(), context.settings().cutover_wait_s)
    except RetryableError as exc:
        log.warning("finalize will be retried", error=str(exc))
        context.reset()
        raise self.retry(exc=exc, countdown=5) from None


@app.task(name=TASK_MIGRATE, bind=True, acks_late=True)
def migrate_task(self: Task, *args: Any, **kwargs: Any) -> str | None:
    """Start a migration for another service that sends this task by name; returns its id."""
    from reembed.migrations import start_migration

    request = parse(MigrateRequest, args, kwargs, TASK_MIGRATE)
    if request is None:
        return None
    record = start_migration(
        context.settings(), context.store(), context.registry(), context.redis_conn(), outbox,
        alias=request.alias, to_model=request.to_model, batch_size=request.batch_size, cutover=request.cutover,
        skip_missing_text=request.skip_missing_text, webhook_url=request.webhook_url, re_embed=request.re_embed,
    )
    return record.id


@app.task(name=TASK_CHECK_VECTORS)
def check_vectors_task(*args: Any, **kwargs: Any) -> dict[str, Any] | None:
    """Embed a few stored documents with ``model`` and compare with their stored vectors."""
    from reembed.verify_model import compare_stored_vectors

    request = parse(CheckVectorsRequest, args, kwargs, TASK_CHECK_VECTORS)
    if request is None:
        return None
    found = compare_stored_vectors(context.store(), request.collection, context.model(request.model), request.sample)
    return VectorCheck.model_validate(found).model_dump()


@app.task(name=TASK_EMBED, acks_late=True, reject_on_worker_lost=True)
def embed_task(*args: Any, **kwargs: Any) -> dict[str, Any] | None:
    """Embed documents for the caller (``reembed evaluate`` embeds its sample here, on the workers'
    devices); the vectors travel as base64 float32 in JSON, with the model's fingerprint."""
    request = parse(EmbedRequest, args, kwargs, TASK_EMBED)
    if request is None:
        return None
    loaded = context.model(request.model)
    return Embeddings(fingerprint=loaded.fingerprint, device=loaded.device,
                      **encode_vectors(loaded.embed_documents(request.texts))).model_dump()
