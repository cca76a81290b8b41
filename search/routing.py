"""Which collection answers a query: the live one, or the canary for a stable share of callers.

The share is decided by a hash of a client key (when the caller gives one) or of the query
text, so one caller (or one query) always lands on the same side while the percentage is
unchanged, and raising the percentage only moves callers from live to canary, never back.
"""

from __future__ import annotations

import hashlib

from reembed.registry import AliasRecord

#: Buckets of the hash: the canary share has a resolution of 0.01 %.
BUCKETS = 10_000


def bucket(key: str) -> int:
    """A stable bucket in ``[0, BUCKETS)`` for ``key`` (sha256, not Python's salted hash)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % BUCKETS


def choose_collection(alias: AliasRecord, query: str, client_key: str | None = None) -> tuple[str, bool]:
    """(collection to serve from, whether it is the canary)."""
    canary = alias.canary
    if canary is None:
        return alias.live_collection, False
    if bucket(client_key if client_key else query) < canary.percent / 100 * BUCKETS:
        return canary.collection, True
    return alias.live_collection, False
