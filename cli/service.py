"""The HTTP service ``reembed serve`` runs: search (``search.api``) with the control API
(``producer.control_http``) beside it. Composed here, where both packages may be imported."""

from __future__ import annotations

from fastapi import FastAPI

from producer.control_http import Control
from reembed.settings import Settings
from search.api import create_app


def create_service(settings: Settings) -> FastAPI:
    return create_app(settings, extensions=[Control(settings)])


def service_from_environment() -> FastAPI:
    """The app of one process of ``reembed serve --workers N``: uvicorn imports it by name in each
    process it starts, so settings travel as the ``REEMBED_*`` environment (``Settings.to_env``)."""
    from reembed.logs import configure_logging

    settings = Settings.from_env()
    configure_logging(settings)
    return create_service(settings)
