"""The Matryoshka shortcut: migrating to the same model at fewer dimensions without embedding.

A model trained with Matryoshka representation learning (OpenAI's ``text-embedding-3-*``,
nomic-embed-text-v1.5) puts the most of its meaning in its first dimensions: asked for
``dimensions=256``, such an endpoint answers its full vector cut to 256 and re-normalised. A
collection embedded with the full model therefore already holds every vector the smaller one
would give, and a migration to ``NAME@256`` (or to a declaration of the same endpoint and model
with ``dimensions = 256``) can take them from the source collection, cut and re-normalise them,
and send no document to the endpoint: no cost, no rate limit, bound by Chroma alone.

That holds only if the endpoint works that way *today* and the stored vectors came from it, so
before the migration starts it embeds a sample of the stored documents at the smaller size and
compares (:func:`check_sample`); a disagreement refuses the shortcut and names the fix. During the
migration, a document whose text in the source is not the batch's (written since the batch was
read) is embedded through the endpoint like in any migration: a vector always belongs to its text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final, Literal

import numpy as np

from reembed.errors import InputError

if TYPE_CHECKING:
    from reembed.models import LoadedModel, ModelSpec
    from reembed.store import Store

#: The record's word for a migration that takes its vectors from the source collection.
SHORTCUT: Final[Literal["matryoshka"]] = "matryoshka"
#: Stored documents embedded at the smaller size before a shortcut starts (in a few spread pages).
SAMPLE = 16
#: The same text through the same model, with a server's numerics (fp16, batch-dependent kernels):
#: above this. Another model, or vectors that are not a cut of the full ones: far below.
MIN_COSINE = 0.999


def sized_name(model: str, size: int) -> str:
    """``MODEL@SIZE``: ``model`` (itself possibly cut, ``NAME@N``) cut to ``size`` dimensions."""
    base, _, suffix = model.rpartition("@")
    return f"{base if base and suffix.isdigit() else model}@{size}"


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row scaled to length 1 (a zero row stays zero), as float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _rows(embeddings: np.ndarray | None) -> list[np.ndarray]:
    return [] if embeddings is None else list(embeddings)


def cut(vectors: np.ndarray, size: int) -> np.ndarray:
    """The first ``size`` dimensions of each row, re-normalised: what a Matryoshka endpoint answers."""
    return unit_rows(np.asarray(vectors, dtype=np.float32)[:, :size])


def unavailable(source: ModelSpec, target: ModelSpec) -> str | None:
    """Why ``target``'s vectors cannot be cut from ``source``'s; None when they can."""
    s, t = source.api, target.api
    if s is None or t is None:
        return "the shortcut needs both models declared behind an API (the same endpoint and model)"
    if not t.matryoshka:
        return f"{t.name!r} is not declared matryoshka = true"
    if ((s.base_url.rstrip("/"), s.model, s.query_prefix, s.document_prefix)
            != (t.base_url.rstrip("/"), t.model, t.query_prefix, t.document_prefix)):
        return f"{t.name!r} is not {s.name!r} at fewer dimensions (another endpoint, model or prefix)"
    if t.dimension >= s.dimension:
        return f"{t.name!r} ({t.dimension}-d) is not smaller than {s.name!r} ({s.dimension}-d)"
    return None


def check_sample(store: Store, collection: str, total: int, model: LoadedModel) -> float:
    """Embed up to ``SAMPLE`` stored documents of ``collection`` with ``model`` (the smaller size)
    and compare with their stored vectors cut to it; returns the lowest cosine.

    Raises:
        InputError: a sampled document's cut vector is not what the endpoint answers now.
    """
    per_page = SAMPLE // 4
    offsets = sorted({min(total - 1, max(0, total * q // 4)) for q in range(4)})
    ids: list[str] = []
    texts: list[str] = []
    stored: list[np.ndarray] = []
    for offset in offsets:
        page = store.page(collection, offset, per_page, embeddings=True)
        for doc_id, text, vector in zip(page.ids, page.documents, _rows(page.embeddings), strict=False):
            if text and text.strip() and doc_id not in ids:
                ids.append(doc_id)
                texts.append(text)
                stored.append(np.asarray(vector, dtype=np.float32))
    if not ids:
        raise InputError(f"collection {collection!r} has no document with text to check the shortcut on; "
                         "migrate with --re-embed")
    answered = unit_rows(model.embed_documents(texts))
    cosines = np.sum(cut(np.stack(stored), model.dimension) * answered, axis=1)
    worst = int(np.argmin(cosines))
    if cosines[worst] < MIN_COSINE:
        raise InputError(
            f"the stored vectors of {collection!r} cut to {model.dimension} dimensions are not what "
            f"{model.spec.name!r} answers now (cosine {cosines[worst]:.4f} for document {ids[worst]!r}, "
            f"{MIN_COSINE} needed): the endpoint changed since they were embedded, or it does not cut this way. "
            "Migrate with --re-embed to embed every document through the endpoint")
    return float(cosines.min())


def from_source(store: Store, collection: str, ids: Sequence[str], texts: Sequence[str], model: LoadedModel,
                ) -> tuple[Callable[[list[str]], np.ndarray], Callable[[], int]]:
    """An ``embed(texts)`` for one batch that cuts the source's stored vector of each text the
    source still holds for its id, and embeds the rest through ``model``; and a count of those.

    Keyed by text: the same text always has the same vector, and the caller may split the batch.

    Raises:
        StoreError: reading the source failed (the batch is retried).
    """
    page = store.get(collection, list(ids), embeddings=True)
    wanted = dict(zip(ids, texts, strict=True))
    known = {text: np.asarray(vector, dtype=np.float32)
             for doc_id, text, vector in zip(page.ids, page.documents, _rows(page.embeddings), strict=False)
             if text is not None and wanted.get(doc_id) == text and vector is not None}
    sent = [0]

    def embed(batch: list[str]) -> np.ndarray:
        out = np.empty((len(batch), model.dimension), dtype=np.float32)
        rest = [i for i, text in enumerate(batch) if text not in known]
        taken = [i for i, text in enumerate(batch) if text in known]
        if taken:
            out[taken] = cut(np.stack([known[batch[i]] for i in taken]), model.dimension)
        if rest:
            out[rest] = model.embed_documents([batch[i] for i in rest])
            sent[0] += len(rest)
        return out

    return embed, lambda: sent[0]
