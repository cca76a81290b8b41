"""The `reembed` command: a thin layer over the producer's, the search's and the worker's APIs.

Every command takes ``--json`` (one JSON object on stdout, nothing else there) and exits
non-zero with a one-line reason on stderr. When ``REEMBED_REDIS_URL`` / ``REEMBED_CHROMA_URL``
are unset, a command starts an embedded Redis and a local ``chroma run`` over the data
directory and stops them when it ends; since nobody else's workers can see that Redis, such a
command also starts its own workers (``--workers``) and waits for the work to finish.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from reembed.errors import ReembedError
from reembed.logs import configure_logging
from cli.services import LocalStack
from reembed.settings import FIELDS, Settings

#: Exit codes. 2 and 3 come from the error tree (``ReembedError.exit_code``).
EXIT_OK = 0
EXIT_FAILED = 1  # the operation ran but ended badly (a migration failed)
EXIT_INTERRUPTED = 130

ENV_HELP = "\b\n" + "\n".join(f"  REEMBED_{f.name:<22} {f.help} (default: {f.default or 'unset'})" for f in FIELDS)


def _emit(as_json: bool, payload: dict[str, Any], text: str | None = None) -> None:
    if as_json:
        click.echo(json.dumps(payload, default=str))
    else:
        click.echo(text if text is not None else "\n".join(f"{k}: {v}" for k, v in payload.items()))


def _fail(message: str, code: int) -> None:
    click.echo(f"reembed: error: {message.splitlines()[0] if message else 'failed'}", err=True)
    sys.exit(code)


def run_guarded(fn: Callable[[], None]) -> None:
    """Map errors to one line on stderr and an exit code; never a traceback for known errors."""
    try:
        fn()
    except ReembedError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_INTERRUPTED)


@contextlib.contextmanager
def stack(settings: Settings, workers: int | None) -> Iterator[LocalStack]:
    """Services for one command; local workers when asked, or by default with an embedded Redis."""
    with LocalStack(settings) as local:
        count = workers if workers is not None else (1 if local.embedded else 0)
        if count:
            local.start_workers(count)
        yield local


def _progress_line(status: dict[str, Any]) -> None:
    total = status["total"] or 1
    eta = f"{status['eta_s']:.0f}s" if status.get("eta_s") not in (None, 0) else "-"
    click.echo(f"\r{status['state']:<10} {status['done']}/{status['total']} docs "
               f"({100 * status['done'] / total:5.1f}%)  failed {status['failed']}  "
               f"{status['docs_per_s']:.1f} docs/s  ETA {eta}   ", nl=False, err=True)


@click.group(epilog="Settings (environment variables):\n\n" + ENV_HELP)
@click.version_option(package_name="chroma-reembed")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Move a Chroma collection to a new embedding model, with zero search downtime."""
    try:
        settings = Settings.from_env()
    except ReembedError as exc:
        _fail(str(exc), exc.exit_code)
        return
    configure_logging(settings)
    ctx.obj = settings


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
workers_option = click.option("--workers", type=click.IntRange(0, 64), default=None,
                              help="Start N local worker processes for this command "
                                   "[default: 1 with an embedded Redis, else 0].")


@main.command()
@json_option
@click.pass_obj
def models(settings: Settings, as_json: bool) -> None:
    """The known models: dimension, whether installed, where the weights are, fingerprint."""
    from reembed.models import KNOWN_MODELS, describe

    rows = [describe(spec, settings.data_dir) for spec in KNOWN_MODELS.values()]
    text = "\n".join(f"{r['name']:<20} {r['dimension']:>4}-d  "
                     f"{(r['fingerprint'] or 'not installed: ' + r['install_hint'])}" for r in rows)
    _emit(as_json, {"models": rows}, text)


@main.command()
@click.argument("alias")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--model", required=True, help="Model name or local sentence-transformers directory.")
@click.option("--batch-size", type=int, default=None, help="Documents per batch [default: REEMBED_BATCH_SIZE].")
@click.option("--skip-missing-text", is_flag=True, help="Record documents without text as skipped.")
@click.option("--wait/--no-wait", default=False, help="Wait until the ingest is complete.")
@workers_option
@json_option
@click.pass_obj
def ingest(settings: Settings, alias: str, file: Path, model: str, batch_size: int | None,
           skip_missing_text: bool, wait: bool, workers: int | None, as_json: bool) -> None:
    """Load a BEIR corpus.jsonl or plain JSONL FILE into a new collection under ALIAS."""
    def run() -> None:
        from producer import ControlPlane

        with stack(settings, workers) as local:
            cp = ControlPlane(local.settings)
            record = cp.ingest(alias, file, model, batch_size, skip_missing_text)
            if wait or local.embedded:
                record = cp.wait(record.id, on_progress=None if as_json else _progress_line)
                click.echo("", err=True)
            status = cp.status(record.id)
        _emit(as_json, status)
        if status["state"] == "failed":
            sys.exit(EXIT_FAILED)
    run_guarded(run)


@main.command()
@click.argument("alias")
@click.option("--collection", required=True, help="The existing Chroma collection.")
@click.option("--model", default=None, help="Its model, when Chroma has none recorded (checked either way).")
@workers_option
@json_option
@click.pass_obj
def adopt(settings: Settings, alias: str, collection: str, model: str | None, workers: int | None,
          as_json: bool) -> None:
    """Put an existing collection under ALIAS after verifying the model of its vectors."""
    def run() -> None:
        from producer import ControlPlane

        with stack(settings, workers) as local:
            result = ControlPlane(local.settings).adopt(alias, collection, model)
        _emit(as_json, result)
    run_guarded(run)


@main.command()
@click.argument("alias")
@click.option("--to", "to_model", required=True, help="Target model name or directory.")
@click.option("--batch-size", type=int, default=None, help="Documents per batch [default: REEMBED_BATCH_SIZE].")
@click.option("--cutover", type=click.Choice(["auto", "manual"]), default="auto", show_default=True,
              help="auto: switch the alias as soon as the target is verified.")
@click.option("--skip-missing-text", is_flag=True, help="Record documents without text as skipped.")
@click.option("--wait/--no-wait", default=False, help="Show progress until the migration ends.")
@workers_option
@json_option
@click.pass_obj
def migrate(settings: Settings, alias: str, to_model: str, batch_size: int | None, cutover: str,
            skip_missing_text: bool, wait: bool, workers: int | None, as_json: bool) -> None:
    """Re-embed ALIAS's live collection with another model; prints the migration id."""
    def run() -> None:
        from producer import ControlPlane

        with stack(settings, workers) as local:
            cp = ControlPlane(local.settings)
            record = cp.migrate(alias, to_model, batch_size, cutover, skip_missing_text)
            if not as_json:
                click.echo(record.id)
            if wait or local.embedded:
                cp.wait(record.id, on_progress=None if as_json else _progress_line)
                click.echo("", err=True)
            status = cp.status(record.id)
        if as_json:
            _emit(True, status)
        elif wait or status["state"] in ("complete", "live", "failed"):
            _emit(False, status)
        if status["state"] == "failed":
            sys.exit(EXIT_FAILED)
    run_guarded(run)


@main.command()
@click.argument("target", required=False)
@click.option("--watch", "watching", is_flag=True,
              help="Redraw a progress bar per running migration until all have ended (Ctrl-C stops).")
@click.option("--interval", type=click.FloatRange(0.2, 3600), default=2.0, show_default=True,
              help="Seconds between two refreshes of --watch.")
@json_option
@click.pass_obj
def status(settings: Settings, target: str | None, watching: bool, interval: float, as_json: bool) -> None:
    """Alias and latest migration progress (TARGET is an alias or a migration id); all aliases without one."""
    def run() -> None:
        from producer import ControlPlane

        with stack(settings, 0) as local:
            cp = ControlPlane(local.settings)
            if watching:
                from cli.watch import watch

                def read() -> list[dict[str, Any]]:
                    if target:
                        return [cp.status(target)]
                    return [cp.status(a.alias) for a in cp.registry.aliases()]

                with contextlib.suppress(KeyboardInterrupt):
                    watch(read, sys.stdout, interval)
                return
            if target:
                _emit(as_json, cp.status(target))
            else:
                rows = [cp.status(a.alias) for a in cp.registry.aliases()]
                _emit(as_json, {"aliases": rows}, "\n".join(
                    f"{r['alias']}: {r['live_collection']} ({r['live_model']})"
                    + (f", migration {r['migration_id']} {r['state']} {r['done']}/{r['total']}" if "state" in r else "")
                    for r in rows) or "no aliases")
    run_guarded(run)


def _control(verb: str, help_text: str, argument: str) -> None:
    @main.command(name=verb, help=help_text)
    @click.argument(argument)
    @workers_option
    @json_option
    @click.pass_obj
    def command(settings: Settings, /, workers: int | None, as_json: bool, **kwargs: str) -> None:
        def run() -> None:
            from producer import ControlPlane

            needs_workers = verb == "resume"
            with stack(settings, workers if needs_workers else 0) as local:
                cp = ControlPlane(local.settings)
                result = getattr(cp, verb)(kwargs[argument])
                # A cutover (or a rollback to a rolled-back target) may start a final catch-up:
                # with an embedded Redis no other worker can see it, so run it here and wait.
                catching_up = bool(result.get("catching_up")) and local.embedded
                if catching_up:
                    local.start_workers(workers or 1)
                if (needs_workers and local.embedded) or catching_up:
                    cp.wait(result["migration_id"], on_progress=None if as_json else _progress_line)
                    result = cp.status(result["migration_id"])
            _emit(as_json, result)
        run_guarded(run)


_control("cutover", "Switch ALIAS to its migration's complete, verified target (one atomic write).", "alias")
_control("rollback", "Switch ALIAS back to its previous collection (one atomic write).", "alias")
_control("pause", "Pause a running migration; its batches wait in the queue.", "migration_id")
_control("resume", "Resume a paused migration, or rebuild one whose Redis was lost by diffing.", "migration_id")
_control("cancel", "Cancel a migration and delete its partial target (never the source).", "migration_id")


@main.command()
@click.argument("alias")
@click.option("--to", "to_model", required=True, help="The new model (name or directory).")
@click.option("--workers", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Worker processes (GPUs) the estimate assumes.")
@click.option("--sample", type=click.IntRange(1, 100_000), default=200, show_default=True,
              help="Documents embedded to measure throughput.")
@click.option("--queries-per-month", type=click.FloatRange(0), default=None)
@click.option("--value-per-query", type=click.FloatRange(0), default=None, help="What one query is worth.")
@click.option("--engineering-cost", type=click.FloatRange(0), default=None, help="One-off cost of the change.")
@click.option("--quality-gain", type=float, default=None,
              help="Relative gain from `reembed evaluate` (0.017 = +1.7 %), for the return on investment.")
@json_option
@click.pass_obj
def plan(settings: Settings, alias: str, to_model: str, workers: int, sample: int, queries_per_month: float | None,
         value_per_query: float | None, engineering_cost: float | None, quality_gain: float | None,
         as_json: bool) -> None:
    """Before migrating: documents, tokens, truncation, measured throughput, time, storage, cost, ROI."""
    def run() -> None:
        from producer.plan import plan as make_plan

        with stack(settings, 0) as local:
            result = make_plan(local.settings, alias, to_model, workers, sample, queries_per_month,
                               value_per_query, engineering_cost, quality_gain)
        _emit(as_json, result)
    run_guarded(run)


@main.command()
@click.argument("alias")
@click.option("--to", "to_model", required=True, help="The new model (name or directory).")
@click.option("--queries", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="BEIR queries.jsonl (with --qrels); without them, queries are made from the corpus.")
@click.option("--qrels", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="BEIR qrels TSV (query-id, corpus-id, score; graded relevance allowed).")
@click.option("--sample", type=click.IntRange(1), default=None, help="Documents to evaluate on (judged ones always in).")
@click.option("--k", type=click.IntRange(1, 100), default=10, show_default=True)
@click.option("--min-gain", type=float, default=0.01, show_default=True, help="Gain needed for GO.")
@click.option("--tolerance", type=float, default=0.01, show_default=True, help="Loss that means NO-GO.")
@click.option("--compare", type=click.Choice(["semantic", "hybrid"]), default="semantic", show_default=True)
@click.option("--synthetic", type=click.IntRange(10, 100_000), default=200, show_default=True,
              help="Queries to make from the corpus when no files are given.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write report.md, report.json and metrics.png here.")
@click.option("--here", is_flag=True,
              help="Embed the sample in this process instead of on the workers (their GPUs when they have them).")
@json_option
@click.pass_obj
def evaluate(settings: Settings, alias: str, to_model: str, queries: Path | None, qrels: Path | None,
             sample: int | None, k: int, min_gain: float, tolerance: float, compare: str, synthetic: int,
             report_dir: Path | None, here: bool, as_json: bool) -> None:
    """Score old model, new model, BM25 and hybrid on ALIAS; exit 0 GO, 1 NO-GO, 3 INCONCLUSIVE."""
    from producer.evaluate import Evaluator, write_report
    from reembed.evaluation import VERDICT_EXIT

    outcome: dict[str, Any] = {}

    def run() -> None:
        with stack(settings, None if not here else 0) as local:
            report = Evaluator(local.settings, on_workers=not here).run(
                alias, to_model, queries, qrels, sample, k, min_gain, tolerance, synthetic, compare)
        if report_dir is not None:
            report["files"] = [str(p) for p in write_report(report, report_dir)]
        d = report["difference"]
        rows = [f"{name:<11} " + "  ".join(f"{m} {v:.4f}" for m, v in values.items())
                for name, values in report["metrics"].items()]
        _emit(as_json, report, "\n".join([*rows, f"{report['compare']} {report['metric']}: {d['mean']:+.4f} "
                                           f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] -> {report['verdict']} "
                                           f"({report['queries']} {report['queries_kind']})"]))
        outcome["verdict"] = report["verdict"]

    try:
        run()
    except ReembedError as exc:
        _fail(str(exc), 2)  # an error is 2 here: 1 and 3 are verdicts
    sys.exit(VERDICT_EXIT[outcome["verdict"]])


@main.command()
@click.argument("alias")
@click.argument("percent", type=click.FloatRange(0, 100))
@json_option
@click.pass_obj
def canary(settings: Settings, alias: str, percent: float, as_json: bool) -> None:
    """Serve PERCENT of ALIAS's queries from its complete migration target (0 ends the canary)."""
    def run() -> None:
        from producer import ControlPlane

        with stack(settings, 0) as local:
            result = ControlPlane(local.settings).canary(alias, percent)
        _emit(as_json, result)
    run_guarded(run)


@main.command()
@click.argument("alias")
@json_option
@click.pass_obj
def history(settings: Settings, alias: str, as_json: bool) -> None:
    """Every migration of ALIAS: models, dates, counts, state, verdict, and which is live."""
    def run() -> None:
        from producer import ControlPlane

        with stack(settings, 0) as local:
            result = ControlPlane(local.settings).history(alias)
        lines = [f"{alias}: live {result['live_collection']}, previous {result['previous_collection'] or '-'}"]
        for m in result["migrations"]:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(m["created_at"]))
            flag = " LIVE" if m["live"] else (" CANARY" if m["canary"] else "")
            lines.append(f"{when}  {m['migration_id']}  {m['kind']:<7} {m['from_model'] or '-'} -> {m['to_model']}  "
                         f"{m['state']:<11} {m['done']}/{m['total']} failed {m['failed']}  "
                         f"verdict {m['verdict'] or '-'}{flag}")
        _emit(as_json, result, "\n".join(lines))
    run_guarded(run)


@main.command()
@click.argument("alias")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--also-previous", metavar="COLLECTION", default=None,
              help="Also delete the previous collection (what a rollback needs); must name it exactly.")
@json_option
@click.pass_obj
def retire(settings: Settings, alias: str, yes: bool, also_previous: str | None, as_json: bool) -> None:
    """Delete ALIAS's collections that are not live, canary, or a running or complete migration's target."""
    def run() -> None:
        from producer import ControlPlane

        with stack(settings, 0) as local:
            cp = ControlPlane(local.settings)
            plan = cp.retire_candidates(alias)
            doomed = plan["deletable"] + ([also_previous] if also_previous else [])
            if not doomed:
                _emit(as_json, {**plan, "deleted": []}, f"nothing to retire for {alias} (kept: {plan['keep']}, "
                                                        f"previous: {plan['previous']})")
                return
            if not yes and not click.confirm(f"delete {', '.join(doomed)}?", err=True):
                _fail("nothing deleted", EXIT_FAILED)
            _emit(as_json, cp.retire(alias, also_previous))
    run_guarded(run)


def _documents_from(file: Path) -> list[Any]:
    from reembed.documents import read_corpus

    return list(read_corpus(file))


for _verb, _help in (("add", "Add new documents (a BEIR or JSONL FILE) to ALIAS; existing ids are refused."),
                     ("upsert", "Add or replace documents (a BEIR or JSONL FILE) in ALIAS.")):
    def _make(verb: str, help_text: str) -> None:
        @main.command(name=verb, help=help_text + " During a migration they reach its target too.")
        @click.argument("alias")
        @click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
        @json_option
        @click.pass_obj
        def command(settings: Settings, alias: str, file: Path, as_json: bool) -> None:
            def run() -> None:
                from producer import Writer

                docs = _documents_from(file)
                with stack(settings, 0) as local:
                    result = Writer(local.settings).upsert(alias, docs, only_new=verb == "add")
                _emit(as_json, result)
            run_guarded(run)
    _make(_verb, _help)


@main.command()
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
        _emit(as_json, result)
    run_guarded(run)


@main.command()
@click.argument("alias")
@click.argument("query")
@click.option("--k", type=click.IntRange(1, 1000), default=10, show_default=True)
@click.option("--mode", type=click.Choice(["hybrid", "semantic", "keyword"]), default="hybrid", show_default=True)
@json_option
@click.pass_obj
def search(settings: Settings, alias: str, query: str, k: int, mode: str, as_json: bool) -> None:
    """Search ALIAS: BM25 and/or its live collection's own model, fused by rank."""
    def run() -> None:
        from search import Searcher

        with stack(settings, 0) as local:
            searcher = Searcher(local.settings)
            try:
                result = searcher.search(alias, query, k, mode, fresh_index=True)  # type: ignore[arg-type]
            finally:
                searcher.close()
        served = result.served_by
        lines = [f"{result.mode} search of {alias}: {served.collection} ({served.model}), {result.took_ms} ms"]
        if result.degraded:
            lines.append(f"degraded: {result.degraded}")
        lines += [f"{h.score:8.4f}  {h.id:<16} bm25={h.ranks.bm25 or '-':<4} semantic={h.ranks.semantic or '-':<4} "
                  f"{(h.document or '')[:70]}" for h in result.results]
        _emit(as_json, result.model_dump(mode="json"), "\n".join(lines))
    run_guarded(run)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind; loopback unless you put a proxy or REEMBED_API_KEY in front.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.pass_obj
def serve(settings: Settings, host: str, port: int) -> None:
    """Serve GET/POST /search, /aliases, /healthz and Prometheus /metrics over HTTP (OpenAPI at /docs)."""
    def run() -> None:
        import uvicorn

        from search.api import create_app

        with stack(settings, 0) as local:
            if not settings.chroma_url:
                click.echo(f"reembed: serving the local Chroma at {local.settings.chroma_url}", err=True)
            uvicorn.run(create_app(local.settings), host=host, port=port, log_config=None,
                        log_level=settings.log_level.lower())
    run_guarded(run)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def worker(ctx: click.Context) -> None:
    """Run a Celery worker (extra options go to `celery worker`), e.g. `reembed worker -c 2`."""
    settings: Settings = ctx.obj
    if not settings.redis_url or not settings.chroma_url:
        _fail("a standalone worker needs REEMBED_REDIS_URL and REEMBED_CHROMA_URL (shared services)", 2)
    argv = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q", "reembed.batches,reembed.control",
            "-E", *ctx.args]
    os.execv(sys.executable, argv)


@main.command()
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
        _emit(as_json, result, (
            f"{result['documents']} documents: ingested at {result['ingest']['docs_per_s']} docs/s, migrated "
            f"{mig['from_model']} -> {mig['to_model']} at {mig['docs_per_s']} docs/s ({mig['state']}, "
            f"{mig['failed']} failed); served before/during/after: {result['served_by_phase']}; "
            f"{result['elapsed_s']} s in all"))
    run_guarded(run)


if __name__ == "__main__":
    main()
