"""The migration engine shared by the producer and the workers: feed batches, verify, finish.

A migration feeds batches in two phases, both bounded by backpressure:

* ``scan``: page through the source collection in storage order; batch ``s-OFFSET`` holds the
  documents at that offset, so re-sending a batch after a crash is harmless (idempotent upsert,
  and progress counts each batch id once).
* ``todo``: after verification found documents missing or changed in the target (a worker
  failure, writes to the source during the migration, or a Redis that lost its queue), their
  ids are listed in Redis and fed again as batches ``rN-INDEX``.

``finalize`` diffs source and target by id and content hash. If they agree (minus recorded
failures and skipped documents) the migration is complete, and with ``cutover=auto`` the alias
switches in one write. If not, the difference becomes the next ``todo`` round: that is the
catch-up, and also how a migration is rebuilt after a Redis loss.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import redis
import structlog
from celery import Celery

from reembed.documents import Document, content_hash, user_metadata
from reembed.errors import CollectionNotFoundError, ReembedError
from reembed.progress import Progress, alias_lock, pump_lock_key, redis_errors
from reembed.queue import TASK_BATCH, TASK_FINALIZE
from reembed.registry import CollectionRecord, MigrationRecord, MigrationState, Registry
from reembed.store import Store

log = structlog.get_logger(__name__)


#: Batches read, sorted by length and sent together by the scan (see ``length_sorted_batches``).
SORT_WINDOW_BATCHES = 8
#: How long one pump task keeps feeding (polling for room every PUMP_POLL_S) before re-sending itself.
PUMP_FEED_S = 5.0
PUMP_POLL_S = 0.05
#: Lifetime of a pump's lock: a pump SIGKILLed while holding it delays the next one by at most this.
PUMP_LOCK_TTL_S = PUMP_FEED_S + 25


def todo_key(migration_id: str) -> str:
    return f"reembed:migration:{migration_id}:todo"


def send_batch(app: Celery, migration_id: str, batch_id: str, docs: list[Document], alias: str | None = None) -> None:
    app.send_task(TASK_BATCH, kwargs={
        "migration_id": migration_id,
        "alias": alias,
        "batch_id": batch_id,
        "ids": [d.id for d in docs],
        "documents": [d.text for d in docs],
        "metadatas": [d.metadata for d in docs],
    })


def _docs(ids: list[str], texts: list[str | None], metas: list[dict[str, Any] | None],
          skipped: set[str]) -> list[Document]:
    return [Document(i, t, user_metadata(m)) for i, t, m in zip(ids, texts, metas, strict=True)
            if i not in skipped and t is not None and t.strip()]


def length_sorted_batches(docs: list[Document], batch_size: int) -> list[list[Document]]:
    """Cut a window of documents into batches of similar length (ties by id: deterministic).

    Padding is the waste of a transformer batch: a batch pads every text to its longest. With
    lengths sorted across a window of several batches, each batch pads little.
    """
    ordered = sorted(docs, key=lambda d: (len(d.text), d.id))
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


def scan_window(cursor: int, docs: list[Document], batch_size: int) -> list[tuple[str, list[Document]]]:
    """The batches of the scan window at ``cursor``, named ``s-CURSOR-J`` (J: rank by length, so
    a window re-sent after a crash gets the same names), in sending order: longest first. The
    workers then end each window, and the migration, on its shortest batches, so no worker idles
    long while another finishes a long one."""
    batches = length_sorted_batches(docs, batch_size) if docs else [[]]
    return [(f"s-{cursor}-{j}", batches[j]) for j in reversed(range(len(batches)))]


def pump(app: Celery, store: Store, registry: Registry, client: redis.Redis, migration_id: str,
         max_waiting: int, keep_feeding_s: float = PUMP_FEED_S, lost_after_s: float = 1200.0) -> bool:
    """Send batches while fewer than ``max_waiting`` are in flight, for up to ``keep_feeding_s``
    seconds (polling for room), so fast workers never wait for the next pump. Returns True when
    it should run again.

    The scan reads a window of ``SORT_WINDOW_BATCHES`` batches (fewer if ``max_waiting`` is
    smaller), sorts it by length and sends its batches as ``s-OFFSET-J``; the cursor moves past
    the window only after all of them are sent, so a pump killed mid-window sends the same
    batches (same ids) again: harmless.

    A batch sent more than ``lost_after_s`` ago and still unfinished is sent again (same id): the
    broker can lose a message (Redis killed while a worker held it, a retry that could not be
    published while Redis was down), and a lost batch would otherwise hold its backpressure slot
    and stall the migration for ever. Twice the visibility timeout gives Celery's own redelivery
    its chance first; a duplicate is harmless (batches are idempotent by id).
    """
    progress = Progress(client, migration_id)
    # One pump at a time per migration: a pump redelivered after a crash and one sent by `resume`
    # could otherwise read the same cursor and move it backwards. The one that finds the lock
    # taken just tries again later (its chain must not end: the holder may have been killed).
    lock = client.lock(pump_lock_key(migration_id), timeout=PUMP_LOCK_TTL_S, blocking=False)
    with redis_errors("locking the pump"):
        if not lock.acquire():
            return True
    try:
        return _pump_locked(app, store, registry, progress, migration_id, max_waiting, keep_feeding_s,
                            lost_after_s)
    finally:
        with contextlib.suppress(redis.RedisError):
            lock.release()


def _pump_locked(app: Celery, store: Store, registry: Registry, progress: Progress, migration_id: str,
                 max_waiting: int, keep_feeding_s: float, lost_after_s: float) -> bool:
    client = progress.r
    deadline = time.monotonic() + keep_feeding_s
    record = None
    if progress.state() == MigrationState.RUNNING.value:
        record = registry.get_migration(migration_id)
        resend_lost(app, store, progress, record, lost_after_s)
    while True:
        state = progress.state()
        if state == MigrationState.PAUSED.value:
            return True
        if state != MigrationState.RUNNING.value:
            return False
        record = record or registry.get_migration(migration_id)
        fields = progress.get()
        if fields.get("enqueue_complete") == "1":
            return False
        room = max_waiting - (int(fields.get("enqueued_batches", 0)) - progress.batches_done())
        # A scan window is always the same size (so a window re-sent after a crash holds the same
        # batches under the same ids) and is only sent whole, when there is room for all of it.
        window = min(SORT_WINDOW_BATCHES, max_waiting) if fields.get("phase", "scan") == "scan" else 1
        if room >= window:
            if _feed(app, store, client, progress, record, fields, window):
                return False
            continue
        if time.monotonic() >= deadline:
            return True
        time.sleep(PUMP_POLL_S)


def _feed(app: Celery, store: Store, client: redis.Redis, progress: Progress, record: MigrationRecord,
          fields: dict[str, str], window: int) -> bool:
    """Send the next window of ``window`` batches (scan) or one batch (catch-up). Returns True
    when everything has been enqueued."""
    phase = fields.get("phase", "scan")
    cursor = int(fields.get("cursor", 0))
    sent = int(fields.get("enqueued_batches", 0))
    skipped = progress.skipped_ids()
    assert record.source_collection is not None
    if phase == "scan":
        started = time.perf_counter()
        page = store.page(record.source_collection, cursor, window * record.batch_size)
        progress.add_timings({"fetch": time.perf_counter() - started}, batches=0)
        if page.ids:
            docs = _docs(page.ids, page.documents, page.metadatas, skipped)
            named = scan_window(cursor, docs, record.batch_size)
            progress.mark_in_flight({b: [d.id for d in batch] for b, batch in named})
            for batch_id, batch in named:
                send_batch(app, record.id, batch_id, batch, record.alias)
            progress.set(cursor=cursor + len(page.ids), enqueued_batches=sent + len(named))
            return False
    else:
        with redis_errors("reading the catch-up list"):
            ids = list(client.lrange(todo_key(record.id), cursor, cursor + record.batch_size - 1))
        if ids:
            started = time.perf_counter()
            found = store.get(record.source_collection, ids)
            progress.add_timings({"fetch": time.perf_counter() - started}, batches=0)
            batch_id = f"r{fields.get('round', 0)}-{cursor}"
            progress.mark_in_flight({batch_id: list(found.ids)})
            send_batch(app, record.id, batch_id, _docs(found.ids, found.documents, found.metadatas, skipped),
                       record.alias)
            progress.set(cursor=cursor + len(ids), enqueued_batches=sent + 1)
            return False
    progress.set(total_batches=sent, enqueue_complete=1)
    log.info("enqueueing finished", migration_id=record.id, alias=record.alias, phase=phase, batches=sent)
    if progress.claim_finalize_if_done():
        app.send_task(TASK_FINALIZE, kwargs={"migration_id": record.id})
    return True


def resend_lost(app: Celery, store: Store, progress: Progress, record: MigrationRecord, lost_after_s: float) -> int:
    """Send again, under the same ids, the batches sent long ago and never finished."""
    lost = progress.lost_batches(lost_after_s)
    if not lost:
        return 0
    assert record.source_collection is not None
    skipped = progress.skipped_ids()
    for batch_id, ids in lost.items():
        found = store.get(record.source_collection, ids)
        progress.mark_in_flight({batch_id: ids})
        send_batch(app, record.id, batch_id, _docs(found.ids, found.documents, found.metadatas, skipped),
                       record.alias)
    log.warning("lost batches sent again", migration_id=record.id, alias=record.alias, batches=sorted(lost),
                older_than_s=lost_after_s)
    return len(lost)


def diff(store: Store, record: MigrationRecord, exclude: set[str]) -> dict[str, Any]:
    """Compare source and target by id, content hash and model fingerprint.

    Returns a dict with ``source`` (ids with text), ``matching``, ``missing`` (to embed),
    ``stale`` (changed or made by another model: to re-embed) and ``extra`` (to delete).
    """
    assert record.source_collection is not None
    source: dict[str, str] = {}
    for page in store.pages(record.source_collection):
        for doc_id, text, meta in zip(page.ids, page.documents, page.metadatas, strict=True):
            if doc_id not in exclude and text is not None and text.strip():
                source[doc_id] = content_hash(text, meta)
    target: dict[str, tuple[str, str]] = {}
    for page in store.pages(record.target_collection, documents=False):
        for doc_id, meta in zip(page.ids, page.metadatas, strict=True):
            meta = meta or {}
            target[doc_id] = (str(meta.get("content_hash", "")), str(meta.get("model_fingerprint", "")))
    missing = [i for i in source if i not in target]
    stale = [i for i, h in source.items() if i in target and target[i] != (h, record.to_fingerprint)]
    extra = [i for i in target if i not in source]
    return {"source": len(source), "missing": missing, "stale": stale, "extra": extra,
            "matching": len(source) - len(missing) - len(stale)}


def check_ingest(store: Store, record: MigrationRecord) -> list[str]:
    """For an ingest (no source collection): ids whose stored hash or fingerprint is wrong."""
    bad = []
    for page in store.pages(record.target_collection):
        for doc_id, text, meta in zip(page.ids, page.documents, page.metadatas, strict=True):
            meta = meta or {}
            if (meta.get("content_hash") != content_hash(text or "", meta)
                    or meta.get("model_fingerprint") != record.to_fingerprint):
                bad.append(doc_id)
    return bad


def finalize(app: Celery, store: Store, registry: Registry, client: redis.Redis, migration_id: str) -> str:
    """Verify the target; complete the migration, or start a catch-up round. Returns the new state."""
    record = registry.get_migration(migration_id)
    progress = Progress(client, migration_id)
    bound_log = log.bind(migration_id=migration_id, alias=record.alias, collection=record.target_collection)
    if record.state not in (MigrationState.RUNNING, MigrationState.VERIFYING):
        return record.state.value
    record = registry.transition(record, MigrationState.VERIFYING)
    progress.set(state=MigrationState.VERIFYING.value)
    failed, skipped = progress.failed_ids(), progress.skipped_ids()
    counts = progress.counts()
    if record.kind == "ingest":
        bad = check_ingest(store, record)
        stored = store.count(record.target_collection)
        if bad or stored != counts["done"]:
            message = f"ingest verification failed: {len(bad)} inconsistent documents, {stored} stored vs {counts['done']} counted"
            registry.transition(record, MigrationState.FAILED, error=message)
            progress.set(state=MigrationState.FAILED.value)
            bound_log.error("verification failed", bad=len(bad), stored=stored, counted=counts["done"])
            return MigrationState.FAILED.value
        return _complete(app, store, registry, progress, record, counts)
    delta = diff(store, record, failed | skipped)
    if delta["extra"]:
        store.delete_ids(record.target_collection, delta["extra"])
    redo = delta["missing"] + delta["stale"]
    total = delta["source"] + len(skipped)
    if not redo:
        counts = {**counts, "total": total + len(failed), "done": delta["matching"]}
        progress.set(total=counts["total"], done=counts["done"])
        return _complete(app, store, registry, progress, record, counts)
    round_no = int(progress.get().get("round", 0)) + 1
    bound_log.info("catching up", missing=len(delta["missing"]), stale=len(delta["stale"]),
                   extra=len(delta["extra"]), round=round_no)
    with redis_errors("starting a catch-up round"):
        pipe = client.pipeline()
        pipe.delete(todo_key(migration_id))
        for start in range(0, len(redo), 10_000):
            pipe.rpush(todo_key(migration_id), *redo[start:start + 10_000])
        pipe.hdel(progress.key, "enqueue_complete", "finalize_claimed", "total_batches")
        pipe.hset(progress.key, mapping={
            "phase": "todo", "cursor": 0, "round": round_no, "total": total + len(failed),
            "done": delta["matching"], "enqueued_batches": progress.batches_done(),
            "state": MigrationState.RUNNING.value,
        })
        pipe.execute()
    registry.transition(record, MigrationState.RUNNING)
    from reembed.queue import TASK_PUMP

    app.send_task(TASK_PUMP, kwargs={"migration_id": migration_id})
    return MigrationState.RUNNING.value


def _complete(app: Celery, store: Store, registry: Registry, progress: Progress, record: MigrationRecord,
              counts: dict[str, int]) -> str:
    fields = progress.get()
    probe = fields.get("probe")
    registry.put_collection(CollectionRecord(
        name=record.target_collection, model=record.to_model, fingerprint=record.to_fingerprint,
        dimension=int(fields.get("dimension", 0)) or None,
        origin="ingest" if record.kind == "ingest" else "migration", migration_id=record.id,
        probe=json.loads(probe) if probe else None,
    ))
    record = registry.transition(
        record, MigrationState.COMPLETE, verified=True, finished_at=time.time(), total=counts["total"],
        done=counts["done"], failed=counts["failed"], skipped=counts["skipped"],
    )
    progress.set(state=MigrationState.COMPLETE.value, finished_at=time.time())
    log.info("migration complete", migration_id=record.id, alias=record.alias, **counts)
    if record.kind == "ingest" or record.cutover == "auto":
        try:
            cutover(store, registry, progress.r, record)
        except ReembedError as exc:  # complete but not switched: say why, `reembed cutover` can retry
            registry.put_migration(record.model_copy(update={"error": f"automatic cutover failed: {exc}"}))
            raise
        progress.set(state=MigrationState.LIVE.value)
        return MigrationState.LIVE.value
    return MigrationState.COMPLETE.value


def cutover(store: Store, registry: Registry, client: redis.Redis, record: MigrationRecord) -> MigrationRecord:
    """Switch the alias to the migration's verified target in one write (idempotent)."""
    if not store.exists(record.target_collection):
        raise CollectionNotFoundError(f"target collection {record.target_collection!r} of migration {record.id} is gone")
    with alias_lock(client, record.alias):
        current = registry.get_alias(record.alias) if registry.has_alias(record.alias) else None
        if current is None or current.live_collection != record.target_collection:
            registry.switch_alias(record.alias, record.target_collection, current.generation if current else None)
            log.info("alias switched", alias=record.alias, collection=record.target_collection, model=record.to_model)
        if record.state != MigrationState.LIVE:
            record = registry.transition(record, MigrationState.LIVE)
    return record
