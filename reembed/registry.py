"""Durable records: aliases, the model of each collection, migrations and their state machine.

They must outlive a lost Redis, so they live in Chroma itself, in one small collection
(``reembed-registry``) whose records are JSON documents keyed ``alias/NAME``,
``collection/NAME`` and ``migration/ID``. Switching an alias is **one upsert of one record**
(with a generation counter), which Chroma applies atomically: a reader sees the old alias or
the new one, never a mix. Writers of one alias are serialised by a Redis lock (see
``progress.alias_lock``); the generation lets a writer detect that it lost a race.
"""

from __future__ import annotations

import time
import uuid
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, Field

from reembed.errors import (
    AliasNotFoundError,
    CollectionNotFoundError,
    MigrationNotFoundError,
    MigrationStateError,
)
from reembed.fusion import FusionSpec
from reembed.store import Store, mapped_errors

REGISTRY_COLLECTION = "reembed-registry"
#: Registry records carry no meaningful vector; Chroma still wants one per record.
_DUMMY_VECTOR = [1.0]


class MigrationState(str, Enum):
    """Where a migration is in its life. The values survive JSON and Redis untouched."""

    PLANNED = "planned"
    RUNNING = "running"
    PAUSED = "paused"
    VERIFYING = "verifying"
    COMPLETE = "complete"
    LIVE = "live"
    ROLLED_BACK = "rolled_back"
    CANCELLED = "cancelled"
    FAILED = "failed"


S = MigrationState
#: The state machine: which state may follow which.
TRANSITIONS: dict[MigrationState, frozenset[MigrationState]] = {
    S.PLANNED: frozenset({S.RUNNING, S.CANCELLED, S.FAILED}),
    S.RUNNING: frozenset({S.PAUSED, S.VERIFYING, S.CANCELLED, S.FAILED}),
    S.PAUSED: frozenset({S.RUNNING, S.CANCELLED}),
    S.VERIFYING: frozenset({S.RUNNING, S.COMPLETE, S.FAILED, S.CANCELLED, S.PAUSED}),
    S.COMPLETE: frozenset({S.LIVE, S.RUNNING, S.CANCELLED}),
    S.LIVE: frozenset({S.ROLLED_BACK}),
    S.ROLLED_BACK: frozenset({S.LIVE, S.RUNNING}),  # RUNNING: the final catch-up of a cutover again
    S.CANCELLED: frozenset(),
    S.FAILED: frozenset({S.RUNNING, S.CANCELLED}),
}
ACTIVE_STATES = frozenset({S.PLANNED, S.RUNNING, S.PAUSED, S.VERIFYING})


class Canary(BaseModel):
    """A share of an alias's queries served by a complete, verified, not yet live collection."""

    collection: str
    percent: float = Field(gt=0, le=100)
    migration_id: str
    #: False: the share is answered by the canary collection alone. True: by both collections,
    #: each with its own model, their rankings fused with BM25's.
    fuse: bool = False


class AliasRecord(BaseModel):
    """A logical name and the one collection it serves (plus, optionally, a canary)."""

    alias: str
    live_collection: str
    previous_collection: str | None = None
    canary: Canary | None = None
    generation: int = 1
    updated_at: float = Field(default_factory=time.time)
    #: model name -> how ``hybrid`` fuses BM25 with that model's ranking on this alias (set by
    #: ``reembed fusion`` or ``evaluate --apply-fusion``); a model not here gets the default.
    fusion: dict[str, FusionSpec] = Field(default_factory=dict)
    #: Where the state changes of this alias's migrations are POSTed (``producer.webhooks``).
    webhook_url: str | None = None


class PlanRecord(BaseModel):
    """What ``reembed plan`` predicted for moving an alias to a model; the next migration of that
    alias to that model keeps the prediction, and ``history`` shows it next to what happened."""

    alias: str
    source_collection: str
    to_model: str
    documents: int
    workers: int
    docs_per_s: float
    bound_by: Literal["model", "chroma", "rate_limit"]
    wall_s: float
    created_at: float = Field(default_factory=time.time)


class SpendRecord(BaseModel):
    """What a migration to a model behind an API has spent, kept in Chroma as well as in Redis:
    a Redis that lost the progress (restarted empty) must not give the budget back. Written by
    the migration's owner at each state change and, while it runs, every ``SPEND_CHECKPOINT_S``;
    its own record, so that a checkpoint never rewrites (and so never races) the migration's."""

    migration_id: str
    tokens: int = 0
    cost: float = 0.0
    at: float = Field(default_factory=time.time)


class CollectionRecord(BaseModel):
    """Which model made the vectors of a physical collection."""

    name: str
    model: str
    fingerprint: str
    dimension: int | None
    origin: Literal["ingest", "migration", "adopt"]
    migration_id: str | None = None
    probe: list[float] | None = None
    created_at: float = Field(default_factory=time.time)


class MigrationRecord(BaseModel):
    """A re-embedding of an alias's collection (or of a corpus file, for an ingest)."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    kind: Literal["migrate", "ingest"] = "migrate"
    alias: str
    source_collection: str | None
    source_file: str | None = None
    target_collection: str
    from_model: str | None
    to_model: str
    to_fingerprint: str
    batch_size: int = Field(ge=1, le=2048)
    # An ingest's file is cut into batches this many at a time, sorted by length (see
    # ``reembed.pipeline.file_batches``). Kept on the record so that an ingest resumed by other
    # code cuts its file as it began to: 1 for the records written before windows existed.
    file_window: int = Field(default=1, ge=1)
    cutover: Literal["auto", "manual"] = "auto"
    skip_missing_text: bool = False
    state: MigrationState = MigrationState.PLANNED
    total: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    verified: bool = False
    verdict: str | None = None  # GO / NO-GO / INCONCLUSIVE once evaluated
    error: str | None = None
    plan: PlanRecord | None = None  # the latest `reembed plan` of this alias and model, when there is one
    max_cost: float | None = None  # a model behind an API: pause before the spend passes this
    price_per_million_tokens: float = 0.0
    webhook_url: str | None = None  # this migration's events go here (else to the alias's webhook)
    shortcut: Literal["matryoshka"] | None = None  # vectors cut from the source's (reembed.matryoshka)
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    finished_at: float | None = None
    version: int = 1


class Registry:
    """Read and write the durable records in Chroma."""

    def __init__(self, store: Store) -> None:
        self.store = store
        with mapped_errors("opening the reembed registry"):
            self._col = store.client.get_or_create_collection(
                REGISTRY_COLLECTION, embedding_function=None,
                metadata={"reembed": "registry", "version": 1},
            )

    # -- raw records -------------------------------------------------------------------------

    def _put(self, kind: str, key: str, record: BaseModel, extra: dict[str, Any] | None = None) -> None:
        meta: dict[str, Any] = {"kind": kind, **(extra or {})}
        with mapped_errors(f"writing registry record {kind}/{key}"):
            self._col.upsert(ids=[f"{kind}/{key}"], documents=[record.model_dump_json()],
                             metadatas=[meta], embeddings=[_DUMMY_VECTOR])  # type: ignore[arg-type]

    def _get(self, kind: str, key: str) -> str | None:
        with mapped_errors(f"reading registry record {kind}/{key}"):
            raw = self._col.get(ids=[f"{kind}/{key}"], include=["documents"])
        docs = raw.get("documents") or []
        return docs[0] if docs else None

    def _all(self, kind: str, where: dict[str, Any] | None = None) -> list[str]:
        clause: dict[str, Any] = {"kind": kind} if not where else {"$and": [{"kind": kind}, where]}
        with mapped_errors(f"listing registry records {kind}"):
            raw = self._col.get(where=clause, include=["documents"])
        return [d for d in (raw.get("documents") or []) if d]

    # -- aliases -----------------------------------------------------------------------------

    def get_alias(self, alias: str) -> AliasRecord:
        raw = self._get("alias", alias)
        if raw is None:
            known = ", ".join(sorted(a.alias for a in self.aliases())) or "none yet"
            raise AliasNotFoundError(f"alias {alias!r} is not registered (known: {known}); "
                                     "create it with `reembed ingest` or `reembed adopt`")
        return AliasRecord.model_validate_json(raw)

    def has_alias(self, alias: str) -> bool:
        return self._get("alias", alias) is not None

    def aliases(self) -> list[AliasRecord]:
        return [AliasRecord.model_validate_json(d) for d in self._all("alias")]

    def switch_alias(self, alias: str, to_collection: str, expected_generation: int | None) -> AliasRecord:
        """Point ``alias`` at ``to_collection`` in one write, remembering the previous collection.

        Raises:
            MigrationStateError: the alias changed since the caller read it (generation moved).
        """
        current = self.get_alias(alias) if self.has_alias(alias) else None
        if current is not None and expected_generation is not None and current.generation != expected_generation:
            raise MigrationStateError(
                f"alias {alias!r} changed while switching (generation {current.generation}, expected "
                f"{expected_generation}); read `reembed status {alias}` and try again"
            )
        record = AliasRecord(
            alias=alias,
            live_collection=to_collection,
            previous_collection=current.live_collection if current else None,
            generation=(current.generation + 1) if current else 1,
            fusion=current.fusion if current else {},  # per model: still right after the switch
            webhook_url=current.webhook_url if current else None,
        )  # a switch ends any canary: the canary either went live or is no longer wanted
        self._put("alias", alias, record)
        return record

    def forget_previous(self, alias: str) -> AliasRecord:
        """The previous collection was deleted: a rollback is no longer possible."""
        current = self.get_alias(alias)
        record = current.model_copy(update={"previous_collection": None, "generation": current.generation + 1,
                                            "updated_at": time.time()})
        self._put("alias", alias, record)
        return record

    def set_canary(self, alias: str, canary: Canary | None, expected_generation: int) -> AliasRecord:
        """Start, change or (``None``) end an alias's canary in one write.

        Raises:
            MigrationStateError: the alias changed since the caller read it.
        """
        return self._update_alias(alias, expected_generation, canary=canary)

    def set_fusion(self, alias: str, model: str, fusion: FusionSpec | None, expected_generation: int) -> AliasRecord:
        """Set (or with ``None`` forget) the fusion ``hybrid`` uses for ``model`` on ``alias``, in one write.

        Raises:
            MigrationStateError: the alias changed since the caller read it.
        """
        chosen = {name: spec for name, spec in self.get_alias(alias).fusion.items() if name != model}
        if fusion is not None:
            chosen[model] = fusion
        return self._update_alias(alias, expected_generation, fusion=chosen)

    def set_webhook(self, alias: str, url: str | None, expected_generation: int) -> AliasRecord:
        """Set (or with ``None`` remove) where this alias's migration events are delivered."""
        return self._update_alias(alias, expected_generation, webhook_url=url)

    def _update_alias(self, alias: str, expected_generation: int, **changes: Any) -> AliasRecord:
        """Change fields of the alias record in one write, if nobody changed it since the caller read it."""
        current = self.get_alias(alias)
        if current.generation != expected_generation:
            raise MigrationStateError(f"alias {alias!r} changed meanwhile (generation {current.generation}, "
                                      f"expected {expected_generation}); try again")
        record = current.model_copy(update={**changes, "generation": current.generation + 1, "updated_at": time.time()})
        self._put("alias", alias, record)
        return record

    def owners(self) -> dict[str, str]:
        """Every collection some alias needs, and that alias: live, previous (a rollback's) and
        canary collections, and the source and target of every migration not yet over or
        waiting for its cutover. One collection belongs to one alias."""
        found: dict[str, str] = {}
        for alias in self.aliases():
            for name in (alias.live_collection, alias.previous_collection,
                         alias.canary.collection if alias.canary else None):
                if name:
                    found.setdefault(name, alias.alias)
        for record in self.migrations():
            if record.state in ACTIVE_STATES or record.state == MigrationState.COMPLETE:
                for name in (record.source_collection, record.target_collection):
                    if name:
                        found.setdefault(name, record.alias)
        return found

    # -- collections -------------------------------------------------------------------------

    def put_collection(self, record: CollectionRecord) -> None:
        self._put("collection", record.name, record)

    def get_collection(self, name: str) -> CollectionRecord:
        raw = self._get("collection", name)
        if raw is None:
            raise CollectionNotFoundError(f"collection {name!r} has no recorded model; adopt it with `reembed adopt`")
        return CollectionRecord.model_validate_json(raw)

    # -- migrations --------------------------------------------------------------------------

    def put_migration(self, record: MigrationRecord) -> None:
        record.updated_at = time.time()
        self._put("migration", record.id, record, {"alias": record.alias, "created_at": record.created_at})

    def record_verdict(self, migration_id: str, verdict: str) -> None:
        """An evaluation's verdict (GO / NO-GO / INCONCLUSIVE) on the migration it judged; not a state."""
        self.put_migration(self.get_migration(migration_id).model_copy(update={"verdict": verdict}))

    def get_migration(self, migration_id: str) -> MigrationRecord:
        raw = self._get("migration", migration_id)
        if raw is None:
            raise MigrationNotFoundError(f"no migration with id {migration_id!r}; list them with `reembed status`")
        return MigrationRecord.model_validate_json(raw)

    def migrations(self, alias: str | None = None) -> list[MigrationRecord]:
        """Migrations, newest first."""
        docs = self._all("migration", {"alias": alias} if alias else None)
        records = [MigrationRecord.model_validate_json(d) for d in docs]
        return sorted(records, key=lambda r: r.created_at, reverse=True)

    def put_plan(self, plan: PlanRecord) -> None:
        self._put("plan", f"{plan.alias}/{plan.to_model}", plan, {"alias": plan.alias})

    def put_spend(self, spend: SpendRecord) -> None:
        self._put("spend", spend.migration_id, spend)

    def get_spend(self, migration_id: str) -> SpendRecord | None:
        raw = self._get("spend", migration_id)
        return SpendRecord.model_validate_json(raw) if raw else None

    def get_plan(self, alias: str, to_model: str) -> PlanRecord | None:
        raw = self._get("plan", f"{alias}/{to_model}")
        return PlanRecord.model_validate_json(raw) if raw else None

    def latest_migration(self, alias: str) -> MigrationRecord | None:
        found = self.migrations(alias)
        return found[0] if found else None

    def transition(self, record: MigrationRecord, new: MigrationState,
                   **changes: Any) -> tuple[MigrationRecord, MigrationState]:
        """Move a migration to ``new`` if the state machine allows it from its *stored* state, and
        persist it; returns the record and the state it was in. Only
        ``reembed.lifecycle.Migration`` calls this.

        Raises:
            MigrationStateError: the move is not allowed from the current state.
        """
        record = self.get_migration(record.id)  # the durable state, not a copy another process changed
        if new != record.state and new not in TRANSITIONS[record.state]:
            raise MigrationStateError(
                f"migration {record.id} is {record.state.value}; it cannot become {new.value}"
            )
        updated = record.model_copy(update={"state": new, **changes})
        self.put_migration(updated)
        return updated, record.state
