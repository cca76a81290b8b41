"""Migration throughput: reembed against the model-bound limit and the naive recipe, in one run.

Three figures on the same documents, same device, same run:

- **limit**: ``SentenceTransformer.encode`` alone (best batch size of a few tried, all CPU cores),
  once per runtime (torch, and OpenVINO where it is installed: ``REEMBED_BACKEND``);
- **naive**: the guide's recipe: read every document, create a collection with Chroma's
  ``SentenceTransformerEmbeddingFunction`` and ``add`` them back (downtime: no search meanwhile);
- **reembed**: ``migrate`` to ``complete`` (verified by diffing source and target) with 1 and with
  2 worker processes (plus the control process) per runtime, while a thread keeps searching the alias.

The naive recipe and reembed with the most workers run ``--rounds`` times, interleaved, because
a shared machine's speed drifts by more than the differences measured; ratios are taken per round.

Also: where a batch's time goes (embed, Chroma write, waiting on the write, bookkeeping), peak
memory of a worker process and of Redis, and how rate and memory grow from 1,000 to 100,000
documents with a fast (static) model.

Run: ``.venv/bin/python bench/bench_migration.py`` (about 60 minutes on 2 CPU cores; 40 without
the growth runs: ``--scale ''``). On a GPU: ``--device cuda --docs 20000 --models DIR1,DIR2``.
Writes its sections of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402

from bench.common import ROOT, SHARED, machine, percentile, recombined_corpus, write_section  # noqa: E402
from producer import ControlPlane  # noqa: E402
from reembed.models import fingerprint, model_dir, pick_device, resolve_model  # noqa: E402
from reembed.progress import Progress  # noqa: E402
from reembed.queue import QUEUE_BATCHES, QUEUE_CONTROL  # noqa: E402
from reembed.registry import MigrationState  # noqa: E402
from reembed.runtimes import openvino_cache, use_openvino  # noqa: E402
from cli.services import Workers  # noqa: E402
from cli.stack import LocalStack  # noqa: E402
from reembed.settings import Settings  # noqa: E402
from search import Searcher  # noqa: E402

STATIC_A = SHARED / "models" / "m2v-mpnet-256"
STATIC_B = SHARED / "models" / "m2v-minilm-256"
WORK = ROOT / ".reembed" / "bench-migration"


def peak_rss_mb(workers: Workers) -> float:
    """Largest peak resident set (VmHWM) among a worker's pool processes."""
    assert workers.process is not None
    peaks = []
    for child in psutil.Process(workers.process.pid).children(recursive=True):
        try:
            with open(f"/proc/{child.pid}/status") as handle:
                peaks += [int(line.split()[1]) / 1024 for line in handle if line.startswith("VmHWM")]
        except OSError:
            continue
    return max(peaks, default=0.0)


def start_embedders(settings: Settings, count: int, model: str, log: Path, backend: str = "torch") -> Workers:
    """``count`` embedding processes with ``model`` preloaded on ``backend``; returns once every one has it."""
    log.unlink(missing_ok=True)
    threads = max(1, (os.cpu_count() or 1) // count) if pick_device(settings.device) == "cpu" else 1
    s = settings.with_(preload_model=model, torch_threads=threads, backend=backend)
    workers = Workers(s, count, queues=QUEUE_BATCHES).start(log)
    deadline = time.monotonic() + 900
    while log.read_text(errors="replace").count('"model loaded"') < count if log.exists() else True:
        if time.monotonic() > deadline or (workers.process and workers.process.poll() is not None):
            raise SystemExit(f"workers did not load {model}; see {log}")
        time.sleep(0.5)
    return workers


def encode_limit(model_name: str, texts: list[str], device: str, backend: str = "torch",
                 batch_size: int = 0) -> dict[str, Any]:
    """The model alone on all cores: ``SentenceTransformer.encode`` (its transformer on ``backend``),
    at ``batch_size`` or at the best of a few sizes tried on a sample."""
    import torch
    from sentence_transformers import SentenceTransformer

    spec = resolve_model(model_name)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    model = SentenceTransformer(str(model_dir(spec, WORK)), device=device)
    if spec.max_seq_length:
        model.max_seq_length = spec.max_seq_length
    if device.startswith("cuda"):
        model.half()
    if backend == "openvino":  # the same converted model the workers load (cached per fingerprint)
        use_openvino(model, openvino_cache(WORK, fingerprint(spec, WORK)), threads)
    rates = {}
    if not batch_size:
        sample = texts[: min(len(texts), 384)]
        for size in (128, 256, 512) if device.startswith("cuda") else (16, 32, 64):
            model.encode(sample[:size], batch_size=size)  # warm-up
            start = time.perf_counter()
            model.encode(sample, batch_size=size, normalize_embeddings=True)
            rates[size] = len(sample) / (time.perf_counter() - start)
        batch_size = max(rates, key=lambda k: rates[k])
    model.encode(texts[:batch_size], batch_size=batch_size)  # warm-up
    start = time.perf_counter()
    model.encode(texts, batch_size=batch_size, normalize_embeddings=True)
    _sync(device)
    rate = len(texts) / (time.perf_counter() - start)
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"docs_per_s": rate, "batch_size": batch_size, "sample_rates": rates}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def naive(settings: Settings, source: str, model_name: str, device: str) -> dict[str, Any]:
    """Read everything, re-create with Chroma's own embedding function, add back. Search is down meanwhile."""
    import chromadb
    import torch
    from chromadb.utils.embedding_functions import SentenceTransformerEmbeddingFunction

    # The recipe runs with torch's default, every core. This process's earlier searchers loaded
    # models through reembed, which sets torch to one thread per process (REEMBED_TORCH_THREADS).
    torch.set_num_threads(os.cpu_count() or 1)

    port = int(settings.chroma_url.rsplit(":", 1)[1])
    client = chromadb.HttpClient(host="127.0.0.1", port=port)
    ef = SentenceTransformerEmbeddingFunction(model_name=str(model_dir(resolve_model(model_name), WORK)),
                                              device=device, normalize_embeddings=True)
    ef(["warm up"])
    start = time.perf_counter()
    col = client.get_collection(source)
    ids, docs, metas = [], [], []
    offset = 0
    while True:
        page = col.get(offset=offset, limit=1000, include=["documents", "metadatas"])
        if not page["ids"]:
            break
        ids += page["ids"]
        docs += page["documents"]
        metas += page["metadatas"]
        offset += len(page["ids"])
    new = client.create_collection("naive-target", embedding_function=ef)  # type: ignore[arg-type]
    step = min(client.get_max_batch_size(), 1000)
    for i in range(0, len(ids), step):
        new.add(ids=ids[i:i + step], documents=docs[i:i + step], metadatas=metas[i:i + step])
    elapsed = time.perf_counter() - start
    count = new.count()
    client.delete_collection("naive-target")
    return {"docs_per_s": len(ids) / elapsed, "seconds": elapsed, "documents": count}


class SearchLoad:
    """Queries the alias once every 0.2 s in a thread; counts answers and failures."""

    def __init__(self, settings: Settings, alias: str, mode: str) -> None:
        self.searcher = Searcher(settings)
        self.alias, self.mode = alias, mode
        self.ok, self.failed, self.latency_ms = 0, [], []  # type: ignore[var-annotated]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(0.2):
            start = time.perf_counter()
            try:
                self.searcher.search(self.alias, "effects of vitamin D on bone density", 10, self.mode)  # type: ignore[arg-type]
                self.ok += 1
                self.latency_ms.append((time.perf_counter() - start) * 1000)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                self.failed.append(str(exc))

    def __enter__(self) -> SearchLoad:
        self.searcher.search(self.alias, "warm up", 10, self.mode)  # type: ignore[arg-type]
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        self.searcher.close()


def batch_timeline(log: Path, migration_id: str, began: float, ended: float, workers: int) -> dict[str, float]:
    """Where the wall time of a run went, from the workers' "batch done" lines: seconds before the
    first batch started, after the last one ended (verification, completion), and the share of the
    workers' time in between spent inside a batch."""
    spans = []
    for line in log.read_text(errors="replace").splitlines():
        if '"batch done"' not in line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("migration_id") == migration_id and "seconds" in entry:
            end = datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()
            spans.append((end - float(entry["seconds"]), end))
    if not spans:
        return {}
    first, last = min(s for s, _ in spans), max(e for _, e in spans)
    busy = sum(e - s for s, e in spans) / (workers * max(last - first, 1e-9))
    return {"before_first_batch_s": first - began, "after_last_batch_s": ended - last, "workers_busy": busy}


def migrate_timed(control: ControlPlane, alias: str, model: str, batch_size: int) -> dict[str, Any]:
    began = time.time()
    start = time.perf_counter()
    record = control.migrate(alias, model, batch_size=batch_size, cutover="manual")
    final = control.wait(record.id, timeout=6 * 3600)
    elapsed = time.perf_counter() - start
    ended = time.time()
    if final.state != MigrationState.COMPLETE:
        raise SystemExit(f"migration ended {final.state.value}: {final.error}")
    timings = Progress(control.redis, record.id).timings()
    batches = max(timings.pop("batches", 1), 1)
    info = control.redis.info("memory")
    result = {"docs_per_s": final.done / elapsed, "seconds": elapsed, "documents": final.done,
              "failed": final.failed, "per_batch_ms": {k: 1000 * v / batches for k, v in timings.items()},
              "batches": int(batches), "redis_peak_mb": int(info["used_memory_peak"]) / 2**20,
              "migration_id": record.id, "began": began, "ended": ended}
    control.cancel(record.id)  # drop the target: the next run starts from the same source
    return result


def run_reembed(local: LocalStack, control: ControlPlane, alias: str, model: str, workers: int,
                batch_size: int, mode: str, backend: str = "torch") -> dict[str, Any]:
    log = local.settings.data_dir / f"embed-{workers}.log"
    embedders = start_embedders(local.settings, workers, model, log, backend)
    try:
        with SearchLoad(local.settings, alias, mode) as load:
            result = migrate_timed(control, alias, model, batch_size)
        result["worker_peak_rss_mb"] = peak_rss_mb(embedders)
        result["timeline"] = batch_timeline(log, result["migration_id"], result["began"], result["ended"], workers)
        result["searches"] = {"ok": load.ok, "failed": len(load.failed), "p50_ms": percentile(load.latency_ms, 50),
                              "first_error": load.failed[0] if load.failed else None}
    finally:
        embedders.stop()
    return result


def ingest_source(control: ControlPlane, local: LocalStack, alias: str, corpus: Path, model: str) -> None:
    embedders = start_embedders(local.settings, 2, model, local.settings.data_dir / f"ingest-{alias}.log")
    try:
        record = control.ingest(alias, corpus, model, batch_size=256)
        final = control.wait(record.id, timeout=6 * 3600)
        if final.state != MigrationState.LIVE:
            raise SystemExit(f"ingest of {alias} ended {final.state.value}: {final.error}")
    finally:
        embedders.stop()


def default_backends(device: str) -> str:
    """Every runtime that can run here: OpenVINO joins torch on a CPU where it is installed."""
    if device != "cpu":
        return "torch"
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "torch"
    return "torch,openvino"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="all-MiniLM-L6-v2", help="target models, comma-separated")
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", default="", help="runtimes to measure, comma-separated (default: all that run here)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="naive and reembed with the most workers are measured this many times, interleaved "
                             "(0: 3 on a CPU, 1 on a GPU); limits and the other worker counts once")
    parser.add_argument("--batch-size", type=int, default=0, help="documents per queued batch (0: 64 cpu, 512 gpu)")
    parser.add_argument("--scale", default="1000,10000,100000", help="corpus sizes for the static-model runs ('' skips)")
    parser.add_argument("--section", default="", help="suffix of the BENCHMARKS.md section (e.g. the GPU)")
    parser.add_argument("--json-out", default="", help="also write the raw figures here")
    args = parser.parse_args()
    device = pick_device(args.device)
    batch_size = args.batch_size or (512 if device.startswith("cuda") else 64)
    backends = (args.backends or default_backends(device)).split(",")
    rounds = args.rounds or (1 if device.startswith("cuda") else 3)
    counts = [int(w) for w in args.workers.split(",")]
    work = WORK
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    settings = Settings.from_env().with_(data_dir=work, redis_url="", chroma_url="", device=device,
                                         max_waiting_batches=32)
    corpus = recombined_corpus(work / "corpus.jsonl", args.docs)
    texts = [json.loads(line)["text"] for line in corpus.open(encoding="utf-8")]
    results: dict[str, Any] = {"machine": machine(), "device": device, "docs": args.docs, "batch_size": batch_size,
                               "rounds": rounds, "backends": backends, "models": {}, "scale": {}}
    with LocalStack(settings) as local:
        control = ControlPlane(local.settings)
        local.control = Workers(local.settings, 1, queues=QUEUE_CONTROL).start(work / "control.log")
        ingest_source(control, local, "src", corpus, str(STATIC_A))
        for name in args.models.split(","):
            row: dict[str, Any] = {"limit": {}, "limit_rounds": {}, "limit_after": {}, "naive": [], "reembed": {}}
            for backend in backends:
                row["limit"][backend] = encode_limit(name, texts, device, backend)
                row["limit_rounds"][backend] = [row["limit"][backend]]
                print(name, backend, "limit", row["limit"][backend], flush=True)
            for round_no in range(rounds):  # interleaved, so a slow spell of a shared machine hits all alike
                row["naive"].append(naive(local.settings, control.registry.get_alias("src").live_collection, name,
                                          device))
                print(name, "round", round_no, "naive", row["naive"][-1], flush=True)
                for backend in backends:
                    if round_no > 0:  # the limit again, at the batch found in round 1: its own per-round ratio
                        again = encode_limit(name, texts, device, backend, row["limit"][backend]["batch_size"])
                        row["limit_rounds"][backend].append(again)
                        print(name, "round", round_no, backend, "limit", again, flush=True)
                    for count in counts if round_no == 0 else [max(counts)]:
                        run = run_reembed(local, control, "src", name, count, batch_size, "hybrid", backend)
                        row["reembed"].setdefault(f"{backend}_{count}", []).append(run)
                        print(name, "round", round_no, backend, count, "workers", run, flush=True)
                    # ... and right after the run: the round's limit is the mean of the two around it,
                    # so a shared machine drifting between them moves both sides of the ratio alike.
                    after = encode_limit(name, texts, device, backend, row["limit"][backend]["batch_size"])
                    row["limit_after"].setdefault(backend, []).append(after)
                    print(name, "round", round_no, backend, "limit after", after, flush=True)
            results["models"][name] = row
        for size in (int(s) for s in args.scale.split(",") if s):
            alias = f"scale{size}"
            ingest_source(control, local, alias, recombined_corpus(work / f"{alias}.jsonl", size), str(STATIC_A))
            results["scale"][size] = run_reembed(local, control, alias, str(STATIC_B), 2, 512, "keyword")
            print("scale", size, results["scale"][size], flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1, default=str))
    report(results, args.section)


def _name(model: str) -> str:
    return Path(model).name if "/" in model else model


def round_limits(row: dict[str, Any], backend: str) -> list[float]:
    """Each round's limit: the mean of the one measured before its run and the one right after
    (the one before alone where an older result has no second)."""
    before = [x["docs_per_s"] for x in row.get("limit_rounds", {}).get(backend, [row["limit"][backend]])]
    after = [x["docs_per_s"] for x in row.get("limit_after", {}).get(backend, [])]
    return [(b + after[i]) / 2 if i < len(after) else b for i, b in enumerate(before)]


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(results: dict[str, Any], section: str) -> None:
    """Write the throughput section (and the growth section when the scale runs ran)."""
    rounds, top = results["rounds"], max((int(k.rsplit("_", 1)[1]) for row in results["models"].values()
                                          for k in row["reembed"]), default=2)
    lines = [
        f"Device: {results['device']}. {results['docs']:,} documents (SciFact, then SciFact sentences recombined), "
        f"queued in batches of {results['batch_size']}; source collection embedded with a static model; "
        "reembed figures are `migrate` → `complete` (verified by a full diff), model preloaded in each worker, "
        "while a thread searched the alias (hybrid) every 0.2 s. Limit = `SentenceTransformer.encode` alone on all "
        "cores (best batch size), its transformer on the runtime of the row. Naive = read all + Chroma's "
        "`SentenceTransformerEmbeddingFunction` (torch) + `add`, search down meanwhile. "
        f"Naive and reembed with {top} workers ran {rounds} time(s), interleaved; their figures are medians, "
        f"and *{top}w ÷ naive* is the median of the per-round ratios (min–max); so is *{top}w ÷ limit*, the limit "
        f"measured in each round right before and right after the {top}-worker run (at the batch size found in "
        "round 1) and the mean of the two taken. 1 worker: round 1. "
        f"*searches*: the 1-worker run, then each {top}-worker round.",
        "",
        f"| model | runtime | limit docs/s | naive docs/s | reembed 1 worker | reembed {top} workers | 1w ÷ limit "
        f"| {top}w ÷ limit | {top}w ÷ naive | {top}w ÷ 1w | searches ok / failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, row in results["models"].items():
        naive_rates = [r["docs_per_s"] for r in row["naive"]]
        for backend, limit in row["limit"].items():
            ones, tops = row["reembed"].get(f"{backend}_1", []), row["reembed"].get(f"{backend}_{top}", [])
            lim = limit["docs_per_s"]
            r1 = ones[0]["docs_per_s"] if ones else float("nan")
            rt = _median([r["docs_per_s"] for r in tops])
            ratios = [r["docs_per_s"] / n for r, n in zip(tops, naive_rates, strict=False)]
            spread = f" ({min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1 else ""
            limits = round_limits(row, backend)
            of_limit = [r["docs_per_s"] / x for r, x in zip(tops, limits, strict=False)]
            lim_spread = f" ({min(of_limit):.2f}–{max(of_limit):.2f})" if len(of_limit) > 1 else ""
            searches = " · ".join(f"{r['searches']['ok']} / {r['searches']['failed']}" for r in ones[:1] + tops)
            lines.append(f"| {_name(model)} | {backend} | {lim:.1f} (batch {limit['batch_size']}) | "
                         f"{_median(naive_rates):.1f} | {r1:.1f} | {rt:.1f} | {r1 / lim:.2f} | {_median(of_limit):.2f}{lim_spread} | "
                         f"{_median(ratios):.2f}{spread} | {rt / r1:.2f} | {searches} |")
    if rounds > 1:
        lines += ["", "Each round (docs/s):", "",
                  "| model | round | naive | " + " | ".join(f"limit {b} before / after | reembed {top}w {b}" for b in results["backends"])
                  + " |", "|---|---|---|" + "---|---|" * len(results["backends"])]
        for model, row in results["models"].items():
            for i, nai in enumerate(row["naive"]):
                cells = []
                for b in results["backends"]:
                    runs, limits = row["reembed"].get(f"{b}_{top}", []), round_limits(row, b)
                    if i >= len(runs):
                        continue
                    rate = runs[i]["docs_per_s"]
                    around = [x["docs_per_s"] for x in (row.get("limit_rounds", {}).get(b, [])[i:i + 1]
                                                        + row.get("limit_after", {}).get(b, [])[i:i + 1])]
                    lim_cell = " / ".join(f"{x:.1f}" for x in around) if i < len(limits) else "–"
                    of_lim = f", {rate / limits[i]:.2f}× limit" if i < len(limits) else ""
                    cells.append(f"{lim_cell} | {rate:.1f} ({rate / nai['docs_per_s']:.2f}× naive{of_lim})")
                lines.append(f"| {_name(model)} | {i + 1} | {nai['docs_per_s']:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "Where the time goes, round 1 (ms per batch, summed over the batch's chunks; writes overlap the next "
              "chunk's embedding, so *write wait* is the part of the write that was not hidden; *before* / *after*: "
              "seconds from `migrate` to the first batch's start and from the last batch's end to `complete` seen; "
              "*busy*: share of the workers' time in between spent inside a batch):", "",
              "| model | runtime | workers | fetch (pump) | embed | Chroma write | write wait | bookkeeping | before s "
              "| after s | busy | worker peak RSS MB | Redis peak MB |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, row in results["models"].items():
        order = {b: i for i, b in enumerate(results["backends"])}
        for key in sorted(row["reembed"], key=lambda k: (order.get(k.rsplit("_", 1)[0], 0), int(k.rsplit("_", 1)[1]))):
            r = row["reembed"][key][0]
            t, line = r["per_batch_ms"], r.get("timeline", {})
            fetch = f"{t['fetch']:.0f}" if "fetch" in t else "-"
            backend, workers = key.rsplit("_", 1)
            lines.append(f"| {_name(model)} | {backend} | {workers} | {fetch} | {t.get('embed', 0):.0f} | "
                         f"{t.get('write', 0):.0f} | {t.get('write_wait', 0):.0f} | {t.get('bookkeeping', 0):.1f} | "
                         f"{line.get('before_first_batch_s', float('nan')):.1f} | "
                         f"{line.get('after_last_batch_s', float('nan')):.1f} | {line.get('workers_busy', 0):.0%} | "
                         f"{r['worker_peak_rss_mb']:.0f} | {r['redis_peak_mb']:.1f} |")
    suffix = f" — {section}" if section else ""
    write_section("Migration throughput (bench/bench_migration.py)" + suffix, "\n".join(lines))
    print("\n".join(lines))
    if results["scale"]:
        growth = ["Static model m2v-mpnet-256 → m2v-minilm-256, 2 workers, batches of 512, a keyword search "
                  "every 0.2 s:", "", "| documents | docs/s | worker peak RSS MB | Redis peak MB | searches ok / failed |",
                  "|---|---|---|---|---|"]
        for size, r in results["scale"].items():
            growth.append(f"| {int(size):,} | {r['docs_per_s']:.0f} | {r['worker_peak_rss_mb']:.0f} | "
                          f"{r['redis_peak_mb']:.1f} | {r['searches']['ok']} / {r['searches']['failed']} |")
        write_section("Migration growth with corpus size (bench/bench_migration.py)" + suffix, "\n".join(growth))
        print("\n".join(growth))


if __name__ == "__main__":
    main()
