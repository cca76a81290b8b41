"""The Celery configuration both sides share, and the stable task names.

The producer sends tasks *by name* through a bare Celery app built from the same settings, so
it never imports the worker package and never loads a model. Other services can do the same:
``Celery(broker=URL).send_task("reembed.migrate", kwargs={"alias": "docs", "to_model": "..."})``.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from reembed.settings import Settings

TASK_MIGRATE = "reembed.migrate"
TASK_PUMP = "reembed.pump"
TASK_BATCH = "reembed.batch"
TASK_FINALIZE = "reembed.finalize"
TASK_CHECK_VECTORS = "reembed.check_vectors"
TASK_EMBED = "reembed.embed"

#: Batches wait here; control tasks (pump, finalize, checks) get their own queue so a long
#: line of batches never delays the task that refills or finishes a migration.
QUEUE_BATCHES = "reembed.batches"
QUEUE_CONTROL = "reembed.control"


def celery_config(settings: Settings) -> dict[str, Any]:
    """JSON only, late acks, prefetch 1, redelivery on worker loss, results in Redis."""
    return {
        "broker_url": settings.redis_url,
        "result_backend": settings.redis_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            # kombu sweeps for messages of dead workers every interval x throttle seconds (100 s by
            # default): sweep every quarter of the timeout instead, so a batch whose worker was
            # SIGKILLed comes back within ~1.25 timeouts.
            "unacked_restore_interval": restore_interval_s(settings.visibility_timeout_s),
            "unacked_restore_throttle": 1,
        },
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "result_expires": 24 * 3600,
        "task_default_queue": QUEUE_BATCHES,
        "task_routes": {
            TASK_BATCH: {"queue": QUEUE_BATCHES},
            TASK_EMBED: {"queue": QUEUE_BATCHES},
            TASK_MIGRATE: {"queue": QUEUE_CONTROL},
            TASK_PUMP: {"queue": QUEUE_CONTROL},
            TASK_FINALIZE: {"queue": QUEUE_CONTROL},
            TASK_CHECK_VECTORS: {"queue": QUEUE_CONTROL},
        },
        "worker_hijack_root_logger": False,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "broker_connection_retry_on_startup": True,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
    }


def restore_interval_s(visibility_timeout_s: int) -> int:
    """Seconds between two sweeps for unacknowledged messages whose visibility timeout ran out."""
    return max(1, min(60, visibility_timeout_s // 4))


def client_app(settings: Settings) -> Celery:
    """A Celery app that only sends tasks by name (producer side)."""
    app = Celery("reembed-producer")
    app.conf.update(celery_config(settings))
    return app


#: kombu's Redis transport keeps each delivered, unacknowledged message here (tag -> message)
#: with its delivery time in the index: what a worker took and has not finished.
UNACKED_INDEX_KEY = "unacked_index"


def in_flight(client: Any, visibility_timeout_s: int) -> tuple[int, float | None]:
    """Messages taken by workers and not yet acknowledged, and the most seconds until one of them
    comes back to its queue if its worker is gone (None when there are none)."""
    entries = client.zrange(UNACKED_INDEX_KEY, 0, 0, withscores=True)
    count = int(client.zcard(UNACKED_INDEX_KEY))
    if not entries:
        return count, None
    import time

    oldest = float(entries[0][1])
    # The sweep runs every restore interval after the timeout: the worst case is both.
    back_in = oldest + visibility_timeout_s + restore_interval_s(visibility_timeout_s) - time.time()
    return count, max(back_in, 0.0)


def restore_unacked_now(settings: Settings) -> int:
    """Give every unacknowledged message back to its queue at once, with kombu's own restore.

    Only correct when no consumer of this Redis is alive (the data folder's own Redis when its
    workers are gone): a live worker's batch would run twice. Returns how many came back.
    """
    from kombu.connection import Connection

    options = {**celery_config(settings)["broker_transport_options"], "visibility_timeout": 0}
    with Connection(settings.redis_url, transport_options=options) as conn:  # type: ignore[no-untyped-call]
        channel: Any = conn.default_channel
        client = channel.client
        before = int(client.zcard(UNACKED_INDEX_KEY))
        if before:
            channel.qos.restore_visible(start=0, num=before + 100, interval=1)
        return before - int(client.zcard(UNACKED_INDEX_KEY))
