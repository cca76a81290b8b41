"""BM25 indexes per collection: persisted, loaded at start-up, rebuilt in the background, swapped whole.

Rules this module keeps:

- A query never waits for a rebuild: it gets the index in memory, however old, while a new one
  is built on a background thread and then swapped in with one assignment.
- A query never sees a half-built index: an index is built completely in memory, written into a
  fresh directory, and published by atomically replacing a ``CURRENT`` pointer file. Another
  process loading at the same moment reads either the old directory or the new one.
- Processes share one copy: ``reembed serve --workers N`` runs N processes over one data folder.
  A build takes a file lock per collection; a process that waits for it first looks whether the
  index another one just published is already as fresh as it needs, and maps it instead of
  building the same thing again. Loaded indexes are memory maps of the published files
  (``reembed.bm25``), so N processes hold one copy in the page cache, not N on the heap.
- Staleness is detected by a signature (collection name, document count, and the collection's
  write counter that reembed's write path bumps in Redis). Chroma has no change feed; a write
  made behind reembed's back that keeps the count equal is seen on the next rebuild only.

Layout: ``DATA_DIR/bm25/<collection>/CURRENT`` names ``<collection>/<build-dir>/``.
"""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog

from reembed.bm25 import Bm25Index, IndexSignature
from reembed.errors import ReembedError, StoreError
from reembed.store import Store

log = structlog.get_logger(__name__)

_POINTER = "CURRENT"


class IndexManager:
    """Hold one per process. Thread-safe; builds run one at a time on a background thread."""

    def __init__(self, root: Path, store: Store, writes: Callable[[str], int] | None = None,
                 check_interval_s: float = 1.0) -> None:
        self.root = root
        self.store = store
        self._writes = writes
        self.check_interval_s = check_interval_s
        self._indexes: dict[str, Bm25Index] = {}
        self._pending: dict[str, Future[Bm25Index | None]] = {}
        self._last_check: dict[str, float] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bm25-build")
        self.last_error: dict[str, str] = {}

    # -- reading -------------------------------------------------------------------------------

    def current(self, collection: str) -> Bm25Index | None:
        """The index in memory (or on disk) for ``collection``, without building anything."""
        with self._lock:
            index = self._indexes.get(collection)
        if index is not None:
            return index
        index = self._load(collection)
        if index is not None:
            with self._lock:
                index = self._indexes.setdefault(collection, index)
        return index

    def ready(self, collection: str) -> Bm25Index:
        """The index for ``collection``, building it now if none exists anywhere (the first time only)."""
        index = self.current(collection)
        if index is not None:
            return index
        with self._build_lock(collection):
            index = self.current(collection)  # another process may have built it while we waited
            return index if index is not None else self.rebuild(collection)

    def loaded(self) -> dict[str, Bm25Index]:
        with self._lock:
            return dict(self._indexes)

    # -- freshness -----------------------------------------------------------------------------

    def signature(self, collection: str) -> IndexSignature:
        writes = 0
        if self._writes is not None:
            with contextlib.suppress(ReembedError):  # Redis down: the count still tells adds and deletes
                writes = self._writes(collection)
        return IndexSignature(collection, self.store.count(collection), writes)

    def is_fresh(self, collection: str) -> bool:
        index = self.current(collection)
        return index is not None and index.signature == self.signature(collection)

    def refresh(self, collection: str) -> Future[Bm25Index | None] | None:
        """Check ``collection`` now and start a background rebuild if its index is stale or missing."""
        self._last_check[collection] = time.monotonic()
        try:
            fresh = self.is_fresh(collection)
        except ReembedError as exc:  # Chroma down: keep serving what we have
            self.last_error[collection] = str(exc)
            return None
        return None if fresh else self.rebuild_in_background(collection)

    def refresh_if_due(self, collection: str) -> None:
        """Called on the query path: schedule a check when the last one is older than the interval."""
        last = self._last_check.get(collection, 0.0)
        if time.monotonic() - last >= self.check_interval_s:
            self._last_check[collection] = time.monotonic()
            self._pool.submit(self._quiet_refresh, collection)

    def _quiet_refresh(self, collection: str) -> None:
        future = self.refresh(collection)
        if future is not None:
            with contextlib.suppress(Exception):
                future.result()

    # -- building ------------------------------------------------------------------------------

    def rebuild_in_background(self, collection: str) -> Future[Bm25Index | None]:
        with self._lock:
            pending = self._pending.get(collection)
            if pending is not None and not pending.done():
                return pending
            future: Future[Bm25Index | None] = Future()
            self._pending[collection] = future
        threading.Thread(target=self._build_into, args=(collection, future), name=f"bm25-{collection}",
                         daemon=True).start()
        return future

    def _build_into(self, collection: str, future: Future[Bm25Index | None]) -> None:
        try:
            future.set_result(self._rebuild_in_child(collection))
        except Exception as exc:  # noqa: BLE001 - recorded and surfaced by /aliases; the old index keeps serving
            self.last_error[collection] = str(exc)
            log.warning("bm25 rebuild failed", collection=collection, error=str(exc))
            future.set_result(None)

    def rebuild(self, collection: str, signature: IndexSignature | None = None) -> Bm25Index:
        """Read every document of ``collection``, build, persist, publish and swap in. Blocking."""
        # Read before the documents: a write during the read re-triggers.
        signature = signature or self.signature(collection)
        ids: list[str] = []
        documents: list[str | None] = []
        metadatas: list[dict[str, Any] | None] = []
        for page in self.store.pages(collection):
            ids.extend(page.ids)
            documents.extend(page.documents)
            metadatas.extend(page.metadatas)
        index = Bm25Index.build(signature, ids, documents, metadatas)
        self._publish(collection, index)
        with self._lock:
            self._indexes[collection] = index
        self.last_error.pop(collection, None)
        log.info("bm25 index built", collection=collection, documents=len(index))
        return index

    def _rebuild_in_child(self, collection: str) -> Bm25Index:
        """Build and publish in a child process, then load the published index and swap it in.

        Building holds the GIL for seconds (reading pages, tokenising, stemming, writing JSON): on
        a thread of the search server it stalled every query right after a cutover (p50 over 4 s
        for the 10 s after it, bench/bench_load.py). In a child, the server's threads keep serving;
        loading the published files back costs a fraction of the build.
        """
        signature = self.signature(collection)
        with self._build_lock(collection):
            index = self._load(collection)
            if index is None or index.signature != signature:  # nobody published this one yet
                with ProcessPoolExecutor(max_workers=1, mp_context=_SPAWN) as pool:
                    pool.submit(_build_and_publish, self.store.url, str(self.root), collection, signature).result()
                index = self._load(collection)
        if index is None:
            raise StoreError(f"the BM25 index of {collection!r} built by a child process could not be read back "
                             f"from {self.root / collection}")
        with self._lock:
            self._indexes[collection] = index
        self.last_error.pop(collection, None)
        return index

    # -- disk ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _build_lock(self, collection: str) -> Iterator[None]:
        """One build of ``collection`` at a time across every process sharing ``root``."""
        base = self.root / collection
        base.mkdir(parents=True, exist_ok=True)
        with open(base / ".build-lock", "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, or the process dies
            yield

    def _publish(self, collection: str, index: Bm25Index) -> None:
        base = self.root / collection
        build = f"build-{time.time_ns()}-{os.getpid()}"
        index.save(base / build)
        tmp = base / f"{_POINTER}.{os.getpid()}.{threading.get_ident()}"
        tmp.write_text(build)
        os.replace(tmp, base / _POINTER)  # the atomic switch
        for old in base.glob("build-*"):
            if old.name != build:
                shutil.rmtree(old, ignore_errors=True)  # a reader that mapped it keeps its open files

    def _load(self, collection: str) -> Bm25Index | None:
        pointer = self.root / collection / _POINTER
        for _attempt in range(2):  # another process may publish (and delete our build) between the reads
            try:
                build = pointer.read_text().strip()
                index = Bm25Index.load(self.root / collection / build)
            except FileNotFoundError:
                return None
            except StoreError as exc:
                log.warning("bm25 index not refreshed", error=str(exc))
                continue
            return index if index.signature.collection == collection else None
        return None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


#: Child processes are spawned, never forked: the server that starts them runs threads.
_SPAWN = multiprocessing.get_context("spawn")


def _build_and_publish(store_url: str, root: str, collection: str, signature: IndexSignature) -> None:
    """In a child process: build ``collection``'s index from Chroma and publish it under ``root``."""
    from reembed.logs import configure_logging
    from reembed.settings import Settings

    configure_logging(Settings.from_env())  # the parent's REEMBED_* environment: same log format
    IndexManager(Path(root), Store.from_settings(Settings.from_env(), store_url)).rebuild(collection, signature)
