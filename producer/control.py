"""The control plane's Python API: ingest, adopt, migrate, status, cutover, rollback, pause, resume, cancel.

The CLI is a thin layer over :class:`ControlPlane`; other services can import it too, or send
the ``reembed.migrate`` task by name without importing reembed at all. Nothing here loads a
model: checks that need one (``adopt``) run on a worker through the ``reembed.check_vectors`` task.
Every change of a migration's state is asked of its owner, ``reembed.lifecycle.Migration``;
the rules of an alias (who may switch it, which collections it owns) are here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import structlog

from producer.adopt import adopt
from producer.fusion import fusion_table, set_fusion
from reembed import readiness
from reembed.documents import validate_corpus
from reembed.fusion import FusionSpec
from reembed.errors import (
    InputError,
    MigrationNotFoundError,
    MigrationStateError,
    NoWorkerError,
    ReembedError,
    WaitTimeoutError,
)
from reembed.events import check_webhook_url, last_id, safe_url
from reembed.events import read as read_events
from reembed.lifecycle import FINAL_STATES, Migration, unfinished
from reembed.matryoshka import sized_name
from reembed.messages import Outbox
from reembed.migrations import budget_fields, start_ingest, start_migration
from reembed.models import resolve_configured
from reembed.pipeline import Feeder
from reembed.progress import alias_lock, redis_client
from reembed.queue import client_app
from reembed.registry import (
    ACTIVE_STATES,
    Canary,
    MigrationRecord,
    MigrationState,
    Registry,
)
from reembed.settings import Settings
from reembed.status import alias_summary, migration_status
from reembed.store import Store
from reembed.verification import diff

log = structlog.get_logger(__name__)

#: Seconds between two looks at Redis while waiting for room in the queue or for the end.
POLL_S = 0.2
#: Seconds ``set_webhook`` waits for another writer of the alias (a cutover) to finish.
WEBHOOK_LOCK_WAIT_S = 30.0
#: While waiting for an ingest, how often to look for batches whose message was lost.
RESEND_EVERY_S = 5.0
#: While waiting, how often to ask whether anything still works on the migration.
STALL_CHECK_S = 2.0


class ControlPlane:
    """One handle on Redis, Chroma and the queue for the producer's operations."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Store.from_settings(settings)
        self.registry = Registry(self.store)
        self.redis = redis_client(settings.redis_url)
        self.outbox = Outbox(client_app(settings))

    def migration(self, migration_id: str) -> Migration:
        """The owner of one migration's state (raises MigrationNotFoundError)."""
        return Migration.load(migration_id, self.registry, self.redis, self.outbox)

    # -- ingest ------------------------------------------------------------------------------

    def ingest(self, alias: str, file: Path, model: str, batch_size: int | None = None,
               skip_missing_text: bool = False, stalled: Callable[[], str | None] | None = None,
               max_cost: float | None = None) -> MigrationRecord:
        """Create ALIAS from a corpus file: validate it whole, then feed its batches to the workers
        (``stalled``: see :meth:`wait`; ``max_cost``: see :meth:`migrate`)."""
        record = self.begin_ingest(alias, file, model, batch_size, skip_missing_text, max_cost)
        self.feed_file(record, file, stalled)
        return record

    def begin_ingest(self, alias: str, file: Path, model: str, batch_size: int | None = None,
                     skip_missing_text: bool = False, max_cost: float | None = None) -> MigrationRecord:
        """The first half of :meth:`ingest`: validate the file and record the ingest (its target
        created); :meth:`feed_file` is the second (the HTTP API runs it as a job)."""
        return start_ingest(self.settings, self.store, self.registry, self.redis, self.outbox, alias=alias,
                            file=file, model=model, batch_size=batch_size, skip_missing_text=skip_missing_text,
                            max_cost=max_cost)

    def feed_file(self, record: MigrationRecord, file: Path, stalled: Callable[[], str | None] | None = None) -> None:
        """Send the file's batches under backpressure; safe to call again after a crash (resumes)."""
        feeder = Feeder(Migration(record, self.registry, self.redis, self.outbox), None,
                        self.settings.max_waiting_batches)
        feeder.feed_file(file, lost_after_s=2.0 * self.settings.visibility_timeout_s, stalled=stalled)

    # -- adopt -------------------------------------------------------------------------------

    def adopt(self, alias: str, collection: str, model: str | None = None, timeout: float = 600) -> dict[str, Any]:
        """Put an existing collection under ALIAS after checking that its vectors are the claimed
        model's (:func:`producer.adopt.adopt`)."""
        return adopt(self, alias, collection, model, timeout)

    # -- migrate -----------------------------------------------------------------------------

    def migrate(self, alias: str, to_model: str | None, batch_size: int | None = None, cutover: str = "auto",
                skip_missing_text: bool = False, max_cost: float | None = None,
                webhook_url: str | None = None, dimensions: int | None = None,
                re_embed: bool = False) -> MigrationRecord:
        """Start a migration; workers pump and embed it. Returns at once with the record.
        ``max_cost`` (a model behind an API): pause before the spend passes it. ``webhook_url``:
        where its events are POSTed (else the alias's webhook, :meth:`set_webhook`).
        ``dimensions``: to ``to_model`` (default: the live model) cut to that size, a Matryoshka
        model (``MODEL@SIZE``), taking the stored vectors when they are that model's unless
        ``re_embed``."""
        if dimensions is not None:
            to_model = sized_name(to_model or self.registry.get_collection(
                self.registry.get_alias(alias).live_collection).model, dimensions)
        if not to_model:
            raise InputError("name the model to migrate to (--to), or a size of the live model (--dimensions)")
        return start_migration(self.settings, self.store, self.registry, self.redis, self.outbox, alias=alias,
                               to_model=to_model, batch_size=batch_size, cutover=cutover,
                               skip_missing_text=skip_missing_text, max_cost=max_cost, webhook_url=webhook_url,
                               re_embed=re_embed)

    def set_webhook(self, alias: str, url: str | None) -> dict[str, Any]:
        """Deliver the events of ALIAS's migrations to ``url`` (None: to nobody); returns the
        alias's webhook as ``webhook`` shows it."""
        checked = check_webhook_url(url)
        # Waits for the lock: nothing to decide here, and a migration that just went live may hold it.
        with alias_lock(self.redis, alias, wait_s=WEBHOOK_LOCK_WAIT_S):
            current = self.registry.get_alias(alias)
            self.registry.set_webhook(alias, checked, current.generation)
        return self.webhook(alias)

    def webhook(self, alias: str) -> dict[str, Any]:
        url = self.registry.get_alias(alias).webhook_url
        return {"alias": alias, "webhook_url": safe_url(url) if url else None}

    # -- status and waiting ------------------------------------------------------------------

    def find(self, alias_or_id: str) -> MigrationRecord:
        """The migration with this id, or the latest one of this alias."""
        if self.registry.has_alias(alias_or_id):
            latest = self.registry.latest_migration(alias_or_id)
            if latest is None:
                raise MigrationNotFoundError(f"alias {alias_or_id!r} has no migration yet")
            return latest
        try:
            return self.registry.get_migration(alias_or_id)
        except MigrationNotFoundError:
            raise MigrationNotFoundError(
                f"no alias or migration id {alias_or_id!r}; list aliases with `reembed status`") from None

    def status(self, alias_or_id: str) -> dict[str, Any]:
        """Alias, live collection and model, and the latest migration's exact progress."""
        out: dict[str, Any] = {}
        if self.registry.has_alias(alias_or_id):
            out.update(alias_summary(self.registry, self.registry.get_alias(alias_or_id)))
        try:
            record = self.find(alias_or_id)
        except MigrationNotFoundError:
            if not out:
                raise
            return out
        if not out:
            out.update(self.status(record.alias) if self.registry.has_alias(record.alias) else {"alias": record.alias})
        return {**out, **self.migration_status(record)}

    def migration_status(self, record: MigrationRecord) -> dict[str, Any]:
        return migration_status(self.redis, record, lambda: self.registry.get_migration(record.id),
                                lambda: self.registry.get_spend(record.id))

    def wait(self, migration_id: str, timeout: float | None = None,
             on_progress: Callable[[dict[str, Any]], None] | None = None,
             stalled: Callable[[], str | None] | None = None) -> MigrationRecord:
        """Block until the migration reaches a final state (complete, live, cancelled, failed).

        ``stalled`` says why nothing will work on the migration (no worker alive, the data folder
        gone), or None; it is asked every ``STALL_CHECK_S`` so that a wait never hangs silently.

        Raises:
            WaitTimeoutError: ``timeout`` passed. NoWorkerError: ``stalled`` gave a reason.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        next_resend = time.monotonic() + RESEND_EVERY_S
        next_check = time.monotonic() + STALL_CHECK_S
        after = self._last_event()
        while True:
            if stalled is not None and time.monotonic() >= next_check:
                reason = stalled()
                if reason:
                    try:
                        state = self.registry.get_migration(migration_id).state
                    except ReembedError:  # the data folder deleted under its Chroma, for one
                        state = MigrationState.RUNNING
                    if state not in FINAL_STATES:
                        raise NoWorkerError(f"{reason}; migration {migration_id} stays {state.value} and "
                                            f"goes on when a worker runs (`reembed status {migration_id}`)")
                next_check = time.monotonic() + STALL_CHECK_S
            record = self.registry.get_migration(migration_id)
            if on_progress:
                on_progress(self.migration_status(record))
            if record.kind == "ingest" and record.state == MigrationState.RUNNING and time.monotonic() > next_resend:
                self._resend_lost_file_batches(record)
                next_resend = time.monotonic() + RESEND_EVERY_S
            auto_live = record.kind == "ingest" or record.cutover == "auto"
            if record.state in FINAL_STATES and not (record.state == MigrationState.COMPLETE and auto_live
                                                     and record.error is None):
                return record
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeoutError(f"migration {migration_id} is still {record.state.value} after {timeout:.0f} s; "
                                       f"follow it with `reembed status {migration_id} --watch`")
            after = self._await_event(after, POLL_S * 2)

    def _last_event(self) -> str | None:
        try:
            return last_id(self.redis)
        except redis.RedisError:
            return None

    def _await_event(self, after: str | None, seconds: float) -> str | None:
        """Sleep ``seconds``, or less: until the next migration event (any migration's: the caller
        reads its record again either way). The state a worker writes is then seen at once, not
        up to a poll later. Returns where to read from next (None: Redis did not answer; the next
        call sleeps and asks again)."""
        if after is not None:
            try:
                found = read_events(self.redis, after, count=100, block_ms=max(1, int(seconds * 1000)))
                return found[-1].id if found else after
            except (redis.RedisError, KeyError, ValueError):  # Redis away, or an entry not ours
                pass
        time.sleep(seconds)
        return self._last_event()

    def _resend_lost_file_batches(self, record: MigrationRecord) -> None:
        """An ingest has no pump: while someone waits for it, its file's lost batches are re-sent here."""
        if record.source_file is None or not Path(record.source_file).exists():
            return
        feeder = Feeder(Migration(record, self.registry, self.redis, self.outbox), None,
                        self.settings.max_waiting_batches)
        if feeder.progress.exists():
            feeder.resend_lost(2.0 * self.settings.visibility_timeout_s, feeder.from_file(Path(record.source_file)))

    # -- cutover, rollback -------------------------------------------------------------------

    def cutover(self, alias: str, search_wait_s: float | None = None) -> dict[str, Any]:
        """Point ALIAS at its latest migration's complete, verified target in one write.

        Waits up to ``search_wait_s`` (default ``REEMBED_CUTOVER_WAIT_S``) for every running search
        process to prepare the target first; ``search_not_ready`` names those that had not.

        A final catch-up first: the target is diffed against the source once more, so writes made
        since the migration completed (or since a rollback) are not lost. If they differ, a
        catch-up round starts and the alias switches by itself when it completes
        (``catching_up`` in the answer says how many documents).
        """
        record = self.registry.latest_migration(alias)
        if record is None or record.kind != "migrate":
            raise MigrationStateError(f"alias {alias!r} has no migration to cut over to")
        if record.state not in (MigrationState.COMPLETE, MigrationState.ROLLED_BACK) or not record.verified:
            hint = (f"wait for it (`reembed status {record.id} --watch`)" if record.state in ACTIVE_STATES
                    else "start a new one with `reembed migrate`")
            raise MigrationStateError(
                f"migration {record.id} is {record.state.value}; only a complete, verified target can go live: {hint}")
        current = self.registry.get_alias(alias)
        if current.live_collection == record.target_collection:
            return {**self.status(alias), "catching_up": 0}
        if current.live_collection != record.source_collection:
            raise MigrationStateError(
                f"alias {alias!r} serves {current.live_collection!r}, not {record.source_collection!r} that migration "
                f"{record.id} re-embedded; start a new migration of what it serves now")
        migration = self.migration(record.id)
        exclude = (migration.progress.failed_ids() | migration.progress.skipped_ids()) \
            if migration.progress.exists() else set()
        delta = diff(self.store, record, exclude)
        behind = len(delta["missing"]) + len(delta["stale"]) + len(delta["extra"])
        if behind:
            migration.restart("final catch-up before cutover", verify=True, cutover="auto")
            log.info("final catch-up before cutover", alias=alias, migration_id=record.id, documents=behind)
            return {**self.status(alias), "catching_up": behind}
        wait = self.settings.cutover_wait_s if search_wait_s is None else search_wait_s
        migration.go_live(self.store, wait)
        return {**self.status(alias), "catching_up": 0,
                "search_not_ready": readiness.not_ready(self.redis, record.target_collection)}

    def rollback(self, alias: str) -> dict[str, Any]:
        """Point ALIAS back at its previous collection in one write; both collections are kept.

        Refused while a migration of ALIAS runs or waits for its cutover (its source would stop
        being what the alias serves; cancel it first). Going back to the target of a migration
        that was rolled back is that migration's cutover again, final catch-up included.
        Writes through reembed reach the previous collection too (``Writer.targets``), so the
        collection rolled back to already holds them.
        """
        current = self.registry.get_alias(alias)
        blocking = unfinished(self.registry, alias)
        if blocking is not None:
            raise MigrationStateError(
                f"migration {blocking.id} of alias {alias!r} is {blocking.state.value}; a rollback now would switch "
                f"the alias away from the collection it re-embeds: `reembed cancel {blocking.id}` first")
        if not current.previous_collection:
            raise MigrationStateError(f"alias {alias!r} has no previous collection to roll back to")
        if not self.store.exists(current.previous_collection):
            raise MigrationStateError(f"previous collection {current.previous_collection!r} no longer exists")
        latest = self.registry.latest_migration(alias)
        if (latest is not None and latest.state == MigrationState.ROLLED_BACK
                and latest.target_collection == current.previous_collection):
            return self.cutover(alias)
        with alias_lock(self.redis, alias):
            self.registry.switch_alias(alias, current.previous_collection, current.generation)
        for record in self.registry.migrations(alias):
            if record.state == MigrationState.LIVE and record.target_collection == current.live_collection:
                self.migration(record.id).rolled_back()
        log.info("alias rolled back", alias=alias, collection=current.previous_collection)
        return self.status(alias)

    def canary(self, alias: str, percent: float, fuse: bool = False) -> dict[str, Any]:
        """Serve ``percent`` of ALIAS's queries from its latest complete migration's target (0 ends it).

        With ``fuse``, that share is answered by both collections, each ranking with its own
        model, and the rankings are fused with BM25's (``served_by.fused_with``). The share is kept
        in the alias record, which every search process reads on every query.

        Raises:
            InputError: percent outside 0..100.
            MigrationStateError: no complete, verified, not-yet-live target to send queries to.
        """
        if not 0 <= percent <= 100:
            raise InputError(f"canary percent {percent} is out of range: use 0..100 (0 ends the canary)")
        latest = self.registry.latest_migration(alias)
        if (percent > 0 and latest is not None and latest.kind == "migrate" and latest.state == MigrationState.COMPLETE
                and self.settings.cutover_wait_s > 0):
            # Search processes prepare a complete migration's target as "next": wait (outside the
            # lock) so the canary's first queries find it prepared; any not ready answer from live.
            readiness.wait_until_ready(self.redis, latest.target_collection, self.settings.cutover_wait_s)
        with alias_lock(self.redis, alias):
            current = self.registry.get_alias(alias)
            canary = None
            if percent > 0:
                record = self.registry.latest_migration(alias)
                if (record is None or record.kind != "migrate" or record.state != MigrationState.COMPLETE
                        or not record.verified or record.target_collection == current.live_collection
                        or record.source_collection != current.live_collection):
                    state = record.state.value if record else "none"
                    raise MigrationStateError(
                        f"alias {alias!r} has no complete, verified migration waiting for cutover (latest: {state}); "
                        "run `reembed migrate ALIAS --to MODEL --cutover manual` and wait for it to complete")
                canary = Canary(collection=record.target_collection, percent=percent, migration_id=record.id,
                                fuse=fuse)
            self.registry.set_canary(alias, canary, current.generation)
        log.info("canary set", alias=alias, percent=percent, fuse=fuse)
        return {**self.status(alias), "canary": canary.model_dump() if canary else None}

    def set_fusion(self, alias: str, model: str | None, fusion: FusionSpec | None) -> dict[str, Any]:
        """Make ``hybrid`` on ALIAS fuse ``model``'s ranking with BM25 by ``fusion`` (``None``: the default)."""
        set_fusion(self.registry, self.redis, self.settings, alias, model, fusion)
        return self.fusions(alias)

    def fusions(self, alias: str) -> dict[str, Any]:
        """The fusion ``hybrid`` uses for each model of ALIAS, and where each came from."""
        return {"alias": alias, "fusion": fusion_table(self.registry, self.registry.get_alias(alias), self.settings)}

    def history(self, alias: str) -> dict[str, Any]:
        """Every migration (and the ingest) of ALIAS, newest first, and which collection is live."""
        current = self.registry.get_alias(alias)
        rows = [{
            "migration_id": r.id, "kind": r.kind, "from_model": r.from_model, "to_model": r.to_model,
            "source_collection": r.source_collection, "target_collection": r.target_collection,
            "state": r.state.value, "created_at": r.created_at, "finished_at": r.finished_at,
            "total": r.total, "done": r.done, "failed": r.failed, "skipped": r.skipped,
            "verified": r.verified, "verdict": r.verdict, "error": r.error, "shortcut": r.shortcut,
            "live": r.target_collection == current.live_collection,
            "canary": bool(current.canary and current.canary.collection == r.target_collection),
            **_against_plan(r),
        } for r in self.registry.migrations(alias)]
        return {"alias": alias, "live_collection": current.live_collection,
                "previous_collection": current.previous_collection, "migrations": rows}

    def retire_candidates(self, alias: str) -> dict[str, Any]:
        """Collections of ALIAS that could be deleted: neither live, canary, mid-migration, nor a
        complete target waiting for its cutover.

        The previous collection (what a rollback needs) is listed apart and only deleted by name.
        """
        current = self.registry.get_alias(alias)
        keep = {current.live_collection} | ({current.canary.collection} if current.canary else set())
        seen: set[str] = set()
        for record in self.registry.migrations(alias):
            if record.state in ACTIVE_STATES or record.state == MigrationState.COMPLETE:
                keep |= {record.target_collection}
            seen |= {c for c in (record.source_collection, record.target_collection) if c}
        keep |= {name for name, owner in self.registry.owners().items() if owner != alias}
        existing = {c for c in seen if self.store.exists(c)}
        previous = current.previous_collection if current.previous_collection in existing else None
        return {"alias": alias, "keep": sorted(keep & existing),
                "previous": previous, "deletable": sorted(existing - keep - {previous})}

    def retire(self, alias: str, also_previous: str | None = None) -> dict[str, Any]:
        """Delete the collections ``retire_candidates`` lists as deletable (and the previous one if
        ``also_previous`` names it exactly). Never automatic: the CLI asks first."""
        with alias_lock(self.redis, alias):
            plan = self.retire_candidates(alias)
            if also_previous is not None and also_previous != plan["previous"]:
                raise InputError(f"{also_previous!r} is not {alias!r}'s previous collection "
                                 f"({plan['previous'] or 'none'}); nothing was deleted")
            doomed = plan["deletable"] + ([also_previous] if also_previous else [])
            for name in doomed:
                self.store.delete(name)
                log.info("collection retired", alias=alias, collection=name)
            if also_previous:
                self.registry.forget_previous(alias)
        return {**plan, "deleted": doomed}

    # -- pause, resume, cancel ---------------------------------------------------------------

    def pause(self, migration_id: str) -> dict[str, Any]:
        return self.migration_status(self.migration(migration_id).pause())

    def resume(self, migration_id: str, stalled: Callable[[], str | None] | None = None,
               max_cost: float | None = None) -> dict[str, Any]:
        """Continue a paused or failed migration, or rebuild one whose Redis state was lost
        (``max_cost``: a new budget, for one paused on reaching its own).

        After a Redis loss the queue and the counters are gone; the durable record survives in
        Chroma. Resuming then diffs source and target and feeds only what is missing (an ingest
        feeds its file again: ids already written are skipped and counted once).
        """
        migration = self.migration(migration_id)
        record = migration.record
        if record.state not in (MigrationState.PAUSED, MigrationState.RUNNING, MigrationState.VERIFYING,
                                MigrationState.FAILED):
            raise MigrationStateError(f"migration {migration_id} is {record.state.value}; nothing to resume")
        if record.kind == "ingest" and (record.source_file is None or not Path(record.source_file).exists()):
            raise InputError(f"ingest {migration_id} needs its file {record.source_file!r} to resume")
        changes: dict[str, Any] = {}
        if max_cost is not None:
            spec = resolve_configured(self.settings, record.to_model)
            changes = budget_fields(spec, max_cost)
        record = migration.restart("resume", **changes)
        if record.kind == "ingest":
            assert record.source_file is not None
            if not migration.progress.skipped_ids():
                migration.progress.record_skipped(dict.fromkeys(validate_corpus(Path(record.source_file))[1],
                                                                "document has no text"))
            self.feed_file(record, Path(record.source_file), stalled)
        return self.migration_status(record)

    def cancel(self, migration_id: str) -> dict[str, Any]:
        """Stop a migration and delete its partial target; the source is never touched."""
        return self.migration_status(self.migration(migration_id).cancel(self.store))


def _against_plan(record: MigrationRecord) -> dict[str, Any]:
    """How long a migration took (start to complete, or to its end) next to what its plan said."""
    took = record.finished_at - record.created_at if record.finished_at else None
    plan = record.plan
    return {"wall_s": round(took, 3) if took is not None else None,
            "docs_per_s": round(record.done / took, 2) if took else None,
            "planned_wall_s": round(plan.wall_s, 3) if plan else None,
            "planned_docs_per_s": round(plan.docs_per_s, 2) if plan else None,
            "planned_workers": plan.workers if plan else None,
            "planned_bound_by": plan.bound_by if plan else None}
