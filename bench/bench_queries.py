"""Query embedding under concurrency: one query per pass, behind the model's lock, against batched passes.

A search process embeds each request's query with the collection's model. Concurrent callers
(threads, as uvicorn runs sync endpoints) each ask for one query. Three ways, same model, same
queries, interleaved over --rounds rounds:

- ``serialized``: one forward pass per query, one at a time (what reembed did before);
- ``serialized, 2 torch threads``: the same, each pass on two intra-op threads;
- ``batched``: ``reembed.query_batching``: callers that arrive while a pass runs share the next.

For each, C concurrent callers (C = 1, 4, 16) embed the 300 SciFact test queries between them;
the figure is queries per second and the per-query latency (p50 / p99). Writes "Query batching"
to BENCHMARKS.md.

    .venv/bin/python bench/bench_queries.py         # ~5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import ROOT, SCIFACT, percentile, write_section  # noqa: E402
from reembed.metrics import read_qrels, read_queries  # noqa: E402
from reembed.models import LoadedModel, load_model, resolve_model  # noqa: E402

CALLERS = (1, 4, 16)
WAYS = ("serialized", "serialized, 2 torch threads", "batched")


def run(model: LoadedModel, texts: list[str], callers: int) -> dict[str, float]:
    took: list[float] = []

    def one(text: str) -> None:
        started = time.perf_counter()
        model.embed_queries([text])
        took.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    with ThreadPoolExecutor(callers) as pool:
        list(pool.map(one, texts))
    wall = time.perf_counter() - started
    return {"qps": len(texts) / wall, "p50_ms": percentile(took, 50), "p99_ms": percentile(took, 99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    queries = read_queries(SCIFACT / "queries.jsonl")
    texts = [queries[q] for q in read_qrels(SCIFACT / "qrels" / "test.tsv")]
    model = load_model(resolve_model(args.model), ROOT / ".reembed" / "bench-queries", "cpu", threads=1)
    batcher = model._queries
    results: dict[str, dict[int, list[dict[str, float]]]] = {w: {c: [] for c in CALLERS} for w in WAYS}
    model.embed_queries(texts[:20])  # warm
    for _ in range(args.rounds):
        for callers in CALLERS:
            for way in WAYS:
                model._queries = batcher if way == "batched" else None
                torch.set_num_threads(2 if "2 torch" in way else 1)
                results[way][callers].append(run(model, texts, callers))
    model._queries = batcher
    torch.set_num_threads(1)
    report(args, results)


def report(args: argparse.Namespace, results: dict[str, dict[int, list[dict[str, float]]]]) -> None:
    def cell(runs: list[dict[str, float]], key: str) -> str:
        values = [r[key] for r in runs]
        return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"

    rows = []
    for callers in CALLERS:
        base = statistics.median(r["qps"] for r in results["serialized"][callers])
        for way in WAYS:
            runs = results[way][callers]
            ratio = statistics.median(r["qps"] for r in runs) / base
            rows.append(f"| {callers} | {way} | {cell(runs, 'qps')} | {ratio:.2f} | {cell(runs, 'p50_ms')} | "
                        f"{cell(runs, 'p99_ms')} |")
    body = f"""`.venv/bin/python bench/bench_queries.py`: {args.model} on the CPU (torch, one intra-op thread unless said),
the 300 SciFact test queries embedded one per call by C concurrent threads, as a search process's requests are.
{args.rounds} rounds, the ways interleaved within each; medians (min–max). Ratio: queries/s ÷ serialized with the same
callers, same round set.

| callers | way | queries/s | ÷ serialized | p50 ms | p99 ms |
|---|---|---|---|---|---|
{chr(10).join(rows)}
"""
    (ROOT / "bench" / "results" / "queries.json").write_text(json.dumps(
        {w: {str(c): r for c, r in by.items()} for w, by in results.items()}, indent=1))
    write_section("Query batching (concurrent queries in one forward pass)", body)
    print(body)


if __name__ == "__main__":
    main()
