"""Choose the fusion for an alias's model from judged queries (``reembed evaluate``).

Why tune at all: equal-weight RRF loses to its better half when one retriever is weak (a
held-out set scored semantic 0.641, BM25 0.453, equal-weight RRF 0.582 nDCG@10). Why this grid:
the convex combination needs one parameter and is tunable from few queries (Bruch et al., 2023);
weighted RRF is kept as the alternative because it ignores score shapes, which some static models
distort. The grid's ends are each retriever alone, so the choice is never worse than the better
half on the queries it was tuned on.

The score reported next to the choice is k-fold cross-validated (tuned on the other folds,
scored on the held-out one): the in-sample best is optimistic by construction.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from reembed.errors import InputError
from reembed.fusion import DEFAULT_FUSION, FusionSpec
from reembed.metrics import METRICS, Qrels

#: One query's two ranked lists of (id, score), best first: BM25's and the semantic model's.
Lists = tuple[Sequence[tuple[str, float]], Sequence[tuple[str, float]]]

WEIGHTS = tuple(round(w / 20, 2) for w in range(21))  # 0, 0.05, ..., 1
RRF_KS = (10, 30, 60, 100)
#: Below this many judged queries the choice is too noisy to replace the default.
MIN_QUERIES = 20
FOLDS = 5


def grid() -> list[FusionSpec]:
    """Every fusion tried: convex at each weight, then RRF at each weight and k."""
    convex = [FusionSpec(method="convex", semantic_weight=w) for w in WEIGHTS]
    rrf = [FusionSpec(method="rrf", semantic_weight=w, k=k) for k in RRF_KS for w in WEIGHTS if 0 < w < 1]
    return convex + rrf


@dataclass(frozen=True)
class Tuning:
    """The chosen fusion, its in-sample score, its cross-validated score, and the references."""

    chosen: FusionSpec
    metric: str
    queries: int
    in_sample: float
    cross_validated: float | None
    references: dict[str, float]  # name -> score on the same queries


def per_query_scores(spec: FusionSpec, lists: Mapping[str, Lists], qrels: Qrels, metric: str) -> dict[str, float]:
    """``metric`` of ``spec`` for every query in ``lists`` that has a judgement."""
    measure = METRICS[metric]
    return {qid: measure([f.id for f in spec.fuse(*lists[qid])], qrels[qid]) for qid in lists if qid in qrels}


def _mean(values: Mapping[str, float], queries: Sequence[str]) -> float:
    return sum(values[q] for q in queries) / len(queries) if queries else 0.0


def _best(table: Sequence[Mapping[str, float]], queries: Sequence[str]) -> int:
    """Index of the best spec on ``queries``; ties go to the earlier spec (convex first, lower weight first)."""
    best, best_score = 0, -1.0
    for i, values in enumerate(table):
        value = _mean(values, queries)
        if value > best_score + 1e-12:
            best, best_score = i, value
    return best


def tune(lists: Mapping[str, Lists], qrels: Qrels, metric: str = "ndcg@10", folds: int = FOLDS,
         seed: int = 13) -> Tuning:
    """Choose the fusion that maximises ``metric`` over the judged queries in ``lists``.

    Raises:
        InputError: an unknown metric, or fewer than ``MIN_QUERIES`` judged queries.
    """
    if metric not in METRICS:
        raise InputError(f"metric {metric!r} is unknown: use one of {', '.join(METRICS)}")
    queries = sorted(q for q in lists if q in qrels and any(g > 0 for g in qrels[q].values()))
    if len(queries) < MIN_QUERIES:
        raise InputError(f"{len(queries)} judged queries are too few to choose a fusion (at least {MIN_QUERIES}); "
                         "give more judged queries, or keep the default")
    specs = grid()
    table = [per_query_scores(spec, lists, qrels, metric) for spec in specs]  # each fusion run once
    best = _best(table, queries)
    chosen, in_sample = specs[best], _mean(table[best], queries)
    shuffled = queries[:]
    random.Random(seed).shuffle(shuffled)
    held_out_total = 0.0
    for fold in range(folds):
        held = set(shuffled[fold::folds])
        fold_best = _best(table, [q for q in shuffled if q not in held])
        held_out_total += sum(table[fold_best][q] for q in held)

    def reference(spec: FusionSpec) -> float:
        return _mean(per_query_scores(spec, lists, qrels, metric), queries)

    references = {
        "bm25": reference(FusionSpec(method="convex", semantic_weight=0.0)),
        "semantic": reference(FusionSpec(method="convex", semantic_weight=1.0)),
        "rrf-equal": reference(FusionSpec(method="rrf", semantic_weight=0.5)),
        "default": reference(DEFAULT_FUSION),
    }
    tuned_on = (f"{len(queries)} judged queries: {metric} {in_sample:.4f} in sample, "
                f"{held_out_total / len(queries):.4f} {folds}-fold cross-validated")
    return Tuning(chosen=chosen.model_copy(update={"tuned_on": tuned_on}), metric=metric, queries=len(queries),
                  in_sample=in_sample, cross_validated=held_out_total / len(queries), references=references)
