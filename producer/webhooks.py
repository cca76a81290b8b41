"""``reembed webhooks``: deliver migration events (``reembed.events``) to the URLs that asked.

A migration only appends to the Redis stream; this process, apart from it, reads the stream as
the consumer group ``reembed-webhooks`` and POSTs each event to the migration's webhook (else
its alias's). So a receiver that is down slows nothing but its own deliveries:

- **At least once.** An event is acknowledged in the group only after its receiver answered
  2xx; a deliverer killed before that gets it again from the group's pending list when it
  restarts. The receiver deduplicates by ``X-Reembed-Delivery`` (the stream id: one per event).
- **In order per URL.** Each URL has its own queue; while its head fails, the rest of that URL's
  events wait behind it (retried with jittered backoff up to ``MAX_BACKOFF_S``), other URLs go on.
  After ``GIVE_UP_S`` of failing, an event is given up: logged, copied to the stream
  ``reembed:events:undelivered``, acknowledged.
- **Signed.** ``X-Reembed-Signature: sha256=HEX``, HEX = HMAC-SHA256(``REEMBED_WEBHOOK_SECRET``,
  ``"{X-Reembed-Timestamp}.{body}"``), so a receiver can check the sender and refuse replays.

Run exactly one (a second would split the group's events and their order).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis
import structlog

from reembed.errors import ConfigError, MigrationNotFoundError, ReembedError
from reembed.events import STREAM, Event, parse_entry, safe_url
from reembed.progress import PREFIX
from reembed.registry import Registry

log = structlog.get_logger(__name__)

GROUP = "reembed-webhooks"
CONSUMER = "deliverer"
UNDELIVERED = f"{PREFIX}:events:undelivered"
MAX_BACKOFF_S = 30.0
GIVE_UP_S = 24 * 3600.0
TIMEOUT_S = 10.0


def signature(secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


@dataclass
class _Queue:
    """One URL's events not yet delivered, oldest first, and when to try its head again."""

    events: deque[Event] = field(default_factory=deque)
    retry_at: float = 0.0
    failures: int = 0
    failing_since: float | None = None


class Deliverer:
    def __init__(self, client: redis.Redis, registry: Registry, secret: str, http: httpx.Client | None = None) -> None:
        if not secret:
            raise ConfigError("REEMBED_WEBHOOK_SECRET is not set: webhooks are signed with it; set a long random "
                              "value and give it to the receivers")
        self.client = client
        self.registry = registry
        self.secret = secret
        self.http = http or httpx.Client(timeout=TIMEOUT_S, follow_redirects=False)
        self.queues: dict[str, _Queue] = {}

    def run(self, stop: threading.Event) -> None:
        """Deliver until ``stop`` is set; survives Redis, Chroma and receivers coming and going.

        After any failure to read (Redis, or Chroma for a target) it starts again from the
        group's pending list: every event read and not yet acknowledged, in order, none lost.
        """
        while not stop.is_set():
            try:
                self._ensure_group()
                self.queues.clear()
                after = "0"
                while pending := self._read(after):  # read before and never acknowledged, in order
                    self._take(pending)
                    after = pending[-1].id
                while not stop.is_set():
                    self._take(self._read(">", block_ms=self._block_ms()))
                    self._deliver_due()
            except (redis.RedisError, ReembedError) as exc:
                log.warning("webhooks: Redis or Chroma unreachable; starting again from the pending events",
                            error=str(exc))
                stop.wait(1.0)

    # -- reading -------------------------------------------------------------------------------

    def _ensure_group(self) -> None:
        try:
            self.client.xgroup_create(STREAM, GROUP, id="$", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _read(self, start: str, block_ms: int | None = None) -> list[Event]:
        found: Any = self.client.xreadgroup(GROUP, CONSUMER, {STREAM: start}, count=100, block=block_ms)
        events = []
        for _, entries in found or []:
            for entry_id, fields in entries:
                if fields:
                    events.append(parse_entry(entry_id, fields))
                else:  # trimmed from the stream while pending: nothing left to deliver
                    self.client.xack(STREAM, GROUP, entry_id)
        return events

    def _block_ms(self) -> int:
        due = [q.retry_at for q in self.queues.values() if q.events]
        wait = min(due) - time.monotonic() if due else 1.0
        return max(1, int(min(1.0, wait) * 1000))

    def _take(self, found: list[Event]) -> None:
        for event in found:
            url = self._target(event)
            if url is None:
                self.client.xack(STREAM, GROUP, event.id)  # nobody asked for it
            else:
                self.queues.setdefault(url, _Queue()).events.append(event)
        self._deliver_due()

    def _target(self, event: Event) -> str | None:
        """The migration's webhook, else its alias's (read now: a URL set later applies)."""
        try:
            url = self.registry.get_migration(event.migration_id).webhook_url
            if url is None and self.registry.has_alias(event.alias):
                url = self.registry.get_alias(event.alias).webhook_url
        except MigrationNotFoundError:
            return None
        return url

    # -- delivering ----------------------------------------------------------------------------

    def _deliver_due(self) -> None:
        now = time.monotonic()
        for url, queue in self.queues.items():
            while queue.events and queue.retry_at <= now:
                event = queue.events[0]
                if self._post(url, event):
                    self.client.xack(STREAM, GROUP, event.id)
                    queue.events.popleft()
                    queue.failures, queue.failing_since = 0, None
                    continue
                queue.failures += 1
                queue.failing_since = queue.failing_since or time.time()
                if time.time() - queue.failing_since > GIVE_UP_S:
                    self._give_up(url, event)
                    queue.events.popleft()
                    queue.failures, queue.failing_since = 0, None
                    continue
                backoff = min(MAX_BACKOFF_S, 0.5 * 2 ** min(queue.failures, 10))
                queue.retry_at = now + backoff * random.uniform(0.5, 1.0)
                break

    def _post(self, url: str, event: Event) -> bool:
        body = json.dumps({"delivery_id": event.id, **event.to_json()}, sort_keys=True).encode()
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", "User-Agent": "reembed-webhooks",
                   "X-Reembed-Delivery": event.id, "X-Reembed-Event": event.event,
                   "X-Reembed-Timestamp": timestamp, "X-Reembed-Signature": signature(self.secret, timestamp, body)}
        try:
            answer = self.http.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            log.info("webhook not delivered", url=safe_url(url), delivery=event.id, error=type(exc).__name__)
            return False
        if 200 <= answer.status_code < 300:
            log.info("webhook delivered", url=safe_url(url), delivery=event.id, event_name=event.event)
            return True
        log.info("webhook refused", url=safe_url(url), delivery=event.id, status=answer.status_code)
        return False

    def _give_up(self, url: str, event: Event) -> None:
        log.error("webhook given up", url=safe_url(url), delivery=event.id, after_s=GIVE_UP_S)
        try:
            self.client.xadd(UNDELIVERED, {"delivery_id": event.id, "url": safe_url(url), "event": event.event,
                                           "migration_id": event.migration_id}, maxlen=10_000, approximate=True)
        except redis.RedisError as exc:
            raise ReembedError(f"Redis refused the undelivered event {event.id}: {exc}") from exc
        self.client.xack(STREAM, GROUP, event.id)
