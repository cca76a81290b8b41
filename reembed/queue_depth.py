"""What an autoscaler scales the workers on: batches waiting per queue and how long the oldest
has waited, read from the broker (Redis) itself, so nothing but Redis has to be up.

Celery's Redis transport keeps a queue as a list (new messages pushed on the left, taken from
the right), so the oldest message is the list's last element. Every message reembed sends
carries the time it was sent in a header (``SENT_AT_HEADER``, see ``reembed.messages``); a
message sent by an older reembed or by hand has none, and its wait is not known.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis

from reembed.errors import QueueUnavailableError
from reembed.progress import PREFIX
from reembed.queue import QUEUE_BATCHES, QUEUE_CONTROL

SENT_AT_HEADER = "reembed_sent_at"
#: At most this many in-flight hashes are counted per scrape (one per running migration).
MAX_MIGRATIONS = 1000


@dataclass(frozen=True)
class QueueDepth:
    queue: str
    waiting: int
    oldest_wait_s: float | None  # None: empty, or the oldest message carries no send time


def queue_depths(client: redis.Redis, queues: tuple[str, ...] = (QUEUE_BATCHES, QUEUE_CONTROL)) -> list[QueueDepth]:
    """Raises QueueUnavailableError when Redis cannot be read."""
    found = []
    try:
        for queue in queues:
            pipe = client.pipeline(transaction=False)
            pipe.llen(queue)
            pipe.lindex(queue, -1)
            waiting, oldest = pipe.execute()
            found.append(QueueDepth(queue, int(waiting), _waited(oldest)))
    except redis.RedisError as exc:
        raise QueueUnavailableError(f"Redis is unreachable reading the queues: {exc}") from exc
    return found


def batches_in_flight(client: redis.Redis) -> int:
    """Batches sent and not yet finished over every migration (waiting or being embedded)."""
    try:
        keys = [key for _, key in zip(range(MAX_MIGRATIONS),
                                      client.scan_iter(match=f"{PREFIX}:migration:*:inflight", count=500))]
        if not keys:
            return 0
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.hlen(key)
        return sum(int(n) for n in pipe.execute())
    except redis.RedisError as exc:
        raise QueueUnavailableError(f"Redis is unreachable reading batches in flight: {exc}") from exc


def _waited(raw: bytes | str | None) -> float | None:
    if raw is None:
        return None
    try:
        sent = json.loads(raw).get("headers", {}).get(SENT_AT_HEADER)
    except (ValueError, AttributeError):
        return None
    return max(0.0, time.time() - float(sent)) if isinstance(sent, (int, float)) else None
