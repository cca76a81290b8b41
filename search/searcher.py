"""Hybrid search by alias: BM25 + semantic, fused by rank, served by the alias's live collection.

The alias is resolved on every query (one small read), so a cutover or a rollback is seen by
the very next query. The query is embedded with the live collection's **own** model, whose
fingerprint and probe vector are checked against the collection's record: a mismatch is refused
(:class:`~reembed.errors.ModelMismatchError`), never served.

Availability: keyword search needs only the in-memory BM25 index. When Chroma is unreachable,
the alias is resolved from the last record this process saw, ``keyword`` keeps answering,
``hybrid`` answers with its keyword half and says so in ``degraded``, and ``semantic`` fails
with :class:`~reembed.errors.StoreUnavailableError`. Redis is never on the query path.

Filters (``where``, ``where_document``) narrow both retrievers before fusion, so every hit passes
them: the BM25 side masks its index with the filter evaluated over its copy
(``reembed.filter_index``), and each keyword hit is confirmed on the row Chroma holds now; the
semantic side is Chroma's filtered query, or a deeper unfiltered one filtered here (``_nearest``).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from reembed.bm25 import Bm25Index, KeywordHit
from reembed.documents import user_metadata
from reembed.errors import (
    InputError,
    ReembedError,
    StoreUnavailableError,
)
from reembed.filter_index import passing
from reembed.filters import Filter, parse_filter
from reembed.fusion import FusionSpec, parse_fusion
from reembed.models import LoadedModel, load_configured
from reembed.progress import read_writes, redis_client
from reembed.registry import AliasRecord, CollectionRecord, Registry
from reembed.settings import Settings
from reembed.store import Page, Store
from search.indexes import IndexManager
from search.results import MODES, Hit, IndexInfo, Mode, Ranks, SearchResponse, ServedBy, ServedCollection
from search.routing import choose_collection

MAX_K = 1000
MAX_QUERY_CHARS = 10_000
#: Post-filtering the semantic side (see ``Searcher._nearest``): from this share of documents
#: passing, asking Chroma for more neighbours unfiltered costs less than its filtered query
#: (measured at 100,000 documents: 300 neighbours 35 ms, 1,000 100 ms; filtered by a share of
#: 10 % 125 ms, 50 % 440 ms).
POSTFILTER_SHARE = 0.2
POSTFILTER_MARGIN = 1.5
POSTFILTER_MAX = 1000
#: A semantic hit's score is the cosine similarity of query and document, whatever the space the
#: collection ranks in (it mirrors its source's). Chroma's distances, for the unit vectors reembed
#: stores: cosine 1 - cos, ip 1 - dot (= 1 - cos), l2 the squared distance 2 - 2 cos.
SIMILARITY: dict[str, Callable[[float], float]] = {
    "cosine": lambda d: 1.0 - d, "ip": lambda d: 1.0 - d, "l2": lambda d: 1.0 - d / 2.0}
#: A fused canary's semantic mode: the two collections' rankings, each normalised, equal shares.
SEMANTIC_ONLY = FusionSpec(method="convex", semantic_weight=1.0)


def check_query(query: str, k: int, mode: str) -> None:
    """Bounds that keep any one request from allocating without limit.

    Raises:
        InputError: naming the bound that was crossed.
    """
    if not query.strip():
        raise InputError("query is empty; send some text to search for")
    if len(query) > MAX_QUERY_CHARS:
        raise InputError(f"query is {len(query)} characters; the limit is {MAX_QUERY_CHARS}")
    if not 1 <= k <= MAX_K:
        raise InputError(f"k={k} is out of range: use 1..{MAX_K}")
    if mode not in MODES:
        raise InputError(f"mode {mode!r} is unknown: use one of {', '.join(MODES)}")


class Searcher:
    """Hold one per process (it caches models, records and indexes); safe to call from threads."""

    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        self.store = store or Store.from_settings(settings)
        self.registry = Registry(self.store)
        self.redis = redis_client(settings.redis_url) if settings.redis_url else None
        client = self.redis
        writes = (lambda name: read_writes(client, name)) if client is not None else None
        self.indexes = IndexManager(settings.data_dir / "bm25", self.store, writes, settings.index_refresh_s)
        self._aliases: dict[str, AliasRecord] = {}
        self._collections: dict[str, CollectionRecord] = {}
        self._spaces: dict[str, str] = {}
        #: collection -> the warm-up query's vector, once its model has embedded one here
        self._warmed: dict[str, np.ndarray] = {}
        self.readiness: dict[str, dict[str, bool | None]] = {}  # alias -> role -> prepared (warm())
        self._lock = threading.Lock()

    # -- resolution ----------------------------------------------------------------------------

    def resolve(self, alias: str) -> tuple[AliasRecord, str | None]:
        """The alias's record now; the last one seen (and a note saying so) while Chroma is unreachable."""
        try:
            record = self.registry.get_alias(alias)
        except StoreUnavailableError as exc:
            with self._lock:
                cached = self._aliases.get(alias)
            if cached is None:
                raise
            return cached, f"Chroma unreachable ({exc}); alias resolved from the record seen at {cached.updated_at:.0f}"
        with self._lock:
            self._aliases[alias] = record
        return record, None

    def collection_record(self, name: str) -> CollectionRecord:
        with self._lock:
            cached = self._collections.get(name)
        if cached is not None:
            return cached
        record = self.registry.get_collection(name)
        with self._lock:
            self._collections[name] = record
        return record

    def space_of(self, name: str) -> str:
        """The collection's distance space (fixed at creation: read once)."""
        with self._lock:
            cached = self._spaces.get(name)
        if cached is None:
            cached = self.store.space(name)
            with self._lock:
                self._spaces[name] = cached
        return cached

    def model_for(self, record: CollectionRecord) -> LoadedModel:
        """The collection's own model, loaded once, after checking it is the same model.

        Raises:
            ModelMismatchError: naming both models, when the weights here differ from those that
                built the collection.
        """
        model = load_configured(self.settings, record.model)
        model.require_fingerprint(record.fingerprint, f"collection {record.name!r}")
        model.check_probe(record.probe, f"collection {record.name!r}")
        return model

    def keyword_index(self, alias: AliasRecord, wait: bool = False, collection: str | None = None) -> Bm25Index:
        """The BM25 index of ``collection`` (default: the alias's live one); while it is being
        rebuilt after a switch, the previous collection's (same documents). Builds synchronously
        only when no index exists at all."""
        live = collection or alias.live_collection
        index = self.indexes.current(live)
        if index is None and alias.previous_collection and not wait:
            index = self.indexes.current(alias.previous_collection)
            if index is not None:
                self.indexes.rebuild_in_background(live)
        if index is None:
            index = self.indexes.ready(live)
        if wait:
            if not self.indexes.is_fresh(live):
                index = self.indexes.rebuild(live)
        else:
            self.indexes.refresh_if_due(live)
        return index

    # -- the query -----------------------------------------------------------------------------

    def search(self, alias: str, query: str, k: int = 10, mode: Mode = "hybrid", *,
               fusion: FusionSpec | str | None = None, fresh_index: bool = False, client_key: str | None = None,
               where: Any = None, where_document: Any = None) -> SearchResponse:
        """Answer one query.

        Args:
            where, where_document: a filter in Chroma's syntax (``reembed.filters``), applied to
                both retrievers before fusion: every hit passes it.
            client_key: routes a caller to the same side of a canary every time (default: the
                query text decides).
            fusion: how ``hybrid`` fuses for this query (a spec, or ``convex:0.7`` /
                ``rrf:0.5:60``); default: what the alias carries for the answering model, else
                the settings' default.
            fresh_index: check the BM25 index against the collection and rebuild it before
                answering (one-shot callers such as the CLI); a server leaves it False and
                refreshes in the background.

        Raises:
            InputError: empty or oversized query, k out of range, unknown mode, a malformed
                filter (``FilterError``, naming the bad part).
            AliasNotFoundError: the alias is not registered.
            ModelMismatchError: the live collection's model is not the one loaded here.
            StoreUnavailableError: Chroma is unreachable and the mode needs it.
        """
        started = time.perf_counter()
        check_query(query, k, mode)
        asked = parse_fusion(fusion, self.settings.rrf_k, "fusion") if isinstance(fusion, str) else fusion
        narrowed = parse_filter(where, where_document)
        alias_record, degraded = self.resolve(alias)
        live, canary = choose_collection(alias_record, query, client_key)
        standing_in = None
        if not fresh_index:  # a server: answer from what this process holds rather than prepare now
            live, canary, standing_in = self._stand_in(alias_record, live, canary)
        sides = [live]
        if canary and alias_record.canary is not None and alias_record.canary.fuse:
            # A fused canary: both collections answer, each with its own model, and their
            # rankings (never their vectors) are fused with BM25's.
            live = alias_record.live_collection
            sides = [live, alias_record.canary.collection]
        records = [self.collection_record(name) for name in sides]  # cached: served while Chroma is down
        record = records[0]
        depth = max(k, self.settings.search_depth)
        keyword: list[KeywordHit] = []
        index: Bm25Index | None = None
        semantic: list[list[tuple[str, float]]] = []  # per side, best first: (id, cosine similarity)
        known: dict[str, tuple[str | None, dict[str, Any]]] = {}  # id -> text and metadata as Chroma returned
        answered: Mode = mode

        if mode in ("keyword", "hybrid") or narrowed is not None:  # a filter's share is read off the index
            index = self.keyword_index(alias_record, wait=fresh_index, collection=live)
        if mode in ("keyword", "hybrid") and index is not None:
            keyword = index.query(query, depth, narrowed)
        if mode in ("semantic", "hybrid"):
            try:
                if degraded:
                    raise StoreUnavailableError(degraded)
                semantic = [self._semantic(name, rec, query, depth, narrowed, index, known)
                            for name, rec in zip(sides, records, strict=True)]
            except StoreUnavailableError as exc:
                if mode == "semantic":
                    raise
                semantic, known = [], {}
                answered, degraded = "keyword", f"semantic retrieval unavailable ({exc}); answered by BM25 only"

        if narrowed is not None and keyword and not degraded:
            try:
                keyword = self._confirm(live, keyword, narrowed, known)
            except StoreUnavailableError as exc:
                degraded = f"keyword hits filtered by the index's copy only (Chroma unreachable: {exc})"
        spec = asked or alias_record.fusion.get(record.model) or self.settings.fusion
        hits = self._assemble(answered, k, keyword, semantic, known, index, spec)
        fused_with = records[1] if len(records) > 1 and answered != "keyword" else None
        served = ServedBy(
            collection=live, model=record.model, fingerprint=record.fingerprint, canary=canary,
            fusion=spec.describe() if answered == "hybrid" else None, standing_in_for=standing_in,
            fused_with=ServedCollection(collection=fused_with.name, model=fused_with.model,
                                        fingerprint=fused_with.fingerprint) if fused_with else None,
            bm25_index=IndexInfo(collection=index.signature.collection, documents=len(index),
                                 built_at=index.built_at) if index is not None and mode != "semantic" else None,
        )
        return SearchResponse(alias=alias, mode=answered, query=query, served_by=served, degraded=degraded,
                              results=hits, took_ms=round((time.perf_counter() - started) * 1000, 2))

    # -- prepared collections (reembed.readiness) ------------------------------------------------

    def is_prepared(self, collection: str) -> bool:
        """Its BM25 index is in memory and its model has embedded a query in this process."""
        with self._lock:
            warmed = collection in self._warmed
        return warmed and collection in self.indexes.loaded()

    def prepared(self) -> set[str]:
        with self._lock:
            warmed = set(self._warmed)
        return warmed & set(self.indexes.loaded())

    def prepare(self, collection: str, wait: bool = False) -> bool:
        """Start building ``collection``'s index if none exists (``wait``: until built) and warm
        its model (one query).

        Returns:
            Whether it is prepared now (an index build may still be running in the background).
        """
        if self.indexes.current(collection) is None:
            building = self.indexes.rebuild_in_background(collection)
            if wait:
                building.result()
        model = self.model_for(self.collection_record(collection))
        # The first calls of a model allocate and trace (seconds, not ms); and Chroma may have
        # dropped a collection nobody queried for a while from its cache (reading its index back
        # stalled the first queries after a rollback): one nearest-neighbour query keeps it warm.
        with self._lock:
            vector = self._warmed.get(collection)
        if vector is None:
            vector = model.embed_queries(["warm-up query"])[0]
        if np.all(np.isfinite(vector)):
            self.store.query(collection, vector, 1)
        with self._lock:
            self._warmed[collection] = vector
        return self.is_prepared(collection)

    def _stand_in(self, alias: AliasRecord, chosen: str, canary: bool) -> tuple[str, bool, str | None]:
        """The collection to answer from when ``chosen`` is not prepared in this process yet.

        A canary share falls back to the live collection; a live collection just switched to is
        stood in for by the previous one (it has the same documents: reembed's write path writes
        both). One answer is always served by one collection set, never a mix. When nothing else
        is prepared either (a process just started), ``chosen`` answers and is prepared on the spot.
        """
        if self.is_prepared(chosen):
            return chosen, canary, None
        if canary and self.is_prepared(alias.live_collection):
            return alias.live_collection, False, None  # the canary starts here once prepared
        previous = alias.previous_collection
        if not canary and previous and self.is_prepared(previous):
            return previous, False, chosen
        return chosen, canary, None

    def _semantic(self, name: str, record: CollectionRecord, query: str, depth: int, narrowed: Filter | None,
                  index: Bm25Index | None, known: dict[str, tuple[str | None, dict[str, Any]]]) -> list[tuple[str, float]]:
        """``name``'s nearest documents to ``query`` by its own model, as (id, cosine similarity);
        their text and metadata are added to ``known``."""
        vector = self.model_for(record).embed_queries([query])[0]
        # A query with no token the model knows (control characters only, for a static model)
        # embeds to NaN: it has no semantic neighbours, which is not an error.
        if not np.all(np.isfinite(vector)):
            return []
        page = self._nearest(name, vector, depth, narrowed, index)
        distances: Any = page.distances if page.distances is not None else []
        to_similarity = SIMILARITY[self.space_of(name)]
        ranked = []
        for doc_id, doc, meta, dist in zip(page.ids, page.documents, page.metadatas, distances, strict=True):
            ranked.append((doc_id, to_similarity(float(dist))))
            known.setdefault(doc_id, (doc, meta or {}))
        return ranked

    def _nearest(self, live: str, vector: np.ndarray, depth: int, narrowed: Filter | None,
                 index: Bm25Index | None) -> Page:
        """The ``depth`` nearest documents that pass ``narrowed``.

        Chroma's filtered query first lists every document that passes, so its cost grows with
        their number (and any ``$contains`` costs 250-440 ms): at 100,000 documents 16 ms
        unfiltered, 57 ms for a metadata filter passing 1 %, 440 ms for one passing half
        (bench/bench_filters.py). When the BM25 index says at least ``POSTFILTER_SHARE`` pass, the
        nearest ``depth / share`` (times a margin) are asked for unfiltered and filtered here, on
        the rows Chroma returned; when too few of them pass, Chroma's filtered query answers
        after all. The index's share is only an estimate (it may trail the collection); which
        rows pass is always decided on what Chroma returned.
        """
        if narrowed is None or index is None or not len(index):
            return self.store.query(live, vector, depth, narrowed)
        share = float(index.allowed(narrowed).mean())
        if share < POSTFILTER_SHARE:
            return self.store.query(live, vector, depth, narrowed)
        asked = min(POSTFILTER_MAX, math.ceil(depth / share * POSTFILTER_MARGIN))
        page = self.store.query(live, vector, asked)
        keep = passing(narrowed, page.documents, page.metadatas)
        if int(keep.sum()) < depth and len(page.ids) == asked:  # not enough, and more exist
            return self.store.query(live, vector, depth, narrowed)
        rows = [i for i, ok in enumerate(keep) if ok][:depth]
        distances = page.distances[rows] if page.distances is not None else None
        return Page(ids=[page.ids[i] for i in rows], documents=[page.documents[i] for i in rows],
                    metadatas=[page.metadatas[i] for i in rows], distances=distances)

    def _confirm(self, live: str, keyword: list[KeywordHit], narrowed: Filter,
                 known: dict[str, tuple[str | None, dict[str, Any]]]) -> list[KeywordHit]:
        """Keep the keyword hits that still pass the filter in Chroma, ranked again.

        The index is a copy that trails the collection by up to ``INDEX_REFRESH_S``: a document
        whose metadata changed since would pass the filter on the copy alone. One ``get`` of the
        hits the semantic side did not return (themselves filtered by Chroma) settles it, and
        their current text and metadata are what the answer shows.
        """
        unsure = [hit.id for hit in keyword if hit.id not in known]
        if unsure:
            # Read by id and filtered here: Chroma's get(ids, where) evaluates the filter over the
            # whole collection first (3.9 s at 100,000 documents for a filter passing half).
            page = self.store.get(live, unsure)
            keep = passing(narrowed, page.documents, page.metadatas)
            for doc_id, doc, meta, ok in zip(page.ids, page.documents, page.metadatas, keep, strict=True):
                if ok:
                    known[doc_id] = (doc, meta or {})
        kept = [hit for hit in keyword if hit.id in known]
        return [KeywordHit(hit.id, hit.score, rank) for rank, hit in enumerate(kept, start=1)]

    def _assemble(self, mode: Mode, k: int, keyword: list[KeywordHit], semantic: list[list[tuple[str, float]]],
                  known: dict[str, tuple[str | None, dict[str, Any]]], index: Bm25Index | None,
                  fusion: FusionSpec) -> list[Hit]:
        keyword_rank = {h.id: h for h in keyword}
        side_ranks = [{doc_id: i for i, (doc_id, _) in enumerate(side, start=1)} for side in semantic]
        if mode == "hybrid":
            fused = fusion.fuse([(h.id, h.score) for h in keyword], *(semantic or [[]]))
            ranked = [(f.id, f.score) for f in fused]
        elif mode == "semantic":
            ranked = semantic[0] if len(semantic) == 1 else [(f.id, f.score) for f in SEMANTIC_ONLY.fuse([], *semantic)]
        else:
            ranked = [(h.id, h.score) for h in keyword]
        hits = []
        for doc_id, score in ranked[:k]:
            if doc_id in known:  # as Chroma returned it
                document, metadata = known[doc_id]
            else:  # found by BM25 only: the indexed copy
                found = index.document(doc_id) if index is not None else None
                document, metadata = found if found is not None else (None, {})
            bm25 = keyword_rank.get(doc_id)
            ranks = Ranks(bm25=bm25.rank if bm25 else None,
                          semantic=side_ranks[0].get(doc_id) if side_ranks else None,
                          semantic_canary=side_ranks[1].get(doc_id) if len(side_ranks) > 1 else None)
            hits.append(Hit(id=doc_id, score=score, document=document, metadata=user_metadata(metadata), ranks=ranks))
        return hits

    # -- background upkeep (the HTTP server calls this every INDEX_REFRESH_S) --------------------

    def warm(self, wait: bool = False) -> dict[str, str]:
        """Load every alias's index and model, refresh stale indexes, and prepare the collections a
        switch may soon serve (a canary's, the target of a migration being verified or waiting for
        its cutover, the previous one a rollback returns to): their index built, model warmed and
        Chroma's copy queried, so the switch costs queries nothing.
        ``readiness`` then says, per alias, which of them are prepared here. ``wait`` (at start-up)
        waits for each live collection's index, so a new process serves from the live collection.

        Returns:
            alias -> error, for the aliases that could not be warmed (reported by /aliases).
        """
        from reembed.registry import MigrationState

        problems: dict[str, str] = {}
        readiness: dict[str, dict[str, bool | None]] = {}
        for alias in self.registry.aliases():
            with self._lock:
                self._aliases[alias.alias] = alias
            roles: dict[str, bool | None] = {"live": None, "canary": None, "next": None, "previous": None}
            try:
                self.keyword_index(alias)  # builds the first index; schedules freshness checks
                roles["live"] = self.prepare(alias.live_collection, wait)
                if alias.canary is not None:
                    roles["canary"] = self.prepare(alias.canary.collection)
                if alias.previous_collection and self.store.exists(alias.previous_collection):
                    roles["previous"] = self.prepare(alias.previous_collection)  # what a rollback serves
                latest = self.registry.latest_migration(alias.alias)
                if latest and latest.kind == "migrate" and latest.state == MigrationState.RUNNING:
                    # Load the new model long before the cutover: loading it on the first query
                    # after the switch stalls every query behind it (seconds, measured in
                    # bench_load.py). Its fingerprint and probe are checked at first use.
                    load_configured(self.settings, latest.to_model)
                if latest and latest.kind == "migrate" and latest.state in (MigrationState.VERIFYING,
                                                                           MigrationState.COMPLETE):
                    roles["next"] = self.prepare(latest.target_collection)
            except ReembedError as exc:
                problems[alias.alias] = str(exc)
            readiness[alias.alias] = roles
        self.readiness = readiness
        return problems

    def close(self) -> None:
        self.indexes.close()
