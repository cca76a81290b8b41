"""reembed against a real OpenAI-compatible server: 1 and 2 workers, and the server's own limit.

The server is infinity (``infinity-emb``, its own virtual environment ``.venv-infinity``, made by
scripts/install.sh) serving all-MiniLM-L6-v2 on the CPU. In one run, rounds interleaved:

- **limit**: the same texts sent straight to the server, in requests of 32 inputs with 4 in
  flight (base64), no reembed: the most this server answers here;
- **reembed, 1 and 2 workers**: ``ingest`` of the same corpus with the declared model
  ``infinity:minilm`` (32 inputs per request, 4 in flight per worker), through the queue, the
  workers and Chroma, to ``live`` (verified).

Run: ``.venv/bin/python bench/bench_api.py`` (about 10 minutes on 2 cores). Writes its section of
BENCHMARKS.md and bench/results/cpu-api.json.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

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
from tests.integration.embedding_server import infinity_server, minilm_dir  # noqa: E402

WORK = ROOT / ".reembed" / "bench-api"
RESULTS = ROOT / "bench" / "results"
MODEL = "infinity:minilm"
PER_REQUEST, IN_FLIGHT = 32, 4


def direct(url: str, texts: list[str]) -> float:
    """The server's own rate: requests of 32 texts, 4 in flight, vectors as base64."""
    client = httpx.Client(timeout=600)

    def one(i: int) -> int:
        body = {"model": "minilm", "input": texts[i:i + PER_REQUEST], "encoding_format": "base64"}
        answer = client.post(f"{url}/embeddings", json=body).json()
        assert all(len(base64.b64decode(d["embedding"])) == 4 * 384 for d in answer["data"])
        return len(answer["data"])

    started = time.perf_counter()
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        done = sum(pool.map(one, range(0, len(texts), PER_REQUEST)))
    client.close()
    return done / (time.perf_counter() - started)


def reembed_ingest(local: LocalStack, control: ControlPlane, corpus: Path, workers: int, alias: str) -> float:
    """``ingest`` of the corpus with the API model on ``workers`` worker processes; docs/s to live."""
    embedders = start_embedders(local.settings, workers, MODEL, local.settings.data_dir / f"embed-{alias}.log")
    try:
        started = time.perf_counter()
        record = control.ingest(alias, corpus, MODEL, batch_size=256)
        final = control.wait(record.id, timeout=3600)
        if final.state != MigrationState.LIVE:
            raise SystemExit(f"ingest {alias} ended {final.state.value}: {final.error}")
        return final.done / (time.perf_counter() - started)
    finally:
        embedders.stop()


def run(docs: int, rounds: int) -> dict[str, Any]:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    corpus = recombined_corpus(WORK / "corpus.jsonl", docs)
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    out: dict[str, Any] = {"machine": machine(), "docs": docs, "rounds": []}
    with infinity_server(WORK / "infinity.log", threads=os.cpu_count() or 1) as url:
        (WORK / "models.toml").write_text(
            f'[models."{MODEL}"]\nbase_url = "{url}"\nmodel = "minilm"\ndimension = 384\n'
            f'tokenizer = "{minilm_dir()}"\nmax_input_tokens = 256\nmax_inputs_per_request = {PER_REQUEST}\n'
            f'concurrency = {IN_FLIGHT}\n')
        settings = Settings.from_env().with_(data_dir=WORK, redis_url="", chroma_url="",
                                             models_file_setting=str(WORK / "models.toml"))
        direct(url, texts[:64])  # warm the server
        with LocalStack(settings) as local:
            control = ControlPlane(local.settings)
            local.control = Workers(local.settings, 1, queues=QUEUE_CONTROL).start(WORK / "control.log")
            for round_no in range(rounds):
                row = {"limit": direct(url, texts)}
                for workers in (1, 2):
                    row[f"reembed_{workers}"] = reembed_ingest(local, control, corpus, workers, f"r{round_no}w{workers}")
                print("round", round_no, row, flush=True)
                out["rounds"].append(row)
    return out


def report(r: dict[str, Any]) -> None:
    def med(xs: list[float]) -> str:
        return f"{statistics.median(xs):.2f} ({min(xs):.2f}–{max(xs):.2f})"

    rows = r["rounds"]
    lines = [
        f"infinity 0.0.78 (its own venv) serving all-MiniLM-L6-v2 on the CPU, {r['docs']:,} SciFact documents. "
        f"*limit*: the same texts sent straight to the server ({PER_REQUEST} per request, {IN_FLIGHT} in flight, "
        f"base64); *reembed*: `ingest` with the declared model `{MODEL}` ({PER_REQUEST} inputs per request, "
        f"{IN_FLIGHT} in flight per worker, the probe text first in each), to `live` (verified). "
        f"{len(rows)} rounds interleaved; ratios per round, median (min–max). Machine: {r['machine']}.",
        "",
        "| round | limit docs/s | reembed 1 worker | reembed 2 workers | 1w ÷ limit | 2w ÷ limit |",
        "|---|---|---|---|---|---|",
    ]
    for i, x in enumerate(rows):
        lines.append(f"| {i + 1} | {x['limit']:.1f} | {x['reembed_1']:.1f} | {x['reembed_2']:.1f} | "
                     f"{x['reembed_1'] / x['limit']:.2f} | {x['reembed_2'] / x['limit']:.2f} |")
    lines += ["", f"**reembed ÷ the server's own rate: 1 worker {med([x['reembed_1'] / x['limit'] for x in rows])}, "
              f"2 workers {med([x['reembed_2'] / x['limit'] for x in rows])}.**"]
    write_section("Models behind an API (bench/bench_api.py)", "\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result = run(args.docs, args.rounds)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cpu-api.json").write_text(json.dumps(result, indent=1))
    report(result)


if __name__ == "__main__":
    main()
