"""The `reembed` command: a thin layer over the producer's, the search's and the worker's APIs.

Every command takes ``--json`` (one JSON object on stdout, nothing else there) and exits
non-zero with a one-line reason on stderr. When ``REEMBED_REDIS_URL`` / ``REEMBED_CHROMA_URL``
are unset, a command uses the data folder's own Redis and ``chroma run``, shared with every other
command on that folder (``cli.stack``: started by the first, stopped by the last); since only the
folder's workers can see that Redis, such a command also starts them (``--workers``) unless they
run, and waits for the work to finish unless ``reembed up`` keeps the stack running.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from cli.common import (
    EXIT_FAILED,
    emit,
    fail,
    handle_signals,
    json_option,
    run_guarded,
    stack,
    wait_and_report,
    workers_option,
)
from reembed.errors import ReembedError
from reembed.logs import configure_logging
from reembed.settings import FIELDS, Settings

ENV_HELP = "\b\n" + "\n".join(f"  REEMBED_{f.name:<22} {f.help} (default: {f.default or 'unset'})" for f in FIELDS)


@click.group(epilog="Settings (environment variables):\n\n" + ENV_HELP)
@click.version_option(package_name="chroma-reembed")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Move a Chroma collection to a new embedding model, with zero search downtime."""
    try:
        settings = Settings.from_env()
    except ReembedError as exc:
        fail(str(exc), exc.exit_code)
        return
    # A command prints its answer and, on failure, one line; its log stays quiet unless asked
    # for (REEMBED_LOG_LEVEL), while the workers it starts log at the configured level.
    quiet = "REEMBED_LOG_LEVEL" not in os.environ and settings.log_level == "INFO"
    configure_logging(settings.with_(log_level="WARNING") if quiet else settings)
    handle_signals()
    ctx.obj = settings




@main.command()
@json_option
@click.pass_obj
def models(settings: Settings, as_json: bool) -> None:
    """The known models and those the models file declares (REEMBED_MODELS_FILE): dimension,
    whether installed (for an API model: whether its key variable is set), fingerprint."""
    from reembed.api_models import api_spec, declared_models
    from reembed.models import KNOWN_MODELS, describe

    specs = [*KNOWN_MODELS.values(), *(api_spec(d) for d in declared_models(settings.models_file).values())]
    rows = [describe(spec, settings.data_dir) for spec in specs]

    def state(row: dict[str, Any]) -> str:
        if row["kind"] == "api":
            return f"{row['fingerprint']}  {row['base_url']}" + (
                "" if row["installed"] else f"  (set {row['api_key_env']} to use it)")
        return str(row["fingerprint"] or "not installed: " + row["install_hint"])

    text = "\n".join(f"{r['name']:<20} {r['dimension']:>4}-d  {state(r)}" for r in rows)
    emit(as_json, {"models": rows}, text)


@main.command()
@click.argument("alias")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--model", required=True, help="Model name or local sentence-transformers directory.")
@click.option("--batch-size", type=int, default=None, help="Documents per batch [default: REEMBED_BATCH_SIZE].")
@click.option("--skip-missing-text", is_flag=True, help="Record documents without text as skipped.")
@click.option("--wait/--no-wait", default=False, help="Wait until the ingest is complete.")
@click.option("--max-cost", type=float, default=None,
              help="A model behind an API: pause before the spend passes this (resume with a higher one).")
@workers_option
@json_option
@click.pass_obj
def ingest(settings: Settings, alias: str, file: Path, model: str, batch_size: int | None,
           skip_missing_text: bool, wait: bool, max_cost: float | None, workers: int | None, as_json: bool) -> None:
    """Load a BEIR corpus.jsonl or plain JSONL FILE into a new collection under ALIAS."""
    def run() -> None:
        from producer import ControlPlane

        with stack(settings, workers, needs_workers=True) as local:
            cp = ControlPlane(local.settings)
            record = cp.ingest(alias, file, model, batch_size, skip_missing_text, stalled=local.no_worker,
                               max_cost=max_cost)
            if wait or local.ephemeral:
                status = wait_and_report(local, cp, record.id, as_json)
            else:
                status = cp.status(record.id)
        emit(as_json, status)
        if status["state"] == "failed":
            fail(f"ingest {record.id} failed: {status['error']}", EXIT_FAILED)
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
        emit(as_json, result)
    run_guarded(run)


@main.command()
@click.argument("alias")
@click.option("--to", "to_model", default=None, help="Target model name or directory (required unless --dimensions).")
@click.option("--dimensions", type=click.IntRange(min=1), default=None,
              help="To --to's model (default: the live one) cut to this size: a model declared matryoshka = true.")
@click.option("--re-embed", is_flag=True,
              help="Embed every document even where the stored vectors could be cut (--dimensions).")
@click.option("--batch-size", type=int, default=None, help="Documents per batch [default: REEMBED_BATCH_SIZE].")
@click.option("--cutover", type=click.Choice(["auto", "manual"]), default="auto", show_default=True,
              help="auto: switch the alias as soon as the target is verified.")
@click.option("--skip-missing-text", is_flag=True, help="Record documents without text as skipped.")
@click.option("--wait/--no-wait", default=False, help="Show progress until the migration ends.")
@click.option("--max-cost", type=float, default=None,
              help="A model behind an API: pause before the spend passes this (resume with a higher one).")
@click.option("--webhook", "webhook_url", metavar="URL", default=None,
              help="POST this migration's events here (`reembed webhooks` delivers; default: the alias's webhook).")
@workers_option
@json_option
@click.pass_obj
def migrate(settings: Settings, alias: str, to_model: str | None, dimensions: int | None, re_embed: bool,
            batch_size: int | None, cutover: str, skip_missing_text: bool, wait: bool, max_cost: float | None,
            webhook_url: str | None, workers: int | None, as_json: bool) -> None:
    """Re-embed ALIAS's live collection with another model; prints the migration id."""
    def run() -> None:
        from producer import ControlPlane

        with stack(settings, workers, needs_workers=True) as local:
            cp = ControlPlane(local.settings)
            record = cp.migrate(alias, to_model, batch_size, cutover, skip_missing_text, max_cost=max_cost,
                                webhook_url=webhook_url, dimensions=dimensions, re_embed=re_embed)
            if not as_json:
                click.echo(record.id)
            if wait or local.ephemeral:
                status = wait_and_report(local, cp, record.id, as_json)
            else:
                status = cp.status(record.id)
        if as_json:
            emit(True, status)
        elif wait or status["state"] in ("complete", "live", "failed"):
            emit(False, status)
        if status["state"] == "failed":
            fail(f"migration {record.id} failed: {status['error']}", EXIT_FAILED)
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
        from reembed.registry import ACTIVE_STATES

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
                emit(as_json, cp.status(target))
            else:
                rows = [cp.status(a.alias) for a in cp.registry.aliases()]
                # An alias exists once its ingest is live: show the ingests still under way too.
                ingests = [{"alias": m.alias, **cp.migration_status(m)} for m in cp.registry.migrations()
                           if m.kind == "ingest" and m.state in ACTIVE_STATES and not cp.registry.has_alias(m.alias)]
                emit(as_json, {"aliases": rows, "ingests": ingests}, "\n".join(
                    [f"{r['alias']}: {r['live_collection']} ({r['model']})"
                     + (f", migration {r['migration_id']} {r['state']} {r['done']}/{r['total']}" if "state" in r else "")
                     for r in rows]
                    + [f"{r['alias']}: ingest {r['migration_id']} {r['state']} {r['done']}/{r['total']}" for r in ingests])
                    or "no aliases")
    run_guarded(run)


def explain_wait(local: Any, result: dict[str, Any]) -> None:
    """After a resume: what it waits for, and for how long at most, in one line on stderr."""
    from reembed.progress import redis_client
    from reembed.queue import in_flight

    count, back_in = in_flight(redis_client(local.settings.redis_url), local.settings.visibility_timeout_s)
    if count and back_in:
        click.echo(f"reembed: {count} task(s) are held by workers; any whose worker is gone comes back to the queue "
                   f"within {back_in:.0f} s (REEMBED_VISIBILITY_TIMEOUT_S={local.settings.visibility_timeout_s})",
                   err=True)


def _control(verb: str, help_text: str, argument: str) -> None:
    @main.command(name=verb, help=help_text)
    @click.argument(argument)
    @workers_option
    @json_option
    @click.pass_obj
    def command(settings: Settings, /, workers: int | None, as_json: bool, **kwargs: Any) -> None:
        def run() -> None:
            from producer import ControlPlane

            needs_workers = verb == "resume"
            with stack(settings, workers if needs_workers else 0, needs_workers) as local:
                cp = ControlPlane(local.settings)
                if needs_workers:
                    result = cp.resume(kwargs[argument], stalled=local.no_worker, max_cost=kwargs.get("max_cost"))
                elif verb == "cutover":
                    result = cp.cutover(kwargs[argument], search_wait_s=kwargs.get("search_wait_s"))
                else:
                    result = getattr(cp, verb)(kwargs[argument])
                # A cutover (or a rollback to a rolled-back target) may start a final catch-up:
                # with an embedded Redis only the folder's workers can see it: run them, and wait.
                catching_up = bool(result.get("catching_up")) and local.embedded
                if catching_up:
                    local.start_workers(workers or 1)
                if needs_workers:
                    explain_wait(local, result)
                if (needs_workers or catching_up) and local.ephemeral:
                    result = wait_and_report(local, cp, result["migration_id"], as_json)
            emit(as_json, result)
        run_guarded(run)


_control("cutover", "Switch ALIAS to its migration's complete, verified target (one atomic write).", "alias")
main.commands["cutover"].params.append(click.Option(
    ["--search-wait-s"], type=click.FloatRange(0, 3600), default=None,
    help="Seconds to wait for every running search process to prepare the target first (default "
         "REEMBED_CUTOVER_WAIT_S; 0 switches at once: a process not ready answers from the old collection meanwhile)."))
_control("rollback", "Switch ALIAS back to its previous collection (one atomic write).", "alias")
_control("pause", "Pause a running migration; its batches wait in the queue.", "migration_id")
_control("resume", "Resume a paused migration, or rebuild one whose Redis was lost by diffing.", "migration_id")
main.commands["resume"].params.append(click.Option(
    ["--max-cost"], type=float, default=None,
    help="A new budget for a migration to an API model that paused on reaching its own."))
_control("cancel", "Cancel a migration and delete its partial target (never the source).", "migration_id")


@main.command()
@click.argument("alias")
@click.argument("percent", type=click.FloatRange(0, 100))
@click.option("--fuse", is_flag=True, help="Answer that share from both collections, each ranking with its own "
              "model, fused with BM25 (the answer says which collection and model found each hit).")
@json_option
@click.pass_obj
def canary(settings: Settings, alias: str, percent: float, fuse: bool, as_json: bool) -> None:
    """Serve PERCENT of ALIAS's queries from its complete migration target (0 ends the canary)."""
    def run() -> None:
        from producer import ControlPlane

        with stack(settings, 0) as local:
            result = ControlPlane(local.settings).canary(alias, percent, fuse)
        emit(as_json, result)
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
                         f"verdict {m['verdict'] or '-'}{flag}{_took(m)}")
        emit(as_json, result, "\n".join(lines))
    run_guarded(run)


def _took(row: dict[str, Any]) -> str:
    """"  took 812 s (planned 760 s, chroma-bound, 2 workers)", as far as it is known."""
    took = f"  took {row['wall_s']:.0f} s" if row.get("wall_s") is not None else ""
    if row.get("planned_wall_s") is None:
        return took
    return (f"{took or '  '} (planned {row['planned_wall_s']:.0f} s, {row['planned_bound_by']}-bound, "
            f"{row['planned_workers']} worker{'' if row['planned_workers'] == 1 else 's'})")


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
                emit(as_json, {**plan, "deleted": []}, f"nothing to retire for {alias} (kept: {plan['keep']}, "
                                                        f"previous: {plan['previous']})")
                return
            if not yes and not click.confirm(f"delete {', '.join(doomed)}?", err=True):
                fail("nothing deleted", EXIT_FAILED)
            emit(as_json, cp.retire(alias, also_previous))
    run_guarded(run)


def _register() -> None:
    """The commands that live in their own modules (the write path, search, serving, assessment)."""
    from cli import assess, folder, serving, sidecars

    for command in (assess.plan, assess.evaluate, assess.fusion, serving.add, serving.upsert, serving.delete,
                    serving.search, serving.serve, serving.worker, serving.demo, folder.up, folder.down,
                    sidecars.exporter, sidecars.webhooks, sidecars.webhook):
        main.add_command(command)


_register()

if __name__ == "__main__":
    main()

