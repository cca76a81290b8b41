"""`reembed status --watch`: a live progress bar per running migration, redrawn in place.

On a terminal the block of lines is redrawn with ANSI cursor moves; elsewhere (a log file, a CI
console) each refresh prints its lines once, so the output stays readable when piped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TextIO

BAR_WIDTH = 30
#: States in which a migration is still moving (or held): the ones --watch follows.
RUNNING = ("planned", "running", "verifying", "paused")


def bar(done: int, failed: int, total: int, width: int = BAR_WIDTH) -> str:
    """``[#####x.....]``: done as ``#``, failed as ``x``, the rest as ``.``."""
    total = max(total, 1)
    filled = min(width, round(width * done / total))
    bad = min(width - filled, round(width * failed / total)) if failed else 0
    return "[" + "#" * filled + "x" * bad + "." * (width - filled - bad) + "]"


def line(row: dict[str, Any]) -> str:
    """One migration's line: alias, bar, percentage, counts, rate and ETA."""
    total = row.get("total") or 0
    done, failed = row.get("done", 0), row.get("failed", 0)
    pct = 100.0 * (done + failed + row.get("skipped", 0)) / total if total else 0.0
    eta = row.get("eta_s")
    eta_text = "-" if eta in (None, 0) else (f"{eta / 60:.1f} min" if eta >= 120 else f"{eta:.0f} s")
    text = (f"{row.get('alias', '?'):<16} {bar(done, failed, total)} {pct:5.1f}%  {done:,}/{total:,}"
            f"  failed {failed:,}  {row.get('docs_per_s', 0):.1f} docs/s  ETA {eta_text}  {row.get('state', '')}")
    if row.get("hint"):
        text += f"\n    {row['hint']}"
    return text


def running_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("state") in RUNNING]


def watch(read: Callable[[], list[dict[str, Any]]], out: TextIO, interval: float = 2.0,
          until_done: bool = True, tty: bool | None = None) -> list[dict[str, Any]]:
    """Redraw the running migrations every ``interval`` seconds; return when none is left running
    (after showing their final line), or never when ``until_done`` is False (Ctrl-C ends it)."""
    tty = out.isatty() if tty is None else tty
    shown = 0
    watched: set[str] = set()
    while True:
        rows = read()
        current = running_rows(rows)
        watched |= {r["migration_id"] for r in current}
        visible = [r for r in rows if r.get("migration_id") in watched]
        lines = [line(r) for r in visible] or ["no migration running"]
        text = "\n".join(lines)
        if tty and shown:
            out.write(f"\x1b[{shown}F\x1b[J")
        out.write(text + "\n")
        out.flush()
        shown = text.count("\n") + 1
        if until_done and not current:
            return visible
        time.sleep(interval)
