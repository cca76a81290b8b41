"""Semantic retrieval by alias, never mixing models.

The alias is resolved on every query (one small read), so a cutover or rollback is seen by the
next query. The query is embedded with the live collection's own model, and that model's
fingerprint and probe vector are checked against the collection's record first: a mismatch is
refused, never served. (Hybrid BM25 + fusion and the HTTP app build on this; see issue 3.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from reembed.errors import InputError, ModelMismatchError
from reembed.models import LoadedModel, load_model, resolve_model
from reembed.registry import Registry
from reembed.settings import Settings
from reembed.store import Store

MAX_K = 1000
MAX_QUERY_CHARS = 10_000


@dataclass
class SearchHit:
    id: str
    score: float
    document: str | None
    metadata: dict[str, Any]


@dataclass
class SearchResult:
    """An answer, and what served it."""

    alias: str
    collection: str
    model: str
    fingerprint: str
    hits: list[SearchHit] = field(default_factory=list)


class Searcher:
    """Hold one of these per process; it caches loaded models by name."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Store(settings.chroma_url)
        self.registry = Registry(self.store)

    def _model_for(self, collection: str) -> tuple[LoadedModel, str]:
        record = self.registry.get_collection(collection)
        model = load_model(resolve_model(record.model), self.settings.data_dir, self.settings.device,
                           self.settings.torch_threads)
        if model.fingerprint != record.fingerprint:
            raise ModelMismatchError(
                f"collection {collection!r} was embedded with {record.model} ({record.fingerprint}); the model "
                f"loaded here is {model.spec.name} ({model.fingerprint}); refusing to mix vector spaces"
            )
        model.check_probe(record.probe, f"collection {collection!r}")
        return model, record.fingerprint

    def search(self, alias: str, query: str, k: int = 10) -> SearchResult:
        if not query.strip():
            raise InputError("query is empty")
        if len(query) > MAX_QUERY_CHARS or not 1 <= k <= MAX_K:
            raise InputError(f"query must be at most {MAX_QUERY_CHARS} characters and k in 1..{MAX_K}")
        collection = self.registry.get_alias(alias).live_collection
        model, fp = self._model_for(collection)
        page = self.store.query(collection, model.embed_queries([query])[0], k)
        distances = page.distances if page.distances is not None else []
        hits = [SearchHit(i, 1.0 - float(d), doc, m or {})
                for i, doc, m, d in zip(page.ids, page.documents, page.metadatas, distances, strict=True)]
        return SearchResult(alias, collection, model.spec.name, fp, hits)
