"""Filtered hybrid search at 100,000 documents: what a ``where`` / ``where_document`` costs.

A corpus of SciFact sentences recombined (``bench.common.recombined_corpus``) gets two metadata
keys: ``bucket`` (an integer 0-99, uniform) and ``lang`` (``en`` for 90 %). It is ingested through
the queue and workers with a static model (minutes, not hours), then 200 SciFact test queries are
answered in process by ``Searcher`` with k=10 under each filter:

* none (the baseline), ``bucket < 50`` (~50 %), ``bucket == 7`` (~1 %),
* ``$contains`` of a word in ~50 % / ~1 % of the texts (cached after its first query),
* a filter of both kinds.

Configurations are interleaved within each of ``--rounds`` rounds (the machine is shared): each
figure is the median over rounds of that round's p50/p95, with the spread of the p50s, and each
filtered p50 is divided by the unfiltered p50 of the same round. The one-time costs are timed
too: building the metadata columns (first filtered query of an index) and the first query of a
new ``$contains`` pattern.

Run: ``.venv/bin/python bench/bench_filters.py`` (about 15 minutes on 2 cores, most of it the
ingest; ``--reuse`` keeps an earlier ingest). Writes its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, SCIFACT, percentile, recombined_corpus, write_section  # noqa: E402
from cli.stack import LocalStack  # noqa: E402
from producer import ControlPlane  # noqa: E402
from reembed.metrics import read_qrels, read_queries  # noqa: E402
from reembed.settings import Settings  # noqa: E402
from search import Searcher  # noqa: E402

STATIC_MODEL = ROOT.parent / "shared" / "models" / "m2v-minilm-256"
ALIAS = "filtered"


def corpus(path: Path, n: int) -> Path:
    """The recombined corpus with ``bucket`` and ``lang`` metadata (seeded)."""
    raw = recombined_corpus(path.with_suffix(".raw.jsonl"), n)
    rng = random.Random(11)
    with open(raw, encoding="utf-8") as src, open(path, "w", encoding="utf-8") as out:
        for line in src:
            row = json.loads(line)
            row["metadata"] = {"bucket": rng.randrange(100), "lang": "en" if rng.random() < 0.9 else "de"}
            out.write(json.dumps(row) + "\n")
    return path


def pick_words(searcher: Searcher) -> tuple[str, str]:
    """Two words for ``$contains``: one in about half the texts, one in about 1 %."""
    index = searcher.keyword_index(searcher.registry.get_alias(ALIAS))
    sample = random.Random(3).sample(index.documents, 2000)
    counts: dict[str, int] = {}
    for text in sample:
        for word in set(text.split()):
            if word.isalpha() and len(word) > 3:
                counts[word] = counts.get(word, 0) + 1
    half = min(counts, key=lambda w: abs(counts[w] / len(sample) - 0.5))
    rare = min(counts, key=lambda w: abs(counts[w] / len(sample) - 0.01))
    return half, rare


def timed(searcher: Searcher, texts: list[str], mode: str, flt: dict[str, Any]) -> list[float]:
    took = []
    for text in texts:
        started = time.perf_counter()
        searcher.search(ALIAS, text, 10, mode, **flt)  # type: ignore[arg-type]
        took.append((time.perf_counter() - started) * 1000)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reuse", action="store_true", help="keep the corpus an earlier run ingested")
    args = parser.parse_args()
    work = ROOT / ".reembed" / "bench-filters"
    if not args.reuse:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    settings = Settings.from_env().with_(data_dir=work, redis_url="", chroma_url="", device="cpu")
    queries = read_queries(SCIFACT / "queries.jsonl")
    texts = [queries[q] for q in read_qrels(SCIFACT / "qrels" / "test.tsv")][:200]
    timings: dict[str, float] = {}
    with LocalStack(settings) as local:
        control = ControlPlane(local.settings)
        have = control.registry.has_alias(ALIAS) and control.store.count(
            control.registry.get_alias(ALIAS).live_collection) == args.documents
        if not have:
            local.start_workers(2)
            started = time.monotonic()
            record = control.ingest(ALIAS, corpus(work / "corpus.jsonl", args.documents), str(STATIC_MODEL),
                                    batch_size=512)
            control.wait(record.id, timeout=6 * 3600)
            timings["ingest"] = time.monotonic() - started
        searcher = Searcher(local.settings)
        searcher.search(ALIAS, "warm up", 10, "hybrid")  # index and model loaded
        live = searcher.registry.get_alias(ALIAS).live_collection
        index = searcher.indexes.current(live)
        assert index is not None and len(index) == args.documents
        started = time.perf_counter()
        searcher.search(ALIAS, "first filtered query", 10, "keyword", where={"bucket": 1})
        timings["first filtered query (builds the metadata columns)"] = time.perf_counter() - started
        half, rare = pick_words(searcher)
        configs: dict[str, dict[str, Any]] = {
            "none": {},
            "where bucket < 50": {"where": {"bucket": {"$lt": 50}}},
            "where bucket == 7": {"where": {"bucket": 7}},
            f"where_document $contains {half!r}": {"where_document": {"$contains": half}},
            f"where_document $contains {rare!r}": {"where_document": {"$contains": rare}},
            "where lang == de and bucket < 50, $contains half": {
                "where": {"$and": [{"lang": "de"}, {"bucket": {"$lt": 50}}]}, "where_document": {"$contains": half}},
        }
        for word in (half, rare):  # before anything else asks for these patterns (then cached)
            started = time.perf_counter()
            searcher.search(ALIAS, "first contains", 10, "keyword", where_document={"$contains": word})
            timings[f"first keyword query with $contains {word!r} (scans the texts once)"] = (
                time.perf_counter() - started)
        matched = {name: int(index.allowed(parse(flt)).sum()) if flt else len(index) for name, flt in configs.items()}
        rounds: dict[str, dict[str, list[dict[str, float]]]] = {m: {c: [] for c in configs} for m in ("hybrid", "keyword")}
        for r in range(args.rounds):
            for mode in ("hybrid", "keyword"):
                for name, flt in configs.items():
                    took = timed(searcher, texts, mode, flt)
                    rounds[mode][name].append({"p50": percentile(took, 50), "p95": percentile(took, 95)})
                    print(f"round {r + 1} {mode} {name}: p50 {rounds[mode][name][-1]['p50']:.1f} ms", flush=True)
        searcher.close()
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "filters.json").write_text(json.dumps(
        {"documents": args.documents, "matched": matched, "rounds": rounds, "timings": timings}, indent=1))
    report(args.documents, args.rounds, len(texts), matched, rounds, timings)


def parse(flt: dict[str, Any]) -> Any:
    from reembed.filters import parse_filter

    return parse_filter(flt.get("where"), flt.get("where_document"))


def report(n: int, rounds_n: int, queries: int, matched: dict[str, int], rounds: dict[str, Any],
           timings: dict[str, float]) -> None:
    lines = [f"{n:,} documents (SciFact sentences recombined, static m2v-minilm-256 vectors), {queries} SciFact "
             f"test queries per configuration, k=10, in process, {rounds_n} interleaved rounds. Each figure: the "
             "median over rounds (spread of the round p50s in brackets); ratio: filtered p50 ÷ unfiltered p50 of "
             "the same round, median over rounds. Every hit passes the filter (tests/integration/test_filters.py).",
             ""]
    for mode in ("hybrid", "keyword"):
        lines += [f"**{mode}**", "", "| filter | documents passing | p50 ms | p95 ms | p50 ÷ unfiltered |",
                  "|---|---|---|---|---|"]
        base = [r["p50"] for r in rounds[mode]["none"]]
        for name, per_round in rounds[mode].items():
            p50s = [r["p50"] for r in per_round]
            ratio = statistics.median(p / b for p, b in zip(p50s, base, strict=True))
            lines.append(f"| {name} | {matched[name]:,} ({matched[name] / n:.1%}) | {statistics.median(p50s):.1f} "
                         f"[{min(p50s):.1f}–{max(p50s):.1f}] | {statistics.median(r['p95'] for r in per_round):.1f} "
                         f"| {ratio:.2f} |")
        lines.append("")
    lines += ["One-time costs:", ""] + [f"- {name}: {seconds:.2f} s" for name, seconds in timings.items()]
    write_section("Filtered search at 100,000 documents (bench/bench_filters.py)", "\n".join(lines))


if __name__ == "__main__":
    main()
