"""Every state change of a migration, published to a Redis stream other services read.

Why a stream: it keeps the order, each reader keeps its own place (an id), and a consumer group
lets several delivery processes share the work. The migration's owner
(``reembed.lifecycle.Migration``) publishes right after it wrote the new state to Chroma, so the
events of one migration are in the order its states were, and a state that was refused (the
state machine) publishes nothing. Trimmed to about ``MAX_EVENTS``.

Read by the webhook deliverer (``producer.webhooks``) and, as a wake-up only, by
``ControlPlane.wait``: it reads the migration's record again on any event, so a lost event costs
it one poll, never a state.

Event names: ``started``, ``resumed``, ``verifying``, ``paused``, ``budget_reached`` (a pause
because the next request would pass ``--max-cost``), ``complete``, ``live``, ``rolled_back``,
``failed``, ``cancelled``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
import structlog

from reembed.errors import InputError
from reembed.progress import PREFIX
from reembed.registry import MigrationRecord, MigrationState

log = structlog.get_logger(__name__)

STREAM = f"{PREFIX}:events"
MAX_EVENTS = 100_000
S = MigrationState
_NAMES: dict[MigrationState, str] = {S.VERIFYING: "verifying", S.PAUSED: "paused", S.COMPLETE: "complete", S.LIVE: "live",
          S.ROLLED_BACK: "rolled_back", S.FAILED: "failed", S.CANCELLED: "cancelled"}
EVENTS = ("started", "resumed", *_NAMES.values(), "budget_reached")


@dataclass(frozen=True)
class Event:
    """One state change, as published (``id``: the stream's, increasing)."""

    id: str
    event: str
    migration_id: str
    alias: str
    kind: str
    state: str
    previous: str
    at: float
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def name_of(previous: MigrationState | None, record: MigrationRecord, budget: bool = False) -> str:
    """The event a move from ``previous`` to ``record.state`` is."""
    if record.state == S.RUNNING:
        return "started" if previous in (None, S.PLANNED) else "resumed"
    if record.state == S.PAUSED and budget:
        return "budget_reached"
    return _NAMES.get(record.state) or str(record.state.value)


def publish(client: redis.Redis, record: MigrationRecord, previous: MigrationState | None,
            budget: bool = False) -> str | None:
    """Append the event of ``record``'s new state; its stream id, or None when Redis refused.

    The state is already durable in Chroma: a Redis that is down loses the event (logged),
    never the state change.
    """
    fields = {"event": name_of(previous, record, budget), "migration_id": record.id, "alias": record.alias,
              "kind": record.kind, "state": record.state.value,
              "previous": previous.value if previous is not None else "", "at": repr(time.time()),
              "error": record.error or ""}
    try:
        return str(client.xadd(STREAM, fields, maxlen=MAX_EVENTS, approximate=True))  # type: ignore[arg-type]
    except redis.RedisError as exc:
        log.warning("event not published", migration_id=record.id, event=fields["event"], error=str(exc))
        return None


def read(client: redis.Redis, after: str = "0-0", count: int = 100, block_ms: int | None = None) -> list[Event]:
    """Events after stream id ``after`` (oldest first), waiting up to ``block_ms`` for one."""
    found: Any = client.xread({STREAM: after}, count=count, block=block_ms)
    return [parse_entry(entry_id, fields) for _, entries in (found or []) for entry_id, fields in entries]


def last_id(client: redis.Redis) -> str:
    """The id of the newest event ("0-0" when there is none): where a reader that wants only what
    comes next starts."""
    newest: Any = client.xrevrange(STREAM, count=1)
    return _text(newest[0][0]) if newest else "0-0"


def parse_entry(entry_id: Any, fields: dict[Any, Any]) -> Event:
    """One stream entry as an ``Event``."""
    raw = {_text(k): _text(v) for k, v in fields.items()}
    return Event(id=_text(entry_id), event=raw["event"], migration_id=raw["migration_id"], alias=raw["alias"],
                 kind=raw["kind"], state=raw["state"], previous=raw["previous"], at=float(raw["at"]),
                 error=raw["error"] or None)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def dumps(event: Event) -> str:
    return json.dumps(event.to_json(), sort_keys=True)


def check_webhook_url(url: str | None) -> str | None:
    """A webhook URL as given, or None for none.

    Raises:
        InputError: not an absolute http(s) URL.
    """
    if url is None or not url.strip():
        return None
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > 2048:
        raise InputError(f"webhook URL {safe_url(url)!r} is not an http(s) URL; give one such as "
                         "https://hooks.example.com/reembed")
    if parts.username or parts.password or parts.query:  # kept in Chroma, where no secret may go
        raise InputError(f"webhook URL {safe_url(url)!r} carries credentials or a query; give it without: every "
                         "delivery is signed with REEMBED_WEBHOOK_SECRET (X-Reembed-Signature), check that instead")
    return url.strip()


def safe_url(url: str) -> str:
    """The URL without credentials or query (they may hold a token): what logs and status show."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"
