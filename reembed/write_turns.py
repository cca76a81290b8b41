"""Turns at a Chroma server's writes, shared by every worker through Redis.

A single-node Chroma server applies writes one at a time: every collection's metadata and text
live in one SQLite database, and each write first re-reads the log and then updates the HNSW
graph under the collection's lock. Two workers that write at once both wait about twice as long,
and together take no more than one writer does; measured, they took less (BENCHMARKS.md, "At
Chroma's ceiling"). So a worker asks for a turn before it writes: at most
``REEMBED_CHROMA_WRITERS`` writes per server are in flight across all workers, and a worker
waiting for its turn has its writer thread wait, not its model (``worker.embedding``).

A turn is a courtesy, never a condition: a turn held by a worker that died lapses after
``HOLD_S``, and when Redis cannot be asked the write goes ahead without one.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import time
from collections.abc import Callable, Iterator

import redis
import structlog

log = structlog.get_logger(__name__)

#: A turn lapses after this long even if never given back (its worker was killed mid-write):
#: what the other workers wait at most for a dead one. Longer than a write takes (5 s for 2,048
#: documents into a server holding 2M on 2 cores); a write that outlasts it only lets a second
#: one in beside it.
HOLD_S = 30.0
#: How often a waiting worker asks again, at first and at most.
POLL_S = (0.002, 0.02)

# KEYS: the turn's key. ARGV: the holder's token. Gives the turn back only if still held by it.
_GIVE_BACK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def server_key(server: str) -> str:
    """The Redis key prefix of ``server``'s turns: a digest, so no URL or credential is stored."""
    return "reembed:chroma-turn:" + hashlib.sha256(server.rstrip("/").encode()).hexdigest()[:16]


class WriteTurns:
    """At most ``slots`` writes in flight to one Chroma server; 0 slots: no turns taken."""

    def __init__(self, client: redis.Redis, server: str, slots: int,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.client, self.slots = client, slots
        self.keys = [f"{server_key(server)}:{i}" for i in range(slots)]
        self._give_back = client.register_script(_GIVE_BACK)
        self._sleep = sleep

    def _take(self, token: str) -> str | None:
        for key in self.keys:
            if self.client.set(key, token, nx=True, px=int(HOLD_S * 1000)):
                return key
        return None

    @contextlib.contextmanager
    def turn(self) -> Iterator[float]:
        """Wait for a turn, hold it for the block; yields the seconds waited."""
        if not self.slots:
            yield 0.0
            return
        started, token, pause, key = time.perf_counter(), secrets.token_hex(8), POLL_S[0], None
        try:
            while (key := self._take(token)) is None:
                self._sleep(pause)
                pause = min(pause * 2, POLL_S[1])
        except redis.RedisError as exc:
            log.warning("turns at Chroma's writes unavailable; writing without one", error=type(exc).__name__)
            key = None
        try:
            yield time.perf_counter() - started
        finally:
            if key is not None:
                with contextlib.suppress(redis.RedisError):  # it lapses by itself after HOLD_S
                    self._give_back(keys=[key], args=[token])
