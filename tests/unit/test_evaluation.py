"""The statistics behind `reembed evaluate`: rankings, bootstrap interval, verdict, synthetic queries."""

from __future__ import annotations

import numpy as np
import pytest

from reembed.evaluation import (
    GO,
    INCONCLUSIVE,
    NO_GO,
    bootstrap_difference,
    dense_rankings,
    sample_ids,
    synthetic_queries,
    verdict,
)


def test_dense_rankings_by_cosine() -> None:
    docs = np.array([[1.0, 0.0], [0.7, 0.7], [0.0, 1.0]])
    first = dense_rankings(np.array([[1.0, 0.1]]), docs, ["a", "b", "c"], 3)[0]
    assert [doc for doc, _ in first] == ["a", "b", "c"]
    norm = np.hypot(1.0, 0.1)  # scores are cosine similarities
    assert [score for _, score in first] == pytest.approx([1.0 / norm, 0.77 / (norm * np.hypot(0.7, 0.7)), 0.1 / norm])
    assert [doc for doc, _ in dense_rankings(np.array([[0.0, 2.0]]), docs, ["a", "b", "c"], 2)[0]] == ["c", "b"]


def test_verdict_on_clear_gain_clear_loss_and_noise() -> None:
    rng = np.random.default_rng(0)
    old = rng.uniform(0.2, 0.8, 300)
    gain = bootstrap_difference(old + 0.05 + rng.normal(0, 0.02, 300), old)
    assert gain.low > 0 and verdict(gain, 0.01, 0.01) == GO
    loss = bootstrap_difference(old - 0.05 + rng.normal(0, 0.02, 300), old)
    assert loss.high < 0 and verdict(loss, 0.01, 0.01) == NO_GO
    noise = bootstrap_difference(old + rng.normal(0, 0.2, 300), old)
    assert noise.low < 0 < noise.high and verdict(noise, 0.01, 0.01) == INCONCLUSIVE
    # a real but small gain below --min-gain is not a GO either
    small = bootstrap_difference(old + 0.005, old)
    assert small.low > 0 and verdict(small, 0.01, 0.01) == INCONCLUSIVE


def test_bootstrap_interval_contains_the_mean_and_is_seeded() -> None:
    new, old = [0.5, 0.7, 0.9, 0.4], [0.5, 0.6, 0.5, 0.4]
    diff = bootstrap_difference(new, old)
    assert diff.low <= diff.mean <= diff.high and diff.mean == np.mean(np.subtract(new, old))
    assert bootstrap_difference(new, old) == diff


def test_synthetic_queries_cut_a_distinctive_sentence_out_of_its_document() -> None:
    docs = [(f"d{i}", f"Common words appear here. Common words appear again. "
                      f"Zygomorphic{i} flowers attract specialised pollinators{i} strongly. Common words end.")
            for i in range(20)]
    queries, qrels, edited = synthetic_queries(docs, 5)
    assert len(queries) == 5
    for qid, text in queries.items():
        (doc_id,) = qrels[qid]
        assert "Zygomorphic" in text and text not in edited[doc_id] and "Common words" in edited[doc_id]


def test_sample_keeps_every_judged_document() -> None:
    ids = [f"d{i}" for i in range(1000)]
    picked = sample_ids(ids, {"d3", "d999"}, 50)
    assert len(picked) == 50 and {"d3", "d999"} <= set(picked)
    assert sample_ids(ids, set(), None) == ids
