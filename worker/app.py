"""The Celery app workers run: ``celery -A worker.app worker`` (or ``reembed worker``).

Settings come from ``REEMBED_*`` variables; logging goes through reembed's structlog set-up
(Celery's own records included) via the ``setup_logging`` signal.
"""

from __future__ import annotations

import threading
from typing import Any

import structlog
from celery import Celery
from celery.signals import (
    celeryd_after_setup,
    setup_logging,
    task_prerun,
    worker_process_init,
    worker_ready,
)

from reembed.logs import configure_logging
from reembed.queue import QUEUE_CONTROL, celery_config
from reembed.settings import Settings

settings = Settings.from_env()
app = Celery("reembed", include=["worker.tasks"])
app.conf.update(celery_config(settings))


@setup_logging.connect
def _setup_logging(**_: Any) -> None:
    configure_logging(settings)


#: True in a worker that consumes only the control queue (set before the pool forks). Only
#: there may a pump task hold its process while it waits for room to feed more batches.
control_only = False


@celeryd_after_setup.connect
def _note_queues(sender: Any = None, instance: Any = None, **_: Any) -> None:
    global control_only
    queues = set(instance.app.amqp.queues.consume_from or ()) if instance is not None else set()
    control_only = queues == {QUEUE_CONTROL}


@worker_process_init.connect
def _limit_threads(**_: Any) -> None:
    """One torch thread per pool process unless told otherwise (models.md: two are far worse on a busy CPU)."""
    import torch

    torch.set_num_threads(settings.torch_threads)
    from worker import context

    if settings.preload_model and not control_only:
        context.model(settings.preload_model)  # logs "model loaded" with fingerprint, device, batch size
    # Chroma's client, the registry and Redis take about half a second to open: opened now, beside
    # the start, not in the first batch's time. A server that is down is the first task's to report.
    threading.Thread(target=context.warm, name="open-connections", daemon=True).start()


@task_prerun.connect
def _bind_task_context(task_id: str | None = None, task: Any = None, kwargs: dict[str, Any] | None = None,
                       **_: Any) -> None:
    """Bind the migration, alias, batch and worker to every log line the task makes, Celery's own
    "succeeded" line included (the next task's binding replaces this one)."""
    kwargs = kwargs or {}
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**{
        k: v for k, v in (("migration_id", kwargs.get("migration_id")), ("alias", kwargs.get("alias")),
                          ("batch", kwargs.get("batch_id")),
                          ("worker", getattr(getattr(task, "request", None), "hostname", None)),
                          ("task", getattr(task, "name", None)))
        if v is not None})


@worker_ready.connect
def _announce(sender: Any = None, **_: Any) -> None:
    structlog.get_logger(__name__).info(
        "worker ready", worker=getattr(sender, "hostname", None), device=settings.device,
        batch_size=settings.batch_size, visibility_timeout_s=settings.visibility_timeout_s,
    )
