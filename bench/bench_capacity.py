"""Capacity: the highest fixed rate of hybrid queries that `reembed serve` holds at p99 <= 200 ms
for 60 s, with 1 and with 2 server processes, and the memory each takes.

SciFact's 5,183 documents are ingested once with all-MiniLM-L6-v2 (the embedded stack). Then, per
round and per process count (the order alternates between rounds: 1, 2, then 2, 1), a fresh
`reembed serve --workers N` is started, and an open-loop client (the one of bench_load.py: the
schedule never waits for answers, latency counts from the scheduled send time) finds the
capacity in two steps:

- probes of 10 s at rising rates (x 1.25 each) until one misses the bound (p99 > 200 ms or any
  error, a 503 included);
- holds of 60 s at the last rate that passed, 15 % lower after a miss (at most 3 holds).

Memory is read while the last hold runs: RSS and PSS (proportional set size: a page shared by
two processes counts half in each) summed over the server's processes. The BM25 index files are
mapped, so PSS is what N processes really cost.

Writes "Search capacity: processes" to BENCHMARKS.md and the raw figures to
bench/results/capacity.json.

    .venv/bin/python bench/bench_capacity.py          # ~20 min on 2 cores (2 rounds)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import psutil  # noqa: E402

from bench.common import (  # noqa: E402
    ROOT, SCIFACT, fresh_stack, percentile, scifact_test_queries, write_section,
)
from cli.services import free_port  # noqa: E402
from cli.stack import LocalStack  # noqa: E402
from producer import ControlPlane  # noqa: E402
from reembed import readiness  # noqa: E402
from reembed.progress import redis_client  # noqa: E402

TITLE = "Search capacity: processes"
BOUND_MS = 200.0
PROBE_S, HOLD_S = 10.0, 60.0
MAX_IN_FLIGHT = 256


async def hold(url: str, texts: list[str], rate: float, seconds: float) -> dict[str, Any]:
    """Send ``rate`` hybrid queries per second for ``seconds`` (open loop); their latencies."""
    latencies: list[float] = []
    errors: dict[str, int] = {}

    async def one(client: httpx.AsyncClient, i: int, scheduled: float) -> None:
        try:
            response = await client.get("/search", params={"alias": "scifact", "q": texts[i % len(texts)],
                                                           "mode": "hybrid"})
            status = str(response.status_code) if response.status_code != 200 else None
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        if status is not None:
            errors[status] = errors.get(status, 0) + 1
        else:
            latencies.append((time.monotonic() - scheduled) * 1000)

    limits = httpx.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=MAX_IN_FLIGHT)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        started = time.monotonic()
        tasks = []
        for i in range(int(rate * seconds)):
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(client, i, started + i / rate)))
        await asyncio.gather(*tasks)
    p99 = percentile(latencies, 99) if latencies else float("inf")
    return {"rate": round(rate, 2), "seconds": seconds, "p50_ms": round(percentile(latencies, 50), 1) if latencies
            else None, "p99_ms": round(p99, 1), "errors": errors, "ok": p99 <= BOUND_MS and not errors}


def memory(pid: int) -> dict[str, float]:
    """RSS and PSS (MiB) summed over the server process and its children."""
    root = psutil.Process(pid)
    rss = pss = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            info = process.memory_full_info()
        except psutil.Error:
            continue
        rss += info.rss
        pss += info.pss
    return {"rss_mib": round(rss / 2**20), "pss_mib": round(pss / 2**20)}


def capacity(url: str, texts: list[str], pid: int, start_rate: float) -> dict[str, Any]:
    """Probe upwards, then hold at the best probe rate (lower after a miss)."""
    asyncio.run(hold(url, texts, 5, 5))  # first queries allocate: not part of any figure
    probes, rate, passed = [], start_rate, None
    while True:
        probe = asyncio.run(hold(url, texts, rate, PROBE_S))
        probes.append(probe)
        print(json.dumps({"probe": probe}), flush=True)
        if not probe["ok"]:
            break
        passed, rate = rate, rate * 1.25
    rate = passed if passed is not None else start_rate * 0.5
    holds: list[dict[str, Any]] = []
    for _ in range(3):
        sampled: dict[str, float] = {}
        sampler = threading.Timer(HOLD_S * 0.75, lambda: sampled.update(memory(pid)))
        sampler.start()
        result = asyncio.run(hold(url, texts, rate, HOLD_S))
        sampler.join()
        result.update(sampled)
        holds.append(result)
        print(json.dumps({"hold": result}), flush=True)
        if result["ok"]:
            return {"capacity_qps": result["rate"], "held": result, "probes": probes, "holds": holds}
        rate *= 0.85
    return {"capacity_qps": 0.0, "held": holds[-1], "probes": probes, "holds": holds}


def serve(local: LocalStack, processes: int, work: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start `reembed serve --workers N` and wait until every process has the alias prepared."""
    port = free_port()
    env = {**os.environ, **local.settings.to_env(), "REEMBED_LOG_LEVEL": "WARNING"}
    log = open(work / f"serve-{processes}.log", "ab")  # noqa: SIM115 - the server's lifetime
    server = subprocess.Popen([sys.executable, "-m", "cli.main", "serve", "--port", str(port), "--workers",
                               str(processes)], env=env, stdout=log, stderr=subprocess.STDOUT)
    client = redis_client(local.settings.redis_url)
    deadline = time.monotonic() + 300
    while len(readiness.processes(client)) < processes:
        if time.monotonic() > deadline or server.poll() is not None:
            raise RuntimeError(f"search service did not start; see {work / f'serve-{processes}.log'}")
        time.sleep(0.5)
    return server, f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--start-rate", type=float, default=10.0)
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    args = parser.parse_args()
    work, settings = fresh_stack("bench-capacity")
    texts = scifact_test_queries()
    results: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    with LocalStack(settings) as local:
        local.start_workers(2)
        control = ControlPlane(local.settings)
        ingest = control.ingest("scifact", SCIFACT / "corpus.jsonl", args.model)
        control.wait(ingest.id, timeout=3600)
        for number in range(args.rounds):
            for processes in ((1, 2) if number % 2 == 0 else (2, 1)):
                server, url = serve(local, processes, work)
                try:
                    found = capacity(url, texts, server.pid, args.start_rate)
                finally:
                    server.terminate()
                    server.wait(timeout=60)
                    gone = time.monotonic() + 30  # its processes withdraw their readiness on the way out
                    while readiness.processes(redis_client(local.settings.redis_url)) and time.monotonic() < gone:
                        time.sleep(0.5)
                found["round"] = number + 1
                results[processes].append(found)
                print(json.dumps({"processes": processes, "capacity_qps": found["capacity_qps"]}), flush=True)
    report(results, args)


def report(results: dict[int, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    out = ROOT / "bench" / "results" / "capacity.json"
    out.write_text(json.dumps({"results": results, "model": args.model, "bound_ms": BOUND_MS}, indent=1) + "\n")

    def spread(values: list[float], digits: int = 0) -> str:
        return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"

    rows = []
    for processes, found in results.items():
        held = [f["held"] for f in found]
        rows.append(f"| {processes} | {spread([f['capacity_qps'] for f in found], 1)} | "
                    f"{spread([h['p50_ms'] or 0 for h in held], 1)} | {spread([h['p99_ms'] for h in held], 1)} | "
                    f"{spread([h.get('rss_mib', 0) for h in held])} | {spread([h.get('pss_mib', 0) for h in held])} |")
    ratios = [two["capacity_qps"] / one["capacity_qps"] for one, two in zip(results[1], results[2], strict=True)
              if one["capacity_qps"]]
    body = f"""`.venv/bin/python bench/bench_capacity.py` (raw figures: `bench/results/capacity.json`).
SciFact's 5,183 documents in one collection ({args.model}, embedded stack: `chroma run` and Redis on the same
cores). Per round and process count, a fresh `reembed serve --workers N`; an open-loop client (asyncio + httpx on the
same 2 cores, latency from the scheduled send time) sends hybrid queries (the 300 SciFact test queries, k=10):
probes of {PROBE_S:.0f} s rising x1.25 from {args.start_rate:g}/s until one misses p99 <= {BOUND_MS:.0f} ms with no
error, then holds of {HOLD_S:.0f} s at the last passing rate (15 % lower after a miss). Capacity = the rate of the
hold that passed. Memory: RSS and PSS of the server's processes, summed, sampled during that hold. Medians of
{len(results[1])} rounds, interleaved (min–max):

| processes | capacity q/s | p50 ms at it | p99 ms at it | RSS MiB | PSS MiB |
|---|---|---|---|---|---|
{chr(10).join(rows)}

- 2 processes ÷ 1 process, per round: {', '.join(f'{r:.2f}' for r in ratios) or 'n/a'}.
"""
    write_section(TITLE, body)
    print(body)


if __name__ == "__main__":
    main()
