"""Fusion specs, their parsing, the choice from judged queries, and the alias that carries them."""

from __future__ import annotations

import random

import chromadb
import fakeredis
import pytest

from producer.fusion import fusion_table, set_fusion
from reembed.errors import ConfigError, InputError
from reembed.fusion import DEFAULT_FUSION, FusionSpec, convex_fusion, parse_fusion, reciprocal_rank_fusion
from reembed.fusion_tuning import MIN_QUERIES, grid, tune
from reembed.registry import CollectionRecord, Registry
from reembed.settings import Settings
from reembed.store import Store

BM25 = [("a", 12.0), ("b", 6.0), ("c", 3.0)]
SEMANTIC = [("c", 0.9), ("d", 0.5), ("a", 0.1)]


def test_convex_normalises_each_list_by_its_theoretical_minimum_and_observed_top() -> None:
    fused = {f.id: f for f in convex_fusion({"bm25": BM25, "semantic": SEMANTIC}, {"bm25": 0.5, "semantic": 0.5})}
    # bm25: (s - 0) / (12 - 0); semantic: (s + 1) / (0.9 + 1)
    assert fused["a"].score == pytest.approx(0.5 * 1.0 + 0.5 * 1.1 / 1.9)
    assert fused["b"].score == pytest.approx(0.5 * 0.5)  # missing from the semantic list: 0 there
    assert fused["c"].score == pytest.approx(0.5 * 0.25 + 0.5 * 1.0)
    assert fused["d"].score == pytest.approx(0.5 * 1.5 / 1.9)
    assert fused["a"].ranks == {"bm25": 1, "semantic": 3}


def test_the_weight_ends_are_each_retriever_alone() -> None:
    bm25_only = FusionSpec(method="convex", semantic_weight=0.0).fuse(BM25, SEMANTIC)
    semantic_only = FusionSpec(method="convex", semantic_weight=1.0).fuse(BM25, SEMANTIC)
    assert [f.id for f in bm25_only][:3] == ["a", "b", "c"]
    assert [f.id for f in semantic_only][:3] == ["c", "d", "a"]


def test_equal_weight_rrf_spec_ranks_as_plain_rrf() -> None:
    plain = reciprocal_rank_fusion({"bm25": ["a", "b", "c"], "semantic": ["c", "d", "a"]}, k=60)
    spec = FusionSpec(method="rrf", semantic_weight=0.5, k=60).fuse(BM25, SEMANTIC)
    assert [f.id for f in spec] == [f.id for f in plain]


def test_a_query_no_document_matches_by_keyword_still_ranks_semantically() -> None:
    fused = DEFAULT_FUSION.fuse([("x", 0.0), ("y", 0.0)], SEMANTIC)
    assert [f.id for f in fused][:3] == ["c", "d", "a"]
    assert DEFAULT_FUSION.fuse([], []) == []


@pytest.mark.parametrize(("text", "method", "weight", "k"), [
    ("convex", "convex", DEFAULT_FUSION.semantic_weight, 60), ("convex:0.8", "convex", 0.8, 60),
    ("rrf", "rrf", 0.5, 60), ("RRF:0.3:20", "rrf", 0.3, 20), (" rrf : 1 ", "rrf", 1.0, 60),
])
def test_parse_fusion(text: str, method: str, weight: float, k: int) -> None:
    spec = parse_fusion(text)
    assert (spec.method, spec.semantic_weight, spec.k) == (method, weight, k)


@pytest.mark.parametrize("text", ["", "linear", "convex:1.5", "convex:-0.1", "convex:0.5:60", "rrf:0.5:x", "rrf:a"])
def test_a_bad_fusion_is_refused_naming_where_it_came_from(text: str) -> None:
    with pytest.raises(InputError, match=r"--fusion=.*use convex\[:WEIGHT\] or rrf"):
        parse_fusion(text, source="--fusion")
    if text:
        with pytest.raises(ConfigError, match="REEMBED_FUSION"):
            Settings.from_env({"REEMBED_FUSION": text})


def test_the_setting_chooses_the_default() -> None:
    assert Settings.from_env({}).fusion == DEFAULT_FUSION
    spec = Settings.from_env({"REEMBED_FUSION": "rrf:0.4", "REEMBED_RRF_K": "30"}).fusion
    assert (spec.method, spec.semantic_weight, spec.k) == ("rrf", 0.4, 30)


def judged(n: int, weak: str, seed: int = 5) -> tuple[dict, dict]:
    """``n`` queries whose relevant document the strong retriever ranks first and the weak one misses."""
    rng = random.Random(seed)
    lists, qrels = {}, {}
    for q in range(n):
        noise = [(f"n{q}-{i}", 10.0 - i * 0.1) for i in range(20)]
        rng.shuffle(noise)
        strong = [(f"rel{q}", 0.8)] + [(f"s{q}-{i}", 0.7 - i * 0.01) for i in range(20)]
        bm25 = [(d, abs(s)) for d, s in noise] if weak == "bm25" else [(f"rel{q}", 15.0), *noise]
        semantic = [(d, s / 20) for d, s in noise] if weak == "semantic" else strong
        lists[f"q{q}"] = (sorted(bm25, key=lambda h: -h[1]), sorted(semantic, key=lambda h: -h[1]))
        qrels[f"q{q}"] = {f"rel{q}": 1}
    return lists, qrels


@pytest.mark.parametrize("weak", ["bm25", "semantic"])
def test_tuning_never_loses_to_the_better_half_where_equal_rrf_does(weak: str) -> None:
    lists, qrels = judged(40, weak)
    tuning = tune(lists, qrels)
    better = max(tuning.references["bm25"], tuning.references["semantic"])
    assert better == pytest.approx(1.0)
    assert tuning.references["rrf-equal"] < better  # the weak retriever's noise displaces the answer
    assert tuning.in_sample == pytest.approx(better)
    assert tuning.cross_validated == pytest.approx(better)
    assert (tuning.chosen.semantic_weight > 0.5) == (weak == "bm25")
    assert "40 judged queries" in (tuning.chosen.tuned_on or "")


def test_too_few_judged_queries_keep_the_default() -> None:
    lists, qrels = judged(MIN_QUERIES - 1, "bm25")
    with pytest.raises(InputError, match="too few"):
        tune(lists, qrels)
    with pytest.raises(InputError, match="metric"):
        tune(*judged(MIN_QUERIES, "bm25"), metric="p@5")


def test_the_grid_holds_both_halves_and_equal_rrf() -> None:
    specs = grid()
    assert FusionSpec(method="convex", semantic_weight=0.0) in specs
    assert FusionSpec(method="convex", semantic_weight=1.0) in specs
    assert FusionSpec(method="rrf", semantic_weight=0.5, k=60) in specs


def test_an_alias_carries_a_fusion_per_model_through_a_switch() -> None:
    client = chromadb.EphemeralClient()
    for col in client.list_collections():
        client.delete_collection(col.name)
    store = Store.from_client(client)
    registry = Registry(store)
    settings = Settings.from_env({})
    for name, model in (("docs--a", "all-MiniLM-L6-v2"), ("docs--b", "all-mpnet-base-v2")):
        client.create_collection(name, embedding_function=None)  # type: ignore[arg-type]
        registry.put_collection(CollectionRecord(name=name, model=model, fingerprint="sha256:x", dimension=4,
                                                 origin="ingest"))
    registry.switch_alias("docs", "docs--a", None)
    redis = fakeredis.FakeRedis()
    chosen = FusionSpec(method="convex", semantic_weight=0.85, tuned_on="test")
    set_fusion(registry, redis, settings, "docs", None, chosen)  # the live model by default
    set_fusion(registry, redis, settings, "docs", "all-mpnet-base-v2", parse_fusion("rrf:0.3"))  # not yet served
    with pytest.raises(InputError, match="no collection made with model 'no-such-model'"):
        set_fusion(registry, redis, settings, "docs", "no-such-model", chosen)
    after = registry.switch_alias("docs", "docs--b", registry.get_alias("docs").generation)
    assert after.fusion["all-MiniLM-L6-v2"] == chosen
    assert after.fusion["all-mpnet-base-v2"].method == "rrf"
    table = {row["model"]: row for row in fusion_table(registry, after, settings)}
    assert table["all-MiniLM-L6-v2"]["fusion"] == "convex semantic_weight=0.85"
    assert table["all-mpnet-base-v2"]["carried_by_alias"]
    set_fusion(registry, redis, settings, "docs", "all-mpnet-base-v2", None)
    table = {row["model"]: row for row in fusion_table(registry, registry.get_alias("docs"), settings)}
    assert not table["all-mpnet-base-v2"]["carried_by_alias"]
    assert table["all-mpnet-base-v2"]["fusion"] == DEFAULT_FUSION.describe()
