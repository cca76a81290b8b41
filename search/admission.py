"""A bound on the queries one search process holds at once: past it, 503 with ``Retry-After``.

Why: a process answers a bounded number of queries per second (its model embeds one query at a
time per thread). Queries beyond that wait in the server's thread pool, and with an open-loop
caller the wait grows without bound, so every caller times out instead of a few being told to
retry. Refusing at once keeps the latency of the admitted queries where it was, tells the caller
(and a load balancer) to go elsewhere or back off, and costs the refused caller one round trip.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

#: Seconds a refused caller is told to wait: about the time a saturated process needs to drain.
RETRY_AFTER_S = 1


class Admission:
    """ASGI middleware: at most ``limit`` requests to ``paths`` in flight; the next is answered 503."""

    def __init__(self, app: ASGIApp, limit: int, on_refused: Callable[[], object] = lambda: None,
                 paths: frozenset[str] = frozenset({"/search"})) -> None:
        self.app = app
        self.limit = limit
        self.on_refused = on_refused  # counts refusals in /metrics
        self.paths = paths
        self._in_flight = 0
        self._lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        with self._lock:
            admitted = self._in_flight < self.limit
            if admitted:
                self._in_flight += 1
        if not admitted:
            self.on_refused()
            response = JSONResponse(
                {"detail": f"this search process is answering {self.limit} queries already "
                           f"(REEMBED_SEARCH_MAX_IN_FLIGHT); retry after {RETRY_AFTER_S} s or on another process"},
                status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
            await response(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            with self._lock:
                self._in_flight -= 1
