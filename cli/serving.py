"""The commands of the other processes: the write path, search, the HTTP service, a worker, the demo."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from cli.common import (
    emit,
    fail,
    json_option,
    run_guarded,
    stack,
)
from reembed.settings import Settings


def _documents_from(file: Path) -> list[Any]:
    from reembed.documents import read_corpus

    return list(read_corpus(file))


def _writer_command(verb: str, help_text: str) -> click.Command:
    @click.command(name=verb, help=help_text + " During a migration they reach its target too.")
    @click.argument("alias")
    @click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @json_option
    @click.pass_obj
    def command(settings: Settings, /, alias: str, file: Path, as_json: bool) -> None:
        def run() -> None:
            from producer import Writer

            docs = _documents_from(file)
            with stack(settings, 0) as local:
                result = Writer(local.settings).upsert(alias, docs, only_new=verb == "add")
            emit(as_json, result)
        run_guarded(run)
    return command


add = _writer_command("add", "Add new documents (a BEIR or JSONL FILE) to ALIAS; existing ids are refused.")
upsert = _writer_command("upsert", "Add or replace documents (a BEIR or JSONL FILE) in ALIAS.")


@click.command()
@click.argument("alias")
@click.argument("ids", nargs=-1, required=True)
@json_option
@click.pass_obj
def delete(settings: Settings, alias: str, ids: tuple[str, ...], as_json: bool) -> None:
    """Delete documents IDS from ALIAS (and from a running migration's target)."""
    def run() -> None:
        from producer import Writer

        with stack(settings, 0) as local:
            result = Writer(local.settings).delete(alias, list(ids))
        emit(as_json, result)
    run_guarded(run)


@click.command()
@click.argument("alias")
@click.argument("query")
@click.option("--k", type=click.IntRange(1, 1000), default=10, show_default=True)
@click.option("--mode", type=click.Choice(["hybrid", "semantic", "keyword"]), default="hybrid", show_default=True)
@click.option("--where", metavar="JSON", help='Metadata filter in Chroma\'s syntax, e.g. \'{"year": {"$gte": 2020}}\'.')
@click.option("--where-document", metavar="JSON", help='Text filter in Chroma\'s syntax, e.g. \'{"$contains": "cell"}\'.')
@click.option("--fusion", metavar="FUSION", help="For hybrid: convex[:W] or rrf[:W[:K]], W the semantic share "
              "(default: what ALIAS carries for its model, `reembed fusion`).")
@json_option
@click.pass_obj
def search(settings: Settings, alias: str, query: str, k: int, mode: str, where: str | None,
           where_document: str | None, fusion: str | None, as_json: bool) -> None:
    """Search ALIAS: BM25 and/or its live collection's own model, fused; a filter applies to both."""
    def run() -> None:
        from reembed.filters import parse_filter, parse_json_filter
        from reembed.fusion import parse_fusion
        from search import Searcher

        metadata = parse_json_filter(where, "--where")
        text = parse_json_filter(where_document, "--where-document")
        parse_filter(metadata, text)  # a bad filter is refused before any service starts
        spec = parse_fusion(fusion, settings.rrf_k, "--fusion") if fusion else None
        with stack(settings, 0) as local:
            searcher = Searcher(local.settings)
            try:
                result = searcher.search(alias, query, k, mode, fresh_index=True,  # type: ignore[arg-type]
                                         where=metadata, where_document=text, fusion=spec)
            finally:
                searcher.close()
        served = result.served_by
        fused = f", {served.fusion}" if served.fusion else ""
        lines = [f"{result.mode} search of {alias}: {served.collection} ({served.model}{fused}), {result.took_ms} ms"]
        if result.degraded:
            lines.append(f"degraded: {result.degraded}")
        lines += [f"{h.score:8.4f}  {h.id:<16} bm25={h.ranks.bm25 or '-':<4} semantic={h.ranks.semantic or '-':<4} "
                  f"{(h.document or '')[:70]}" for h in result.results]
        emit(as_json, result.model_dump(mode="json"), "\n".join(lines))
    run_guarded(run)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind; loopback unless you put a proxy or REEMBED_API_KEY in front.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Server processes on one socket: queries embed in parallel; BM25 indexes are one copy "
                   "on disk, mapped by all.")
@click.pass_obj
def serve(settings: Settings, host: str, port: int, workers: int) -> None:
    """Serve GET/POST /search, /aliases, /healthz and Prometheus /metrics over HTTP (OpenAPI at /docs)."""
    def run() -> None:
        import uvicorn

        from cli.service import create_service
        from search.api import MULTIPROCESS_ENV

        with stack(settings, 0) as local:
            if not settings.chroma_url:
                click.echo(f"reembed: serving the local Chroma at {local.settings.chroma_url}", err=True)
            # Keep idle connections longer than clients and proxies do (httpx 5 s, a load balancer
            # 60 s): a server that closes first races a request sent on the closing connection, and
            # the caller gets a read error (1 in 46,716 queries in bench_load.py with uvicorn's 5 s).
            options: dict[str, Any] = {"host": host, "port": port, "log_config": None,
                                       "log_level": settings.log_level.lower(), "timeout_keep_alive": 75}
            if workers == 1:
                # uvicorn shuts down gracefully on SIGINT and SIGTERM only: a hang-up becomes a SIGTERM.
                signal.signal(signal.SIGHUP, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
                uvicorn.run(create_service(local.settings), **options)
                return
            with _metrics_folder(local.settings.data_dir) as folder:
                # Each process uvicorn spawns imports the app by name and reads its settings (the
                # services this command started or found included) from the environment.
                os.environ.update({**local.settings.to_env(), MULTIPROCESS_ENV: str(folder)})
                uvicorn.run("cli.service:service_from_environment", factory=True, workers=workers, **options)
    run_guarded(run)


@contextlib.contextmanager
def _metrics_folder(data_dir: Path) -> Iterator[Path]:
    """A fresh folder for the processes' Prometheus counters, removed when the server stops
    (counters of a previous server must not be added to this one's)."""
    folder = data_dir / f"serve-metrics-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def worker(ctx: click.Context) -> None:
    """Run a Celery worker (extra options go to `celery worker`), e.g. `reembed worker -c 2`."""
    settings: Settings = ctx.obj
    if not settings.redis_url or not settings.chroma_url:
        fail("a standalone worker needs REEMBED_REDIS_URL and REEMBED_CHROMA_URL (shared services)", 2)
    argv = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q", "reembed.batches,reembed.control",
            "-E", *ctx.args]
    os.execv(sys.executable, argv)


@click.command()
@click.option("--corpus", type=click.Path(path_type=Path), default=None,
              help="A BEIR or JSONL corpus [default: the small corpus shipped with reembed].")
@click.option("--from-model", default="all-MiniLM-L6-v2", show_default=True)
@click.option("--to-model", default="all-mpnet-base-v2", show_default=True)
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True)
@json_option
@click.pass_obj
def demo(settings: Settings, corpus: Path | None, from_model: str, to_model: str, workers: int,
         as_json: bool) -> None:
    """The main job on embedded defaults: ingest, search, migrate while searching, search again."""
    from cli.demo import run_demo

    def run() -> None:
        result = run_demo(settings, corpus, from_model, to_model, workers, as_json)
        mig = result["migration"]
        emit(as_json, result, (
            f"{result['documents']} documents: ingested at {result['ingest']['docs_per_s']} docs/s, migrated "
            f"{mig['from_model']} -> {mig['to_model']} at {mig['docs_per_s']} docs/s ({mig['state']}, "
            f"{mig['failed']} failed); served before/during/after: {result['served_by_phase']}; "
            f"{result['elapsed_s']} s in all"))
    run_guarded(run)

