"""Retrieval metrics against values computed by hand, graded relevance included."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from reembed.errors import InputError
from reembed.metrics import mean_scores, mrr_at_k, ndcg_at_k, per_query, read_qrels, recall_at_k

RANKED = ["a", "b", "c", "d"]
JUDGED = {"b": 2, "d": 1, "e": 1, "z": 0}


def test_ndcg_with_graded_relevance() -> None:
    dcg = 2 / math.log2(3)
    idcg = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)  # ideal order: grades 2, 1, 1
    assert ndcg_at_k(RANKED, JUDGED, 3) == pytest.approx(dcg / idcg)  # 0.4030
    assert ndcg_at_k(RANKED, JUDGED, 3) == pytest.approx(0.40303, abs=1e-5)
    assert ndcg_at_k(["b", "d", "e"], JUDGED, 3) == pytest.approx(1.0)
    assert ndcg_at_k(["x", "y"], JUDGED, 10) == 0.0


def test_recall_and_mrr() -> None:
    assert recall_at_k(RANKED, JUDGED, 3) == pytest.approx(1 / 3)
    assert recall_at_k(RANKED, JUDGED, 4) == pytest.approx(2 / 3)
    assert mrr_at_k(RANKED, JUDGED, 10) == 0.5
    assert mrr_at_k(RANKED, JUDGED, 1) == 0.0


def test_queries_without_a_relevant_document_are_skipped() -> None:
    qrels = {"q1": JUDGED, "q2": {"a": 0}}
    assert set(per_query({"q1": RANKED, "q2": RANKED}, qrels)["ndcg@10"]) == {"q1"}
    assert mean_scores({}, {"q1": {"a": 1}})["mrr@10"] == 0.0  # a judged query with no answer scores 0


def test_read_qrels_graded_with_header(tmp_path: Path) -> None:
    path = tmp_path / "test.tsv"
    path.write_text("query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t1\nq2\td3\t0\n")
    assert read_qrels(path) == {"q1": {"d1": 2, "d2": 1}, "q2": {"d3": 0}}
    path.write_text("query-id\tcorpus-id\tscore\nq1\td1\thigh\n")
    with pytest.raises(InputError, match="not an integer"):
        read_qrels(path)
