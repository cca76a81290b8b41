"""Does a collection's stored vectors come from the model it is claimed to come from?

Embedding a few stored documents again and comparing with their stored vectors is the only
check that tells two models of the same dimension apart. It runs on a worker (it loads a model).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reembed.models import PROBE_MIN_COSINE, LoadedModel
from reembed.store import Store


def compare_stored_vectors(store: Store, collection: str, model: LoadedModel, sample: int = 8) -> dict[str, Any]:
    """Re-embed up to ``sample`` documents spread over the collection; cosine to the stored vectors."""
    total = store.count(collection)
    offsets = sorted({int(i * total / sample) for i in range(sample)}) if total else []
    ids: list[str] = []
    texts: list[str] = []
    stored: list[np.ndarray] = []
    for offset in offsets:
        page = store.page(collection, offset, 1, embeddings=True)
        if page.ids and page.documents[0] and page.embeddings is not None:
            ids.append(page.ids[0])
            texts.append(page.documents[0])
            stored.append(page.embeddings[0])
    result: dict[str, Any] = {
        "collection": collection, "model": model.spec.name, "fingerprint": model.fingerprint,
        "checked": len(ids), "dimension_model": model.dimension,
        "dimension_stored": int(stored[0].shape[0]) if stored else None,
        "probe": [round(float(x), 6) for x in model.probe],
    }
    if not ids or result["dimension_stored"] != model.dimension:
        return {**result, "match": False, "cosine_min": None, "cosine_mean": None}
    fresh = model.embed_documents(texts).astype(np.float64)
    old = np.asarray(stored, dtype=np.float64)
    cos = (fresh * old).sum(1) / (np.linalg.norm(fresh, axis=1) * np.linalg.norm(old, axis=1) + 1e-12)
    return {**result, "match": bool(cos.min() >= PROBE_MIN_COSINE),
            "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean())}
