"""Starting a migration or an ingest: every check before anything is written.

Lives in the shared library because two entry points start migrations: the producer (CLI and
Python API) and the ``reembed.migrate`` task that other services send to the workers.
Neither loads a model (the target model's fingerprint is a digest of its files), except to check
the Matryoshka shortcut on a sample (``reembed.matryoshka``).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Literal

import redis
import structlog

from reembed.documents import validate_corpus
from reembed.events import check_webhook_url
from reembed.errors import (
    AliasExistsError,
    InputError,
    MigrationStateError,
    MissingTextError,
    ModelNotFoundError,
)
from reembed.lifecycle import Migration, unfinished
from reembed.messages import Outbox
from reembed.matryoshka import SHORTCUT, check_sample, unavailable
from reembed.models import ModelSpec, fingerprint, load_configured, recorded_name, resolve_configured
from reembed.pipeline import SORT_WINDOW_BATCHES
from reembed.progress import alias_lock
from reembed.registry import CollectionRecord, MigrationRecord, MigrationState, PlanRecord, Registry
from reembed.settings import MAX_BATCH_SIZE, Settings
from reembed.store import Store

log = structlog.get_logger(__name__)

#: Aliases become part of collection names, so they obey Chroma's rule with room for a suffix.
ALIAS_PATTERN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62}[A-Za-z0-9])?$")
#: Ids of documents without text shown in an error; the rest are counted.
SHOWN_IDS = 10


def check_alias_name(alias: str) -> str:
    if not ALIAS_PATTERN.match(alias) or ".." in alias:
        raise InputError(
            f"alias {alias!r} is not valid: use 1-64 characters from A-Z a-z 0-9 . _ -, "
            "starting and ending with a letter or digit"
        )
    return alias


def check_batch_size(batch_size: int | None, settings: Settings) -> int:
    size = settings.batch_size if batch_size is None else batch_size
    if not 1 <= size <= MAX_BATCH_SIZE:
        raise InputError(f"batch size {size} is out of range: use 1..{MAX_BATCH_SIZE}")
    return size


def target_name(alias: str, spec: ModelSpec, migration_id: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(spec.name).name).strip("-").lower()[:40] or "model"
    return f"{alias}--{slug}--{migration_id[:8]}"


def _refuse_if_active(registry: Registry, alias: str) -> None:
    record = unfinished(registry, alias)
    if record is not None and record.state == MigrationState.COMPLETE:
        raise MigrationStateError(
            f"migration {record.id} of alias {alias!r} is complete and waits for its cutover; "
            f"`reembed cutover {alias}`, or `reembed cancel {record.id}`")
    if record is not None:
        raise MigrationStateError(
            f"migration {record.id} of alias {alias!r} is {record.state.value}; wait for it, or "
            f"`reembed cancel {record.id}`")


#: A plan older than this, or made for another source collection, says nothing about a migration.
PLAN_KEPT_S = 7 * 24 * 3600


def _recent_plan(registry: Registry, alias: str, source: str, to_model: str) -> PlanRecord | None:
    plan = registry.get_plan(alias, to_model)
    if plan is None or plan.source_collection != source or time.time() - plan.created_at > PLAN_KEPT_S:
        return None
    return plan


def start_migration(settings: Settings, store: Store, registry: Registry, client: redis.Redis, outbox: Outbox, *,
                    alias: str,
                    to_model: str, batch_size: int | None = None, cutover: Literal["auto", "manual"] | str = "auto",
                    skip_missing_text: bool = False, max_cost: float | None = None,
                    webhook_url: str | None = None, re_embed: bool = False) -> MigrationRecord:
    """Check everything, create the target collection, record the migration as running.

    A target that is the live model at fewer dimensions (a Matryoshka model) takes the stored
    vectors, cut, once a sample shows that equals the endpoint's answer; ``re_embed`` embeds
    every document instead.

    Raises:
        AliasNotFoundError, ModelNotFoundError, MissingTextError, MigrationStateError,
        InputError (empty collection, same model, bad batch size), CollectionExistsError.
    """
    if cutover not in ("auto", "manual"):
        raise InputError(f"cutover {cutover!r}: use auto or manual")
    size = check_batch_size(batch_size, settings)
    webhook_url = check_webhook_url(webhook_url)
    spec = resolve_configured(settings, to_model)
    to_fingerprint = fingerprint(spec, settings.data_dir)
    cut_from = None if re_embed else _shortcut_source(settings, store, registry, alias, spec)
    with alias_lock(client, alias):
        alias_record = registry.get_alias(alias)
        _refuse_if_active(registry, alias)
        source = alias_record.live_collection
        if cut_from is not None and cut_from != source:
            raise MigrationStateError(f"alias {alias!r} switched to {source!r} while the shortcut was checked on "
                                      f"{cut_from!r}; run migrate again")
        source_record = registry.get_collection(source)
        if source_record.fingerprint == to_fingerprint:
            raise InputError(f"alias {alias!r} is already embedded with {spec.name!r}; nothing to migrate")
        if store.count(source) == 0:
            raise InputError(f"collection {source!r} behind alias {alias!r} is empty; nothing to migrate")
        total, missing = store.without_text(source)
        if missing and not skip_missing_text:
            raise MissingTextError(source, len(missing), missing[:SHOWN_IDS])
        record = MigrationRecord(
            alias=alias, source_collection=source, target_collection="", from_model=source_record.model,
            to_model=spec.name, to_fingerprint=to_fingerprint, batch_size=size, cutover=cutover,
            skip_missing_text=skip_missing_text, total=total, skipped=len(missing),
            plan=_recent_plan(registry, alias, source, spec.name), **budget_fields(spec, max_cost),
            webhook_url=webhook_url, shortcut=SHORTCUT if cut_from else None,
        )
        record.target_collection = target_name(alias, spec, record.id)
        _create_target(store, registry, record, spec, "migration")
        Migration(record, registry, client, outbox).begin(dict.fromkeys(missing, "document has no text"))
    log.info("migration started", migration_id=record.id, alias=alias, collection=record.target_collection,
             from_model=record.from_model, to_model=spec.name, total=total, skipped=len(missing),
             shortcut=record.shortcut)
    return record


def cuts_from(settings: Settings, registry: Registry, collection: str, spec: ModelSpec) -> bool:
    """Whether ``spec``'s vectors are ``collection``'s cut short (its model, declared as today, at
    fewer dimensions): the Matryoshka shortcut applies, pending the sample check."""
    if spec.api is None or not spec.api.matryoshka:
        return False
    record = registry.get_collection(collection)
    try:
        source_spec = resolve_configured(settings, record.model)
    except ModelNotFoundError:
        return False
    return unavailable(source_spec, spec) is None and record.fingerprint == fingerprint(source_spec, settings.data_dir)


def _shortcut_source(settings: Settings, store: Store, registry: Registry, alias: str, spec: ModelSpec) -> str | None:
    """The live collection of ``alias`` when a migration to ``spec`` may cut its stored vectors
    (``spec`` is its model at fewer dimensions, and a sample agrees); None when it must embed.

    Raises:
        InputError: the shortcut applies but the sample disagrees (the fix: ``--re-embed``).
    """
    source = registry.get_alias(alias).live_collection
    if not cuts_from(settings, registry, source, spec):
        return None
    total = store.count(source)
    if not total:
        return None  # refused below: nothing to migrate
    cosine = check_sample(store, source, total, load_configured(settings, spec.name))
    log.info("matryoshka shortcut checked on a sample", alias=alias, collection=source, to_model=spec.name,
             lowest_cosine=round(cosine, 6))
    return source


def start_ingest(settings: Settings, store: Store, registry: Registry, client: redis.Redis, outbox: Outbox, *,
                 alias: str,
                 file: Path, model: str, batch_size: int | None = None,
                 skip_missing_text: bool = False, max_cost: float | None = None) -> MigrationRecord:
    """Validate a corpus file whole, then create the alias's first collection and record the ingest.

    Raises:
        InputError (bad file, duplicate ids, bad metadata), MissingTextError, AliasExistsError,
        ModelNotFoundError, MigrationStateError.
    """
    check_alias_name(alias)
    size = check_batch_size(batch_size, settings)
    spec = resolve_configured(settings, model)
    to_fingerprint = fingerprint(spec, settings.data_dir)
    total, empty = validate_corpus(file)
    if empty and not skip_missing_text:
        raise MissingTextError(str(file), len(empty), empty[:SHOWN_IDS])
    with alias_lock(client, alias):
        if registry.has_alias(alias):
            raise AliasExistsError(f"alias {alias!r} already exists; migrate it, or ingest under another alias")
        _refuse_if_active(registry, alias)
        record = MigrationRecord(
            kind="ingest", alias=alias, source_collection=None, source_file=str(file.resolve()),
            target_collection="", from_model=None, to_model=spec.name, to_fingerprint=to_fingerprint,
            batch_size=size, file_window=SORT_WINDOW_BATCHES, skip_missing_text=skip_missing_text, total=total,
            skipped=len(empty), **budget_fields(spec, max_cost),
        )
        record.target_collection = target_name(alias, spec, record.id)
        _create_target(store, registry, record, spec, "ingest")
        Migration(record, registry, client, outbox).begin(dict.fromkeys(empty, "document has no text"), phase="file")
    log.info("ingest started", migration_id=record.id, alias=alias, collection=record.target_collection,
             model=spec.name, total=total)
    return record


def budget_fields(spec: ModelSpec, max_cost: float | None) -> dict[str, Any]:
    """The price a migration is charged at and its limit (``--max-cost``), checked.

    Raises:
        InputError: a limit for a model that costs nothing per request, or a negative one.
    """
    if max_cost is not None:
        if spec.api is None:
            raise InputError(f"--max-cost applies to a model behind an API; {spec.name!r} runs in the workers "
                             "and costs nothing per request")
        if max_cost < 0:
            raise InputError(f"--max-cost {max_cost} is negative: give the most this migration may spend")
    return {"max_cost": max_cost, "price_per_million_tokens": spec.price_per_million_tokens}


def _create_target(store: Store, registry: Registry, record: MigrationRecord, spec: ModelSpec,
                   origin: Literal["ingest", "migration"]) -> None:
    """The target mirrors its source (distance space, HNSW settings, the user's collection
    metadata) and records the new model as its embedding function, so that applications reading
    Chroma directly embed their queries with the right model."""
    metadata: dict[str, Any] = {}
    hnsw: dict[str, Any] | None = None
    if record.source_collection:
        metadata = {k: v for k, v in (store.metadata(record.source_collection) or {}).items()
                    if not k.startswith(("reembed_", "hnsw:"))}
        hnsw = store.configuration(record.source_collection).get("hnsw") or None
    metadata.update({"reembed_model": spec.name, "reembed_fingerprint": record.to_fingerprint,
                     "reembed_migration": record.id, "reembed_alias": record.alias})
    store.create(record.target_collection, metadata=metadata, hnsw=hnsw, model_name=recorded_name(spec),
                 normalize=spec.normalize, openai_config=spec.api.chroma_config() if spec.api else None)
    registry.put_collection(CollectionRecord(
        name=record.target_collection, model=spec.name, fingerprint=record.to_fingerprint,
        dimension=spec.dimension, origin=origin, migration_id=record.id,
    ))
