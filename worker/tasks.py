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
from reembed.errors import RetryableError
from reembed.queue import TASK_BATCH, TASK_CHECK_VECTORS, TASK_EMBED, TASK_FINALIZE, TASK_MIGRATE, TASK_PUMP
from reembed.store import Store
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


@app.task(name=TASK_BATCH, bind=True, acks_late=True, reject_on_worker_lost=True,
          max_retries=20, retry_backoff=True, retry_backoff_max=60)
def batch_task(self: Task, migration_id: str, batch_id: str, ids: list[str], documents: list[str],
               metadatas: list[dict[str, Any]], alias: str | None = None) -> dict[str, Any]:
    """Re-embed one batch into the migration's target collection (``alias`` is for the logs)."""
    started = time.perf_counter()
    try:
        outcome = reembed_batch(
            migration_id=migration_id, batch_id=batch_id, ids=ids, documents=documents, metadatas=metadatas,
            first_delivery=self.request.retries == 0, store=context.store(), registry=context.registry(),
            client=context.redis_conn(), load=context.model,
        )
    except PausedError as exc:
        raise self.retry(exc=exc, countdown=PAUSED_RETRY_S, max_retries=None) from None
    except RetryableError as exc:
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
    if outcome.finished_migration:
        app.send_task(TASK_FINALIZE, kwargs={"migration_id": migration_id})
    return {"batch_id": batch_id, "written": outcome.written, "failed": len(outcome.failed)}


@app.task(name=TASK_PUMP, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def pump_task(self: Task, migration_id: str) -> None:
    """Feed a migration's batches under backpressure, then re-send itself until all are sent."""
    try:
        again = pipeline.pump(app, context.store(), context.registry(), context.redis_conn(), migration_id,
                              context.settings().max_waiting_batches,
                              keep_feeding_s=pipeline.PUMP_FEED_S if worker_app.control_only else 0.0,
                              lost_after_s=2.0 * context.settings().visibility_timeout_s)
    except RetryableError as exc:
        log.warning("pump will be retried", migration_id=migration_id, error=str(exc))
        context.reset()
        raise self.retry(exc=exc, countdown=5) from None
    if again:
        app.send_task(TASK_PUMP, kwargs={"migration_id": migration_id}, countdown=PUMP_INTERVAL_S)


@app.task(name=TASK_FINALIZE, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def finalize_task(self: Task, migration_id: str) -> str:
    """Verify the target against the source; complete, or start a catch-up round."""
    try:
        return pipeline.finalize(app, context.store(), context.registry(), context.redis_conn(), migration_id)
    except RetryableError as exc:
        log.warning("finalize will be retried", migration_id=migration_id, error=str(exc))
        context.reset()
        raise self.retry(exc=exc, countdown=5) from None


@app.task(name=TASK_MIGRATE, bind=True, acks_late=True)
def migrate_task(self: Task, alias: str, to_model: str, batch_size: int | None = None,
                 cutover: str = "auto", skip_missing_text: bool = False) -> str:
    """Start a migration for another service that sends this task by name; returns its id."""
    from reembed.migrations import start_migration

    record = start_migration(
        context.settings(), context.store(), context.registry(), context.redis_conn(),
        alias=alias, to_model=to_model, batch_size=batch_size, cutover=cutover,
        skip_missing_text=skip_missing_text,
    )
    app.send_task(TASK_PUMP, kwargs={"migration_id": record.id})
    return record.id


@app.task(name=TASK_CHECK_VECTORS)
def check_vectors_task(collection: str, model: str, sample: int = 8) -> dict[str, Any]:
    """Embed a few stored documents with ``model`` and compare with their stored vectors."""
    from reembed.verify_model import compare_stored_vectors

    store: Store = context.store()
    return compare_stored_vectors(store, collection, context.model(model), sample)


@app.task(name=TASK_EMBED, acks_late=True, reject_on_worker_lost=True)
def embed_task(model: str, texts: list[str]) -> dict[str, Any]:
    """Embed documents for the caller (``reembed evaluate`` embeds its sample here, on the workers'
    devices); the vectors travel as base64 float32 in JSON, with the model's fingerprint."""
    loaded = context.model(model)
    return {"fingerprint": loaded.fingerprint, "device": loaded.device,
            **encode_vectors(loaded.embed_documents(texts))}
