"""Retrieval metrics and BEIR files: nDCG@k, Recall@k, MRR@k over graded judgements.

Definitions follow ``trec_eval`` / ``pytrec_eval`` as BEIR uses them, so figures compare with
published ones: nDCG uses the linear gain ``rel`` and the ``log2(rank + 1)`` discount, the ideal
ranking is the judged documents sorted by grade; Recall counts documents with grade > 0; MRR is
the reciprocal rank of the first document with grade > 0 within the cut-off. Queries without a
relevant document are skipped (they have no defined score).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from reembed.errors import InputError

Qrels = dict[str, dict[str, int]]  # query id -> document id -> grade


def ndcg_at_k(ranked: Sequence[str], judged: Mapping[str, int], k: int) -> float:
    dcg = sum(judged.get(doc, 0) / math.log2(rank + 1) for rank, doc in enumerate(ranked[:k], start=1))
    ideal = sorted((g for g in judged.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(rank + 1) for rank, g in enumerate(ideal, start=1))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked: Sequence[str], judged: Mapping[str, int], k: int) -> float:
    relevant = {doc for doc, g in judged.items() if g > 0}
    return len(relevant.intersection(ranked[:k])) / len(relevant) if relevant else 0.0


def mrr_at_k(ranked: Sequence[str], judged: Mapping[str, int], k: int) -> float:
    for rank, doc in enumerate(ranked[:k], start=1):
        if judged.get(doc, 0) > 0:
            return 1.0 / rank
    return 0.0


#: Metric name -> f(ranked ids, judged {id: grade}).
METRICS: dict[str, Callable[[Sequence[str], Mapping[str, int]], float]] = {
    "ndcg@10": lambda r, j: ndcg_at_k(r, j, 10),
    "recall@10": lambda r, j: recall_at_k(r, j, 10),
    "recall@100": lambda r, j: recall_at_k(r, j, 100),
    "mrr@10": lambda r, j: mrr_at_k(r, j, 10),
}


def per_query(run: Mapping[str, Sequence[str]], qrels: Qrels) -> dict[str, dict[str, float]]:
    """metric -> query id -> score, for every judged query that has a relevant document."""
    out: dict[str, dict[str, float]] = {name: {} for name in METRICS}
    for qid, judged in qrels.items():
        if not any(g > 0 for g in judged.values()):
            continue
        ranked = run.get(qid, [])
        for name, fn in METRICS.items():
            out[name][qid] = fn(ranked, judged)
    return out


def mean_scores(run: Mapping[str, Sequence[str]], qrels: Qrels) -> dict[str, float]:
    scores = per_query(run, qrels)
    return {name: (sum(v.values()) / len(v) if v else 0.0) for name, v in scores.items()}


# -- BEIR files ------------------------------------------------------------------------------


def read_queries(path: Path) -> dict[str, str]:
    """``queries.jsonl``: ``{"_id", "text"}`` per line."""
    if not path.is_file():
        raise InputError(f"queries file {str(path)!r} does not exist")
    queries: dict[str, str] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                queries[str(row["_id"])] = str(row["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InputError(f"{path}:{number}: expected a JSON object with '_id' and 'text'") from None
    return queries


def read_qrels(path: Path) -> Qrels:
    """``qrels/<split>.tsv``: ``query-id<TAB>corpus-id<TAB>score`` with a header line; grades are ints."""
    if not path.is_file():
        raise InputError(f"qrels file {str(path)!r} does not exist")
    qrels: Qrels = {}
    with open(path, encoding="utf-8", newline="") as handle:
        for number, row in enumerate(csv.reader(handle, delimiter="\t"), start=1):
            if not row or (number == 1 and not row[-1].strip().lstrip("-").isdigit()):
                continue  # blank line or header
            if len(row) < 3:
                raise InputError(f"{path}:{number}: expected query-id, corpus-id and score separated by tabs")
            try:
                grade = int(row[-1])
            except ValueError:
                raise InputError(f"{path}:{number}: score {row[-1]!r} is not an integer") from None
            qrels.setdefault(row[0], {})[row[1]] = grade
    if not qrels:
        raise InputError(f"qrels file {str(path)!r} holds no judgements")
    return qrels
