"""Concurrent single queries embedded in one forward pass (group commit, no extra thread).

A search process embeds one query per request, and a model can run one forward pass at a time
(torch modules are not safe to call from two threads at once), so under concurrent load queries
queued one behind the other. Here each caller adds its text to a shared list and takes the
model's lock; whoever gets the lock embeds *everything* pending in one batch and hands each
caller its row; a caller whose row is already there returns at once. Alone, a query is embedded
as before (no waiting for company); under load the batch grows with the queue, and one pass over
eight short queries costs far less than eight passes (BENCHMARKS.md, "Query batching").
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

#: The most queries embedded in one pass: bounds the pass's time (and so the first caller's wait).
MAX_BATCH = 64


@dataclass
class _Slot:
    text: str
    vector: np.ndarray | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class QueryBatcher:
    """Embeds single texts through ``encode`` (a list of texts -> one row per text), batching the
    callers that arrive while a pass runs. ``lock`` is the model's own: documents and queries
    never run at once."""

    def __init__(self, encode: Callable[[list[str]], np.ndarray], lock: threading.Lock) -> None:
        self._encode = encode
        self._lock = lock
        self._pending: list[_Slot] = []
        self._pending_lock = threading.Lock()
        self.passes = 0  # forward passes run (a test reads it)

    def embed(self, text: str) -> np.ndarray:
        slot = _Slot(text)
        with self._pending_lock:
            self._pending.append(slot)
        while not slot.done.is_set():
            with self._lock:
                if slot.done.is_set():  # an earlier holder embedded it with its batch
                    break
                with self._pending_lock:
                    batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                self.passes += 1
                try:
                    vectors = self._encode([s.text for s in batch])
                except BaseException as exc:  # every caller of the batch gets the error, not a hang
                    for s in batch:
                        s.error = exc
                        s.done.set()
                    raise
                for s, vector in zip(batch, vectors, strict=True):
                    s.vector = vector
                    s.done.set()
        if slot.error is not None:
            raise slot.error
        assert slot.vector is not None
        return slot.vector
