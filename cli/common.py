"""What every `reembed` command shares: output, errors and exit codes, and the local services.

Every command takes ``--json`` (one JSON object on stdout, nothing else there) and exits
non-zero with a one-line reason on stderr.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click

from cli.stack import LocalStack
from reembed.errors import NoWorkerError, ReembedError
from reembed.settings import Settings

#: Exit codes. 2, 3 and 4 come from the error tree (``ReembedError.exit_code``).
EXIT_OK = 0
EXIT_FAILED = 1  # the operation ran but ended badly (a migration failed)
EXIT_INTERRUPTED = 130

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
workers_option = click.option("--workers", type=click.IntRange(0, 64), default=None,
                              help="Start N local worker processes for this command "
                                   "[default: 1 with an embedded Redis, else 0].")


def emit(as_json: bool, payload: dict[str, Any], text: str | None = None) -> None:
    if as_json:
        click.echo(json.dumps(payload, default=str))
    else:
        click.echo(text if text is not None else "\n".join(f"{k}: {v}" for k, v in payload.items()))


def fail(message: str, code: int) -> None:
    """One line on stderr, then exit with ``code``."""
    click.echo(f"reembed: error: {message.splitlines()[0] if message else 'failed'}", err=True)
    sys.exit(code)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C, so every ``with`` stops what it started."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum: int, frame: Any) -> None:
    raise Stopped(signum)


def handle_signals() -> None:
    """SIGTERM and SIGHUP end a command the way Ctrl-C does (services it started are stopped)."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _stop)


def run_guarded(fn: Callable[[], None]) -> None:
    """Map errors to one line on stderr and an exit code; never a traceback for known errors."""
    try:
        fn()
    except ReembedError as exc:
        fail(str(exc), exc.exit_code)
    except Stopped as exc:
        fail(f"stopped by {signal.Signals(exc.signum).name}", 128 + exc.signum)
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)


@contextlib.contextmanager
def stack(settings: Settings, workers: int | None, needs_workers: bool = False) -> Iterator[LocalStack]:
    """Services for one command (the data folder's shared stack where nothing is configured);
    local workers when asked, or by default with the folder's Redis.

    Raises:
        NoWorkerError: the command needs workers, none runs for the folder's Redis, and
            ``--workers 0`` forbids starting them (it would wait forever).
    """
    context = click.get_current_context(silent=True)
    with LocalStack(settings, command=f"reembed {context.info_name}" if context else "reembed") as local:
        count = workers if workers is not None else (1 if local.embedded else 0)
        if count:
            local.start_workers(count)
        elif needs_workers and local.ephemeral and local.no_worker():
            raise NoWorkerError(f"--workers 0, and no worker runs for {settings.data_dir}: only its own workers see "
                                "its embedded Redis, so nothing would do the work; drop --workers 0, or start "
                                "them with `reembed up --workers N`")
        yield local


def wait_and_report(local: LocalStack, cp: Any, migration_id: str, as_json: bool) -> dict[str, Any]:
    """Wait for a migration (failing within seconds if nothing works on it), then say on stderr,
    in one line, what went wrong: the migration's error, or its failed documents. On shared
    services, where workers may be scaled from zero, a missing worker is said, not fatal."""
    if not local.embedded and local.workers is None and not cp.outbox.workers(patience_s=3):
        click.echo("reembed: no worker answers on REEMBED_REDIS_URL yet; the migration waits in the queue "
                   "until one runs (`reembed worker`)", err=True)
    cp.wait(migration_id, on_progress=None if as_json else progress_line, stalled=local.no_worker)
    click.echo("", err=True)
    status: dict[str, Any] = cp.status(migration_id)
    report_failures(status)
    return status


def report_failures(status: dict[str, Any]) -> None:
    if status.get("failed") and status.get("failures"):
        first, reason = next(iter(status["failures"].items()))
        click.echo(f"reembed: {status['failed']} document(s) failed, first {first!r}: {reason}; "
                   f"`reembed status {status['migration_id']} --json` lists them", err=True)


def progress_line(status: dict[str, Any]) -> None:
    total = status["total"] or 1
    eta = f"{status['eta_s']:.0f}s" if status.get("eta_s") not in (None, 0) else "-"
    click.echo(f"\r{status['state']:<10} {status['done']}/{status['total']} docs "
               f"({100 * status['done'] / total:5.1f}%)  failed {status['failed']}  "
               f"{status['docs_per_s']:.1f} docs/s  ETA {eta}   ", nl=False, err=True)
