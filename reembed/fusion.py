"""Reciprocal rank fusion: combine rankings, never raw scores.

BM25 scores are unbounded term statistics and cosine similarities live in [-1, 1], with a
different spread for every model: adding them mixes units. RRF uses only each document's rank
in each retriever: ``score(d) = sum_r weight_r / (k + rank_r(d))`` (Cormack et al., 2009), with
``k = 60`` by default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from reembed.errors import InputError

DEFAULT_RRF_K = 60


@dataclass
class Fused:
    """One document after fusion: its score and its 1-based rank in each retriever that found it."""

    id: str
    score: float
    ranks: dict[str, int] = field(default_factory=dict)


def reciprocal_rank_fusion(rankings: Mapping[str, Sequence[str]], k: int = DEFAULT_RRF_K,
                           weights: Mapping[str, float] | None = None) -> list[Fused]:
    """Fuse ranked id lists (best first) by name; ties are broken by the best single rank, then id.

    Raises:
        InputError: ``k`` is negative or a weight is negative or names no retriever.
    """
    if k < 0:
        raise InputError(f"RRF k must be >= 0 (got {k}); 60 is the usual choice")
    weights = dict(weights or {})
    unknown = set(weights) - set(rankings)
    if unknown or any(w < 0 for w in weights.values()):
        raise InputError(f"fusion weights must be >= 0 and name retrievers among {sorted(rankings)} (got {weights})")
    fused: dict[str, Fused] = {}
    for name, ids in rankings.items():
        weight = weights.get(name, 1.0)
        for position, doc_id in enumerate(ids, start=1):
            entry = fused.setdefault(doc_id, Fused(doc_id, 0.0))
            if name in entry.ranks:  # a retriever listing the same id twice keeps its best rank
                continue
            entry.ranks[name] = position
            entry.score += weight / (k + position)
    return sorted(fused.values(), key=lambda f: (-f.score, min(f.ranks.values()), f.id))
