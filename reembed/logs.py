"""Logging set-up, called only from entry points (CLI main, Celery's setup_logging signal).

structlog renders both its own events and the standard library's records (Celery, Chroma),
so every line of every process has one format: JSON lines off a terminal, console on one.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from reembed.settings import Settings

#: ``scheme://user:password@`` in any URL: the password is replaced.
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)([^@\s]+)(@)", re.IGNORECASE)
#: Celery prints a task's request, arguments included, in some messages ("Failed to cancel
#: active request <Request: reembed.batch[...] () {'migration_id': ..., 'documents': [...]}>").
_TASK_ARGUMENTS = re.compile(r"(\{'migration_id'|\(\) \{|'(?:documents|metadatas)': \[).*", re.DOTALL)


class Redactor:
    """A processor that keeps document text and credentials out of every log line."""

    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        self.secrets = tuple(s for s in secrets if s)

    def clean(self, text: str) -> str:
        text = _URL_PASSWORD.sub(r"\1***\3", text)
        text = _TASK_ARGUMENTS.sub("<task arguments not logged>", text)
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> dict[str, Any]:
        return {k: self.clean(v) if isinstance(v, str) else v for k, v in event.items()}


def configure_logging(settings: Settings, stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging through one renderer on stderr."""
    out = stream or sys.stderr
    as_json = settings.log_format == "json" or (settings.log_format == "auto" and not out.isatty())
    redact = Redactor(settings.secrets)
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, redact, renderer],
    ))
    handler.setLevel(settings.log_level)  # libraries that set their own logger to DEBUG stay quiet
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # Progress bars (model loading) are not log lines: they would break JSON output.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for noisy in ("httpx", "chromadb", "sentence_transformers", "transformers", "urllib3", "bm25s"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
