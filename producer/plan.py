"""`reembed plan`: what a migration will cost before anything is written.

Every figure is measured on this collection and this machine where it can be: documents and
documents without text are counted, tokens are counted with the new model's own tokenizer, and
the new model's throughput is measured by embedding a sample of this corpus on this machine's
device (a model behind an API: by sending the sample to its endpoint, whose cost is reported as
``plan_cost``, and capped by the declared requests and tokens per minute). Chroma's write rate is measured too, on the server the migration will write to: a sample
of these documents (their text and metadata, vectors of the new dimension) is added to a
throw-away collection, deleted afterwards. The wall time follows the slower of the two. Storage is
computed from the dimension plus Chroma's per-document overhead (HNSW links, the stored text and
metadata, measured on the sample). Nothing else is written, except the plan itself (a registry
record), which the next migration of the alias to that model keeps so that ``history`` can show
predicted against actual. A migration that will cut the stored vectors (``reembed.matryoshka``)
costs nothing and goes at Chroma's pace.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np

from reembed.api_models import ApiModelDeclaration
from reembed.documents import provenance
from reembed.errors import InputError, ReembedError
from reembed.migrations import cuts_from
from reembed.models import LoadedModel, load_configured, resolve_configured
from reembed.registry import PlanRecord, Registry
from reembed.settings import MAX_BATCH_SIZE, Settings
from reembed.store import Store

#: Collections up to this size have every document tokenised; above, a random sample is, and
#: the totals are extrapolated (and say so).
TOKENIZE_ALL_UP_TO = 200_000
TOKENIZE_SAMPLE = 20_000
#: Chroma's HNSW keeps up to 2·M neighbour ids (4 bytes) per vector in layer 0 (M = 16 by
#: default) plus a small id map: about 150 bytes per document.
HNSW_BYTES_PER_DOC = 2 * 16 * 4 + 22


#: The write probe: this many sample documents are added to a throw-away collection, in writes of
#: PROBE_WRITE documents (the size a migration's writes have), by as many writers as workers (at
#: most PROBE_WRITERS): a few seconds. Its name starts with PROBE_PREFIX.
PROBE_DOCS = 2048
PROBE_WRITE = 512
PROBE_WRITERS = 4
PROBE_PREFIX = "reembed-plan-probe-"
#: A Chroma write gets slower as the server's data grows (its SQLite B-trees and full-text index,
#: one database for all of a single-node server's collections, and the HNSW graph): the time per
#: document fits t0·(1 + c·√n) with n the documents the server holds (`bench/bench_ceiling.py
#: --ramp 1000000`, BENCHMARKS.md "Chroma's own add rate as a collection grows", 2 cores: averaged
#: over 0 → 100k, 200k, 500k and 1M documents, 1.23, 1.32, 1.56 and 1.72 × t0 measured; 1.23, 1.32,
#: 1.51 and 1.72 × by this fit).
CHROMA_SLOWDOWN_PER_SQRT_DOC = 0.00108


def chroma_growth(documents: int, held: int, c: float = CHROMA_SLOWDOWN_PER_SQRT_DOC) -> float:
    """Mean time per document of writing ``documents`` more into a server that holds ``held``
    (what the write probe meets) ÷ the time at ``held``, for a time of 1 + c·√n at n held:
    the mean of √n over [held, held + documents] is ⅔·((held + documents)^1.5 − held^1.5) / documents."""
    if documents <= 0:
        return 1.0
    end = held + documents
    mean_root = 2.0 / 3.0 * (math.pow(end, 1.5) - math.pow(held, 1.5)) / documents
    return (1.0 + c * mean_root) / (1.0 + c * math.sqrt(held))


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


def api_rate_limit(decl: ApiModelDeclaration, mean_tokens: float) -> float | None:
    """Documents per second the declared rate limits allow all workers together (None: none
    declared): requests per minute times documents per request, tokens per minute over the
    documents' mean token count."""
    limits = []
    if decl.requests_per_minute:
        per_request = min(decl.max_inputs_per_request - int(decl.probe_every_request),
                          decl.max_tokens_per_request / max(mean_tokens, 1.0))
        limits.append(decl.requests_per_minute * max(per_request, 1.0) / 60)
    if decl.tokens_per_minute:
        limits.append(decl.tokens_per_minute / max(mean_tokens, 1.0) / 60)
    return min(limits) if limits else None


def chroma_write_rate(store: Store, model: LoadedModel, texts: list[str], metadatas: list[dict[str, Any] | None],
                      space: str, writers: int) -> float:
    """Documents per second that ``writers`` concurrent writers get from this Chroma server,
    measured by adding the sample (real text and metadata, random unit vectors of the model's
    dimension, the provenance fields a migration writes) to a throw-away collection."""
    name = PROBE_PREFIX + secrets.token_hex(4)
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((len(texts), model.dimension)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    metas = [provenance(model, t, m) for t, m in zip(texts, metadatas, strict=True)]
    writes = [slice(i, i + PROBE_WRITE) for i in range(0, len(texts), PROBE_WRITE)]
    store.create(name, {"reembed": "plan write probe; safe to delete"}, hnsw={"space": space})
    ids = [f"probe-{i}" for i in range(len(texts))]
    try:
        def write(part: slice) -> None:
            store.add(name, ids[part], vectors[part], texts[part], metas[part])

        write(writes[0])  # warm-up: the collection's first write also opens its segments
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=max(1, writers)) as pool:
            list(pool.map(write, writes[1:]))
        return (len(texts) - PROBE_WRITE) / (time.perf_counter() - started)
    finally:
        with contextlib.suppress(ReembedError):
            store.delete(name)


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
    spec = resolve_configured(settings, to_model)
    ids: list[str] = []
    texts: list[str] = []
    metadatas: list[dict[str, Any] | None] = []
    extra_bytes: list[int] = []
    empty: list[str] = []
    for page in store.pages(current.live_collection):
        for doc_id, text, meta in zip(page.ids, page.documents, page.metadatas, strict=True):
            if text is None or not text.strip():
                empty.append(doc_id)
                continue
            ids.append(doc_id)
            texts.append(text)
            metadatas.append(meta)
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
    usage = getattr(getattr(model, "client", None), "usage", None)  # a model behind an API counts requests
    sent_before = usage.requests if usage else 0
    started = time.perf_counter()
    model.embed_documents(measured)
    seconds = time.perf_counter() - started
    per_worker = len(measured) / seconds
    cores = os.cpu_count() or 1
    effective = workers if model.device != "cpu" else min(workers, max(1, cores // settings.torch_threads))
    model_rate = per_worker * effective
    mean_tokens = sum(tokens) / len(tokens)
    limit_rate = api_rate_limit(spec.api, mean_tokens) if spec.api else None
    api: dict[str, Any] = {}
    if spec.api and usage is not None:
        sent = usage.requests - sent_before
        api = {"api_requests_measured": sent, "api_request_s": round(seconds / max(sent, 1), 3),
               "rate_limit_docs_per_s": round(limit_rate, 2) if limit_rate else None,
               "plan_cost": round(spec.price_per_million_tokens * sum(model.count_tokens(measured[:8] + measured))
                                  / 1e6, 6)}
    space = store.space(current.live_collection)
    # A small collection's documents are written several times over (under other ids): the probe
    # always writes PROBE_DOCS, so that its few writes are the size a migration's are.
    chosen = rng.sample(range(len(texts)), min(PROBE_DOCS, len(texts)))
    probe = [chosen[i % len(chosen)] for i in range(PROBE_DOCS)]
    probe_rate = chroma_write_rate(store, model, [texts[i] for i in probe], [metadatas[i] for i in probe],
                                   space, min(workers, PROBE_WRITERS))
    held = store.documents_held()
    growth = chroma_growth(len(texts), held)
    write_rate = probe_rate / growth  # on average while the target grows to the whole collection
    rate = min(model_rate, write_rate, limit_rate or model_rate)
    bound_by: Literal["model", "chroma", "rate_limit"] = (
        "rate_limit" if limit_rate and limit_rate <= min(model_rate, write_rate)
        else "model" if model_rate <= write_rate else "chroma")
    total_tokens = int(sum(tokens) * scale)
    vectors_bytes = len(texts) * model.dimension * 4
    overhead = HNSW_BYTES_PER_DOC + sum(extra_bytes) / len(extra_bytes)
    api_cost = spec.price_per_million_tokens * total_tokens / 1e6
    shortcut = cuts_from(settings, registry, current.live_collection, spec)
    if shortcut:  # the stored vectors are cut: nothing sent but the sample, only Chroma's pace counts
        rate, bound_by, api_cost = write_rate, "chroma", 0.0
    warning = space_warning(space, spec.name, spec.normalize, model.similarity)
    out: dict[str, Any] = {
        "alias": alias, "from_model": live.model, "to_model": spec.name, "dimension": model.dimension,
        "device": model.device, "documents": len(texts) + len(empty), "documents_to_embed": len(texts),
        "documents_without_text": len(empty), "first_without_text": empty[:10],
        "blocked": bool(empty), "tokens": total_tokens, "tokens_counted_on": token_note,
        "mean_tokens_per_document": round(sum(tokens) / len(tokens), 1), "max_sequence_length": limit,
        "documents_truncated": int(over * scale),
        "throughput_sample": len(measured), "docs_per_s_per_worker": round(per_worker, 2),
        "workers": workers, "effective_workers": effective, "model_docs_per_s": round(model_rate, 2),
        "chroma_write_docs_per_s": round(write_rate, 2), "chroma_probe_documents": PROBE_DOCS,
        "chroma_write_probe_docs_per_s": round(probe_rate, 2), "chroma_documents_held": held,
        "chroma_growth_factor": round(growth, 3),
        "bound_by": bound_by, "docs_per_s": round(rate, 2), "estimated_wall_s": round(len(texts) / rate, 3),
        # Chroma-bound: large batches make large writes, which the server takes best.
        "suggested_batch_size": MAX_BATCH_SIZE if bound_by == "chroma" else settings.batch_size,
        "storage_vectors_bytes": vectors_bytes,
        "storage_overhead_bytes_per_document": round(overhead),
        "storage_total_bytes": int(vectors_bytes + overhead * len(texts)),
        "price_per_million_tokens": spec.price_per_million_tokens, "api_cost": round(api_cost, 4),
        "space": space, "model_similarity": model.similarity, "normalized": spec.normalize,
        "warnings": [warning] if warning else [], **api, "shortcut": "matryoshka" if shortcut else None,
    }
    if None not in (queries_per_month, value_per_query, quality_gain):
        benefit = queries_per_month * value_per_query * quality_gain  # type: ignore[operator]
        cost = (engineering_cost or 0.0) + api_cost
        out.update(monthly_benefit=round(benefit, 2), one_off_cost=round(cost, 2),
                   months_to_break_even=round(cost / benefit, 2) if benefit > 0 else None)
    registry.put_plan(PlanRecord(alias=alias, source_collection=current.live_collection, to_model=spec.name,
                                 documents=len(texts), workers=workers, docs_per_s=rate, bound_by=bound_by,
                                 wall_s=len(texts) / rate))
    return out
