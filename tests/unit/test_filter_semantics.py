"""Filters in Chroma's syntax: every malformed shape refused naming its part, and the keyword side's
evaluation on a small corpus whose answers were read off a real ``chroma run`` 1.5.9 (the
integration test ``test_filters.py`` checks random filters against the server itself)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from reembed.bm25 import Bm25Index, IndexSignature
from reembed.filter_index import FilterIndex
from reembed.filters import MAX_DEPTH, FilterError, parse_filter, parse_json_filter
from reembed.metrics import ndcg_at_k, read_qrels, read_queries
from reembed.text_column import TextColumn
from tests.conftest import SCIFACT, need

IDS = "abcdeg"
DOCS = ["Hello World cells", "hello world", "Cell biology", "", "ab", "café ünïcode ĞĞ"]
METAS: list[dict[str, Any]] = [{"n": 1, "s": "x", "b": True}, {"n": 1.0, "s": "X", "b": False}, {"n": 2, "s": "y"},
                               {"f": 2.5}, {"n": 0, "b": 1}, {"n": -3}]


def matching(where: Any = None, where_document: Any = None) -> str:
    flt = parse_filter(where, where_document)
    assert flt is not None
    mask = FilterIndex(TextColumn.of(DOCS), METAS).mask(flt)
    return "".join(doc_id for doc_id, ok in zip(IDS, mask, strict=True) if ok)


# (filter, ids Chroma 1.5.9 returned for get(where=...) on this corpus)
AS_CHROMA = [
    ({"n": 1}, "ab"), ({"n": 1.0}, "ab"), ({"n": {"$ne": 1}}, "cdeg"),
    ({"b": True}, "a"), ({"b": 1}, "e"), ({"b": {"$ne": True}}, "bcdeg"), ({"n": {"$eq": True}}, ""),
    ({"b": {"$gt": 0}}, "e"), ({"n": {"$ne": "x"}}, "abcdeg"), ({"zz": {"$nin": [1]}}, "abcdeg"),
    ({"n": {"$in": [1, 2]}}, "abc"), ({"n": {"$nin": [1, 2]}}, "deg"), ({"s": {"$in": ["x", "X"]}}, "ab"),
    ({"$and": [{"n": 1}, {"s": "x"}]}, "a"), ({"$or": [{"n": 2}, {"f": 2.5}]}, "cd"),
    # An integer is compared with a fractional bound cast to an integer (toward zero).
    ({"n": {"$eq": 1.5}}, "a"), ({"n": {"$eq": -3.5}}, "g"), ({"n": {"$eq": -2.5}}, ""),
    ({"n": {"$lt": 1.5}}, "beg"), ({"n": {"$gt": -2.5}}, "abce"), ({"n": {"$gte": -3.5}}, "abceg"),
    ({"n": {"$lte": 0.5}}, "eg"), ({"n": {"$in": [0.5, 2.5]}}, "ce"), ({"f": {"$lte": 2}}, ""),
    ({"n": {"$gt": 1e300}}, ""), ({"n": {"$lt": 9.3e18}}, "abceg"), ({"n": 9223372036854775807}, ""),
]


@pytest.mark.parametrize(("where", "expected"), AS_CHROMA, ids=[json.dumps(w) for w, _ in AS_CHROMA])
def test_metadata_filters_match_what_chroma_returned(where: dict[str, Any], expected: str) -> None:
    assert matching(where) == expected


@pytest.mark.parametrize(("where_document", "expected"), [
    ({"$contains": "hello"}, "b"), ({"$contains": "ell"}, "abc"), ({"$contains": "Ğ"}, "g"),
    ({"$contains": "é"}, "g"), ({"$not_contains": "hello"}, "acdeg"),
    ({"$and": [{"$contains": "ell"}, {"$not_contains": "Cell"}]}, "ab"),
    ({"$or": [{"$contains": "ab"}, {"$contains": "bio"}]}, "ce"),
    ({"$contains": "s\x00h"}, ""),  # never across the boundary of two texts
])
def test_document_filters_are_case_sensitive_substrings(where_document: dict[str, Any], expected: str) -> None:
    assert matching(where_document=where_document) == expected


def test_both_parts_must_pass() -> None:
    assert matching({"n": {"$gte": 1}}, {"$contains": "ell"}) == "abc"
    assert matching({"s": "x"}, {"$contains": "hello"}) == ""


def deep(levels: int) -> dict[str, Any]:
    node: dict[str, Any] = {"n": 1}
    for _ in range(levels):
        node = {"$and": [node, {"n": 1}]}
    return node


@pytest.mark.parametrize(("where", "where_document", "message"), [
    ([1], None, r"^where: must be an object"),
    ({}, None, r"^where: is an empty object"),
    ({"n": 1, "s": "x"}, None, r"^where: has 2 keys \(n, s\).*\$and"),
    ({"n": None}, None, r"^where\.n: must be a string, number or boolean, got null"),
    ({"n": [1, 2]}, None, r"^where\.n: is a list.*\$in"),
    ({"n": {"$gt": "a"}}, None, r"^where\.n\.\$gt: compares numbers only"),
    ({"n": {"$gt": True}}, None, r"^where\.n\.\$gt: compares numbers only"),
    ({"n": {"$in": []}}, None, r"^where\.n\.\$in: needs a non-empty list"),
    ({"n": {"$in": [1, "x"]}}, None, r"^where\.n\.\$in: mixes value types"),
    ({"n": {"$in": [1, 2.5]}}, None, r"^where\.n\.\$in: mixes value types"),
    ({"n": {"$in": [1, None]}}, None, r"^where\.n\.\$in\[1\]: must be a string"),
    ({"n": {"$like": 1}}, None, r"^where\.n\.\$like: is not an operator"),
    ({"n": {"$eq": 1, "$ne": 2}}, None, r"^where\.n: has 2 keys"),
    ({"n": {"$contains": 1}}, None, r"^where\.n\.\$contains: tests array values"),
    ({"$and": [{"n": 1}]}, None, r"^where\.\$and: must be a list of at least two"),
    ({"$or": {"n": 1}}, None, r"^where\.\$or: must be a list"),
    ({"$and": [{"n": 1}, {"s": {"$gt": "x"}}]}, None, r"^where\.\$and\[1\]\.s\.\$gt: compares numbers only"),
    ({"$not": {"n": 1}}, None, r"^where\.\$not: is not an operator here"),
    ({"#document": {"$contains": "x"}}, None, r"^where\.#document: is not a metadata key.*where_document"),
    ({"": 1}, None, r"^where\.: the metadata key is empty"),
    ({"n": float("nan")}, None, r"^where\.n: is not a finite number"),
    ({"n": 2**63}, None, r"^where\.n: is outside the 64-bit integer range"),
    (deep(MAX_DEPTH + 1), None, r"nested deeper than"),
    (None, {"$contains": ""}, r"^where_document\.\$contains: needs a non-empty string"),
    (None, {"$contains": 3}, r"^where_document\.\$contains: needs a non-empty string, got 3"),
    (None, {"$regex": "a.*"}, r"^where_document\.\$regex: is not supported"),
    (None, {"year": 1}, r"^where_document\.year: is not a document operator"),
    (None, {"$or": [{"$contains": "a"}, {"$nope": "b"}]}, r"^where_document\.\$or\[1\]\.\$nope"),
])
def test_malformed_filters_are_refused_naming_the_part(where: Any, where_document: Any, message: str) -> None:
    with pytest.raises(FilterError, match=message):
        parse_filter(where, where_document)


def test_a_filter_as_json_text_and_its_size_bound() -> None:
    assert parse_json_filter('{"n": 1}', "where") == {"n": 1}
    assert parse_json_filter(None, "where") is None
    with pytest.raises(FilterError, match=r"^where: is not JSON"):
        parse_json_filter("{n: 1}", "where")
    huge = {"$or": [{"n": i} for i in range(300)]}
    with pytest.raises(FilterError, match="over 256 conditions"):
        parse_filter(huge)
    assert parse_filter() is None


def test_filtered_bm25_returns_only_allowed_documents_and_keeps_their_order() -> None:
    docs = {f"d{i}": f"solar panel number {i} " + ("wind " * (i % 3)) for i in range(30)}
    metas = [{"i": i, "odd": bool(i % 2)} for i in range(30)]
    index = Bm25Index.build(IndexSignature("t", 30, 0), list(docs), list(docs.values()), list(metas))
    everything = index.query("wind solar", 30)
    flt = parse_filter({"odd": True})
    assert flt is not None
    odd = index.query("wind solar", 30, flt)
    score = {h.id: h.score for h in everything}
    assert {h.id for h in odd} == {doc_id for doc_id in score if int(doc_id[1:]) % 2}
    assert all(h.score == score[h.id] for h in odd)  # the mask removes documents, it never rescales
    assert [h.score for h in odd] == sorted((h.score for h in odd), reverse=True)
    assert [h.rank for h in odd] == list(range(1, len(odd) + 1))
    nothing = parse_filter({"i": {"$gt": 100}})
    assert nothing is not None and index.query("wind solar", 30, nothing) == []


def test_scifact_bm25_quality_is_unchanged_by_a_filter_that_passes_everything() -> None:
    """Unfiltered queries take the same path as before; a filter passing every document changes
    no ranking either. nDCG@10 on the 300 judged test queries: the figure in BENCHMARKS.md."""
    rows = [json.loads(line) for line in open(need(SCIFACT / "corpus.jsonl"), encoding="utf-8")]
    ids = [r["_id"] for r in rows]
    index = Bm25Index.build(IndexSignature("scifact", len(ids), 0), ids,
                            [f"{r['title']} {r['text']}" for r in rows], [{"year": 2000} for _ in rows])
    qrels = read_qrels(SCIFACT / "qrels" / "test.tsv")
    queries = {q: text for q, text in read_queries(SCIFACT / "queries.jsonl").items() if q in qrels}
    everything = parse_filter({"year": {"$gte": 0}}, {"$not_contains": "\u2603 no such text"})
    assert everything is not None
    plain, filtered = [], []
    for qid, text in queries.items():
        unfiltered = [h.id for h in index.query(text, 10)]
        assert [h.id for h in index.query(text, 10, everything)] == unfiltered
        plain.append(ndcg_at_k(unfiltered, qrels[qid], 10))
        filtered.append(ndcg_at_k([h.id for h in index.query(text, 10, everything)], qrels[qid], 10))
    assert len(plain) == 300
    assert float(np.mean(plain)) == pytest.approx(0.6863, abs=5e-4)
    assert float(np.mean(filtered)) == float(np.mean(plain))


def test_a_saved_index_is_mapped_and_filters_and_answers_as_the_one_it_was_built_from(tmp_path: Any) -> None:
    """What every process of ``serve --workers N`` does: map the files one process published."""
    built = Bm25Index.build(IndexSignature("t", len(DOCS), 0), list(IDS), list(DOCS), list(METAS))
    built.save(tmp_path / "idx")
    loaded = Bm25Index.load(tmp_path / "idx")
    assert not isinstance(loaded.documents.blob, bytes), "a loaded index maps its documents, it does not read them"
    for where, where_document in [({"n": 1}, None), (None, {"$contains": "ell"}), ({"s": {"$in": ["x", "y"]}},
                                  {"$not_contains": "ĞĞ"}), (None, {"$contains": "world cells"})]:
        flt = parse_filter(where, where_document)
        assert flt is not None
        assert loaded.allowed(flt).tolist() == built.allowed(flt).tolist() == \
            FilterIndex(TextColumn.of(DOCS), METAS).mask(flt).tolist()
    assert [loaded.document(i) for i in IDS] == [(d, m) for d, m in zip(DOCS, METAS, strict=True)]
    assert loaded.document("zz") is None
    assert [h.id for h in loaded.query("hello cell", 6)] == [h.id for h in built.query("hello cell", 6)]
