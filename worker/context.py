"""Per-process connections of a worker, opened lazily after the pool forks."""

from __future__ import annotations

import contextlib
import functools

import redis

from reembed.errors import ReembedError
from reembed.models import LoadedModel, load_configured
from reembed.progress import redis_client
from reembed.registry import Registry
from reembed.settings import Settings
from reembed.store import Store
from reembed.write_turns import WriteTurns


@functools.cache
def settings() -> Settings:
    return Settings.from_env()


@functools.cache
def store() -> Store:
    return Store.from_settings(settings())


@functools.cache
def registry() -> Registry:
    return Registry(store())


@functools.cache
def redis_conn() -> redis.Redis:
    return redis_client(settings().redis_url)


@functools.cache
def write_turns() -> WriteTurns:
    """This worker's turns at its Chroma server's writes (``REEMBED_CHROMA_WRITERS``)."""
    return WriteTurns(redis_conn(), store().url, settings().chroma_writers)


def model(name: str) -> LoadedModel:
    """The model, loaded once per process (``load_model`` caches)."""
    return load_configured(settings(), name)


def warm() -> None:
    """Open this process's connections ahead of its first task; failures are left to that task
    (it reports them and retries)."""
    with contextlib.suppress(ReembedError, redis.RedisError):
        registry()
        write_turns()
        redis_conn().ping()


def reset() -> None:
    """Drop cached connections (after a Chroma server restart, for example)."""
    for cached in (store, registry, redis_conn, write_turns):
        cached.cache_clear()
