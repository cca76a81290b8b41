"""`reembed up` / `reembed down`: keep the data folder's stack running between commands.

Without them, the first command that needs the folder's Redis, Chroma or workers starts them
and the last one to end stops them (``cli.stack``). ``up`` pins the stack, so workers keep
working on a migration after the command that started it returns (``migrate`` then returns at
once, as with shared services) and search answers without a start-up; ``down`` unpins it and
stops it when no command uses it any more.
"""

from __future__ import annotations

import click

from cli.common import emit, fail, json_option, run_guarded
from cli.stack import FolderStack, LocalStack
from reembed.settings import Settings


def _say(line: str) -> None:
    click.echo(f"reembed: {line}", err=True)


@click.command()
@click.option("--workers", type=click.IntRange(0, 64), default=1, show_default=True,
              help="Embedding processes to keep running (0: Redis and Chroma only).")
@click.option("--status", "show", is_flag=True, help="Only show what runs for the data folder; start nothing.")
@json_option
@click.pass_obj
def up(settings: Settings, workers: int, show: bool, as_json: bool) -> None:
    """Start the data folder's Redis, Chroma server and workers, and keep them running."""
    def run() -> None:
        folder = FolderStack(settings.data_dir, _say)
        if show:
            state = folder.describe()
            emit(as_json, state, _text(state))
            return
        if settings.redis_url and settings.chroma_url:
            fail("REEMBED_REDIS_URL and REEMBED_CHROMA_URL are both set: nothing of the data folder's to run; "
                 "start workers on those services with `reembed worker`", 2)
        with LocalStack(settings, command="reembed up", say=_say) as local:
            if workers and local.embedded:
                local.start_workers(workers)
            assert local.folder is not None
            local.folder.pin(True)
            state = local.folder.describe()
        emit(as_json, state, _text(state) + "\nstop it with `reembed down`")
    run_guarded(run)


@click.command()
@click.option("--force", is_flag=True, help="Stop even while commands use the stack (they then fail).")
@json_option
@click.pass_obj
def down(settings: Settings, force: bool, as_json: bool) -> None:
    """Stop the data folder's Redis, Chroma server and workers (after the commands using them)."""
    def run() -> None:
        stopped, users = FolderStack(settings.data_dir, _say).stop(force)
        text = f"stopped {', '.join(stopped)}" if stopped else "nothing was running"
        if users:
            who = ", ".join(f"pid {pid} ({what})" for pid, what in users.items())
            text = f"still used by {who}: it stops when they end (or `reembed down --force`)"
        emit(as_json, {"data_dir": str(settings.data_dir), "stopped": stopped, "users": users}, text)
    run_guarded(run)


def _text(state: dict[str, object]) -> str:
    services = state["services"]
    assert isinstance(services, dict)
    if not services:
        return f"nothing runs for {state['data_dir']}"
    lines = [f"{name:<8} pid {s['pid']:<8} {s.get('url') or ''}{' x' + str(s['processes']) if 'processes' in s else ''}"
             for name, s in services.items()]
    users = state["users"]
    assert isinstance(users, dict)
    lines.append(f"pinned: {'yes' if state['pinned'] else 'no'}; used by: "
                 f"{', '.join(f'pid {p} ({w})' for p, w in users.items()) or 'no command'}")
    return "\n".join(lines)
