"""Verification: whether a migration's target holds exactly its source, re-embedded.

Read by the worker that finishes a migration (``pipeline.finalize``) and by ``reembed status``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from reembed.documents import content_hash, read_corpus, same_metadata
from reembed.registry import MigrationRecord
from reembed.store import Store


def diff(store: Store, record: MigrationRecord, exclude: set[str]) -> dict[str, Any]:
    """Compare source and target by id, content hash and model fingerprint.

    Returns a dict with ``source`` (ids with text), ``matching``, ``missing`` (to embed),
    ``stale`` (changed or made by another model: to re-embed) and ``extra`` (to delete).
    """
    assert record.source_collection is not None
    source_collection = record.source_collection

    def read_source() -> dict[str, str]:
        # The text is read and hashed here, not taken from a stored hash: a plain Chroma client
        # that updates a document keeps the old metadata, hash included (Chroma merges metadata).
        hashes: dict[str, str] = {}
        for page in store.pages(source_collection):
            for doc_id, text, meta in zip(page.ids, page.documents, page.metadatas, strict=True):
                if doc_id not in exclude and text is not None and text.strip():
                    hashes[doc_id] = content_hash(text, meta)
        return hashes

    # The two reads at once: Chroma serves them on two cores, and this process hashes meanwhile.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="diff-source") as pool:
        reading = pool.submit(read_source)
        target: dict[str, tuple[str, str]] = {}
        for page in store.pages(record.target_collection, documents=False):
            for doc_id, meta in zip(page.ids, page.metadatas, strict=True):
                meta = meta or {}
                target[doc_id] = (str(meta.get("content_hash", "")), str(meta.get("model_fingerprint", "")))
        source = reading.result()
    missing = [i for i in source if i not in target]
    stale = [i for i, h in source.items() if i in target and target[i] != (h, record.to_fingerprint)]
    extra = [i for i in target if i not in source]
    return {"source": len(source), "missing": missing, "stale": stale, "extra": extra,
            "matching": len(source) - len(missing) - len(stale)}


def check_ingest(store: Store, record: MigrationRecord) -> list[str]:
    """For an ingest (no source collection): ids whose stored hash or fingerprint is wrong.

    A stored hash that disagrees with the stored text and metadata is settled against the corpus
    file: Chroma may return a float 1-2 units in the last place off the one written
    (``documents.FLOAT_REL_TOL``), which changes the hash but not the document.
    """
    bad: list[str] = []
    unsure: dict[str, tuple[str, dict[str, Any]]] = {}
    for page in store.pages(record.target_collection):
        for doc_id, text, meta in zip(page.ids, page.documents, page.metadatas, strict=True):
            meta = meta or {}
            if meta.get("model_fingerprint") != record.to_fingerprint:
                bad.append(doc_id)
            elif meta.get("content_hash") != content_hash(text or "", meta):
                unsure[doc_id] = (text or "", meta)
    if unsure and record.source_file and Path(record.source_file).exists():
        for doc in read_corpus(Path(record.source_file)):
            stored = unsure.get(doc.id)
            if (stored is not None and stored[0] == doc.text and same_metadata(stored[1], doc.metadata)
                    and stored[1].get("content_hash") == content_hash(doc.text, doc.metadata)):
                del unsure[doc.id]
    return bad + sorted(unsure)
