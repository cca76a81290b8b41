"""Search quality on BEIR SciFact and search latency, through reembed's real path.

Quality: SciFact's corpus is ingested with the first model through the queue and workers into
Chroma, the 300 test queries are answered by ``Searcher`` in keyword, semantic and hybrid mode
(k=100), and nDCG@10 / Recall@100 / MRR@10 are compared with the published figures. The alias is
then migrated to the second model (latency is measured while that migration runs), cut over,
and evaluated again. Nothing is tuned: RRF k=60, equal weights (the train split exists for tuning).

Latency: p50/p95 per mode, warm, one client, in process and over HTTP (uvicorn on loopback);
on SciFact, on SciFact during a migration, and on a 100,000-document corpus (sentences of
SciFact recombined, embedded with a static model so that building it takes minutes).

Run: ``.venv/bin/python bench/bench_search.py`` (about 45 minutes on 2 CPU cores with mpnet;
``--models all-MiniLM-L6-v2`` alone takes about 5). Writes two sections of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import uvicorn  # noqa: E402

from bench.common import ROOT, SCIFACT, percentile, recombined_corpus, write_section  # noqa: E402
from producer import ControlPlane  # noqa: E402
from producer.evaluate import Evaluator, write_report  # noqa: E402
from reembed.metrics import mean_scores, read_qrels, read_queries  # noqa: E402
from reembed.registry import MigrationState  # noqa: E402
from cli.services import free_port  # noqa: E402
from cli.stack import LocalStack  # noqa: E402
from reembed.settings import Settings  # noqa: E402
from search import Searcher  # noqa: E402
from search.api import create_app  # noqa: E402

STATIC_MODEL = ROOT.parent / "shared" / "models" / "m2v-minilm-256"
MODES = ("keyword", "semantic", "hybrid")
PUBLISHED = {"keyword": "0.665-0.687 (BM25)", "all-MiniLM-L6-v2": "0.645", "all-mpnet-base-v2": "0.656"}


def evaluate(searcher: Searcher, alias: str, queries: dict[str, str], qrels: dict) -> dict[str, dict[str, float]]:
    out = {}
    for mode in MODES:
        run = {qid: [h.id for h in searcher.search(alias, queries[qid], 100, mode).results] for qid in qrels}
        out[mode] = mean_scores(run, qrels)
    return out


def latencies(call: Any, texts: list[str]) -> dict[str, float]:
    for text in texts[:10]:
        call(text)  # warm-up
    took = []
    for text in texts:
        start = time.perf_counter()
        call(text)
        took.append((time.perf_counter() - start) * 1000)
    return {"p50": percentile(took, 50), "p95": percentile(took, 95), "n": len(took)}


class Server:
    """The real HTTP service on a loopback port, in a thread."""

    def __init__(self, settings: Settings) -> None:
        self.port = free_port()
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 300
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("search server did not start")
            time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def search(self, alias: str, mode: str) -> Any:
        def call(text: str) -> None:
            response = self.client.get("/search", params={"alias": alias, "q": text, "k": 10, "mode": mode})
            response.raise_for_status()
        return call


def latency_table(searcher: Searcher, server: Server, alias: str, texts: list[str]) -> dict[str, Any]:
    rows = {}
    for mode in MODES:
        rows[mode] = {"in_process": latencies(lambda t, m=mode: searcher.search(alias, t, 10, m), texts),
                      "http": latencies(server.search(alias, mode), texts)}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="all-MiniLM-L6-v2,all-mpnet-base-v2")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--big", type=int, default=100_000, help="documents of the large latency corpus (0: skip)")
    args = parser.parse_args()
    models = args.models.split(",")
    work = ROOT / ".reembed" / "bench-search"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    settings = Settings.from_env().with_(data_dir=work, redis_url="", chroma_url="", device="cpu")
    queries = read_queries(SCIFACT / "queries.jsonl")
    qrels = read_qrels(SCIFACT / "qrels" / "test.tsv")
    texts = [queries[q] for q in qrels]
    quality: dict[str, Any] = {}
    latency: dict[str, Any] = {}
    timings: dict[str, float] = {}
    evaluations: dict[str, Any] = {}
    with LocalStack(settings) as local:
        local.start_workers(args.workers)
        control = ControlPlane(local.settings)
        started = time.monotonic()
        ingest = control.ingest("scifact", SCIFACT / "corpus.jsonl", models[0])
        control.wait(ingest.id, timeout=6 * 3600)
        timings[f"ingest {models[0]}"] = time.monotonic() - started
        searcher = Searcher(local.settings)
        quality[models[0]] = evaluate(searcher, "scifact", queries, qrels)
        print(json.dumps(quality, indent=1), flush=True)
        with Server(local.settings) as server:
            latency["scifact"] = latency_table(searcher, server, "scifact", texts)
            for model in models[1:]:
                started = time.monotonic()
                migration = control.migrate("scifact", model, cutover="manual")
                during: dict[str, list[float]] = {"in_process": [], "http": []}
                call_http = server.search("scifact", "hybrid")
                i = 0
                while control.registry.get_migration(migration.id).state not in (
                        MigrationState.COMPLETE, MigrationState.FAILED, MigrationState.CANCELLED):
                    text = texts[i % len(texts)]
                    i += 1
                    t0 = time.perf_counter()
                    searcher.search("scifact", text, 10, "hybrid")
                    during["in_process"].append((time.perf_counter() - t0) * 1000)
                    t0 = time.perf_counter()
                    call_http(text)
                    during["http"].append((time.perf_counter() - t0) * 1000)
                    time.sleep(0.5)
                final = control.wait(migration.id, timeout=6 * 3600)
                if final.state != MigrationState.COMPLETE:
                    raise SystemExit(f"migration to {model} ended {final.state.value}: {final.error}")
                timings[f"migrate to {model}"] = time.monotonic() - started
                latency[f"scifact during migration to {model} (hybrid)"] = {
                    k: {"p50": percentile(v, 50), "p95": percentile(v, 95), "n": len(v)} for k, v in during.items()}
                evaluations[model] = Evaluator(local.settings).run(
                    "scifact", model, SCIFACT / "queries.jsonl", SCIFACT / "qrels" / "test.tsv")
                write_report(evaluations[model], ROOT / "bench" / "results" / f"evaluate-scifact-{model}")
                control.cutover("scifact")
                quality[model] = evaluate(searcher, "scifact", queries, qrels)
                print(json.dumps(quality, indent=1), flush=True)
        if args.big:
            started = time.monotonic()
            big = control.ingest("big", recombined_corpus(work / "big.jsonl", args.big), str(STATIC_MODEL), batch_size=512)
            control.wait(big.id, timeout=6 * 3600)
            timings[f"ingest {args.big} docs with a static model"] = time.monotonic() - started
            searcher.search("big", "warm up the index", 10, "keyword")
            with Server(local.settings) as server:
                latency[f"{args.big:,} documents (static m2v-minilm-256)"] = latency_table(
                    searcher, server, "big", texts[:200])
        searcher.close()
    report(models, quality, latency, timings, args.workers)
    for model, result in evaluations.items():
        d = result["difference"]
        write_section(f"`reembed evaluate` on SciFact: {models[0]} → {model} (bench/bench_search.py)", (
            f"`reembed evaluate scifact --to {model} --queries queries.jsonl --qrels qrels/test.tsv` on the alias the "
            f"benchmark built (new vectors read from the complete migration target {result['new_vectors']}); "
            f"{result['queries']} judged queries, {result['documents']} documents. Published nDCG@10: "
            f"{models[0]} 0.645, all-mpnet-base-v2 0.656.\n\n"
            "| system | nDCG@10 | Recall@10 | Recall@100 | MRR@10 |\n|---|---|---|---|---|\n"
            + "\n".join(f"| {name} | {v['ndcg@10']:.4f} | {v['recall@10']:.4f} | {v['recall@100']:.4f} | "
                         f"{v['mrr@10']:.4f} |" for name, v in result["metrics"].items())
            + f"\n\nnew − old nDCG@10: {d['mean']:+.4f}, bootstrap 95% CI [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] "
            f"→ verdict **{result['verdict']}** (GO needs > {result['min_gain']} with the interval above 0). "
            f"Report: `bench/results/evaluate-scifact-{model}/report.md`.\n"))


def report(models: list[str], quality: dict, latency: dict, timings: dict, workers: int) -> None:
    rows = ["| model | mode | nDCG@10 | Recall@100 | MRR@10 | published nDCG@10 |", "|---|---|---|---|---|---|"]
    for model in models:
        for mode in MODES:
            m = quality[model][mode]
            ref = PUBLISHED["keyword"] if mode == "keyword" else (PUBLISHED.get(model, "-") if mode == "semantic" else "-")
            rows.append(f"| {model} | {mode} | {m['ndcg@10']:.4f} | {m['recall@100']:.4f} | {m['mrr@10']:.4f} | {ref} |")
    body = (
        "SciFact test split (300 queries, 5,183 documents), answered by `Searcher` from the Chroma collection "
        f"that reembed's workers ({workers} processes) filled; hybrid = RRF (k=60, equal weights) of the top 100 "
        "of each retriever. No tuning on the test split. `.venv/bin/python bench/bench_search.py`.\n\n"
        + "\n".join(rows) + "\n\n"
        + "Wall times: " + ", ".join(f"{k}: {v:.0f} s" for k, v in timings.items()) + ".\n"
    )
    write_section("Search quality on SciFact (bench/bench_search.py)", body)
    lat = ["| corpus | mode | in process p50 / p95 ms | HTTP p50 / p95 ms |", "|---|---|---|---|"]
    for corpus, table in latency.items():
        if "in_process" in table:
            lat.append(f"| {corpus} | hybrid | {table['in_process']['p50']:.1f} / {table['in_process']['p95']:.1f} "
                       f"| {table['http']['p50']:.1f} / {table['http']['p95']:.1f} |")
            continue
        for mode in MODES:
            r = table[mode]
            lat.append(f"| {corpus} | {mode} | {r['in_process']['p50']:.1f} / {r['in_process']['p95']:.1f} "
                       f"| {r['http']['p50']:.1f} / {r['http']['p95']:.1f} |")
    write_section("Search latency (bench/bench_search.py)", (
        "Warm, one client, k=10, SciFact test queries; HTTP = the real FastAPI app under uvicorn on loopback "
        "(JSON encoding and a TCP round trip on top). \"During migration\" = the same machine's two cores also "
        "run the embedding workers.\n\n" + "\n".join(lat) + "\n"))
    print((ROOT / "BENCHMARKS.md").read_text())


if __name__ == "__main__":
    main()
