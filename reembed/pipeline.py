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

An ingest is fed by the same ``Feeder`` from its corpus file (``feed_file``, in the producer):
same batch messages, in-flight record, backpressure and exactly-once counting. Every change of
state goes through the migration's owner, ``reembed.lifecycle.Migration``.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import redis
import structlog

from reembed.documents import (
    Document,
    read_corpus,
    user_metadata,
    validate_corpus,
)
from reembed.errors import (
    NoWorkerError,
    QueueUnavailableError,
    ReembedError,
    RetryableError,
)
from reembed.lifecycle import Migration
from reembed.messages import BatchMessage
from reembed.progress import Progress, pump_lock_key, redis_errors
from reembed.registry import MigrationRecord, MigrationState
from reembed.store import ID_CHUNK, Page, Store
from reembed.verification import check_ingest, diff

log = structlog.get_logger(__name__)


#: Batches read, sorted by length and sent together by the scan and by a new ingest's file feeder
#: (see ``length_sorted_batches``).
SORT_WINDOW_BATCHES = 8
#: How long one pump task keeps feeding (polling for room every PUMP_POLL_S) before re-sending itself.
PUMP_FEED_S = 5.0
PUMP_POLL_S = 0.05
#: Lifetime of a pump's lock: a pump SIGKILLed while holding it delays the next one by at most this.
PUMP_LOCK_TTL_S = PUMP_FEED_S + 25


#: Seconds a file feeder waits between two looks at the queue when it is full.
FEED_POLL_S = 0.2
#: How often a feeder waiting for room asks whether anything still works on the ingest.
STALL_CHECK_S = 2.0
#: How long a file feeder waits for an unreachable Redis before it gives up (exit 3).
OUTAGE_S = 60.0


#: Per process, by migration: the chunk of source ids the scan listed last (when, offset, ids).
_listed: dict[str, tuple[float, int, list[str]]] = {}
#: A listed chunk is listed again after this long, so that a long-lived pump sees recent writes.
LISTED_TTL_S = 60.0
LISTED_KEPT = 8


def scan_page(store: Store, migration_id: str, source: str, cursor: int, limit: int) -> tuple[int, Page]:
    """The documents at positions ``cursor`` to ``cursor + limit`` of the source, in storage order,
    and how many positions they span (0 at the end; more than the documents when some were
    deleted since their ids were listed).

    A plain ``get(offset=cursor)`` costs more the further the cursor is (Chroma skips the rows
    before it), which made a scan O(n²): this lists ids ``ID_CHUNK`` at a time, once per chunk,
    and reads each window's documents by id, at a cost that does not grow with the position.
    """
    listed = _listed.get(migration_id)
    if (listed is None or time.monotonic() - listed[0] >= LISTED_TTL_S
            or not listed[1] <= cursor <= cursor + limit <= listed[1] + len(listed[2])):
        while len(_listed) >= LISTED_KEPT:  # a control worker lives through many migrations
            del _listed[min(_listed, key=lambda k: _listed[k][0])]
        listed = _listed[migration_id] = (time.monotonic(), cursor, store.ids(source, cursor, max(ID_CHUNK, limit)))
    start = cursor - listed[1]
    ids = listed[2][start:start + limit]
    if not ids:
        _listed.pop(migration_id, None)
        return 0, Page(ids=[], documents=[], metadatas=[])
    return len(ids), store.get(source, ids)


def batch_message(record: MigrationRecord, batch_id: str, docs: list[Document],
                  write: Literal["add", "upsert"]) -> BatchMessage:
    return BatchMessage(migration_id=record.id, batch_id=batch_id, write=write, alias=record.alias,
                        ids=[d.id for d in docs], documents=[d.text for d in docs],
                        metadatas=[d.metadata for d in docs])


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


def window_batches(cursor: int, batch_size: int, most: int) -> int:
    """How many batches the scan window at ``cursor`` holds: one at the start, doubling up to
    ``most``, the first windows together exactly ``most`` (so the queue fills to its bound).

    The first batch then reaches a worker after one batch is read, not ``most`` (1.5 s for 16,384
    documents, the whole start of a small migration); later windows are long enough to sort by
    length. The same cursor always gets the same window, so a window re-sent after a crash holds
    the same batches under the same names.
    """
    sent = cursor // batch_size  # batches before this window: every window but the last is whole
    if sent >= most:
        return most
    doubled = 1
    while doubled <= sent:
        doubled *= 2
    return min(doubled, most - sent)


def file_batches(file: Path, batch_size: int, skipped: set[str], window: int = 1) -> Iterable[tuple[str, list[Document]]]:
    """A corpus file's batches, ``f-INDEX``: the same names and contents however often it is read.

    The file is read ``window`` batches at a time and each window cut by length, longest batch
    first, as a scan's (``scan_window``): a file in arrival order mixes short and long texts in
    every batch. ``window`` 1 keeps the file's order (an ingest recorded before windows).
    """
    wanted = (doc for doc in read_corpus(file) if doc.id not in skipped)
    index = 0
    while docs := list(itertools.islice(wanted, batch_size * window)):
        batches = reversed(length_sorted_batches(docs, batch_size)) if window > 1 else [docs]
        for batch in batches:
            yield f"f-{index}", batch
            index += 1


class Feeder:
    """Sends one migration's batches under backpressure, for a collection (the pump) or a file.

    Both kinds record every batch in flight before sending it, re-send (same id, ``upsert``) a
    batch sent long ago and never finished, never let more than ``max_waiting`` batches wait,
    and count each batch once when it is recorded done.
    """

    def __init__(self, migration: Migration, store: Store | None, max_waiting: int) -> None:
        self.migration = migration
        self.store = store
        self.max_waiting = max_waiting
        self.progress: Progress = migration.progress

    @property
    def record(self) -> MigrationRecord:
        return self.migration.record

    def room(self) -> int:
        return self.max_waiting - self.progress.waiting()

    def resend_lost(self, lost_after_s: float, load: Callable[[list[str]], list[Document]]) -> int:
        """Send again, under the same ids, the batches sent long ago and never finished.

        The broker can lose a message (Redis killed while a worker held it, a retry that could
        not be published while Redis was down), and a lost batch would otherwise hold its
        backpressure slot and stall the migration for ever. A duplicate is harmless (idempotent).
        """
        lost = self.progress.lost_batches(lost_after_s)
        if not lost:
            return 0
        self.migration.send([batch_message(self.record, batch_id, load(ids), "upsert")
                             for batch_id, ids in lost.items()])
        log.warning("lost batches sent again", migration_id=self.record.id, alias=self.record.alias,
                    batches=sorted(lost), older_than_s=lost_after_s)
        return len(lost)

    def from_collection(self, ids: list[str]) -> list[Document]:
        assert self.store is not None and self.record.source_collection is not None
        found = self.store.get(self.record.source_collection, ids)
        return _docs(found.ids, found.documents, found.metadatas, self.progress.skipped_ids())

    def feed_window(self, window: int) -> bool:
        """Send the next window of ``window`` batches (scan) or one batch (catch-up). Returns True
        when everything has been enqueued."""
        assert self.store is not None
        fields = self.progress.get()
        phase = fields.get("phase", "scan")
        cursor = int(fields.get("cursor", 0))
        sent = int(fields.get("enqueued_batches", 0))
        record = self.record
        source = record.source_collection
        assert source is not None
        if phase == "scan":
            started = time.perf_counter()
            span, page = scan_page(self.store, record.id, source, cursor, window * record.batch_size)
            self.progress.add_timings({"fetch": time.perf_counter() - started}, batches=0)
            if span:
                docs = _docs(page.ids, page.documents, page.metadatas, self.progress.skipped_ids())
                named = scan_window(cursor, docs, record.batch_size)
                self.migration.send([batch_message(record, b, batch, "add") for b, batch in named])
                self.progress.set(cursor=cursor + span, enqueued_batches=sent + len(named))
                return False
        else:
            ids = self.progress.todo(cursor, record.batch_size)
            if ids:
                started = time.perf_counter()
                docs = self.from_collection(ids)
                self.progress.add_timings({"fetch": time.perf_counter() - started}, batches=0)
                batch_id = f"r{fields.get('round', 0)}-{cursor}"
                self.migration.send([batch_message(record, batch_id, docs, "upsert")])
                self.progress.set(cursor=cursor + len(ids), enqueued_batches=sent + 1)
                return False
        self.migration.end_of_input(sent)
        log.info("enqueueing finished", migration_id=record.id, alias=record.alias, phase=phase, batches=sent)
        return True

    def feed_file(self, file: Path, lost_after_s: float, outage_s: float = OUTAGE_S,
                  stalled: Callable[[], str | None] | None = None) -> None:
        """An ingest's batches from its corpus file. Safe to call again after a crash (batches
        already sent are skipped); lost batches are sent again while it waits for room.

        While it waits for room it stops feeding when the ingest failed or was cancelled, and
        raises ``NoWorkerError`` when ``stalled`` says nothing works on it: never a silent hang.

        Redis may go away under it: it waits up to ``outage_s`` for Redis to answer again, and
        if Redis came back without this ingest's progress (restarted empty) it rebuilds the
        progress and feeds the file again from its start. Batches keep their ids, Chroma's
        ``add`` skips ids it holds, and a batch id is counted once: nothing is lost or doubled.
        """
        down_since: float | None = None
        while True:
            try:
                if not self.progress.exists():
                    self.migration.rebuild_progress(skipped_in_file(file))
                self._feed_file(file, lost_after_s, stalled)
                return
            except _ProgressLost:
                log.warning("progress lost while feeding; feeding the file again", migration_id=self.record.id)
            except QueueUnavailableError:
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > outage_s:
                    raise
                time.sleep(1.0)
                continue
            down_since = None

    def from_file(self, file: Path) -> Callable[[list[str]], list[Document]]:
        """A loader of lost batches' documents from the corpus file (batches are deterministic)."""
        skipped = self.progress.skipped_ids()

        def load(ids: list[str]) -> list[Document]:
            wanted = set(ids)
            for _, batch in file_batches(file, self.record.batch_size, skipped, self.record.file_window):
                if {d.id for d in batch} & wanted:
                    return [d for d in batch if d.id in wanted]
            return []
        return load

    def _feed_file(self, file: Path, lost_after_s: float, stalled: Callable[[], str | None] | None) -> None:
        skipped = self.progress.skipped_ids()
        sent = int(self.progress.get().get("enqueued_batches", 0))
        count = 0
        load = self.from_file(file)
        next_check = time.monotonic() + STALL_CHECK_S
        batches = file_batches(file, self.record.batch_size, skipped, self.record.file_window)
        for index, (batch_id, batch) in enumerate(batches):
            count = index + 1
            if index < sent:  # sent before a crash
                continue
            while self.room() <= 0:
                self.resend_lost(lost_after_s, load)
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + STALL_CHECK_S
                    if self.migration.state() in (MigrationState.FAILED, MigrationState.CANCELLED):
                        return  # whoever waits for it reports why
                    reason = stalled() if stalled is not None else None
                    if reason:
                        raise NoWorkerError(f"{reason}; ingest {self.record.id} stays running with "
                                            f"{index} of its batches sent (`reembed resume {self.record.id}`)")
                time.sleep(FEED_POLL_S)
            if not self.progress.exists():
                raise _ProgressLost
            self.migration.send([batch_message(self.record, batch_id, batch, "add")])
            self.progress.set(cursor=index + 1, enqueued_batches=index + 1)
        self.migration.end_of_input(count)


class _ProgressLost(Exception):
    """Redis lost a feeding ingest's progress (restarted empty)."""


def skipped_in_file(file: Path) -> dict[str, str]:
    """The documents of a corpus file that cannot be embedded (no text), with the reason."""
    return dict.fromkeys(validate_corpus(file)[1], "document has no text")


def pump(migration: Migration, store: Store, max_waiting: int, keep_feeding_s: float = PUMP_FEED_S,
         lost_after_s: float = 1200.0) -> bool:
    """Send batches while fewer than ``max_waiting`` are in flight, for up to ``keep_feeding_s``
    seconds (polling for room), so fast workers never wait for the next pump. Returns True when
    it should run again.

    The scan reads a window of batches (one at first, doubling up to ``SORT_WINDOW_BATCHES``,
    or ``max_waiting`` if smaller), sorts it by length and sends its batches as ``s-OFFSET-J``; the cursor moves past
    the window only after all of them are sent, so a pump killed mid-window sends the same
    batches (same ids) again: harmless. A batch sent more than ``lost_after_s`` ago (twice the
    visibility timeout: Celery's own redelivery gets its chance first) is sent again.
    """
    client = migration.progress.r
    # One pump at a time per migration: a pump redelivered after a crash and one sent by `resume`
    # could otherwise read the same cursor and move it backwards. The one that finds the lock
    # taken just tries again later (its chain must not end: the holder may have been killed).
    lock = client.lock(pump_lock_key(migration.id), timeout=PUMP_LOCK_TTL_S, blocking=False)
    with redis_errors("locking the pump"):
        if not lock.acquire():
            return True
    try:
        return _pump_locked(Feeder(migration, store, max_waiting), keep_feeding_s, lost_after_s)
    finally:
        with contextlib.suppress(redis.RedisError):
            lock.release()


def _pump_locked(feeder: Feeder, keep_feeding_s: float, lost_after_s: float) -> bool:
    migration = feeder.migration
    deadline = time.monotonic() + keep_feeding_s
    if migration.record.kind == "ingest":
        return False  # an ingest is fed from its file by the producer (``Feeder.feed_file``)
    if migration.state() == MigrationState.RUNNING:
        feeder.resend_lost(lost_after_s, feeder.from_collection)
    while True:
        state = migration.state()
        if state == MigrationState.PAUSED:
            return True
        if state != MigrationState.RUNNING:
            return False
        fields = feeder.progress.get()
        if fields.get("enqueue_complete") == "1":
            return False
        # A scan window's size follows from its cursor (so a window re-sent after a crash holds the
        # same batches under the same ids) and it is only sent whole, when there is room for all of it.
        window = 1
        if fields.get("phase", "scan") == "scan":
            window = window_batches(int(fields.get("cursor", 0)), feeder.record.batch_size,
                                    min(SORT_WINDOW_BATCHES, feeder.max_waiting))
        if feeder.room() >= window:
            if feeder.feed_window(window):
                return False
            continue
        if time.monotonic() >= deadline:
            return True
        time.sleep(PUMP_POLL_S)


def finalize(migration: Migration, store: Store, search_wait_s: float = 0.0) -> str:
    """Verify the target; complete the migration (and switch the alias with ``cutover=auto``,
    after waiting up to ``search_wait_s`` for the search processes to prepare it), or start a
    catch-up round of what differs. Returns the new state."""
    record = migration.record
    progress = migration.progress
    bound_log = log.bind(migration_id=record.id, alias=record.alias, collection=record.target_collection)
    if record.state == MigrationState.COMPLETE and record.error is None:
        return _maybe_go_live(migration, store, search_wait_s)  # verified before; its automatic switch was retried
    if record.state not in (MigrationState.RUNNING, MigrationState.VERIFYING):
        return str(record.state.value)
    record = migration.verifying()
    failed, skipped = progress.failed_ids(), progress.skipped_ids()
    counts = progress.counts()
    if record.kind == "ingest":
        bad = check_ingest(store, record)
        stored = store.count(record.target_collection)
        if bad or stored != counts["done"]:
            migration.fail(f"ingest verification failed: {len(bad)} inconsistent documents, {stored} stored "
                           f"vs {counts['done']} counted")
            return MigrationState.FAILED.value
        migration.complete(counts)
        return _maybe_go_live(migration, store)  # an ingest: no search process serves the alias yet
    started = time.perf_counter()
    delta = diff(store, record, failed | skipped)
    bound_log.info("source and target diffed", seconds=round(time.perf_counter() - started, 3),
                   source=delta["source"], missing=len(delta["missing"]), stale=len(delta["stale"]),
                   extra=len(delta["extra"]))
    if delta["extra"]:
        store.delete_ids(record.target_collection, delta["extra"])
    redo = delta["missing"] + delta["stale"]
    total = delta["source"] + len(skipped) + len(failed)
    if not redo:
        migration.complete({**counts, "total": total, "done": delta["matching"]})
        return _maybe_go_live(migration, store, search_wait_s)
    bound_log.info("catching up", missing=len(delta["missing"]), stale=len(delta["stale"]),
                   extra=len(delta["extra"]))
    migration.catch_up(redo, total=total, done=delta["matching"])
    return MigrationState.RUNNING.value


def _maybe_go_live(migration: Migration, store: Store, search_wait_s: float = 0.0) -> str:
    record = migration.record
    if record.kind != "ingest" and record.cutover != "auto":
        return MigrationState.COMPLETE.value
    try:
        migration.go_live(store, search_wait_s)
    except RetryableError:
        raise  # Chroma or Redis unreachable: the task retries the switch
    except ReembedError as exc:  # complete but not switched: say why; `reembed cutover` can retry
        migration.note_error(f"automatic cutover failed: {exc}")
        log.error("automatic cutover failed", migration_id=record.id, alias=record.alias, error=str(exc))
        return MigrationState.COMPLETE.value
    return MigrationState.LIVE.value
