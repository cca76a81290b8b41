"""The one owner of a migration: its durable record, its Redis progress and the messages it sends.

Which store is authoritative for what (the rule every reader follows):

* **Chroma (the registry) holds the lifecycle**: a migration's state and everything else in its
  ``MigrationRecord``. It outlives Redis.
* **Redis holds the work in progress**: counters, finished and in-flight batches, failures, the
  catch-up list, and a *cache* of the state in the progress hash, so a worker does not ask
  Chroma before every batch. The cache is written here only, always right after the durable
  write. How to read the state is ``current_state``, and every reader uses it.

``Migration`` is the only code that writes either one. The control plane, the pump, the
verification and the Celery tasks ask it to start, pause, resume, cancel, record a batch, catch
up, complete, fail or go live; none of them writes a state by hand.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis
import structlog

from reembed import events, readiness
from reembed.errors import CollectionNotFoundError, MigrationStateError, ReembedError
from reembed.messages import BatchMessage, Outbox
from reembed.progress import ALIAS_LOCK_TTL_S, Progress, alias_lock
from reembed.registry import (
    ACTIVE_STATES,
    CollectionRecord,
    MigrationRecord,
    MigrationState,
    Registry,
    SpendRecord,
)
from reembed.store import Store

log = structlog.get_logger(__name__)

S = MigrationState
#: States whose state lives in the Redis cache too; any other state is read from Chroma alone.
CACHED_STATES = frozenset({S.RUNNING, S.PAUSED, S.VERIFYING})
#: States in which a migration's target receives writes through the alias (it may go live).
WRITE_THROUGH = frozenset({S.RUNNING, S.PAUSED, S.VERIFYING, S.COMPLETE})
#: States a migration ends in (until a cutover, a rollback or a resume moves it on).
FINAL_STATES = frozenset({S.COMPLETE, S.LIVE, S.CANCELLED, S.FAILED, S.ROLLED_BACK})
#: Seconds between durable copies of a running migration's spend (one small Chroma write).
SPEND_CHECKPOINT_S = 10.0


class Migration:
    """A handle on one migration. Cheap to build; hold it for one operation, then drop it."""

    def __init__(self, record: MigrationRecord, registry: Registry, client: redis.Redis, outbox: Outbox) -> None:
        self.record = record
        self.registry = registry
        self.outbox = outbox
        self.progress = Progress(client, record.id)

    @classmethod
    def load(cls, migration_id: str, registry: Registry, client: redis.Redis, outbox: Outbox) -> Migration:
        """Raises MigrationNotFoundError."""
        return cls(registry.get_migration(migration_id), registry, client, outbox)

    @property
    def id(self) -> str:
        return self.record.id

    # -- reading the state: one rule ---------------------------------------------------------

    def state(self) -> MigrationState:
        return current_state(self.record, self.progress.state())

    def refresh(self) -> MigrationRecord:
        self.record = self.registry.get_migration(self.id)
        return self.record

    # -- writing the state: the one place ----------------------------------------------------

    def _become(self, new: MigrationState, budget: bool = False, **changes: Any) -> MigrationRecord:
        """Persist ``new`` in Chroma (the state machine decides if it may follow), then the cache,
        then tell other services (``reembed.events``) when the state changed."""
        self.record, before = self.registry.transition(self.record, new, **changes)
        if self.progress.exists() or new in CACHED_STATES:
            self.progress.set(state=new.value)
            self.checkpoint_spend(force=True)
        if new != before:
            events.publish(self.progress.r, self.record, before, budget)
        return self.record

    # -- spend (a model behind an API) ---------------------------------------------------------

    def checkpoint_spend(self, force: bool = False) -> None:
        """Copy the spend from Redis to Chroma: at every state change (``force``), and after a
        batch at most every ``SPEND_CHECKPOINT_S`` across all workers. A Redis that restarts
        empty then loses at most that long of spend, never the budget already used."""
        if not self.record.price_per_million_tokens or not self.progress.exists():
            return
        if force or self.progress.checkpoint_due(SPEND_CHECKPOINT_S):
            tokens, cost = self.progress.spend()
            self.registry.put_spend(SpendRecord(migration_id=self.id, tokens=tokens, cost=cost))

    def recorded_spend(self) -> tuple[int, float]:
        """The spend last copied to Chroma: where a rebuilt progress starts counting from."""
        spend = self.registry.get_spend(self.id) if self.record.price_per_million_tokens else None
        return (spend.tokens, spend.cost) if spend else (0, 0.0)

    def begin(self, skipped: dict[str, str], phase: str = "scan") -> MigrationRecord:
        """A new migration (or ingest) whose target exists: record it running, progress from zero."""
        self.record.state = S.RUNNING
        self.registry.put_migration(self.record)
        self.progress.init(self.record.total, S.RUNNING.value, skipped)
        self.progress.set(phase=phase)
        self.progress.set_budget(self.record.max_cost)
        events.publish(self.progress.r, self.record, None)
        if self.record.kind == "migrate":
            self.outbox.pump(self.id)
        return self.record

    def rebuild_progress(self, skipped: dict[str, str]) -> None:
        """Redis lost this migration's progress (restarted empty): start it again from zero.
        Batch ids are stable, so what was already written is counted once more, never twice."""
        log.warning("progress lost, rebuilding", migration_id=self.id, alias=self.record.alias)
        self.progress.init(self.record.total, self.state().value, skipped, self.recorded_spend())

    def pause(self, reason: str | None = None, budget: bool = False) -> MigrationRecord:
        """Stop feeding and embedding until resumed; ``reason`` shows in status; ``budget``: the
        next request would have passed ``--max-cost``."""
        return self._become(S.PAUSED, budget, error=reason) if reason else self._become(S.PAUSED)

    def cancel(self, store: Store) -> MigrationRecord:
        """Stop, and delete the partial target (never the source, never a live collection)."""
        if self.record.state in (S.LIVE, S.ROLLED_BACK):
            raise MigrationStateError(f"migration {self.id} went live; use `reembed rollback`, not cancel")
        if self.registry.has_alias(self.record.alias):
            alias = self.registry.get_alias(self.record.alias)
            if self.record.target_collection in (alias.live_collection, alias.previous_collection):
                raise MigrationStateError(f"collection {self.record.target_collection!r} is served by alias "
                                          f"{self.record.alias!r}; it cannot be cancelled")
        self._become(S.CANCELLED, finished_at=time.time())
        if self.record.target_collection != self.record.source_collection and store.exists(self.record.target_collection):
            store.delete(self.record.target_collection)
        return self.record

    def fail(self, error: str) -> MigrationRecord:
        log.error("migration failed", migration_id=self.id, alias=self.record.alias, error=error)
        return self._become(S.FAILED, error=error)

    def verifying(self) -> MigrationRecord:
        return self._become(S.VERIFYING)

    def restart(self, reason: str, verify: bool = False, **changes: Any) -> MigrationRecord:
        """Run again from a paused, failed, verifying, complete or rolled-back state: the one
        restart path (resume, resume after a lost Redis, the final catch-up of a cutover).

        With its progress in Redis the pump carries on where it was; without it (Redis lost its
        data) the progress is rebuilt and verification diffs source and target and feeds only
        what differs. ``verify`` asks for that diff in any case (a cutover's final catch-up). An
        ingest is fed again from its file by the caller (``Feeder.feed_file``).
        """
        had_progress = self.progress.exists()
        was = self.registry.get_migration(self.id).state
        self._become(S.RUNNING, error=None, **changes)  # refused (and nothing written) from a final state
        if not had_progress:
            self.progress.init(self.record.total, S.RUNNING.value, spent=self.recorded_spend())
        self.progress.set_budget(self.record.max_cost)  # a resume may have raised it
        if had_progress and was == S.FAILED:  # its workers dropped what they held: send it again now
            self.progress.expire_in_flight()
        log.info("migration restarted", migration_id=self.id, alias=self.record.alias, reason=reason,
                 progress_rebuilt=not had_progress)
        if self.record.kind == "ingest":
            return self.record
        fields = self.progress.get()
        if verify or not had_progress or (fields.get("enqueue_complete") == "1" and
                                          self.progress.batches_done() >= int(fields.get("total_batches", -1))):
            self.outbox.finalize(self.id)
        else:  # feeding goes on; the pump also re-sends batches whose message was lost
            self.outbox.pump(self.id)
        return self.record

    def catch_up(self, redo: list[str], total: int, done: int) -> MigrationRecord:
        """Verification found ``redo`` missing or changed in the target: feed them as a new round."""
        self.progress.start_round(redo, total, done)
        self._become(S.RUNNING)
        self.outbox.pump(self.id)
        return self.record

    def complete(self, counts: dict[str, int]) -> MigrationRecord:
        """Verified: record the target's model with its probe, and the migration complete."""
        fields = self.progress.get()
        probe = fields.get("probe")
        self.registry.put_collection(CollectionRecord(
            name=self.record.target_collection, model=self.record.to_model, fingerprint=self.record.to_fingerprint,
            dimension=int(fields.get("dimension", 0)) or None,
            origin="ingest" if self.record.kind == "ingest" else "migration", migration_id=self.id,
            probe=json.loads(probe) if probe else None,
        ))
        self.progress.set(total=counts["total"], done=counts["done"], finished_at=time.time())
        self._become(S.COMPLETE, verified=True, finished_at=time.time(), total=counts["total"],
                     done=counts["done"], failed=counts["failed"], skipped=counts["skipped"])
        log.info("migration complete", migration_id=self.id, alias=self.record.alias, **counts)
        return self.record

    def go_live(self, store: Store, search_wait_s: float = 0.0) -> MigrationRecord:
        """Switch the alias to this verified target in one write (idempotent).

        First waits up to ``search_wait_s`` for every running search process to prepare the
        target (``reembed.readiness``), so the switch changes only which prepared collection
        answers; one still not ready keeps answering from the source meanwhile.

        Refused when the alias no longer serves this migration's source (a rollback, or another
        migration, switched it meanwhile): the target would lack the writes made since.
        """
        record = self.record
        if not store.exists(record.target_collection):
            raise CollectionNotFoundError(f"target collection {record.target_collection!r} of migration "
                                          f"{record.id} is gone")
        if search_wait_s > 0 and record.kind == "migrate" and record.state != S.LIVE:
            waiting = readiness.wait_until_ready(self.progress.r, record.target_collection, search_wait_s)
            if waiting:
                log.warning("switching before every search process prepared the target; they answer from the "
                            "source until they have", alias=record.alias, collection=record.target_collection,
                            processes=waiting, waited_s=search_wait_s)
        # Wait for the lock: a small migration can finish before the producer that started it lets go.
        with alias_lock(self.progress.r, record.alias, wait_s=ALIAS_LOCK_TTL_S):
            current = self.registry.get_alias(record.alias) if self.registry.has_alias(record.alias) else None
            if current is not None and current.live_collection not in (record.target_collection,
                                                                       record.source_collection):
                raise MigrationStateError(
                        f"alias {record.alias!r} serves {current.live_collection!r}, not {record.source_collection!r} "
                        f"that migration {record.id} re-embedded; start a new migration of what it serves now")
            if current is None or current.live_collection != record.target_collection:
                self.registry.switch_alias(record.alias, record.target_collection,
                                           current.generation if current else None)
                log.info("alias switched", alias=record.alias, collection=record.target_collection,
                         model=record.to_model)
            if record.state != S.LIVE:
                self._become(S.LIVE)
        return self.record

    def rolled_back(self) -> MigrationRecord:
        return self._become(S.ROLLED_BACK)

    def note_error(self, error: str) -> MigrationRecord:
        """Keep a reason on the record without changing its state (an automatic cutover refused)."""
        self.record = self.record.model_copy(update={"error": error})
        self.registry.put_migration(self.record)
        return self.record

    # -- batches -----------------------------------------------------------------------------

    def send(self, batches: list[BatchMessage]) -> None:
        """Remember what each batch holds until it is recorded done, then send it."""
        self.progress.mark_in_flight({b.batch_id: list(b.ids) for b in batches})
        for batch in batches:
            self.outbox.batch(batch)

    def record_batch(self, batch_id: str, written: int, truncated: int = 0) -> None:
        """Count a finished batch once; the call that finishes the last one asks for verification."""
        last = self.progress.record_batch(batch_id, written, truncated)
        try:
            self.checkpoint_spend()
        except ReembedError as exc:  # the batch is written and counted; the next one copies the spend
            log.warning("spend not copied to Chroma", migration_id=self.id, error=str(exc))
        if last:
            self.outbox.finalize(self.id)

    def end_of_input(self, total_batches: int) -> None:
        """Every batch is sent: verification runs once the last one is recorded (maybe now)."""
        self.progress.set(total_batches=total_batches, enqueue_complete=1)
        if self.progress.claim_finalize_if_done():
            self.outbox.finalize(self.id)


def current_state(record: MigrationRecord, cached: str | None) -> MigrationState:
    """The one rule for reading a state: a final state recorded in Chroma wins; otherwise the
    Redis cache while Redis holds the progress (``cached``); otherwise the durable record."""
    if record.state in FINAL_STATES or cached is None:
        return record.state
    return MigrationState(cached)


def unfinished(registry: Registry, alias: str) -> MigrationRecord | None:
    """The migration of ``alias`` that is not over: planned, running, paused, verifying, or complete
    and waiting for its cutover. While there is one, the alias may neither start another migration
    (the waiting target would miss the writes) nor roll back (the migration's source would stop
    being what the alias serves)."""
    live = registry.get_alias(alias).live_collection if registry.has_alias(alias) else None
    for record in registry.migrations(alias):
        if record.state in ACTIVE_STATES or (record.state == S.COMPLETE and record.target_collection != live):
            return record
    return None
