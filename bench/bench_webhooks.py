"""Does a webhook receiver that is down (or slow) slow a migration? Same run, interleaved.

The embedded stack, 2 workers, --docs SciFact sentences recombined, static models (the migration
is then bound by Chroma, where a slowdown would show most). Per round, three pairs of migrations,
each pair to the other static model and back (their mean: the two directions differ in speed),
each pair with a different webhook on its alias:

- ``none``: no webhook;
- ``down``: a URL where nothing listens (every delivery fails and is retried);
- ``slow``: a receiver that answers after 1 s.

The order of the three pairs turns each round (a later migration runs on a fuller Chroma).

`reembed webhooks`' deliverer runs throughout in this process. docs/s of each migration (start to
live, as `status` reports it); the ratios down ÷ none and slow ÷ none per round.

Writes "Webhooks and migration speed" to BENCHMARKS.md.

    .venv/bin/python bench/bench_webhooks.py --rounds 3 --docs 3000      # ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.common import ROOT, SHARED, recombined_corpus, write_section  # noqa: E402
from cli.services import free_port  # noqa: E402
from cli.stack import LocalStack  # noqa: E402
from producer import ControlPlane  # noqa: E402
from producer.webhooks import Deliverer  # noqa: E402
from reembed.progress import redis_client  # noqa: E402
from reembed.registry import MigrationState  # noqa: E402
from reembed.settings import Settings  # noqa: E402

TITLE = "Webhooks and migration speed"
MODELS = (str(SHARED / "models" / "m2v-minilm-256"), str(SHARED / "models" / "m2v-mpnet-256"))


def slow_receiver(port: int, delay_s: float) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(delay_s)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--docs", type=int, default=3000)
    args = parser.parse_args()
    work = ROOT / ".reembed" / "bench-webhooks"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    settings = Settings.from_env().with_(data_dir=work, redis_url="", chroma_url="", device="cpu",
                                         webhook_secret="bench-secret")
    corpus = recombined_corpus(work / "corpus.jsonl", args.docs)
    slow_port = free_port()
    receiver = slow_receiver(slow_port, 1.0)
    urls = {"none": None, "down": f"http://127.0.0.1:{free_port()}/hook", "slow": f"http://127.0.0.1:{slow_port}/hook"}
    rates: dict[str, list[float]] = {name: [] for name in urls}
    with LocalStack(settings) as local:
        local.start_workers(2)
        control = ControlPlane(local.settings)
        control.wait(control.ingest("hooks", corpus, MODELS[0]).id, timeout=1800)
        stop = threading.Event()
        deliverer = Deliverer(redis_client(local.settings.redis_url), control.registry, "bench-secret")
        threading.Thread(target=deliverer.run, args=(stop,), daemon=True).start()
        turn = 1
        try:
            names = list(urls)
            for number in range(args.rounds):  # the order turns each round: no variant is always last
                for name in names[number % 3:] + names[:number % 3]:
                    control.set_webhook("hooks", urls[name])
                    pair = []
                    for _ in range(2):  # to the other model and back: every variant migrates both ways
                        record = control.migrate("hooks", MODELS[turn % 2])
                        final = control.wait(record.id, timeout=1800)
                        if final.state != MigrationState.LIVE:
                            raise RuntimeError(f"migration ended {final.state.value}: {final.error}")
                        pair.append(control.status(record.id)["docs_per_s"])
                        control.retire("hooks", also_previous=control.registry.get_alias("hooks").previous_collection)
                        turn += 1
                    rates[name].append(sum(pair) / 2)
                    print(name, pair, flush=True)
        finally:
            stop.set()
            receiver.shutdown()
    report(rates, args)


def report(rates: dict[str, list[float]], args: argparse.Namespace) -> None:
    rows = [f"| {name} | {statistics.median(v):.0f} ({min(v):.0f}–{max(v):.0f}) |" for name, v in rates.items()]
    down = [d / n for d, n in zip(rates["down"], rates["none"], strict=True)]
    slow = [s / n for s, n in zip(rates["slow"], rates["none"], strict=True)]
    body = f"""`.venv/bin/python bench/bench_webhooks.py --rounds {args.rounds} --docs {args.docs}`. The embedded stack, 2
workers, {args.docs:,} SciFact sentences recombined, static models (each migration to the other one, so it is bound by
Chroma), `reembed webhooks`' deliverer running in the bench process throughout. Per round three pairs of migrations (to the
other model and back; the order of the pairs turns each round): no webhook, a webhook where nothing listens (every delivery fails and is retried), a receiver that answers after 1 s.
docs/s start to live (mean of the pair), medians of {args.rounds} rounds (min–max):

| webhook | docs/s |
|---|---|
{chr(10).join(rows)}

- down ÷ none per round: {', '.join(f'{r:.2f}' for r in down)}; slow ÷ none: {', '.join(f'{r:.2f}' for r in slow)}.
"""
    write_section(TITLE, body)
    print(body)


if __name__ == "__main__":
    main()
