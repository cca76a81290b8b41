"""A migration's exact progress, read from Redis (or from the durable record once Redis forgot it).

Shared by ``reembed status``, the control plane and the search service's ``GET /aliases``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis

from reembed.lifecycle import current_state
from reembed.progress import Progress
from reembed.registry import AliasRecord, MigrationRecord, MigrationState, Registry, SpendRecord

#: States whose progress must be in Redis; a record in one of them without it means Redis lost it.
LOST_IF_NOT_IN_REDIS = frozenset({MigrationState.RUNNING, MigrationState.VERIFYING, MigrationState.PAUSED})


def migration_status(client: redis.Redis, record: MigrationRecord,
                     reread: Callable[[], MigrationRecord] | None = None,
                     recorded_spend: Callable[[], SpendRecord | None] | None = None) -> dict[str, Any]:
    """Counts, rate and ETA of one migration.

    ``reread`` reads the record again when Redis already caches a newer state than ``record``:
    the owner writes Chroma first and Redis second, so a record read before the cache may miss
    what the cache's state came with (a pause's reason). ``recorded_spend`` reads the durable
    copy of the spend, shown once Redis no longer holds the progress.

    Raises:
        QueueUnavailableError: Redis is unreachable.
    """
    progress = Progress(client, record.id)
    live = progress.exists()
    counts = progress.counts() if live else {"total": record.total, "done": record.done,
                                             "failed": record.failed, "skipped": record.skipped}
    fields = progress.get() if live else {}
    if reread is not None and fields.get("state") not in (None, record.state.value):
        record = reread()
    started = float(fields.get("started_at", record.created_at))
    end = float(fields.get("finished_at", 0)) or record.finished_at or time.time()
    rate = counts["done"] / max(end - started, 1e-6)
    remaining = max(counts["total"] - counts["done"] - counts["failed"] - counts["skipped"], 0)
    return {
        "migration_id": record.id, "kind": record.kind, "source_collection": record.source_collection,
        "source_file": record.source_file, "target_collection": record.target_collection,
        "from_model": record.from_model, "to_model": record.to_model, "to_fingerprint": record.to_fingerprint,
        "state": current_state(record, fields.get("state")).value,
        **counts, "docs_per_s": round(rate, 2),
        "eta_s": round(remaining / rate, 1) if rate > 0 and remaining else (0 if not remaining else None),
        "verified": record.verified, "cutover": record.cutover, "error": record.error, "shortcut": record.shortcut,
        "failures": progress.failures(10) if live else {}, "progress_in_redis": live,
        **_truncation(progress, live), **_spend(progress, live, record, recorded_spend),
        "hint": (f"Redis holds no progress for this {record.state.value} migration (it lost its data?): "
                 f"run `reembed resume {record.id}` to finish it by diffing source and target")
        if not live and record.state in LOST_IF_NOT_IN_REDIS else None,
    }



def alias_summary(registry: Registry, alias: AliasRecord) -> dict[str, Any]:
    """What an alias serves: live collection with its model and fingerprint, previous collection,
    canary, generation. The one summary ``reembed status``, ``GET /aliases`` and /metrics share."""
    live = registry.get_collection(alias.live_collection)
    return {"alias": alias.alias, "live_collection": alias.live_collection, "model": live.model,
            "fingerprint": live.fingerprint, "previous_collection": alias.previous_collection,
            "canary": alias.canary.model_dump() if alias.canary else None, "generation": alias.generation}


def _truncation(progress: Progress, live: bool) -> dict[str, Any]:
    """Documents the model read only in part (it truncates past its maximum sequence length)."""
    count, sample = progress.truncated() if live else (0, {})
    return {"truncated": count, "truncated_tokens": sample}


def _spend(progress: Progress, live: bool, record: MigrationRecord,
           recorded: Callable[[], SpendRecord | None] | None) -> dict[str, Any]:
    """Tokens sent to a model behind an API and what they cost, against the migration's budget."""
    tokens, cost = progress.spend() if live else (0, 0.0)
    if not live and recorded is not None and record.price_per_million_tokens:
        spend = recorded()
        tokens, cost = (spend.tokens, spend.cost) if spend else (0, 0.0)
    return {"tokens": tokens, "cost": round(cost, 6), "max_cost": record.max_cost}
