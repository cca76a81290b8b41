"""`reembed demo`: the main job on embedded defaults, narrated.

Ingest a corpus with model A through the queue and workers, search it, migrate it to model B
while searching every second (served by A until the cutover), then search again (served by B).
The shipped corpus (58 short documents written for this project, CC0) finishes in about a
minute on a 2-core CPU, model loading included.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import click

from cli.stack import LocalStack
from producer import ControlPlane
from reembed.documents import demo_corpus_path, read_corpus
from reembed.settings import Settings
from search import Searcher

QUERIES = ("why is the sky blue", "how do vaccines protect us", "comparing vectors from two embedding models")
ALIAS = "demo"


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        click.echo(message, err=True)


def _ask(searcher: Searcher, query: str, phase: str) -> dict[str, Any]:
    result = searcher.search(ALIAS, query, k=3)  # hybrid: BM25 + the live collection's own model
    return {"phase": phase, "query": query, "collection": result.served_by.collection,
            "model": result.served_by.model, "mode": result.mode, "top": [h.id for h in result.results]}


def run_demo(settings: Settings, corpus: Path | None, from_model: str, to_model: str, workers: int,
             quiet: bool) -> dict[str, Any]:
    """Run the whole story in a fresh ``DATA_DIR/demo`` and return what happened."""
    corpus = corpus or demo_corpus_path()
    base = settings.data_dir
    demo_dir = base / "demo"
    shutil.rmtree(demo_dir, ignore_errors=True)
    demo_dir.mkdir(parents=True)
    (base / "models").mkdir(parents=True, exist_ok=True)
    os.symlink(base / "models", demo_dir / "models")  # extracted weights are reused across demos
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    queries = QUERIES if corpus == demo_corpus_path() else tuple(d.text[:80] for _, d in zip(range(3), read_corpus(corpus)))
    searches: list[dict[str, Any]] = []
    started = time.monotonic()
    with LocalStack(settings.with_(data_dir=demo_dir, redis_url="", chroma_url="")) as local:
        _say(quiet, f"services: redis {local.settings.redis_url}, chroma {local.settings.chroma_url}")
        local.start_workers(workers)
        cp = ControlPlane(local.settings)
        _say(quiet, f"1. ingest {corpus.name} with {from_model} through the queue ({workers} worker processes)")
        ingest = cp.ingest(ALIAS, corpus, from_model)
        cp.wait(ingest.id, timeout=1800)
        ingest_status = cp.status(ingest.id)
        _say(quiet, f"   {ingest_status['done']} documents in {ingest_status['target_collection']} "
                    f"at {ingest_status['docs_per_s']} docs/s (worker start-up and model loading included)")
        searcher = Searcher(local.settings)
        for q in queries:
            searches.append(_ask(searcher, q, "before"))
        _say(quiet, f"2. migrate to {to_model} while searching")
        migration = cp.migrate(ALIAS, to_model)
        while cp.registry.get_migration(migration.id).state.value not in ("live", "complete", "failed", "cancelled"):
            searches.append(_ask(searcher, queries[len(searches) % len(queries)], "during"))
            time.sleep(1.0)
        final = cp.wait(migration.id, timeout=1800)
        migration_status = cp.status(migration.id)
        _say(quiet, f"   {final.state.value}: {migration_status['done']}/{migration_status['total']} documents, "
                    f"{migration_status['failed']} failed, {migration_status['docs_per_s']} docs/s")
        for q in queries:
            searches.append(_ask(searcher, q, "after"))
    for s in searches:
        _say(quiet, f"   [{s['phase']:<6}] {s['model']:<18} {s['collection']:<40} {s['query']!r} -> {s['top']}")
    served = {phase: sorted({s["model"] for s in searches if s["phase"] == phase}) for phase in ("before", "during", "after")}
    return {
        "corpus": str(corpus), "documents": ingest_status["done"], "ingest": ingest_status,
        "migration": migration_status, "served_by_phase": served, "searches": searches,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
