"""The write path other services use: documents go through an alias, never around it.

A write lands in every collection the alias serves or may serve next, each embedded with its
own model: the live collection, the previous one (what a rollback switches to), and the target
of a migration that runs or waits for its cutover. Then the collections' write counters are
bumped in Redis so every search process rebuilds its BM25 index. If a target write fails (or a
service writes to the live collection behind reembed's back), nothing is lost: a migration's
verification diffs source and target by content hash before completing, and again at cutover
(also after a rollback), and re-embeds what differs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import structlog

from reembed.documents import Document, check_metadata, check_text, provenance
from reembed.errors import InputError, ReembedError
from reembed.lifecycle import WRITE_THROUGH
from reembed.models import LoadedModel, load_configured
from reembed.progress import bump_writes, redis_client
from reembed.registry import Registry
from reembed.settings import MAX_BATCH_SIZE, Settings
from reembed.store import Store

log = structlog.get_logger(__name__)

@dataclass(frozen=True)
class WriteTarget:
    collection: str
    model: str
    fingerprint: str
    role: str  # "live" or "migration target"


class Writer:
    """Hold one per process; it loads (and caches) the models of the collections it writes to."""

    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        self.store = store or Store.from_settings(settings)
        self.registry = Registry(self.store)
        self.redis = redis_client(settings.redis_url) if settings.redis_url else None

    def targets(self, alias: str) -> list[WriteTarget]:
        """Every collection the alias serves or may serve next, live first: the live collection, the
        previous one (what a rollback switches to), and the target of a migration of the live
        collection that is running or waits for its cutover (a canary serves that target too).

        Writing all of them is what makes rollback, a cutover after a rollback, and a second
        rollback lossless: whichever collection the alias switches to already holds the write.
        """
        current = self.registry.get_alias(alias)
        names = [(current.live_collection, "live")]
        if current.previous_collection:
            names.append((current.previous_collection, "previous"))
        record = self.registry.latest_migration(alias)
        if (record is not None and record.kind == "migrate" and record.state in WRITE_THROUGH
                and record.source_collection == current.live_collection):
            names.append((record.target_collection, "migration target"))
        found: list[WriteTarget] = []
        for name, role in names:
            if any(t.collection == name for t in found) or (role != "live" and not self.store.exists(name)):
                continue
            collection = self.registry.get_collection(name)
            found.append(WriteTarget(name, collection.model, collection.fingerprint, role))
        return found

    def _model(self, target: WriteTarget) -> LoadedModel:
        model = load_configured(self.settings, target.model)
        model.require_fingerprint(target.fingerprint, f"collection {target.collection!r}")
        return model

    def upsert(self, alias: str, documents: list[Document], only_new: bool = False) -> dict[str, Any]:
        """Add or replace ``documents`` under ALIAS. ``only_new`` (``add``) refuses ids that exist.

        Raises:
            InputError: no documents, too many, a duplicate or existing id (``only_new``), a
                document without text, or metadata Chroma cannot store; nothing is written.
        """
        _check(documents)
        targets = self.targets(alias)
        ids = [d.id for d in documents]
        if only_new:
            existing = self.store.get(targets[0].collection, ids).ids
            if existing:
                raise InputError(f"{len(existing)} id(s) already exist in {alias!r} (first: {', '.join(existing[:5])}); "
                                 "use upsert to replace them; nothing was written")
        texts = [d.text for d in documents]
        for target in targets:  # live first: what the alias serves is written before anything else
            model = self._model(target)
            vectors = model.embed_documents(texts)
            metas = [provenance(model, d.text, d.metadata) for d in documents]
            # Only the live collection was checked for existing ids; elsewhere replace whatever is there.
            write = self.store.add if only_new and target.role == "live" else self.store.upsert
            write(target.collection, ids=ids, embeddings=vectors, documents=texts, metadatas=metas)
        return self._done(alias, "add" if only_new else "upsert", targets, len(documents))

    def delete(self, alias: str, ids: list[str]) -> dict[str, Any]:
        """Delete ``ids`` from the live collection and any migration target (absent ids are ignored)."""
        if not ids or len(ids) > MAX_BATCH_SIZE:
            raise InputError(f"give 1..{MAX_BATCH_SIZE} ids to delete (got {len(ids)})")
        targets = self.targets(alias)
        for target in targets:
            self.store.delete_ids(target.collection, ids)
        return self._done(alias, "delete", targets, len(ids))

    def _done(self, alias: str, op: str, targets: list[WriteTarget], count: int) -> dict[str, Any]:
        for target in targets:
            if self.redis is not None:
                with contextlib.suppress(ReembedError):  # Redis down: search still sees adds/deletes by count
                    bump_writes(self.redis, target.collection)
        log.info("documents written", alias=alias, op=op, documents=count,
                 collections=[t.collection for t in targets])
        return {"alias": alias, "op": op, "documents": count,
                "collections": [{"collection": t.collection, "model": t.model, "role": t.role} for t in targets]}


def _check(documents: list[Document]) -> None:
    if not documents or len(documents) > MAX_BATCH_SIZE:
        raise InputError(f"give 1..{MAX_BATCH_SIZE} documents per write (got {len(documents)}); split larger ones")
    seen: set[str] = set()
    for doc in documents:
        if not doc.id.strip():
            raise InputError("a document has an empty id")
        if doc.id in seen:
            raise InputError(f"id {doc.id!r} appears twice in one write")
        seen.add(doc.id)
        if not doc.text.strip():
            raise InputError(f"document {doc.id!r} has no text to embed")
        check_metadata(doc.id, doc.metadata, "write")
        check_text(doc.id, doc.text, "write")
