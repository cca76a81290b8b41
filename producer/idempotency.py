"""``Idempotency-Key`` for the control API's POSTs: a retried request gets the first answer.

A client that timed out cannot know whether its ``POST .../migrations`` started one; it sends
the same request again with the same key, and must neither start a second migration nor get a
different answer. The first request with a key claims it in Redis (``SET NX``) and runs; the
answer (status and body) is kept for ``TTL_S``. A request with a claimed key waits for that
answer and returns it, so ten identical requests at once start one migration. A key reused
for another request (method, path or body differ) is refused with 422. An answer of 5xx
(Redis or Chroma down) is not kept: the retry runs again, as the client wants.

The key is hashed before it becomes part of a Redis key: a client may put anything in it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import redis

from reembed.errors import InputError, QueueUnavailableError
from reembed.progress import PREFIX

TTL_S = 24 * 3600
#: How long a request waits for the first one with its key (that one may plan a migration).
WAIT_S = 120.0
_PENDING = "pending"

Answer = tuple[int, Any]


def request_fingerprint(method: str, path: str, body: Any) -> str:
    return hashlib.sha256(json.dumps([method, path, body], sort_keys=True).encode()).hexdigest()


class Idempotency:
    def __init__(self, client: redis.Redis, ttl_s: int = TTL_S, wait_s: float = WAIT_S) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.wait_s = wait_s

    def run(self, key: str | None, fingerprint: str, call: Callable[[], Answer]) -> Answer:
        """``call()``'s answer, or the one the first request with ``key`` got.

        Raises:
            InputError: ``key`` was used for another request.
            QueueUnavailableError: Redis is unreachable, or the first request never answered.
        """
        if not key:
            return call()
        if len(key) > 255:
            raise InputError("Idempotency-Key is longer than 255 characters; use a UUID")
        slot = f"{PREFIX}:idempotency:{hashlib.sha256(key.encode()).hexdigest()}"
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                claimed = self.client.set(slot, json.dumps({"request": fingerprint, "state": _PENDING}),
                                          nx=True, ex=self.ttl_s)
                stored = None if claimed else self.client.get(slot)
            except redis.RedisError as exc:
                raise QueueUnavailableError(f"Redis is unreachable for the Idempotency-Key: {exc}") from exc
            if claimed:
                return self._first(slot, fingerprint, call)
            if stored is None:  # the first one gave up (5xx): claim it now
                continue
            kept = json.loads(stored)
            if kept["request"] != fingerprint:
                raise InputError("this Idempotency-Key was used for another request (method, path or body "
                                 "differ); use a new key for a new request")
            if kept["state"] != _PENDING:
                return int(kept["status"]), kept["body"]
            if time.monotonic() > deadline:
                raise QueueUnavailableError(f"the first request with this Idempotency-Key has not answered in "
                                            f"{self.wait_s:.0f} s; retry later with the same key")
            time.sleep(0.05)

    def _first(self, slot: str, fingerprint: str, call: Callable[[], Answer]) -> Answer:
        try:
            status, body = call()
        except BaseException:
            self.client.delete(slot)  # nothing answered: a retry runs anew
            raise
        if status >= 500:
            self.client.delete(slot)
        else:
            self.client.set(slot, json.dumps({"request": fingerprint, "state": "done", "status": status,
                                              "body": body}), ex=self.ttl_s)
        return status, body
