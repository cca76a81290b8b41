"""Load test: the HTTP search under open-loop load through a migration, its cutover and a rollback.

`reembed serve` runs as its own process (as deployed); an open-loop asyncio client sends --rate
queries per second, cycling through the SciFact test queries in a mix of modes, while the alias is
migrated from a static model to --to (manual cutover), cut over, and 60 s later rolled back; 60 s
after that the round ends. --runs rounds run one after the other on the same server (each a new
migration). Every answer is put in a phase by its scheduled send time:

- ``migration``: while the migration runs, until the cutover;
- ``after cutover (0-15 s)`` and ``steady on new (30-60 s)``;
- ``after rollback (0-15 s)`` and ``steady on old (30-60 s)``.

The goal (issue 18): p99 in the 15 s after a switch <= 2 x the steady p99 of the collection switched
to, 0 errors, 0 ``served_by`` violations. A violation: an answer whose model or fingerprint is not
its collection's, or, more than 1 s after a switch, an answer from the other collection that does
not say it stood in for the live one (``served_by.standing_in_for``: the process had not prepared
it yet; counted apart).

Writes "Load: HTTP search during a migration" to BENCHMARKS.md and RELIABILITY.md, and the raw
figures to bench/results/load.json.

    .venv/bin/python bench/bench_load.py            # ~15 min on 2 cores (3 rounds)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
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

from bench.common import (  # noqa: E402
    ROOT, SCIFACT, SHARED, fresh_stack, percentile, scifact_test_queries, write_section,
)
from cli.services import free_port  # noqa: E402
from cli.stack import LocalStack  # noqa: E402
from producer import ControlPlane  # noqa: E402
from reembed.registry import MigrationState  # noqa: E402

RELIABILITY = ROOT / "RELIABILITY.md"
TITLE = "Load: HTTP search during a migration"
MODES = ("hybrid",) * 6 + ("keyword",) * 3 + ("semantic",)
#: Queries per second sent, whatever the answers do; and the most requests outstanding at once.
RATE = 40.0
MAX_IN_FLIGHT = 64
#: Seconds after a switch: its window, and the steady window of the collection switched to.
SWITCH_WINDOW = (0.0, 15.0)
STEADY_WINDOW = (30.0, 60.0)
PHASES = ("migration", "after cutover (0-15 s)", "steady on new (30-60 s)", "after rollback (0-15 s)",
          "steady on old (30-60 s)")


def phase_of(scheduled: float, events: dict[str, float]) -> str | None:
    """The phase a query sent at ``scheduled`` belongs to (None: between windows)."""
    for switch, after, steady in (("rollback", PHASES[3], PHASES[4]), ("cutover", PHASES[1], PHASES[2])):
        at = events.get(switch)
        if at is not None and scheduled >= at:
            since = scheduled - at
            if SWITCH_WINDOW[0] <= since < SWITCH_WINDOW[1]:
                return after
            if STEADY_WINDOW[0] <= since < STEADY_WINDOW[1]:
                return steady
            return None
    return PHASES[0]


async def load(url: str, texts: list[str], stop: asyncio.Event, records: dict[str, tuple[str, str]],
               events: dict[str, Any], rate: float, lookup: Callable[[str], Any]) -> dict[str, Any]:
    """Send ``rate`` queries per second (open loop: the schedule does not wait for answers, as
    real clients don't) until ``stop``, at most MAX_IN_FLIGHT at once; check every answer.
    Latency runs from the scheduled send time, so a stalled server cannot hide its backlog."""
    errors: Counter[str] = Counter()
    served: Counter[str] = Counter()
    violations: list[str] = []
    stood_in = 0
    phases: dict[str, list[float]] = {p: [] for p in PHASES}
    gate = asyncio.Semaphore(MAX_IN_FLIGHT)

    async def one(client: httpx.AsyncClient, i: int, scheduled: float) -> None:
        nonlocal stood_in
        mode, text = MODES[i % len(MODES)], texts[i % len(texts)]
        async with gate:
            try:
                response = await client.get("/search", params={"alias": "scifact", "q": text, "mode": mode})
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] += 1
                return
        took = (time.monotonic() - scheduled) * 1000
        if response.status_code != 200:
            errors[str(response.status_code)] += 1
            return
        phase = phase_of(scheduled, events)
        if phase is not None:
            phases[phase].append(took)
        by = response.json()["served_by"]
        served[by["collection"]] += 1
        if by["collection"] not in records:  # a collection this checker has not read yet: read its record
            record = await asyncio.to_thread(lookup, by["collection"])
            records[by["collection"]] = (record.model, record.fingerprint)
        if (by["model"], by["fingerprint"]) != records[by["collection"]]:
            violations.append(f"{by['collection']} answered as {by['model']}/{by['fingerprint']}")
        switch = "rollback" if "rollback" in events else "cutover" if "cutover" in events else None
        if switch == "cutover" and scheduled >= events.get("rollback_called", float("inf")):
            switch = None  # sent while `reembed rollback` ran: either collection may answer
        if switch is not None and scheduled > events[switch] + 1.0 and by["collection"] != events[f"{switch}_to"]:
            if by.get("standing_in_for") == events[f"{switch}_to"]:
                stood_in += 1
            else:
                violations.append(f"{by['collection']} served {scheduled - events[switch]:.1f} s after the {switch}")

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
    return {"errors": dict(errors), "served": dict(served), "violations": violations, "stood_in": stood_in,
            "phases": phases, "queries": i}


async def drive(control: ControlPlane, alias: str, to_model: str, stop: asyncio.Event,
                events: dict[str, Any]) -> dict[str, Any]:
    """Migrate (manual cutover), cut over once complete, roll back 60 s later, stop 60 s after that."""
    started = time.monotonic()
    migration = await asyncio.to_thread(control.migrate, alias, to_model, None, "manual")
    while True:
        await asyncio.sleep(0.5)
        record = await asyncio.to_thread(control.registry.get_migration, migration.id)
        if record.state == MigrationState.COMPLETE:
            break
        if record.state in (MigrationState.FAILED, MigrationState.CANCELLED):
            raise RuntimeError(f"migration ended {record.state.value}: {record.error}")
    complete_at = time.monotonic()
    source = record.source_collection
    answer = await asyncio.to_thread(control.cutover, alias)
    events.update(cutover=time.monotonic(), cutover_to=record.target_collection)
    await asyncio.sleep(STEADY_WINDOW[1])
    events["rollback_called"] = time.monotonic()
    await asyncio.to_thread(control.rollback, alias)
    events.update(rollback=time.monotonic(), rollback_to=source)
    await asyncio.sleep(STEADY_WINDOW[1])
    stop.set()
    return {"migration_s": complete_at - started, "cutover_wait_s": events["cutover"] - complete_at,
            "search_not_ready": answer.get("search_not_ready"),
            "documents": (await asyncio.to_thread(control.status, migration.id))["done"]}


def stats(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50_ms": round(percentile(values, 50), 1), "p95_ms": round(percentile(values, 95), 1),
            "p99_ms": round(percentile(values, 99), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--to", default="all-MiniLM-L6-v2", help="the migration's target model")
    parser.add_argument("--rate", type=float, default=RATE, help="queries per second (open loop)")
    args = parser.parse_args()
    work, settings = fresh_stack("bench-load")
    texts = scifact_test_queries()
    rounds: list[dict[str, Any]] = []
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
            wait_for_server(url, server, work)
            for number in range(args.runs):
                events: dict[str, Any] = {}

                async def run() -> tuple[dict[str, Any], dict[str, Any]]:
                    stop = asyncio.Event()
                    results = await asyncio.gather(load(url, texts, stop, records, events, args.rate,
                                                        control.registry.get_collection),
                                                   drive(control, "scifact", args.to, stop, events))
                    return results[0], results[1]

                result, timing = asyncio.run(run())
                figures = {"phases": {p: stats(v) for p, v in result["phases"].items()},
                           **{k: result[k] for k in ("errors", "served", "stood_in", "queries")},
                           "violations": len(result["violations"]), "violation_examples": result["violations"][:5],
                           **timing}
                print(json.dumps(figures), flush=True)
                rounds.append(figures)
                control.retire("scifact")  # the rolled-back target: the next round migrates anew
        finally:
            server.terminate()
            server.wait(timeout=30)
    report(rounds, args)


def wait_for_server(url: str, server: subprocess.Popen[bytes], work: Path) -> None:
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            raise RuntimeError(f"search service did not start; see {work / 'serve.log'}")
        time.sleep(0.5)


def report(rounds: list[dict[str, Any]], args: argparse.Namespace) -> None:
    def median(phase: str, key: str) -> tuple[float, float, float]:
        values = [r["phases"][phase][key] for r in rounds]
        return statistics.median(values), min(values), max(values)

    ratios = {
        "cutover": [r["phases"][PHASES[1]]["p99_ms"] / r["phases"][PHASES[2]]["p99_ms"] for r in rounds],
        "rollback": [r["phases"][PHASES[3]]["p99_ms"] / r["phases"][PHASES[4]]["p99_ms"] for r in rounds],
    }
    out = ROOT / "bench" / "results" / "load.json"
    out.write_text(json.dumps({"rounds": rounds, "ratios": ratios, "rate": args.rate, "to": args.to,
                               "workers": args.workers}, indent=1) + "\n")
    rows = []
    for phase in PHASES:
        cells = [f"{m:.1f} ({lo:.1f}–{hi:.1f})" for m, lo, hi in (median(phase, k) for k in ("p50_ms", "p95_ms", "p99_ms"))]
        rows.append(f"| {phase} | {sum(r['phases'][phase]['n'] for r in rounds):,} | " + " | ".join(cells) + " |")
    errors = Counter[str]()
    for r in rounds:
        errors.update(r["errors"])
    body = f"""`.venv/bin/python bench/bench_load.py` (raw figures: `bench/results/load.json`). `reembed serve` as its own
process on loopback; an open-loop asyncio + httpx client sending {args.rate:g} queries/s (at most {MAX_IN_FLIGHT} in
flight; latency counted from the scheduled send time) cycling the 300 SciFact test queries, 60% hybrid / 30% keyword /
10% semantic. {len(rounds)} rounds on the same server, each: SciFact's 5,183 documents migrated from the m2v MiniLM
static model to {args.to} on {args.workers} worker processes (`--cutover manual`), `reembed cutover` once complete
(which waits for the search process to have the target prepared), `reembed rollback` 60 s later, 60 s more. All on the
same 2 cores. Medians of the rounds (min–max):

| phase | queries | p50 ms | p95 ms | p99 ms |
|---|---|---|---|---|
{chr(10).join(rows)}

- p99 in the 15 s after a switch ÷ steady p99 of the collection switched to (goal ≤ 2): cutover
  {', '.join(f'{x:.2f}' for x in ratios['cutover'])}; rollback {', '.join(f'{x:.2f}' for x in ratios['rollback'])}.
- Errors: {sum(errors.values())} {dict(errors) or ''}; `served_by` violations: {sum(r['violations'] for r in rounds)};
  answers that stood in for a collection not yet prepared: {sum(r['stood_in'] for r in rounds)}.
- Migration to complete: {', '.join(f"{r['migration_s']:.0f} s" for r in rounds)}; the cutover's wait for the search
  process: {', '.join(f"{r['cutover_wait_s']:.2f} s" for r in rounds)}.
"""
    write_section(TITLE, body)
    write_section(TITLE, body, path=RELIABILITY)
    print(body)


if __name__ == "__main__":
    main()
