"""`reembed plan`: what a migration will cost before anything is written.

Every figure is measured on this collection and this machine where it can be: documents and
documents without text are counted, tokens are counted with the new model's own tokenizer, and
the new model's throughput is measured by embedding a sample of this corpus on this machine's
device. Storage is computed from the dimension plus Chroma's per-document overhead (HNSW links,
the stored text and metadata, measured on the sample). Nothing is written.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

from reembed.errors import InputError
from reembed.models import load_configured, resolve_model
from reembed.registry import Registry
from reembed.settings import Settings
from reembed.store import Store

#: Collections up to this size have every document tokenised; above, a random sample is, and
#: the totals are extrapolated (and say so).
TOKENIZE_ALL_UP_TO = 200_000
TOKENIZE_SAMPLE = 20_000
#: Chroma's HNSW keeps up to 2·M neighbour ids (4 bytes) per vector in layer 0 (M = 16 by
#: default) plus a small id map: about 150 bytes per document.
HNSW_BYTES_PER_DOC = 2 * 16 * 4 + 22


#: The distance space that ranks as each sentence-transformers similarity function does, for vectors
#: that are not normalised (normalised vectors rank the same in all three spaces).
SPACE_FOR_SIMILARITY = {"cosine": "cosine", "dot": "ip", "euclidean": "l2"}


def space_warning(space: str, model: str, normalized: bool, similarity: str) -> str | None:
    """Why ``space`` (the source's, which the target mirrors) would rank ``model``'s vectors
    differently from the similarity the model was trained for; None when it does not."""
    if normalized:
        return None  # unit vectors: cosine, l2 and ip order neighbours identically
    suits = SPACE_FOR_SIMILARITY.get(similarity)
    if suits == space:
        return None
    fix = (f"a collection in the {suits!r} space" if suits else "normalised vectors (a model spec with normalize)")
    return (f"the source collection uses the {space!r} distance space, which the target mirrors, but {model} "
            f"scores by {similarity} similarity and its vectors are not normalised: nearest neighbours in "
            f"{space!r} are not the model's; it needs {fix}")


def plan(settings: Settings, alias: str, to_model: str, workers: int = 1, sample: int = 200,
         queries_per_month: float | None = None, value_per_query: float | None = None,
         engineering_cost: float | None = None, quality_gain: float | None = None) -> dict[str, Any]:
    """Every figure by name (the CLI prints them; ``--json`` gives this dict)."""
    if workers < 1 or sample < 1:
        raise InputError("--workers and --sample must be at least 1")
    store = Store.from_settings(settings)
    registry = Registry(store)
    current = registry.get_alias(alias)
    live = registry.get_collection(current.live_collection)
    spec = resolve_model(to_model)
    ids: list[str] = []
    texts: list[str] = []
    extra_bytes: list[int] = []
    empty: list[str] = []
    for page in store.pages(current.live_collection):
        for doc_id, text, meta in zip(page.ids, page.documents, page.metadatas, strict=True):
            if text is None or not text.strip():
                empty.append(doc_id)
                continue
            ids.append(doc_id)
            texts.append(text)
            extra_bytes.append(len(text.encode("utf-8")) + len(json.dumps(meta or {})) + len(doc_id))
    if not texts:
        raise InputError(f"alias {alias!r} has no document with text; nothing to migrate")
    model = load_configured(settings, to_model)
    rng = random.Random(5)
    if len(texts) <= TOKENIZE_ALL_UP_TO:
        counted, scale, token_note = texts, 1.0, "every document"
    else:
        counted = rng.sample(texts, TOKENIZE_SAMPLE)
        scale, token_note = len(texts) / TOKENIZE_SAMPLE, f"a random sample of {TOKENIZE_SAMPLE}, extrapolated"
    tokens = model.count_tokens(counted)
    limit = model.max_tokens
    over = sum(1 for t in tokens if limit is not None and t > limit)
    measured = rng.sample(texts, min(sample, len(texts)))
    model.embed_documents(measured[:8])  # warm-up
    started = time.perf_counter()
    model.embed_documents(measured)
    per_worker = len(measured) / (time.perf_counter() - started)
    cores = os.cpu_count() or 1
    effective = workers if model.device != "cpu" else min(workers, max(1, cores // settings.torch_threads))
    rate = per_worker * effective
    total_tokens = int(sum(tokens) * scale)
    vectors_bytes = len(texts) * model.dimension * 4
    overhead = HNSW_BYTES_PER_DOC + sum(extra_bytes) / len(extra_bytes)
    api_cost = spec.price_per_million_tokens * total_tokens / 1e6
    space = store.space(current.live_collection)
    warning = space_warning(space, spec.name, spec.normalize, model.similarity)
    out: dict[str, Any] = {
        "alias": alias, "from_model": live.model, "to_model": spec.name, "dimension": model.dimension,
        "device": model.device, "documents": len(texts) + len(empty), "documents_to_embed": len(texts),
        "documents_without_text": len(empty), "first_without_text": empty[:10],
        "blocked": bool(empty), "tokens": total_tokens, "tokens_counted_on": token_note,
        "mean_tokens_per_document": round(sum(tokens) / len(tokens), 1), "max_sequence_length": limit,
        "documents_truncated": int(over * scale),
        "throughput_sample": len(measured), "docs_per_s_per_worker": round(per_worker, 2),
        "workers": workers, "effective_workers": effective, "docs_per_s": round(rate, 2),
        "estimated_wall_s": round(len(texts) / rate, 3),
        "storage_vectors_bytes": vectors_bytes,
        "storage_overhead_bytes_per_document": round(overhead),
        "storage_total_bytes": int(vectors_bytes + overhead * len(texts)),
        "price_per_million_tokens": spec.price_per_million_tokens, "api_cost": round(api_cost, 4),
        "space": space, "model_similarity": model.similarity, "normalized": spec.normalize,
        "warnings": [warning] if warning else [],
    }
    if None not in (queries_per_month, value_per_query, quality_gain):
        benefit = queries_per_month * value_per_query * quality_gain  # type: ignore[operator]
        cost = (engineering_cost or 0.0) + api_cost
        out.update(monthly_benefit=round(benefit, 2), one_off_cost=round(cost, 2),
                   months_to_break_even=round(cost / benefit, 2) if benefit > 0 else None)
    return out
