"""Re-embedding one batch: plain functions, so they are tested without Celery.

A batch is embedded as a whole; if the model raises, the batch is split in halves until the
document(s) that make it fail are isolated. Those are recorded as failed with the reason and
every other document proceeds. Connection errors are *not* split: they propagate as
``RetryableError`` and the task retries the whole batch later.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis
import structlog

from reembed.budget import Budget
from reembed.documents import provenance
from reembed.errors import (
    BudgetReachedError,
    CollectionNotFoundError,
    InputError,
    MigrationStateError,
    ModelError,
    ReembedError,
    RetryableError,
    StoreAuthError,
    StoreError,
)
from reembed.lifecycle import Migration
from reembed.matryoshka import SHORTCUT, from_source
from reembed.messages import BatchMessage, Outbox
from reembed.models import LoadedModel
from reembed.progress import MAX_DELIVERIES
from reembed.registry import MigrationRecord, MigrationState, Registry
from reembed.store import Store
from reembed.write_turns import WriteTurns

log = structlog.get_logger(__name__)


#: States in which a batch is embedded and written.
RUNNING_STATES = (MigrationState.RUNNING, MigrationState.VERIFYING)


class PausedError(RetryableError):
    """The migration is paused: hold the batch and try it again later."""


@dataclass
class BatchOutcome:
    """What happened to one batch."""

    batch_id: str
    written: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    dropped: str | None = None  # why the batch was not processed at all


def embed_isolating(embed: Callable[[list[str]], np.ndarray], ids: list[str], texts: list[str],
                    ) -> tuple[list[int], np.ndarray | None, dict[str, str]]:
    """Embed ``texts``; on a model error split in halves to find the failing documents.

    Returns:
        (indexes that succeeded, their vectors in that order, {id: reason} of failures).
    """
    try:
        vectors = embed(texts)
        if not np.all(np.isfinite(vectors)):
            raise ValueError("the model returned NaN or infinite values")
        return list(range(len(texts))), vectors, {}
    except (RetryableError, ModelError):
        raise  # the endpoint or the model, not a document: splitting would not help
    except Exception as exc:  # a poison document: anything the model itself raises
        if len(texts) == 1:
            return [], None, {ids[0]: f"{type(exc).__name__}: {exc}"[:500]}
    mid = len(texts) // 2
    left = embed_isolating(embed, ids[:mid], texts[:mid])
    right = embed_isolating(embed, ids[mid:], texts[mid:])
    indexes = left[0] + [mid + i for i in right[0]]
    parts = [v for v in (left[1], right[1]) if v is not None and len(v)]
    vectors_out = np.concatenate(parts) if parts else None
    return indexes, vectors_out, {**left[2], **right[2]}


#: Per process: the migration records seen (their model and target never change) and the
#: migrations whose probe vector this process already checked. Keeps Chroma off the per-batch path.
_records: dict[str, MigrationRecord] = {}
_probe_checked: set[str] = set()


def _migration(migration_id: str, registry: Registry, client: redis.Redis, outbox: Outbox) -> Migration:
    record = _records.get(migration_id)
    if record is None:
        record = _records[migration_id] = registry.get_migration(migration_id)
    return Migration(record, registry, client, outbox)


def reembed_batch(
    message: BatchMessage,
    *,
    first_delivery: bool,
    store: Store,
    registry: Registry,
    client: redis.Redis,
    outbox: Outbox,
    load: Callable[[str], LoadedModel],
    turns: WriteTurns | None = None,
) -> BatchOutcome:
    """Embed one batch with the migration's target model and write it idempotently.

    Raises:
        PausedError: the migration is paused; the caller retries later.
        RetryableError: Chroma or Redis is unreachable.
        ModelMismatchError: this worker's model is not the one the migration records.
    """
    started = time.perf_counter()
    migration_id, batch_id, ids = message.migration_id, message.batch_id, message.ids
    migration = _migration(migration_id, registry, client, outbox)
    progress, record = migration.progress, migration.record
    outcome = BatchOutcome(batch_id)
    in_redis = progress.exists()
    state = migration.state() if in_redis else migration.refresh().state
    if state not in RUNNING_STATES and state != MigrationState.PAUSED and in_redis:
        # This process may hold the record from before a restart (a cutover's catch-up): look again.
        _records[migration_id] = migration.refresh()
        state = migration.state()
    if state in RUNNING_STATES and not in_redis:
        # Redis lost its data (restarted without persistence): counting this batch into empty
        # progress would make half a record. Drop it; `reembed resume` diffs and re-feeds it.
        outcome.dropped = f"progress of migration {migration_id} is gone from Redis; run `reembed resume {migration_id}`"
        return outcome
    if state == MigrationState.PAUSED:
        raise PausedError(f"migration {migration_id} is paused")
    if state not in RUNNING_STATES:
        outcome.dropped = f"migration is {state.value}"
        return outcome
    # Counted on each delivery from the queue (not on Celery retries of the same delivery).
    deliveries = progress.count_delivery(batch_id) if first_delivery else 0
    if deliveries > MAX_DELIVERIES:
        reason = f"batch {batch_id} was delivered {MAX_DELIVERIES} times without finishing (worker lost each time)"
        outcome.failed = dict.fromkeys(ids, reason)
        progress.record_failures(outcome.failed)
        migration.record_batch(batch_id, 0)
        return outcome

    try:
        model = load(record.to_model)
        model.require_fingerprint(record.to_fingerprint, f"migration {migration_id}")
        if migration_id not in _probe_checked:  # every worker of a migration must embed the probe alike
            progress.record_probe(model.probe, model.dimension)
            recorded = progress.probe()
            if recorded:
                model.check_probe(recorded, f"migration {migration_id}")
            _probe_checked.add(migration_id)
    except ModelError as exc:
        # Retrying will not fix missing or broken weights, or another model's: stop the migration
        # (resumable once the worker is fixed) rather than lose the batch or mix vectors.
        with contextlib.suppress(MigrationStateError):
            migration.fail(f"a worker cannot embed with {record.to_model!r}: {exc}")
        outcome.dropped = f"migration failed: {exc}"
        return outcome

    # The first delivery of a first-pass batch (its message says ``add``): the target has none of
    # these ids, and `add` is several times faster than `upsert`. A redelivery upserts.
    write = store.add if (deliveries == 1 and message.write == "add") else store.upsert
    book = time.perf_counter() - started
    try:
        embed: Callable[[list[str]], np.ndarray] = model.embed_documents
        sent: Callable[[], int] | None = None
        if record.shortcut == SHORTCUT and record.source_collection:
            embed, sent = from_source(store, record.source_collection, ids, message.documents, model)
        truncated: dict[str, int] = {}
        with model.metered(Budget(progress, record.price_per_million_tokens)):
            written, failed, timings = embed_and_write(
                model, record.target_collection, ids, message.documents, message.metadatas, write, embed,
                turns.turn if turns is not None else None,
                while_writing=lambda: truncated.update(truncated_tokens(model, ids, message.documents)))
        if sent is not None and sent():
            log.info("documents embedded through the endpoint: their text changed since the source was read",
                     migration_id=migration_id, batch=batch_id, count=sent(), of=len(ids))
    except BudgetReachedError as exc:
        # The next request could pass --max-cost: nothing more is sent. What this batch wrote is
        # rewritten by id when it runs again after `resume --max-cost`, so nothing counts twice.
        with contextlib.suppress(MigrationStateError):
            migration.pause(str(exc), budget=True)
        raise PausedError(str(exc)) from None
    except ModelError as exc:
        # A model behind an API that changed (its probe moved), answered the wrong dimension or
        # refused the key: stop before another vector is written. What this batch wrote is
        # rewritten by id on resume, so nothing is counted twice.
        with contextlib.suppress(MigrationStateError):
            migration.fail(f"a worker cannot embed with {record.to_model!r}: {exc}")
        outcome.dropped = f"migration failed: {exc}"
        return outcome
    except CollectionNotFoundError:
        if registry.get_migration(migration_id).state == MigrationState.CANCELLED:
            outcome.dropped = "migration was cancelled"
            return outcome
        raise
    except (InputError, StoreError) as exc:
        if isinstance(exc, (RetryableError, StoreAuthError)):
            raise  # not the documents' fault: the task retries (a token fixed meanwhile, a server back)
        # Chroma refused the batch (validation catches what it knows Chroma refuses; this is the
        # rest): the documents are recorded as failed with the reason, and the migration goes on.
        with contextlib.suppress(ReembedError):
            store.delete_ids(record.target_collection, ids)  # a chunk may have been written before
        outcome.failed = dict.fromkeys(ids, f"Chroma refused the write: {exc}")
        progress.record_failures(outcome.failed)
        migration.record_batch(batch_id, 0)
        return outcome
    tail = time.perf_counter()
    if truncated:
        progress.record_truncated_sample(truncated)
        log.info("documents truncated by the model", migration_id=migration_id, batch=batch_id,
                 max_tokens=model.max_tokens, ids=sorted(truncated)[:10], count=len(truncated))
    outcome.written = written
    outcome.failed = failed
    progress.record_failures(failed)
    migration.record_batch(batch_id, written, len(truncated))
    timings["bookkeeping"] += book + time.perf_counter() - tail
    progress.add_timings(timings)
    return outcome


def truncated_tokens(model: LoadedModel, ids: list[str], texts: list[str]) -> dict[str, int]:
    """Documents longer than the model reads, with their token count. A character is at most
    four UTF-8 bytes and a byte-level tokenizer makes at most one token per byte, so only texts
    longer than a quarter of the limit can exceed it: the tokenizer runs on those alone."""
    limit = model.max_tokens
    if limit is None:
        return {}
    long = [i for i, t in enumerate(texts) if 4 * len(t) > limit - 2]
    if not long:
        return {}
    counts = model.count_tokens([texts[i] for i in long])
    return {ids[i]: n for i, n in zip(long, counts, strict=True) if n > limit}


#: A write this large goes as soon as Chroma is free: larger ones are not faster per document
#: (BENCHMARKS.md, "At Chroma's ceiling"), and the server then works while the model embeds.
MIN_WRITE = 512
#: Seconds per document of one Chroma write, as this process last measured it (starts at the
#: single-writer rate in BENCHMARKS.md: about 800 documents/s in writes of 512).
_write_s_per_doc = 1 / 800


def last_hidden_chance(rest: int, waiting: int, next_chunk: int, embed_s_per_doc: float,
                       write_s_per_doc: float) -> bool:
    """Whether to write the ``waiting`` rows now so that embedding the ``rest`` of the batch hides
    the write, because after the next chunk it no longer would.

    Each write has a fixed cost (HTTP, a SQLite transaction, the HNSW log), paid in Chroma's CPU,
    which on a shared machine is the model's: on the 2-core machine of BENCHMARKS.md, 384-d, a
    write of 16 SciFact documents took 36 ms and one of 64 took 77 (medians of 10).
    Writing every chunk as soon as it is hidden made four writes of a 64-document batch of a
    transformer on a CPU; writing at the last moment that is still hidden makes two (everything
    but the last chunk, hidden behind it, then the last chunk), and leaves the same part unhidden.
    """
    hidden_now = rest * embed_s_per_doc >= waiting * write_s_per_doc
    hidden_next = (rest - next_chunk) * embed_s_per_doc >= (waiting + next_chunk) * write_s_per_doc
    return hidden_now and (rest <= next_chunk or not hidden_next)


def length_order(texts: list[str]) -> list[int]:
    """Positions of ``texts``, shortest first (ties keep their order): the order to embed them in,
    so that each forward pass pads its texts to a length close to theirs. A batch cut from a
    scan's length-sorted window is in this order already, and keeps it."""
    return sorted(range(len(texts)), key=lambda i: len(texts[i]))


Row = tuple[str, np.ndarray, str, dict[str, Any]]  # id, vector, text, metadata: embedded, not yet written


def embed_and_write(model: LoadedModel, collection: str, ids: list[str], documents: list[str],
                    metadatas: list[dict[str, Any]], write: Callable[..., None],
                    embed: Callable[[list[str]], np.ndarray] | None = None,
                    turn: Callable[[], AbstractContextManager[float]] | None = None,
                    while_writing: Callable[[], object] | None = None,
                    ) -> tuple[int, dict[str, str], dict[str, float]]:
    """Embed a batch chunk by chunk and write it in as few writes as keep both the model and
    Chroma busy.

    A Chroma write has a large fixed cost (a write of 32 documents runs at a fraction of the
    rate of one of 512), so writes should be large; but the model idles while a write it waits
    for runs, and Chroma idles while the model embeds. So whenever Chroma is free, what is
    embedded so far is written if it is a large write (``MIN_WRITE``: the server works while
    the model embeds the rest), or if the rest of the batch will keep the model busy for at
    least as long as that write takes and would not after the next chunk (a transformer on a
    CPU: the write is hidden, and made as late and as large as still hides it; see
    ``last_hidden_chance``). Otherwise (a fast model, a small batch) it waits to be part of a
    larger write. At most one write is in flight, so memory stays one batch deep. ``embed``
    replaces ``model.embed_documents`` (the Matryoshka shortcut's cut of stored vectors).

    ``turn`` is this worker's turn at its Chroma server (``reembed.write_turns``): a write waits
    for it in the writer thread while the model goes on embedding, and then takes everything
    embedded by then. So the writes a busy server takes one at a time grow to a whole batch
    instead of queueing as chunks, each paying the fixed cost and a wait for the turn.

    ``while_writing`` runs here once everything is embedded, while the batch's last write is in
    flight: the batch's own bookkeeping (the truncation count's tokenizer pass, ~20 ms for 64
    SciFact documents) in time the model would otherwise spend waiting for Chroma.

    The batch is embedded shortest text first (``length_order``): a transformer pads every text
    of a forward pass to its longest, so chunks of similar lengths waste little. A scan's and an
    ingest's batches are cut from length-sorted windows; a catch-up round's, or an ingest's
    recorded before windows, are not (short texts of mixed lengths: 1.6 x faster, BENCHMARKS.md,
    "Padding").

    Returns:
        (documents written, {id: reason} of failures, seconds spent embedding / writing / waiting
        for the writer at the end / waiting for turns / in ``while_writing``, as "bookkeeping").
    """
    order = length_order(documents)
    ids, documents, metadatas = [ids[i] for i in order], [documents[i] for i in order], [metadatas[i] for i in order]
    chunk = max(model.batch_size, 1)
    written = 0
    failed: dict[str, str] = {}
    timings = {"embed": 0.0, "write": 0.0, "write_wait": 0.0, "write_turn": 0.0, "bookkeeping": 0.0}
    ready: list[Row] = []
    lock = threading.Lock()  # ``ready`` is filled here and emptied by the writer thread

    def timed_write() -> int:
        global _write_s_per_doc
        with turn() if turn is not None else contextlib.nullcontext(0.0) as waited:
            timings["write_turn"] += waited
            with lock:
                rows = ready[:]
                ready.clear()
            if not rows:
                return 0
            start = time.perf_counter()
            write(collection, ids=[r[0] for r in rows], embeddings=np.stack([r[1] for r in rows]),
                  documents=[r[2] for r in rows], metadatas=[r[3] for r in rows])
            seconds = time.perf_counter() - start
        timings["write"] += seconds
        _write_s_per_doc = 0.7 * _write_s_per_doc + 0.3 * seconds / len(rows)
        return len(rows)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="chroma-write") as writer:
        pending: Future[int] | None = None
        for begin in range(0, len(ids), chunk):
            part_ids, part_docs = ids[begin:begin + chunk], documents[begin:begin + chunk]
            start = time.perf_counter()
            ok, vectors, part_failed = embed_isolating(embed or model.embed_documents, part_ids, part_docs)
            timings["embed"] += time.perf_counter() - start
            failed.update(part_failed)
            if vectors is not None:
                rows = [(part_ids[i], vectors[n], part_docs[i], provenance(model, part_docs[i], metadatas[begin + i]))
                        for n, i in enumerate(ok)]
                with lock:
                    ready.extend(rows)
            waiting = len(ready)  # exact when used: a write is only sent while none is in flight
            embedded = begin + len(part_ids)
            rest = len(ids) - embedded
            if waiting and rest and (pending is None or pending.done()):
                if waiting >= MIN_WRITE or last_hidden_chance(rest, waiting, min(chunk, rest),
                                                              timings["embed"] / embedded, _write_s_per_doc):
                    if pending is not None:
                        written += pending.result()  # finished: raises the write's error (the task retries)
                    pending = writer.submit(timed_write)
        start = time.perf_counter()

        def write_rest() -> int:  # runs after ``pending`` (one thread), which may have taken it all
            with lock:
                left = bool(ready)
            return timed_write() if left else 0

        last = writer.submit(write_rest)
        if while_writing is not None:
            while_writing()
            timings["bookkeeping"] = time.perf_counter() - start
        if pending is not None:
            written += pending.result()
        written += last.result()
        timings["write_wait"] += time.perf_counter() - start - timings["bookkeeping"]
    return written, failed, timings
