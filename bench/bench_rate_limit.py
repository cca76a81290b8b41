"""A provider's per-minute request limit, shared by two workers.

infinity (its own venv, all-MiniLM-L6-v2 on the CPU) behind a proxy that enforces N requests a
minute as a provider does (``FaultProxy(requests_per_minute=N)``: a token bucket refilled at N/60
a second holding 10 s of it, a 429 with ``retry-after`` when empty, and
``x-ratelimit-remaining-requests`` on every answer). Two workers ``ingest`` the same corpus with
the declared model, in requests of 3 documents and the probe, so that requests, not the server,
bound the rate. Two ways, alternated within each round, each through a fresh proxy (a full bucket):

- **declared**: ``requests_per_minute = N`` in the declaration: reembed's limiter, one bucket in
  Redis for every worker of the endpoint;
- **undeclared**: no limit declared: only the server's 429s (whose ``retry-after`` blocks every
  worker) slow them down.

From the proxy's log: 429s in the first minute and after it, and accepted requests per minute
after the first minute ÷ N (the goal: no 429 after the first minute, within 10 % of N).

Run: ``.venv/bin/python bench/bench_rate_limit.py`` (about 7 minutes a round). Writes its section
of BENCHMARKS.md and bench/results/rate-limit.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_migration import start_embedders  # noqa: E402
from bench.common import ROOT, machine, recombined_corpus, write_section  # noqa: E402
from cli.services import Workers  # noqa: E402
from cli.stack import LocalStack  # noqa: E402
from producer import ControlPlane  # noqa: E402
from reembed.queue import QUEUE_CONTROL  # noqa: E402
from reembed.registry import MigrationState  # noqa: E402
from reembed.settings import Settings  # noqa: E402
from tests.integration.embedding_server import FaultProxy, infinity_server, minilm_dir  # noqa: E402

WORK = ROOT / ".reembed" / "bench-rate-limit"
RESULTS = ROOT / "bench" / "results"
PER_REQUEST = 4  # 3 documents and the probe text
WAYS = ("declared", "undeclared")


def declaration(name: str, url: str, rpm: int) -> str:
    return (f'[models."{name}"]\nbase_url = "{url}"\nmodel = "minilm"\ndimension = 384\n'
            f'tokenizer = "{minilm_dir()}"\nmax_input_tokens = 64\nmax_inputs_per_request = {PER_REQUEST}\n'
            f'concurrency = 2\nrequests_per_minute = {rpm}\n')


def one_way(local: LocalStack, control: ControlPlane, infinity: str, corpus: Path, rpm: int, way: str,
            alias: str) -> dict[str, Any]:
    """Two workers ingest ``corpus`` through a fresh enforcing proxy; what the proxy saw."""
    proxy = FaultProxy(infinity, requests_per_minute=rpm)
    name = f"limited:{alias}"  # a model per run: its own Redis bucket, nothing carried over
    models = local.settings.data_dir / "models.toml"
    models.write_text(declaration(name, proxy.url, rpm if way == "declared" else 0))
    embedders = start_embedders(local.settings, 2, name, local.settings.data_dir / f"embed-{alias}.log")
    try:
        first = len(proxy.log)  # the workers' probes at start-up are not part of the run
        started = time.monotonic()
        record = control.ingest(alias, corpus, name, batch_size=60)
        final = control.wait(record.id, timeout=3600)
        seconds = time.monotonic() - started
        if final.state != MigrationState.LIVE:
            raise SystemExit(f"ingest {alias} ended {final.state.value}: {final.error}")
    finally:
        embedders.stop()
        proxy.close()
    log = proxy.log[first:]
    t0, t_end = log[0][0], max(t for t, status in log if status == 200)
    steady = [(t, s) for t, s in log if t >= t0 + 60]
    minutes = (t_end - (t0 + 60)) / 60
    accepted = sum(1 for t, s in steady if s == 200 and t <= t_end)
    return {"way": way, "rpm": rpm, "docs": final.done, "seconds": round(seconds, 1),
            "docs_per_s": round(final.done / seconds, 2), "requests": len(log),
            "429_first_minute": sum(1 for t, s in log if s == 429 and t < t0 + 60),
            "429_after": sum(1 for _, s in steady if s == 429),
            "steady_minutes": round(minutes, 2), "steady_rpm": round(accepted / minutes, 1) if minutes > 0 else None,
            "ratio": round(accepted / minutes / rpm, 3) if minutes > 0 else None}


def run(rpm: int, docs: int, rounds: int) -> dict[str, Any]:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    corpus = recombined_corpus(WORK / "corpus.jsonl", docs)
    out: dict[str, Any] = {"machine": machine(), "rpm": rpm, "docs": docs, "rows": []}
    with infinity_server(WORK / "infinity.log", threads=os.cpu_count() or 1) as url:
        settings = Settings.from_env().with_(data_dir=WORK, redis_url="", chroma_url="",
                                             models_file_setting=str(WORK / "models.toml"))
        with LocalStack(settings) as local:
            control = ControlPlane(local.settings)
            local.control = Workers(local.settings, 1, queues=QUEUE_CONTROL).start(WORK / "control.log")
            for round_no in range(rounds):
                ways = WAYS if round_no % 2 == 0 else WAYS[::-1]
                for way in ways:
                    row = one_way(local, control, url, corpus, rpm, way, f"r{round_no}{way[0]}")
                    print(json.dumps(row), flush=True)
                    out["rows"].append(row)
    return out


def report(r: dict[str, Any]) -> None:
    def med(way: str, key: str) -> str:
        xs = [x[key] for x in r["rows"] if x["way"] == way and x[key] is not None]
        return f"{statistics.median(xs):g} ({min(xs):g}–{max(xs):g})" if xs else "–"

    lines = [
        f"infinity 0.0.78 serving all-MiniLM-L6-v2 on the CPU behind a proxy enforcing **{r['rpm']} requests a "
        f"minute** (token bucket holding 10 s, 429 with retry-after, `x-ratelimit-remaining-requests`); 2 workers "
        f"`ingest` {r['docs']:,} recombined SciFact documents in requests of 3 documents and the probe. Each way "
        f"through a fresh proxy; ways alternated within each round. "
        "`.venv/bin/python bench/bench_rate_limit.py`.",
        "",
        "| round | way | docs/s | requests | 429 in the first minute | 429 after | accepted requests/min after "
        "the first minute | ÷ limit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, x in enumerate(r["rows"]):
        lines.append(f"| {i // 2 + 1} | {x['way']} | {x['docs_per_s']} | {x['requests']} | {x['429_first_minute']} | "
                     f"{x['429_after']} | {x['steady_rpm']} | {x['ratio']} |")
    lines += ["", f"Medians (min–max): declared ÷ limit {med('declared', 'ratio')}, 429 after the first minute "
              f"{med('declared', '429_after')}; undeclared ÷ limit {med('undeclared', 'ratio')}, 429 after the "
              f"first minute {med('undeclared', '429_after')}."]
    write_section("Rate limit shared by two workers (bench/bench_rate_limit.py)", "\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rpm", type=int, default=120, help="the limit the proxy enforces")
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    result = run(args.rpm, args.docs, args.rounds)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rate-limit.json").write_text(json.dumps(result, indent=1))
    report(result)


if __name__ == "__main__":
    main()
