"""The HTTP search service (FastAPI; OpenAPI at ``/docs``).

Status codes: 422 bad input (empty query, k out of range, unknown mode, a malformed filter: the
message names the bad part), 404 unknown alias,
409 model mismatch, 503 Chroma or Redis unreachable (with the reason), 401 missing or wrong API
key. Endpoints are plain ``def``: FastAPI runs them on its thread pool, since embedding a query
and asking Chroma block.

Start-up loads every alias's BM25 index (building it the first time) and model before the
first request is accepted; a background thread then keeps indexes fresh and prepares the target
of a migration about to be cut over.

Several processes (``reembed serve --workers N``, uvicorn's own supervisor and shared socket):
each runs ``cli.service.service_from_environment``, maps the BM25 indexes one of them published (one copy in the
page cache), publishes its own readiness, and counts in Prometheus's multiprocess files so that
any process's ``/metrics`` sums the counters of all of them.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any, Protocol

import redis
import structlog
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reembed import readiness
from reembed.errors import QueueUnavailableError, ReembedError
from reembed.filters import parse_json_filter
from reembed.settings import Settings
from reembed.status import alias_summary, migration_status
from search.admission import Admission
from reembed.access import Forbidden, Keys, Unauthorised
from reembed.http_errors import error_body, status_for
from search.prometheus import SearchMetrics, StateCollector
from search.results import Mode, SearchResponse
from search.searcher import MAX_K, MAX_QUERY_CHARS, Searcher

log = structlog.get_logger(__name__)

#: Queries in one POST /search: bounds the work one request can ask for.
MAX_BATCH_QUERIES = 100

#: The largest request body accepted: a full batch of the longest queries, UTF-8, with room for JSON.
MAX_BODY_BYTES = MAX_BATCH_QUERIES * MAX_QUERY_CHARS * 4 + 64 * 1024

WHERE_HELP = ("metadata filter in Chroma's syntax ({key: value}, $eq $ne $gt $gte $lt $lte $in $nin, "
              "$and $or), applied to both retrievers: every hit passes it")
WHERE_DOCUMENT_HELP = "text filter in Chroma's syntax ($contains, $not_contains, $and, $or), case-sensitive"

FUSION_HELP = ("how hybrid fuses BM25 and semantic for this query: convex[:W] or rrf[:W[:K]], W the semantic "
               "share (default: what the alias carries for the answering model)")
QueryText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_QUERY_CHARS)]


class SearchRequest(BaseModel):
    # A field this API does not know is refused (422), never ignored: a client that sends a filter
    # the service does not apply must not get unfiltered hits back as if it had.
    model_config = ConfigDict(extra="forbid")

    alias: str = Field(min_length=1, max_length=512)
    q: QueryText | Annotated[list[QueryText], Field(min_length=1, max_length=MAX_BATCH_QUERIES)] = Field(
        description=f"one query, or up to {MAX_BATCH_QUERIES} queries")
    k: int = Field(10, ge=1, le=MAX_K)
    mode: Mode = "hybrid"
    key: str | None = Field(None, max_length=256, description="client key for canary routing")
    where: dict[str, Any] | None = Field(None, description=WHERE_HELP, examples=[{"year": {"$gte": 2020}}])
    where_document: dict[str, Any] | None = Field(None, description=WHERE_DOCUMENT_HELP,
                                                  examples=[{"$contains": "protein"}])
    fusion: str | None = Field(None, max_length=64, description=FUSION_HELP, examples=["convex:0.7"])


class BatchSearchResponse(BaseModel):
    responses: list[SearchResponse]


#: The query parameters GET /search knows; any other is a 422 (see ``SearchRequest``).
GET_SEARCH_PARAMS = frozenset({"alias", "q", "k", "mode", "key", "where", "where_document", "fusion"})


def known_params(request: Request) -> None:
    """Refuse query parameters GET /search does not know, as POST refuses unknown fields."""
    unknown = sorted(set(request.query_params) - GET_SEARCH_PARAMS)
    if unknown:
        raise RequestValidationError([{"type": "extra_forbidden", "loc": ("query", name),
                                       "msg": "Extra inputs are not permitted", "input": request.query_params[name]}
                                      for name in unknown])


#: Set by ``reembed serve --workers N`` before the processes start: prometheus_client then keeps
#: counters in files there (it reads the variable when it is first imported).
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Extension(Protocol):
    """Routes served beside search, behind the same keys, closed when the server stops (the
    control API, ``producer.control_http``: search itself never imports the control plane)."""

    def router(self, keys: Keys) -> APIRouter: ...

    def close(self) -> None: ...


def create_app(settings: Settings, searcher: Searcher | None = None,
               extensions: Sequence[Extension] = ()) -> FastAPI:
    """The app. Pass a ``searcher`` to share one (tests); otherwise one is made at start-up."""
    state: dict[str, Any] = {"searcher": searcher, "warm_errors": {}}
    stop = threading.Event()
    prometheus = CollectorRegistry()
    metrics = SearchMetrics(prometheus)
    scraped = prometheus
    if os.environ.get(MULTIPROCESS_ENV):  # several processes: counters from every one's files
        scraped = CollectorRegistry()
        MultiProcessCollector(scraped)  # type: ignore[no-untyped-call]
    scraped.register(StateCollector(lambda: state["searcher"]))

    process = readiness.process_id()

    def upkeep(starting: bool = False) -> None:
        """Warm and prepare (``Searcher.warm``), then tell cutovers what this process holds."""
        searcher: Searcher = state["searcher"]
        try:
            state["warm_errors"] = searcher.warm(wait=starting)
        except ReembedError as exc:  # Chroma down: keep serving from memory
            state["warm_errors"] = {"*": str(exc)}
        if searcher.redis is not None:
            with contextlib.suppress(ReembedError, redis.RedisError):  # Redis is not on the query path
                readiness.publish(searcher.redis, process, searcher.prepared(),
                                  max(readiness.READY_TTL_S, 3 * settings.index_refresh_s))

    def keep_fresh() -> None:
        while not stop.wait(settings.index_refresh_s):
            upkeep()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state["searcher"] is None:
            state["searcher"] = Searcher(settings)
        upkeep(starting=True)
        thread = threading.Thread(target=keep_fresh, name="search-upkeep", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)
            if state["searcher"].redis is not None:
                with contextlib.suppress(ReembedError, redis.RedisError):
                    readiness.withdraw(state["searcher"].redis, process)
            if searcher is None:
                state["searcher"].close()
            for extension in extensions:
                extension.close()

    app = FastAPI(title="reembed search", version="1", lifespan=lifespan,
                  description="Hybrid BM25 + semantic search by alias, always served by the alias's live "
                              "collection with that collection's own embedding model.")
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    app.add_middleware(Admission, limit=settings.search_max_in_flight, on_refused=metrics.refused.inc)

    keys = Keys(settings)
    authorise = keys.read
    for extension in extensions:
        app.include_router(extension.router(keys))

    @app.exception_handler(ReembedError)
    async def reembed_error(request: Request, exc: ReembedError) -> JSONResponse:
        code = status_for(exc)
        if code == 500:
            log.error("search failed", error=str(exc), path=request.url.path)
        return JSONResponse(error_body(exc), status_code=code)

    @app.exception_handler(Unauthorised)
    async def unauthorised(request: Request, exc: Unauthorised) -> JSONResponse:
        return JSONResponse({"detail": "missing or wrong API key: send Authorization: Bearer <REEMBED_API_KEY> "
                             "(or <REEMBED_ADMIN_KEY>)"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, exc: Forbidden) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=403)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Never echo the input back: it may be a whole document.
        errors = [{"loc": e.get("loc"), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    def _searcher() -> Searcher:
        searcher: Searcher = state["searcher"]
        return searcher

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        """Liveness and what is loaded; 200 while the process can answer keyword queries. ``ready``:
        per alias, whether its live collection, its canary, the next target (a migration being
        verified or waiting for its cutover) and the previous collection (what a rollback serves)
        are prepared here (index in memory, model warmed)."""
        searcher = _searcher()
        loaded = searcher.indexes.loaded()
        return {"status": "ok", "process": process, "indexes": {name: len(index) for name, index in loaded.items()},
                "prepared": sorted(searcher.prepared()), "ready": searcher.readiness, "problems": state["warm_errors"]}

    @app.get("/search", response_model=SearchResponse, dependencies=[Depends(authorise), Depends(known_params)])
    def search_get(
        alias: Annotated[str, Query(min_length=1, max_length=512)],
        q: Annotated[str, Query(min_length=1, max_length=MAX_QUERY_CHARS)],
        k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
        mode: Mode = "hybrid",
        key: Annotated[str | None, Query(max_length=256, description="client key for canary routing")] = None,
        where: Annotated[str | None, Query(max_length=64 * 1024, description=WHERE_HELP + " (JSON)")] = None,
        where_document: Annotated[str | None, Query(max_length=64 * 1024,
                                                    description=WHERE_DOCUMENT_HELP + " (JSON)")] = None,
        fusion: Annotated[str | None, Query(max_length=64, description=FUSION_HELP)] = None,
    ) -> SearchResponse:
        metadata = parse_json_filter(where, "where")
        text = parse_json_filter(where_document, "where_document")
        return observed(mode, lambda: _searcher().search(alias, q, k, mode, client_key=key, where=metadata,
                                                         where_document=text, fusion=fusion))

    @app.post("/search", response_model=SearchResponse | BatchSearchResponse, dependencies=[Depends(authorise)])
    def search_post(body: SearchRequest) -> SearchResponse | BatchSearchResponse:
        def one(query: str) -> SearchResponse:
            return observed(body.mode, lambda: _searcher().search(body.alias, query, body.k, body.mode,
                                                                  client_key=body.key, where=body.where,
                                                                  where_document=body.where_document,
                                                                  fusion=body.fusion))
        if isinstance(body.q, str):
            return one(body.q)
        return BatchSearchResponse(responses=[one(q) for q in body.q])

    def observed(mode: str, answer: Callable[[], SearchResponse]) -> SearchResponse:
        """Count and time one query by requested mode, answering mode and status."""
        started = time.perf_counter()
        try:
            response: SearchResponse = answer()
        except ReembedError as exc:
            metrics.observe(mode, "none", status_for(exc), time.perf_counter() - started)
            raise
        metrics.observe(mode, response.mode, 200, time.perf_counter() - started)
        return response

    @app.get("/metrics", include_in_schema=False, dependencies=[Depends(authorise)])
    def prometheus_metrics() -> Response:
        """Prometheus text format: query counts and latency, live collection per alias, BM25 index
        age, and the progress, rate and ETA of running migrations. Behind the API key like every
        other endpoint but /healthz (Prometheus sends it with `authorization: credentials`)."""
        return Response(generate_latest(scraped), media_type=CONTENT_TYPE_LATEST)

    @app.get("/aliases", dependencies=[Depends(authorise)])
    def aliases() -> dict[str, Any]:
        """Every alias with its live collection, model, document count and any running migration."""
        searcher = _searcher()
        rows = []
        for alias in searcher.registry.aliases():
            index = searcher.indexes.current(alias.live_collection)
            row: dict[str, Any] = {
                **alias_summary(searcher.registry, alias), "documents": searcher.store.count(alias.live_collection),
                "bm25_index": {"documents": len(index), "built_at": index.built_at} if index else None,
                "migration": None,
            }
            latest = searcher.registry.latest_migration(alias.alias)
            if latest is not None and latest.kind == "migrate":
                if searcher.redis is None:
                    raise QueueUnavailableError("no REEMBED_REDIS_URL: migration progress cannot be read")
                row["migration"] = migration_status(searcher.redis, latest)
            rows.append(row)
        return {"aliases": rows}

    return app


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` (413) before anything parses them, whether the
    client declares a Content-Length or streams chunks: no request can make the service
    allocate without limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send)
            return
        seen = 0
        started = False

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        response = JSONResponse({"detail": f"request body over {self.max_bytes} bytes; send fewer or shorter "
                                           "queries"}, status_code=413)
        await response(scope={"type": "http"}, receive=_no_body, send=send)


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}
