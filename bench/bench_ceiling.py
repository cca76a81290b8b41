"""At Chroma's ceiling: reembed against plain ``add`` into the same server, and growth to 1M documents.

With a static model, embedding costs next to nothing and a migration is bound by what one Chroma
server writes. Three parts, each in one run:

- **ratio** (``--ratio``): 20,000 SciFact documents (five metadata keys) are migrated static model
  A → static model B with 1 and with 2 workers while a thread searches the alias (hybrid, every
  0.2 s), against the ceiling: the same documents, the same B vectors and the same metadata
  (provenance fields included) written with plain ``collection.add`` in batches of the size
  that server takes best (tried first). Rounds interleaved; the ratio is taken per round.
- **growth** (``--growth 10000,100000,1000000``): for each size, ingest with A, then migrate to B
  with 2 workers (search served, p50/p95 and errors recorded), and record the verification
  diff, the cutover and the new collection's BM25 build; worker and Redis peak memory. On the
  largest collection: milliseconds per page of a scan at offsets 0, 100k, 500k and 1M, as
  reembed reads (ids listed in chunks, documents by id) and as a plain ``get(offset=…)`` does.

- **ramp** (``--ramp 1000000``): Chroma alone, no reembed: its ``add`` rate, batch by batch, as one
  collection grows from empty to N: the rate a migration's target can be written at, at each
  size, whatever writes it. ``--sync-thresholds 1000,8192`` repeats it on a fresh server per
  HNSW ``sync_threshold`` (how often Chroma saves the index).

Run: ``.venv/bin/python bench/bench_ceiling.py --ratio`` (about 40 minutes: 3 rounds),
``--growth 10000,100000,1000000`` (about 2 hours on 2 cores; the 1M ingest alone is ~30 minutes)
and ``--ramp 1000000`` (about 40 minutes).
Writes its sections of BENCHMARKS.md and the raw figures to bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_migration import SearchLoad, peak_rss_mb, start_embedders  # noqa: E402
from bench.common import ROOT, SHARED, machine, percentile, recombined_corpus, write_section  # noqa: E402
from cli.services import Workers  # noqa: E402
from cli.stack import LocalStack  # noqa: E402
from producer import ControlPlane  # noqa: E402
from reembed.documents import provenance  # noqa: E402
from reembed.models import load_configured  # noqa: E402
from reembed.progress import Progress  # noqa: E402
from reembed.queue import QUEUE_CONTROL  # noqa: E402
from reembed.registry import MigrationState  # noqa: E402
from reembed.settings import Settings  # noqa: E402
from reembed.store import Store  # noqa: E402
from search.indexes import IndexManager  # noqa: E402

STATIC_A = SHARED / "models" / "m2v-mpnet-256"
STATIC_B = SHARED / "models" / "m2v-minilm-256"
WORK = ROOT / ".reembed" / "bench-ceiling"
RESULTS = ROOT / "bench" / "results"
JOURNALS = ["cell", "nature", "science", "lancet", "bmj", "plos"]


def with_metadata(corpus: Path) -> Path:
    """Five metadata keys per document (int, float, str, bool, str), as the issue's measurements had."""
    out = corpus.with_suffix(".meta.jsonl")
    with corpus.open(encoding="utf-8") as src, out.open("w", encoding="utf-8") as dst:
        for i, line in enumerate(src):
            row = json.loads(line)
            row["metadata"] = {"year": 1990 + i % 35, "score": round((i * 7919 % 1000) / 1000, 3),
                               "journal": JOURNALS[i % len(JOURNALS)], "open_access": i % 3 == 0,
                               "lang": "en"}
            dst.write(json.dumps(row) + "\n")
    return out


def ingest(control: ControlPlane, local: LocalStack, alias: str, corpus: Path) -> float:
    """Ingest ``corpus`` with model A on 2 workers; returns docs/s."""
    embedders = start_embedders(local.settings, 2, str(STATIC_A), local.settings.data_dir / f"ingest-{alias}.log")
    try:
        started = time.perf_counter()
        record = control.ingest(alias, corpus, str(STATIC_A), batch_size=2048)
        final = control.wait(record.id, timeout=6 * 3600)
        if final.state != MigrationState.LIVE:
            raise SystemExit(f"ingest of {alias} ended {final.state.value}: {final.error}")
        return final.done / (time.perf_counter() - started)
    finally:
        embedders.stop()


def migrate(local: LocalStack, control: ControlPlane, alias: str, workers: int, batch_size: int,
            keep: bool = False, chroma_writers: int | None = None) -> dict[str, Any]:
    """``migrate`` A → B to ``complete`` with ``workers`` workers, a hybrid search every 0.2 s;
    ``chroma_writers`` overrides REEMBED_CHROMA_WRITERS in the workers."""
    log = local.settings.data_dir / f"embed-{alias}-{workers}.log"
    settings = local.settings if chroma_writers is None else local.settings.with_(chroma_writers=chroma_writers)
    embedders = start_embedders(settings, workers, str(STATIC_B), log)
    try:
        control.redis.config_resetstat()
        with SearchLoad(local.settings, alias, "hybrid") as load:
            started = time.perf_counter()
            record = control.migrate(alias, str(STATIC_B), batch_size=batch_size, cutover="manual")
            final = control.wait(record.id, timeout=6 * 3600)
            elapsed = time.perf_counter() - started
        if final.state != MigrationState.COMPLETE:
            raise SystemExit(f"migration ended {final.state.value}: {final.error}")
        result: dict[str, Any] = {
            "docs_per_s": final.done / elapsed, "seconds": elapsed, "documents": final.done,
            "worker_peak_rss_mb": peak_rss_mb(embedders),
            "redis_peak_mb": int(control.redis.info("memory")["used_memory_peak"]) / 2**20,
            "searches": {"ok": load.ok, "failed": len(load.failed), "p50_ms": percentile(load.latency_ms, 50),
                         "p95_ms": percentile(load.latency_ms, 95)},
            "diff_s": _logged_seconds(local.settings.data_dir / "control.log", record.id, "source and target diffed"),
            "migration_id": record.id, "target": record.target_collection, "source": record.source_collection,
        }
        timings = Progress(control.redis, record.id).timings()
        batches = max(timings.pop("batches", 1), 1)
        result["per_batch_ms"] = {k: round(1000 * v / batches, 1) for k, v in timings.items()}
        result["batches"] = int(batches)
    finally:
        embedders.stop()
    if not keep:
        control.cancel(record.id)  # drop the target: the next run starts from the same source
    return result


def _logged_seconds(log: Path, migration_id: str, event: str) -> float | None:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if f'"{event}"' in line and migration_id in line:
            return float(json.loads(line)["seconds"])
    return None


def raw_add(store: Store, settings: Settings, source: str, size: int, searched: str | None = None) -> float:
    """The ceiling: the source's documents and metadata with model B's vectors and the provenance
    fields a migration writes, read and embedded beforehand, then only ``add``-ed (timed). With
    ``searched`` (an alias), the same search load as a migration's runs against the same server
    meanwhile: the ceiling a migration that keeps search served can reach."""
    model = load_configured(settings, str(STATIC_B))
    ids, docs, metas = [], [], []
    for page in store.pages(source):
        ids += page.ids
        docs += [d or "" for d in page.documents]
        metas += page.metadatas
    vectors = model.embed_documents(docs)
    rows = [provenance(model, d, m) for d, m in zip(docs, metas, strict=True)]
    name = f"ceiling-{size}"
    if store.exists(name):
        store.delete(name)
    store.create(name, {"bench": "ceiling"})
    collection = store.collection(name)  # plain chromadb from here
    with SearchLoad(settings, searched, "hybrid") if searched else contextlib.nullcontext():
        started = time.perf_counter()
        for i in range(0, len(ids), size):
            collection.add(ids=ids[i:i + size], embeddings=vectors[i:i + size], documents=docs[i:i + size],
                           metadatas=rows[i:i + size])
        rate = len(ids) / (time.perf_counter() - started)
    store.delete(name)
    return rate


PROBE_DOCS = 8192


def add_probe(store: Store, settings: Settings, source: str, into: str | None) -> float:
    """Chroma's own ``add`` rate, in batches of 2,048, of 8,192 of ``source``'s documents (model B
    vectors, new ids) into ``into`` as it stands (then removed again), or into a fresh collection
    when ``into`` is None: the two together say how much of a slower migration at size n is
    Chroma taking writes into a bigger collection."""
    model = load_configured(settings, str(STATIC_B))
    page = store.get(source, store.ids(source, 0, PROBE_DOCS))
    docs = [d or "" for d in page.documents]
    vectors = model.embed_documents(docs)
    rows = [provenance(model, d, m) for d, m in zip(docs, page.metadatas, strict=True)]
    ids = [f"probe-{i}" for i in range(len(docs))]
    name = into or "ceiling-probe"
    if into is None:
        if store.exists(name):
            store.delete(name)
        store.create(name, {"bench": "ceiling"})
    collection = store.collection(name)
    started = time.perf_counter()
    for i in range(0, len(ids), 2048):
        collection.add(ids=ids[i:i + 2048], embeddings=vectors[i:i + 2048], documents=docs[i:i + 2048],
                       metadatas=rows[i:i + 2048])
    rate = len(ids) / (time.perf_counter() - started)
    if into is None:
        store.delete(name)
    else:
        collection.delete(ids=ids)
    return rate


def best_write_size(store: Store, settings: Settings, source: str) -> tuple[int, dict[int, float]]:
    """The add size this server takes best, tried on the whole source (once each)."""
    rates = {size: raw_add(store, settings, source, size) for size in (512, 1024, 2048, 4096)}
    return max(rates, key=lambda s: rates[s]), rates


def run_ratio(docs: int, rounds: int, batch_size: int) -> dict[str, Any]:
    work = WORK / "ratio"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    settings = Settings.from_env().with_(data_dir=work, redis_url="", chroma_url="", max_waiting_batches=16)
    corpus = with_metadata(recombined_corpus(work / "corpus.jsonl", docs))
    out: dict[str, Any] = {"machine": machine(), "docs": docs, "batch_size": batch_size, "rounds": []}
    with LocalStack(settings) as local:
        control = ControlPlane(local.settings)
        local.control = Workers(local.settings, 1, queues=QUEUE_CONTROL).start(work / "control.log")
        out["ingest_docs_per_s"] = ingest(control, local, "src", corpus)
        store = Store.from_settings(local.settings)
        source = control.registry.get_alias("src").live_collection
        size, tried = best_write_size(store, local.settings, source)
        out["write_sizes"], out["best_write_size"] = tried, size
        print("write sizes", tried, flush=True)
        for round_no in range(rounds):
            row: dict[str, Any] = {"raw": raw_add(store, local.settings, source, size),
                                   "raw_searched": raw_add(store, local.settings, source, size, searched="src")}
            for workers in (2, 1):
                row[f"reembed_{workers}"] = migrate(local, control, "src", workers, batch_size)
            # The same 2 workers without turns at Chroma's writes (both may write at once)
            row["reembed_2_no_turns"] = migrate(local, control, "src", 2, batch_size, chroma_writers=0)
            print("round", round_no, json.dumps(row, default=str), flush=True)
            out["rounds"].append(row)
    return out


def scan_costs(store: Store, name: str, count: int, page: int = 512) -> list[dict[str, float]]:
    """Milliseconds per page at a few offsets: plain ``get(offset=…)``, and reembed's scan (its
    ids-only listing of a 20,000-id chunk, shared by the chunk's pages, plus the page read by id)."""
    from reembed.store import ID_CHUNK

    rows = []
    for offset in sorted({0, 100_000, 500_000, count - ID_CHUNK} & set(range(0, max(count - page, 1) + 1))):
        plain, listing, by_id = [], [], []
        for _ in range(5):
            started = time.perf_counter()
            store.page(name, offset, page)
            plain.append(time.perf_counter() - started)
            started = time.perf_counter()
            ids = store.ids(name, offset, ID_CHUNK)
            listing.append(time.perf_counter() - started)
            started = time.perf_counter()
            store.get(name, ids[:page])
            by_id.append(time.perf_counter() - started)
        list_ms = 1000 * statistics.median(listing)
        rows.append({"offset": offset, "plain_ms": 1000 * statistics.median(plain), "list_chunk_ms": list_ms,
                     "by_id_ms": 1000 * statistics.median(by_id),
                     "reembed_ms": 1000 * statistics.median(by_id) + list_ms * page / ID_CHUNK})
    return rows


def run_growth(sizes: list[int], batch_size: int) -> dict[str, Any]:
    out: dict[str, Any] = {"machine": machine(), "batch_size": batch_size, "sizes": {}}
    work = WORK / "growth"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    settings = Settings.from_env().with_(data_dir=work, redis_url="", chroma_url="", max_waiting_batches=16)
    with LocalStack(settings) as local:
        control = ControlPlane(local.settings)
        local.control = Workers(local.settings, 1, queues=QUEUE_CONTROL).start(work / "control.log")
        store = Store.from_settings(local.settings)
        for size in sizes:
            alias = f"g{size}"
            corpus = with_metadata(recombined_corpus(work / f"{alias}.jsonl", size))
            row: dict[str, Any] = {"ingest_docs_per_s": ingest(control, local, alias, corpus)}
            print(size, "ingested", row, flush=True)
            row.update(migrate(local, control, alias, 2, batch_size, keep=True))
            started = time.perf_counter()
            control.cutover(alias)
            row["cutover_s"] = time.perf_counter() - started
            # The old collection, now out of service, holds ``size`` documents: Chroma's add rate into it
            # against its rate into an empty one.
            row["add_empty_docs_per_s"] = add_probe(store, local.settings, row["target"], None)
            row["add_full_docs_per_s"] = add_probe(store, local.settings, row["target"], row["source"])
            print(size, "add probes", row["add_empty_docs_per_s"], row["add_full_docs_per_s"], flush=True)
            started = time.perf_counter()
            index = IndexManager(work / "bm25-bench", store).rebuild(row["target"])
            row["bm25_build_s"] = time.perf_counter() - started
            row["bm25_disk_mb"] = sum(f.stat().st_size for f in (work / "bm25-bench").rglob("*") if f.is_file()) / 2**20
            row["bm25_documents"] = len(index.ids)
            shutil.rmtree(work / "bm25-bench", ignore_errors=True)
            if size == max(sizes):
                row["scan"] = scan_costs(store, row["target"], size)
            print(size, json.dumps(row, default=str), flush=True)
            out["sizes"][size] = row
            (work / f"{alias}.jsonl").unlink(missing_ok=True)
            corpus.unlink(missing_ok=True)
    return out


def run_ramp(size: int, sync_thresholds: list[int], write: int = 2048) -> dict[str, Any]:
    """Chroma's own ``add`` rate as one collection grows from empty to ``size`` documents: no
    reembed, no search, nothing else on the server. The texts, five metadata keys, provenance and
    model-B vectors are all made first; then only ``add`` (batches of ``write``) is timed, batch
    by batch, with the collection's size before it: once per HNSW ``sync_threshold`` (how many
    added vectors make Chroma save its index and its id map to disk), each into a fresh server."""
    work = WORK / "ramp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    settings = Settings.from_env().with_(data_dir=work, redis_url="", chroma_url="")
    corpus = with_metadata(recombined_corpus(work / "corpus.jsonl", size))
    model = load_configured(settings, str(STATIC_B))
    with corpus.open(encoding="utf-8") as handle:
        read = [json.loads(line) for line in handle]
    ids, docs = [d["id"] for d in read], [d["text"] for d in read]
    started = time.perf_counter()
    vectors = model.embed_documents(docs)
    embed_s = time.perf_counter() - started
    rows = [provenance(model, d["text"], d["metadata"]) for d in read]
    del read
    runs: dict[int, list[tuple[int, int, float]]] = {}  # threshold: [(documents before, added, seconds)]
    for threshold in sync_thresholds:
        batches = runs[threshold] = []
        shutil.rmtree(work / "chroma", ignore_errors=True)
        with LocalStack(settings) as local:
            store = Store.from_settings(local.settings)
            store.create("ramp", {"bench": "ramp"}, hnsw={"space": "cosine", "sync_threshold": threshold})
            collection = store.collection("ramp")
            for i in range(0, size, write):
                began = time.perf_counter()
                collection.add(ids=ids[i:i + write], embeddings=vectors[i:i + write], documents=docs[i:i + write],
                               metadatas=rows[i:i + write])
                batches.append((i, len(ids[i:i + write]), time.perf_counter() - began))
                if len(batches) % 50 == 0:
                    print(f"ramp sync_threshold={threshold}: {i + write:,} documents, last batch "
                          f"{batches[-1][2]:.2f} s", flush=True)
    corpus.unlink(missing_ok=True)
    return {"machine": machine(), "size": size, "write": write, "model_embed_s": embed_s, "runs": runs}


def ramp_rate(batches: list[tuple[int, int, float]], low: int, high: int) -> float:
    """docs/s of the batches that started with the collection holding ``low`` ≤ n < ``high``."""
    chosen = [(count, seconds) for start, count, seconds in batches if low <= start < high]
    return sum(c for c, _ in chosen) / sum(s for _, s in chosen) if chosen else float("nan")


def slowdown_fit(batches: list[tuple[int, int, float]]) -> tuple[float, float]:
    """Fit seconds per document = t0·(1 + c·√n), t0 from the first three batches (an empty
    collection, as `reembed plan`'s probe writes); returns (t0, c)."""
    import numpy as np

    per_doc = np.array([seconds / count for _, count, seconds in batches])
    size = np.array([start + count / 2 for start, count, _ in batches])
    t0 = float(np.median(per_doc[:3]))
    excess, root = per_doc / t0 - 1, np.sqrt(size)
    return t0, float((root * excess).sum() / (root * root).sum())


def report_ramp(r: dict[str, Any]) -> None:
    size, write = r["size"], r["write"]
    runs = {int(t): [(int(b[0]), int(b[1]), float(b[2])) for b in batches] for t, batches in r["runs"].items()}
    marks = [m for m in (10_000, 100_000, 200_000, 500_000, 1_000_000) if m <= size] or [size]
    lines = [
        f"One `chroma run`, nothing else on it: {size:,} SciFact sentences recombined (five metadata keys, "
        f"the provenance fields a migration writes, model-B vectors, 256-d), all made beforehand, then only "
        f"`add` in batches of {write:,} into one collection as it grows, each batch timed with the collection's "
        f"size before it; a fresh server per HNSW `sync_threshold` (Chroma saves its HNSW index and the "
        f"collection's whole id map to disk each time that many vectors were added since the last save; "
        f"default 1,000). *Average 0 → n*: what a migration of n documents sees (its target grows from empty "
        f"to n); *at n*: the batches that started between 0.8 n and n. docs/s, and ÷ the average to "
        f"{marks[0]:,} of the same threshold.",
        "",
        "| n | " + " | ".join(f"sync_threshold {t:,}: average 0 → n | at n" for t in runs) + " |",
        "|---|" + "---|---|" * len(runs),
    ]
    for mark in marks:
        cells = []
        for batches in runs.values():
            first = ramp_rate(batches, 0, marks[0])
            average, at = ramp_rate(batches, 0, mark), ramp_rate(batches, int(0.8 * mark), mark)
            cells.append(f"{average:.0f} ({average / first:.2f}) | {at:.0f} ({at / first:.2f})")
        lines.append(f"| {mark:,} | " + " | ".join(cells) + " |")
    for threshold, batches in runs.items():
        t0, c = slowdown_fit(batches)
        averaged = ", ".join(f"{mark:,}: {1 / (ramp_rate(batches, 0, mark) * t0):.2f}" for mark in marks)
        fitted = ", ".join(f"{1 + 2 / 3 * c * math.sqrt(mark):.2f}" for mark in marks)
        lines += ["", f"sync_threshold {threshold:,}: time per document ≈ t0·(1 + c·√n) at size n, t0 = "
                      f"{1000 * t0:.3f} ms (the first three writes), c = {c:.5f} (least squares over every write; "
                      f"`reembed plan` assumes `CHROMA_SLOWDOWN_PER_SQRT_DOC`). Mean time per document over a "
                      f"target growing to n, ÷ t0, measured ({averaged}) and by the fit, 1 + ⅔·c·√n ({fitted})."]
    write_section("Chroma's own add rate as a collection grows (bench/bench_ceiling.py --ramp)", "\n".join(lines))
    print("\n".join(lines))


def report_ratio(r: dict[str, Any]) -> None:
    ratios2 = [x["reembed_2"]["docs_per_s"] / x["raw"] for x in r["rounds"]]
    ratios1 = [x["reembed_1"]["docs_per_s"] / x["raw"] for x in r["rounds"]]
    searched = [x for x in r["rounds"] if "raw_searched" in x]
    ratios_searched = [x["reembed_2"]["docs_per_s"] / x["raw_searched"] for x in searched]
    two_one = [x["reembed_2"]["docs_per_s"] / x["reembed_1"]["docs_per_s"] for x in r["rounds"]]
    free = [x for x in r["rounds"] if "reembed_2_no_turns" in x]
    turns_gain = [x["reembed_2"]["docs_per_s"] / x["reembed_2_no_turns"]["docs_per_s"] for x in free]

    def med(xs: list[float]) -> str:
        return f"{statistics.median(xs):.2f} ({min(xs):.2f}–{max(xs):.2f})"

    sizes = ", ".join(f"{k}: {v:.0f}" for k, v in r["write_sizes"].items())
    lines = [
        f"{r['docs']:,} SciFact documents (recombined past 5,183; five metadata keys), static model m2v-mpnet-256 → "
        f"m2v-minilm-256 (256-d), one `chroma run`, `migrate` → `complete` (verified by the full diff) in batches "
        f"of {r['batch_size']}, a hybrid search every 0.2 s throughout. *Raw add*: the same ids, texts, metadata "
        f"(provenance fields included) and model-B vectors, computed beforehand, written with plain `add` in "
        f"batches of {r['best_write_size']} (the best of the sizes tried, docs/s: {sizes}), alone (*raw*) and with "
        f"the same search load as the migrations against the same server (*raw, searched*). "
        f"{len(r['rounds'])} rounds, interleaved (raw, raw searched, 2 workers, 1 worker, 2 workers without "
        f"turns at Chroma's writes: `REEMBED_CHROMA_WRITERS=0`); ratios per round, median (min–max).",
        "",
        "| round | raw add docs/s | raw, searched | reembed 2 workers | reembed 1 worker | 2 workers, no turns "
        "| 2w ÷ raw | 2w ÷ raw searched | 1w ÷ raw | 2w ÷ 1w | searches ok / failed (2w) | search p50 / p95 ms (2w) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, x in enumerate(r["rounds"]):
        two, one = x["reembed_2"], x["reembed_1"]
        raw_searched = x.get("raw_searched")
        no_turns = x.get("reembed_2_no_turns")
        cells = [f"{i + 1}", f"{x['raw']:.0f}", f"{raw_searched:.0f}" if raw_searched else "–",
                 f"{two['docs_per_s']:.0f}", f"{one['docs_per_s']:.0f}",
                 f"{no_turns['docs_per_s']:.0f}" if no_turns else "–", f"{two['docs_per_s'] / x['raw']:.2f}",
                 f"{two['docs_per_s'] / raw_searched:.2f}" if raw_searched else "–",
                 f"{one['docs_per_s'] / x['raw']:.2f}", f"{two['docs_per_s'] / one['docs_per_s']:.2f}",
                 f"{two['searches']['ok']} / {two['searches']['failed']}",
                 f"{two['searches']['p50_ms']:.0f} / {two['searches']['p95_ms']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    first = r["rounds"][0]
    lines += ["", f"**reembed 2 workers ÷ raw add: {med(ratios2)}**; ÷ raw add with search served: "
              f"{med(ratios_searched) if ratios_searched else '–'}; 1 worker ÷ raw: {med(ratios1)}; "
              f"2 workers ÷ 1 worker: {med(two_one)}; 2 workers with turns ÷ without: "
              f"{med(turns_gain) if turns_gain else '–'}. Verification diff, round 1: "
              f"{first['reembed_2']['diff_s'] or float('nan'):.2f} s (2 workers). Per batch of {r['batch_size']}, "
              f"round 1, ms (2 workers / 1 worker): " + "; ".join(
                  f"{k} {first['reembed_2']['per_batch_ms'].get(k, 0):.0f} / {first['reembed_1']['per_batch_ms'].get(k, 0):.0f}"
                  for k in ("fetch", "embed", "write", "write_turn", "write_wait", "bookkeeping")) + "."]
    write_section("At Chroma's ceiling (bench/bench_ceiling.py --ratio)", "\n".join(lines))
    print("\n".join(lines))


def report_growth(r: dict[str, Any]) -> None:
    lines = [
        f"Static model m2v-mpnet-256 → m2v-minilm-256, 2 workers, batches of {r['batch_size']}, SciFact sentences "
        "recombined with five metadata keys, one `chroma run`, a hybrid search every 0.2 s during each migration. "
        "*Diff*: the verification that source and target agree (ids, content hashes, fingerprints); *cutover*: "
        "`reembed cutover` (catch-up check and the alias switch); *BM25 build*: the new collection's index, read "
        "from Chroma, built and written; *Chroma add*: plain `add` of 8,192 documents in batches of 2,048 into an "
        "empty collection and into the old collection of n documents after the cutover (then deleted).",
        "",
        "| documents | ingest docs/s | migrate docs/s | ÷ 10k rate | Chroma add docs/s, empty / n-doc collection "
        "| worker peak RSS MB | Redis peak MB | diff s "
        "| cutover s | BM25 build s | BM25 on disk MB | searches ok / failed | search p50 / p95 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    sizes = sorted(r["sizes"], key=int)
    base = r["sizes"][sizes[0]]["docs_per_s"]
    for size in sizes:
        x = r["sizes"][size]
        s = x["searches"]
        lines.append(f"| {int(size):,} | {x['ingest_docs_per_s']:.0f} | {x['docs_per_s']:.0f} | "
                     f"{x['docs_per_s'] / base:.2f} | {x.get('add_empty_docs_per_s', float('nan')):.0f} / "
                     f"{x.get('add_full_docs_per_s', float('nan')):.0f} | "
                     f"{x['worker_peak_rss_mb']:.0f} | {x['redis_peak_mb']:.1f} | "
                     f"{x['diff_s'] or float('nan'):.1f} | {x['cutover_s']:.2f} | {x['bm25_build_s']:.1f} | "
                     f"{x['bm25_disk_mb']:.0f} | {s['ok']} / {s['failed']} | {s['p50_ms']:.0f} / {s['p95_ms']:.0f} |")
    scan = next((r["sizes"][s]["scan"] for s in sizes if "scan" in r["sizes"][s]), None)
    if scan:
        lines += ["", f"Reading a page of 512 documents of the {int(sizes[-1]):,}-document collection at a given "
                  "position (median of 5, ms). *plain*: `get(offset=…, limit=512)`, what reembed did before; "
                  "*reembed*: the page read by id plus its share of listing a 20,000-id chunk (`get(offset=…, "
                  "include=[])`, shown whole):", "",
                  "| offset | plain get(offset) | id chunk listing | page by id | reembed per page |",
                  "|---|---|---|---|---|"]
        for row in scan:
            lines.append(f"| {row['offset']:,} | {row['plain_ms']:.1f} | {row['list_chunk_ms']:.0f} | "
                         f"{row['by_id_ms']:.1f} | {row['reembed_ms']:.1f} |")
    write_section("Growth to a million documents (bench/bench_ceiling.py --growth)", "\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", action="store_true")
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--growth", default="", help="corpus sizes, comma-separated (e.g. 10000,100000,1000000)")
    parser.add_argument("--ramp", type=int, default=0, help="Chroma's own add rate as a collection grows to N")
    parser.add_argument("--sync-thresholds", default="1000", help="HNSW sync_threshold values for --ramp")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if args.ratio:
        ratio = run_ratio(args.docs, args.rounds, args.batch_size)
        (RESULTS / "cpu-ceiling.json").write_text(json.dumps(ratio, indent=1, default=str))
        report_ratio(ratio)
    if args.growth:
        growth = run_growth([int(s) for s in args.growth.split(",")], args.batch_size)
        (RESULTS / "cpu-growth-1m.json").write_text(json.dumps(growth, indent=1, default=str))
        report_growth(growth)
    if args.ramp:
        ramp = run_ramp(args.ramp, [int(t) for t in args.sync_thresholds.split(",")])
        (RESULTS / "cpu-ramp.json").write_text(json.dumps(ramp, indent=1, default=str))
        report_ramp(ramp)


if __name__ == "__main__":
    main()
