"""Load test: the HTTP search under steady load while a migration runs, then cuts over.

`reembed serve` runs as its own process (as deployed); an open-loop asyncio client sends --rate
queries per second for at least --seconds and until the migration is live (+10 s), cycling
through the SciFact test queries in a mix of modes. Every answer's ``served_by`` is checked against the
registry record of the collection it names (model and fingerprint): a mixed-model answer, or an
answer from the old collection after the cutover was seen, counts as a violation.

Writes "Load: HTTP search during a migration" to BENCHMARKS.md and RELIABILITY.md, and the raw
figures to bench/results/load.json.

    .venv/bin/python bench/bench_load.py            # ~8 min on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402

from bench.common import ROOT, SCIFACT, SHARED, percentile, write_section  # noqa: E402
from producer import ControlPlane  # noqa: E402
from reembed.metrics import read_qrels, read_queries  # noqa: E402
from reembed.registry import MigrationState  # noqa: E402
from cli.services import free_port  # noqa: E402
from cli.stack import LocalStack  # noqa: E402
from reembed.settings import Settings  # noqa: E402

RELIABILITY = ROOT / "RELIABILITY.md"
TITLE = "Load: HTTP search during a migration"
MODES = ("hybrid",) * 6 + ("keyword",) * 3 + ("semantic",)
#: Queries per second sent, whatever the answers do; and the most requests outstanding at once.
RATE = 40.0
MAX_IN_FLIGHT = 64


async def load(url: str, texts: list[str], stop: asyncio.Event, records: dict[str, tuple[str, str]],
               alias_state: dict[str, Any], rate: float, lookup: Callable[[str], Any]) -> dict[str, Any]:
    """Send ``rate`` queries per second (open loop: the schedule does not wait for answers, as
    real clients don't) until ``stop``, at most MAX_IN_FLIGHT at once; check every answer.
    Latency runs from the scheduled send time, so a stalled server cannot hide its backlog."""
    took: dict[str, list[float]] = {m: [] for m in set(MODES)}
    errors: Counter[str] = Counter()
    served: Counter[str] = Counter()
    violations: list[str] = []
    phases: dict[str, list[float]] = {"during migration": [], "after cutover": []}
    gate = asyncio.Semaphore(MAX_IN_FLIGHT)

    async def one(client: httpx.AsyncClient, i: int, scheduled: float) -> None:
        mode, text = MODES[i % len(MODES)], texts[i % len(texts)]
        async with gate:
            try:
                response = await client.get("/search", params={"alias": "scifact", "q": text, "mode": mode})
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] += 1
                return
        took[mode].append((time.monotonic() - scheduled) * 1000)
        if response.status_code != 200:
            errors[str(response.status_code)] += 1
            return
        by = response.json()["served_by"]
        served[by["collection"]] += 1
        phase = "after cutover" if alias_state.get("cutover_seen_at") is not None else "during migration"
        phases[phase].append((time.monotonic() - scheduled) * 1000)
        if by["collection"] not in records:  # a collection this checker has not read yet: read its record
            record = await asyncio.to_thread(lookup, by["collection"])
            records[by["collection"]] = (record.model, record.fingerprint)
        expected = records[by["collection"]]
        if (by["model"], by["fingerprint"]) != expected:
            violations.append(f"{by['collection']} answered as {by['model']}/{by['fingerprint']}")
        cut = alias_state.get("cutover_seen_at")
        if cut is not None and scheduled > cut + 1.0 and by["collection"] != alias_state["live"]:
            violations.append(f"old collection {by['collection']} served {scheduled - cut:.1f} s after cutover")

    limits = httpx.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=MAX_IN_FLIGHT)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        started = time.monotonic()
        pending: set[asyncio.Task[None]] = set()
        i = 0
        while not stop.is_set():
            scheduled = started + i / rate
            delay = scheduled - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(client, i, scheduled))
            pending.add(task)
            task.add_done_callback(pending.discard)
            i += 1
        await asyncio.gather(*pending)
    return {"took": took, "errors": dict(errors), "served": dict(served), "violations": violations,
            "phases": phases}


async def watch(control: ControlPlane, migration_id: str, source: str, stop: asyncio.Event, seconds: float,
                records: dict[str, tuple[str, str]], alias_state: dict[str, Any]) -> dict[str, Any]:
    """End the load once both the minimum time has passed and the migration is live (+10 s)."""
    started = time.monotonic()
    live_at = None
    while True:
        await asyncio.sleep(1)
        record = await asyncio.to_thread(control.registry.get_migration, migration_id)
        if record.state == MigrationState.LIVE and live_at is None:
            live_at = time.monotonic()
            target = await asyncio.to_thread(control.registry.get_collection, record.target_collection)
            records[target.name] = (target.model, target.fingerprint)
            alias_state.update(live=target.name, cutover_seen_at=live_at)
        if record.state in (MigrationState.FAILED, MigrationState.CANCELLED):
            raise RuntimeError(f"migration ended {record.state.value}: {record.error}")
        if live_at is not None and time.monotonic() - started >= seconds and time.monotonic() - live_at >= 10:
            stop.set()
            return {"migration_s": live_at - started, "load_s": time.monotonic() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300, help="minimum load duration")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--to", default="all-MiniLM-L6-v2", help="the migration's target model")
    parser.add_argument("--rate", type=float, default=RATE, help="queries per second (open loop)")
    args = parser.parse_args()
    work = ROOT / ".reembed" / "bench-load"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    settings = Settings.from_env().with_(data_dir=work, redis_url="", chroma_url="", device="cpu")
    queries = read_queries(SCIFACT / "queries.jsonl")
    texts = [queries[q] for q in read_qrels(SCIFACT / "qrels" / "test.tsv")]
    with LocalStack(settings) as local:
        local.start_workers(args.workers)
        control = ControlPlane(local.settings)
        ingest = control.ingest("scifact", SCIFACT / "corpus.jsonl", str(SHARED / "models" / "m2v-minilm-256"))
        control.wait(ingest.id, timeout=1800)
        source = control.registry.get_collection(ingest.target_collection)
        records = {source.name: (source.model, source.fingerprint)}
        port = free_port()
        env = {**os.environ, **local.settings.to_env(), "REEMBED_LOG_LEVEL": "WARNING"}
        server = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--port", str(port)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=open(work / "serve.log", "wb"))  # noqa: SIM115
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"search service did not start; see {work / 'serve.log'}")
                time.sleep(0.5)
            migration = control.migrate("scifact", args.to)
            alias_state: dict[str, Any] = {"live": source.name}

            async def run() -> tuple[dict[str, Any], dict[str, Any]]:
                stop = asyncio.Event()
                results = await asyncio.gather(load(url, texts, stop, records, alias_state, args.rate,
                                                    control.registry.get_collection),
                                               watch(control, migration.id, source.name, stop, args.seconds,
                                                     records, alias_state))
                return results[0], results[1]

            result, timing = asyncio.run(run())
            status = control.status(migration.id)
        finally:
            server.terminate()
            server.wait(timeout=30)
    report(result, timing, status, args)


def report(result: dict[str, Any], timing: dict[str, Any], status: dict[str, Any], args: argparse.Namespace) -> None:
    every = [t for values in result["took"].values() for t in values]
    n = len(every) + sum(result["errors"].values())
    figures = {
        "queries": n, "seconds": round(timing["load_s"], 1), "qps": round(n / timing["load_s"], 1),
        "p50_ms": round(percentile(every, 50), 1), "p95_ms": round(percentile(every, 95), 1),
        "p99_ms": round(percentile(every, 99), 1), "errors": result["errors"],
        "violations": len(result["violations"]), "violation_examples": result["violations"][:5],
        "served_by_collection": result["served"],
        "per_mode": {m: {"n": len(v), "p50_ms": round(percentile(v, 50), 1), "p95_ms": round(percentile(v, 95), 1),
                         "p99_ms": round(percentile(v, 99), 1)} for m, v in sorted(result["took"].items())},
        "per_phase": {p: {"n": len(v), "p50_ms": round(percentile(v, 50), 1), "p95_ms": round(percentile(v, 95), 1),
                          "p99_ms": round(percentile(v, 99), 1)} for p, v in result["phases"].items()},
        "migration": {"to": args.to, "documents": status["done"], "seconds_to_live": round(timing["migration_s"], 1),
                      "docs_per_s": round(status["done"] / timing["migration_s"], 1), "workers": args.workers},
        "rate_sent_qps": args.rate, "max_in_flight": MAX_IN_FLIGHT,
    }
    out = ROOT / "bench" / "results" / "load.json"
    out.write_text(json.dumps(figures, indent=1) + "\n")
    rows = "\n".join(f"| {m} | {f['n']:,} | {f['p50_ms']} | {f['p95_ms']} | {f['p99_ms']} |"
                     for m, f in figures["per_mode"].items())
    phase_rows = "\n".join(f"| {p} | {f['n']:,} | {f['p50_ms']} | {f['p95_ms']} | {f['p99_ms']} |"
                           for p, f in figures["per_phase"].items())
    body = f"""`.venv/bin/python bench/bench_load.py` (raw figures: `bench/results/load.json`). `reembed serve` as its
own process on loopback; an open-loop asyncio + httpx client sending {args.rate:g} queries/s (at most {MAX_IN_FLIGHT} in
flight; latency counted from the scheduled send time) cycling the 300 SciFact test queries, 60% hybrid /
30% keyword / 10% semantic, for {figures['seconds']} s, while SciFact's
{figures['migration']['documents']:,} documents migrated from the m2v MiniLM static model to {args.to} on
{args.workers} worker processes ({figures['migration']['docs_per_s']} docs/s, live after
{figures['migration']['seconds_to_live']} s), then 10 s more after the cutover. All on the same 2 cores.

| | figure |
|---|---|
| queries | {n:,} in {figures['seconds']} s: {figures['qps']} queries/s |
| latency p50 / p95 / p99 | {figures['p50_ms']} / {figures['p95_ms']} / {figures['p99_ms']} ms |
| errors | {sum(result['errors'].values())} {result['errors'] or ''} |
| `served_by` violations (model or fingerprint not the named collection's; old collection > 1 s after cutover) | {figures['violations']} |
| answers per collection | {', '.join(f'{k}: {v:,}' for k, v in result['served'].items())} |

| mode or phase | queries | p50 ms | p95 ms | p99 ms |
|---|---|---|---|---|
{rows}
{phase_rows}
"""
    write_section(TITLE, body)
    write_section(TITLE, body, path=RELIABILITY)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
