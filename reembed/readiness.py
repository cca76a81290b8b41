"""Which collections each search process has prepared: published by search, read before a switch.

A collection is *prepared* in a search process when its BM25 index is in memory and its model is
loaded and has embedded a query: answering from it costs a query nothing extra. Each search
process publishes the set it holds every ``INDEX_REFRESH_S`` under its own key with a time to
live, so a process that died drops out by itself. A cutover or a canary reads these keys and can
wait (bounded) until every live search process holds the collection it is about to serve; a
process that is still not ready when the switch happens keeps answering from the collection it
holds (``search.searcher``), so the switch never makes a query wait for a build.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterable

import redis

from reembed.progress import PREFIX

#: Seconds a process's published set stays without a refresh before it counts as gone.
READY_TTL_S = 15
POLL_S = 0.25


def _key(process: str) -> str:
    return f"{PREFIX}:search:ready:{process}"


def process_id() -> str:
    """A search server's name in the readiness keys: host, pid, and a suffix (one process may
    hold several apps, as the tests do)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def publish(client: redis.Redis, process: str, prepared: Iterable[str], ttl_s: float = READY_TTL_S) -> None:
    """Replace ``process``'s published set of prepared collections (expires after ``ttl_s``)."""
    value = json.dumps({"collections": sorted(prepared), "at": time.time()})
    client.set(_key(process), value, ex=max(1, round(ttl_s)))


def withdraw(client: redis.Redis, process: str) -> None:
    """A process that stops serving removes itself at once (instead of after its TTL)."""
    client.delete(_key(process))


def processes(client: redis.Redis) -> dict[str, set[str]]:
    """Every live search process and the collections it has prepared."""
    found: dict[str, set[str]] = {}
    prefix = _key("")
    for key in client.scan_iter(match=prefix + "*", count=500):
        name = key.decode() if isinstance(key, bytes) else str(key)
        raw = client.get(name)
        if raw is None:  # expired between the scan and the read
            continue
        found[name[len(prefix):]] = set(json.loads(raw).get("collections", []))
    return found


def not_ready(client: redis.Redis, collection: str) -> list[str]:
    """The live search processes that have not prepared ``collection``."""
    return sorted(p for p, prepared in processes(client).items() if collection not in prepared)


def wait_until_ready(client: redis.Redis, collection: str, timeout_s: float) -> list[str]:
    """Wait up to ``timeout_s`` for every live search process to prepare ``collection``.

    Returns:
        The processes still not ready (empty when all are, or when no search process runs).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        waiting = not_ready(client, collection)
        if not waiting or time.monotonic() >= deadline:
            return waiting
        time.sleep(POLL_S)
