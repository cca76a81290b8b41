"""Fusion of the BM25 and the semantic ranking: reciprocal ranks, or a convex combination of scores.

BM25 scores are unbounded term statistics and cosine similarities live in [-1, 1], with a
different spread for every model: adding them raw mixes units. RRF uses only each document's rank
in each retriever: ``score(d) = sum_r weight_r / (k + rank_r(d))`` (Cormack et al., 2009). A convex
combination first puts each retriever's scores on [0, 1] (:func:`convex_fusion`).

Equal-weight RRF loses to its better half when one retriever is much weaker; which fusion serves
an alias is therefore a :class:`FusionSpec` per model, chosen from judged queries by
``reembed evaluate`` (``reembed.fusion_tuning``) and carried by the alias record, with
:data:`DEFAULT_FUSION` when nothing is known.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


# -- a fusion an alias can carry -------------------------------------------------------------------

#: Lowest score each retriever can give (theoretical min-max normalisation, "TMM" in Bruch et al.,
#: "An Analysis of Fusion Functions for Hybrid Retrieval", 2023): a BM25 score is >= 0 and a
#: semantic score is a cosine similarity, >= -1. The top of each list is its observed maximum.
THEORETICAL_MIN = {"bm25": 0.0, "semantic": -1.0}


class FusionSpec(BaseModel):
    """How ``hybrid`` combines the BM25 and the semantic ranking of one model.

    ``convex``: ``w * tmm(semantic) + (1 - w) * tmm(bm25)`` over each retriever's top list, a
    document missing from a list scoring that list's 0 (Bruch et al. found this convex
    combination better than RRF and tunable from a few judged queries). ``rrf``:
    ``w / (k + rank_semantic) + (1 - w) / (k + rank_bm25)``; ``w = 0.5`` is equal-weight RRF.
    ``w = 1`` is semantic alone and ``w = 0`` BM25 alone, so a tuned fusion can always fall back
    to the better half.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["convex", "rrf"]
    semantic_weight: float = Field(ge=0.0, le=1.0)
    k: int = Field(default=DEFAULT_RRF_K, ge=0, le=10_000, description="RRF's k (rrf only)")
    tuned_on: str | None = Field(default=None, description="what chose it: judged queries and the score they gave")

    def describe(self) -> str:
        if self.method == "rrf":
            return f"rrf semantic_weight={self.semantic_weight:g} k={self.k}"
        return f"convex semantic_weight={self.semantic_weight:g}"

    def fuse(self, bm25: Sequence[tuple[str, float]], semantic: Sequence[tuple[str, float]],
             *more_semantic: Sequence[tuple[str, float]]) -> list[Fused]:
        """Fuse ranked lists of ``(id, score)`` (best first): BM25's and one or more semantic ones.

        Several semantic lists (a fused canary: each collection ranked by its own model) share the
        semantic weight equally; their ranks are named ``semantic``, ``semantic_2``, ...
        """
        semantic_lists = [semantic, *more_semantic]
        names = ["semantic"] + [f"semantic_{i}" for i in range(2, len(semantic_lists) + 1)]
        lists = {"bm25": list(bm25), **{n: list(hits) for n, hits in zip(names, semantic_lists, strict=True)}}
        weights = {"bm25": 1.0 - self.semantic_weight, **{n: self.semantic_weight / len(names) for n in names}}
        if self.method == "rrf":
            return reciprocal_rank_fusion({n: [i for i, _ in hits] for n, hits in lists.items()}, self.k, weights)
        return convex_fusion(lists, weights)


#: The fusion served when nothing else is known (no judged queries; see BENCHMARKS.md, "Fusion").
#: Without judgements nothing says which retriever is the stronger on a user's data (on SciFact
#: BM25 beats a static model by 0.29 nDCG@10; on a held-out set BM25 lost to the new model by 0.19),
#: so the default gives both equal shares; among such symmetric fusions, SciFact's train split
#: chose convex over RRF (at every k): its worst loss to the better half, over a static, a small and
#: a large model, is the smallest. Never tuned on a test split.
DEFAULT_FUSION = FusionSpec(method="convex", semantic_weight=0.5,
                            tuned_on="default: equal shares, convex chosen on SciFact's train split")


def convex_fusion(lists: Mapping[str, Sequence[tuple[str, float]]], weights: Mapping[str, float]) -> list[Fused]:
    """``sum_r weight_r * (score - min_r) / (max_r - min_r)`` with theoretical minimums; ties as RRF's."""
    fused: dict[str, Fused] = {}
    for name, hits in lists.items():
        if not hits:
            continue
        low = THEORETICAL_MIN[name.split("_")[0]]
        top = max(score for _, score in hits)
        span = top - low
        weight = weights.get(name, 1.0)
        for position, (doc_id, score) in enumerate(hits, start=1):
            entry = fused.setdefault(doc_id, Fused(doc_id, 0.0))
            if name in entry.ranks:
                continue
            entry.ranks[name] = position
            if span > 0:
                entry.score += weight * (score - low) / span
    return sorted(fused.values(), key=lambda f: (-f.score, min(f.ranks.values()), f.id))


def parse_fusion(text: str, rrf_k: int = DEFAULT_RRF_K, source: str = "REEMBED_FUSION") -> FusionSpec:
    """``convex`` / ``rrf``, optionally with ``:semantic_weight`` and (rrf) ``:k``: ``convex:0.7``, ``rrf:0.5:60``.

    Raises:
        InputError: naming ``source`` and the accepted form.
    """
    parts = [p.strip() for p in text.strip().lower().split(":")]
    usage = f"{source}={text!r} is not a fusion: use convex[:WEIGHT] or rrf[:WEIGHT[:K]], WEIGHT in 0..1 (semantic's share)"
    if not parts or parts[0] not in ("convex", "rrf") or len(parts) > (3 if parts[0] == "rrf" else 2):
        raise InputError(usage)
    try:
        weight = float(parts[1]) if len(parts) > 1 else (DEFAULT_FUSION.semantic_weight if parts[0] == "convex" else 0.5)
        k = int(parts[2]) if len(parts) > 2 else rrf_k
        return FusionSpec(method=parts[0], semantic_weight=weight, k=k, tuned_on=f"set ({source})")  # type: ignore[arg-type]
    except (ValueError, ValidationError) as exc:
        raise InputError(usage) from exc
