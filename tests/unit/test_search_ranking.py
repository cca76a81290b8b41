"""Ranking and fusion on tiny corpora with hand-checked answers, and BM25 parity with rank-bm25."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from reembed.errors import InputError
from reembed.bm25 import Bm25Index, IndexSignature, tokenize
from reembed.fusion import reciprocal_rank_fusion
from search.searcher import check_query
from tests.conftest import SCIFACT, need

SIG = IndexSignature("tiny", 3, 0)
TINY = {
    "d1": "Solar panels convert sunlight into electricity",
    "d2": "Wind turbines generate electricity",
    "d3": "The cat sleeps in the sunlight",
}


def tiny_index() -> Bm25Index:
    return Bm25Index.build(SIG, list(TINY), list(TINY.values()), [{"n": i} for i in range(3)])


def test_tokenizer_lowercases_drops_stop_words_and_stems() -> None:
    assert tokenize(["The Cats SLEEPING in the gardens"]) == [["cat", "sleep", "garden"]]


def test_bm25_ranks_tiny_corpus_as_hand_checked() -> None:
    index = tiny_index()
    # d1 has both terms; d2 and d3 one each with equal idf; d3 is shorter (3 terms vs 4), so it wins.
    assert [h.id for h in index.query("sunlight electricity", 10)] == ["d1", "d3", "d2"]
    assert [h.id for h in index.query("sleeping cats", 10)] == ["d3"]  # stemming: sleeping→sleep, cats→cat
    assert index.query("the in into", 10) == []  # stop words only: nothing matches
    assert index.query("zebra", 10) == []  # unknown term: nothing, not zero-score padding
    assert [h.rank for h in index.query("sunlight electricity", 2)] == [1, 2]


def test_index_round_trips_through_disk(tmp_path: Path) -> None:
    index = tiny_index()
    index.save(tmp_path / "idx")
    loaded = Bm25Index.load(tmp_path / "idx")
    assert loaded.signature == SIG and len(loaded) == 3
    assert [(h.id, round(h.score, 5)) for h in loaded.query("sunlight electricity", 3)] == \
        [(h.id, round(h.score, 5)) for h in index.query("sunlight electricity", 3)]
    assert loaded.document("d2") == (TINY["d2"], {"n": 1})
    assert not list(tmp_path.rglob("*.pkl")), "indexes are never pickled"


def test_rrf_matches_hand_computed_scores() -> None:
    fused = reciprocal_rank_fusion({"bm25": ["a", "b", "c"], "semantic": ["c", "a", "d"]}, k=60)
    assert [f.id for f in fused] == ["a", "c", "b", "d"]
    assert fused[0].score == pytest.approx(1 / 61 + 1 / 62)
    assert fused[1].score == pytest.approx(1 / 63 + 1 / 61)
    assert fused[0].ranks == {"bm25": 1, "semantic": 2} and fused[3].ranks == {"semantic": 3}


def test_rrf_weights_and_k_change_the_order() -> None:
    rankings = {"bm25": ["a", "b", "c"], "semantic": ["c", "a", "d"]}
    weighted = reciprocal_rank_fusion(rankings, k=60, weights={"semantic": 2.0})
    assert [f.id for f in weighted][:2] == ["c", "a"]  # 1/63 + 2/61 > 1/61 + 2/62
    assert reciprocal_rank_fusion(rankings, k=0)[0].score == pytest.approx(1 + 1 / 2)
    with pytest.raises(InputError, match="weights"):
        reciprocal_rank_fusion(rankings, weights={"dense": 1.0})
    with pytest.raises(InputError, match="k must be"):
        reciprocal_rank_fusion(rankings, k=-1)


@pytest.mark.parametrize(("query", "k", "mode", "match"), [
    ("   ", 10, "hybrid", "empty"),
    ("x" * 10_001, 10, "hybrid", "limit is 10000"),
    ("ok", 0, "hybrid", "k=0"),
    ("ok", 1001, "hybrid", "k=1001"),
    ("ok", 10, "fuzzy", "mode 'fuzzy'"),
])
def test_query_bounds_are_refused_with_the_bound_named(query: str, k: int, mode: str, match: str) -> None:
    with pytest.raises(InputError, match=match):
        check_query(query, k, mode)


def test_bm25s_matches_rank_bm25_on_scifact() -> None:
    """The reference: with Okapi/Robertson parameters matched (epsilon 0), the same top 10."""
    from rank_bm25 import BM25Okapi

    corpus_file = need(SCIFACT / "corpus.jsonl")
    docs = []
    with open(corpus_file, encoding="utf-8") as handle:
        for line, _ in zip(handle, range(1500)):
            row = json.loads(line)
            docs.append((row["_id"], f"{row['title']} {row['text']}"))
    queries = []
    with open(SCIFACT / "queries.jsonl", encoding="utf-8") as handle:
        for line, _ in zip(handle, range(80)):
            queries.append(json.loads(line)["text"])
    ids = [d for d, _ in docs]
    params = {"method": "robertson", "k1": 1.5, "b": 0.75}
    ours = Bm25Index.build(IndexSignature("scifact", len(ids), 0), ids, [t for _, t in docs],
                           [None] * len(ids), params)
    reference = BM25Okapi(tokenize([t for _, t in docs]), k1=1.5, b=0.75, epsilon=0.0)
    compared = 0
    for query in queries:
        expected = reference.get_scores(tokenize([query])[0])
        # rank-bm25 keeps the constant (k1 + 1) in the numerator, bm25s drops it: same ranking.
        got = ours.scores(query) * (1.5 + 1)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
        top_ref = [ids[i] for i in np.argsort(-expected, kind="stable")[:10] if expected[i] > 0]
        top_ours = [h.id for h in ours.query(query, 10)]
        # Equal scores may be listed in either order; compare the rankings score by score.
        ref_scores = sorted((round(float(expected[ids.index(i)]), 3) for i in top_ref), reverse=True)
        our_scores = [round(float(got[ids.index(i)]), 3) for i in top_ours]
        assert our_scores == ref_scores
        strict = [i for i in top_ref if list(np.round(expected, 3)).count(round(float(expected[ids.index(i)]), 3)) == 1]
        assert [i for i in top_ours if i in strict] == strict
        compared += 1
    assert compared == 80
