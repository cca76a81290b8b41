"""What every `reembed` command shares: output, errors and exit codes, and the local services.

Every command takes ``--json`` (one JSON object on stdout, nothing else there) and exits
non-zero with a one-line reason on stderr.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click

from cli.services import LocalStack
from reembed.errors import ReembedError
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
    click.echo(f"reembed: error: {message.splitlines()[0] if message else 'failed'}", err=True)
    sys.exit(code)


def run_guarded(fn: Callable[[], None]) -> None:
    """Map errors to one line on stderr and an exit code; never a traceback for known errors."""
    try:
        fn()
    except ReembedError as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", EXIT_INTERRUPTED)


@contextlib.contextmanager
def stack(settings: Settings, workers: int | None) -> Iterator[LocalStack]:
    """Services for one command; local workers when asked, or by default with an embedded Redis."""
    with LocalStack(settings) as local:
        count = workers if workers is not None else (1 if local.embedded else 0)
        if count:
            local.start_workers(count)
        yield local


def progress_line(status: dict[str, Any]) -> None:
    total = status["total"] or 1
    eta = f"{status['eta_s']:.0f}s" if status.get("eta_s") not in (None, 0) else "-"
    click.echo(f"\r{status['state']:<10} {status['done']}/{status['total']} docs "
               f"({100 * status['done'] / total:5.1f}%)  failed {status['failed']}  "
               f"{status['docs_per_s']:.1f} docs/s  ETA {eta}   ", nl=False, err=True)
