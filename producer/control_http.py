"""The HTTP control API: what ``reembed`` commands do, for services that do not import reembed.

Every route calls the same :class:`producer.ControlPlane` the CLI and the Celery task use, so
validation, rules and error messages are one implementation; errors map to status codes in
``reembed.http_errors`` (404 unknown, 409 state conflict, 422 bad input, 503 a service down).
State-changing routes need the admin key, reads the read key (``reembed.access``). Every POST
honours ``Idempotency-Key`` (``producer.idempotency``). Long work (plan, evaluate, feeding an
ingest's file, resuming one) is accepted with 202 and a job to poll at ``GET /jobs/{id}``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import redis
import structlog
from fastapi import APIRouter, Depends, Header, Path as PathParam, Query
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from producer.control import ControlPlane
from producer.idempotency import Answer, Idempotency, request_fingerprint
from producer.jobs import Jobs
from reembed import events
from reembed.access import Keys
from reembed.errors import QueueUnavailableError, ReembedError
from reembed.http_errors import error_body, status_for
from reembed.settings import Settings

log = structlog.get_logger(__name__)

ALIAS = Annotated[str, PathParam(min_length=1, max_length=128)]
MIGRATION = Annotated[str, PathParam(min_length=1, max_length=64)]
IDEMPOTENCY_KEY = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255,
                                               description="Retries with this key get the first answer.")]
_BATCH = Field(None, ge=1, le=2048, description="Documents per batch (default REEMBED_BATCH_SIZE).")
_MAX_COST = Field(None, ge=0, description="A model behind an API: pause before the spend passes this.")


class ErrorBody(BaseModel):
    detail: str = Field(description="What went wrong, naming the thing and the fix.")
    error: str = Field(description="The error's class, e.g. MigrationStateError.")


ERRORS = {401: "No key, or an unknown one", 403: "A read key on a change, or the control API is off",
          404: "No such alias, migration or job", 409: "The state does not allow it",
          422: "Bad input (named)", 503: "Redis or Chroma unreachable, or no worker: retry"}


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MigrateBody(Body):
    to_model: str | None = Field(None, min_length=1, max_length=512, examples=["all-mpnet-base-v2"],
                                 description="Required unless `dimensions` cuts the live model.")
    dimensions: int | None = Field(None, ge=1, le=65536, description=(
        "To `to_model` (default: the live model) cut to this size: a model declared `matryoshka = true`. "
        "Its stored vectors are cut instead of embedded when they are that model's."))
    re_embed: bool = Field(False, description="Embed every document even where the stored vectors could be cut.")
    batch_size: int | None = _BATCH
    cutover: Literal["auto", "manual"] = "auto"
    skip_missing_text: bool = False
    max_cost: float | None = _MAX_COST
    webhook_url: str | None = Field(None, max_length=2048, description="POST this migration's events here.")


class WebhookBody(Body):
    url: str = Field(min_length=1, max_length=2048, examples=["https://hooks.example.com/reembed"])


class IngestBody(Body):
    file: str = Field(min_length=1, max_length=4096, description="A BEIR or JSONL file the server can read.")
    model: str = Field(min_length=1, max_length=512)
    batch_size: int | None = _BATCH
    skip_missing_text: bool = False
    max_cost: float | None = _MAX_COST


class ResumeBody(Body):
    max_cost: float | None = _MAX_COST


class CutoverBody(Body):
    search_wait_s: float | None = Field(None, ge=0, le=3600, description="Default REEMBED_CUTOVER_WAIT_S.")


class CanaryBody(Body):
    percent: float = Field(ge=0, le=100)
    fuse: bool = False


class RetireBody(Body):
    also_previous: str | None = Field(None, max_length=512, description="The previous collection, named exactly.")


class PlanBody(Body):
    to_model: str = Field(min_length=1, max_length=512)
    workers: int = Field(1, ge=1, le=1024)
    sample: int = Field(200, ge=1, le=100_000)


class EvaluateBody(Body):
    to_model: str = Field(min_length=1, max_length=512)
    queries_file: str | None = Field(None, max_length=4096)
    qrels_file: str | None = Field(None, max_length=4096)
    sample: int | None = Field(None, ge=1)
    k: int = Field(10, ge=1, le=1000)
    compare: Literal["semantic", "hybrid"] = "semantic"
    apply_fusion: bool = False


class Control:
    """One per server process: the control plane, jobs and idempotency, made on first use. An
    extension of the search app (``search.api.Extension``): ``router`` and ``close``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._plane: ControlPlane | None = None
        self._jobs: Jobs | None = None
        self._lock = threading.Lock()

    @property
    def plane(self) -> ControlPlane:
        with self._lock:
            if self._plane is None:
                self._plane = ControlPlane(self.settings)
            return self._plane

    @property
    def jobs(self) -> Jobs:
        plane = self.plane
        with self._lock:
            if self._jobs is None:
                self._jobs = Jobs(plane.redis, status_for)
            return self._jobs

    def answer(self, method: str, path: str, body: Any, key: str | None, action: Callable[[], Answer]) -> JSONResponse:
        """Run ``action`` once per ``key``; a ReembedError becomes its status and message."""
        def guarded() -> Answer:
            try:
                status, content = action()
                return status, jsonable_encoder(content)  # kept as JSON by the idempotency layer
            except ReembedError as exc:
                if status_for(exc) == 500:
                    log.error("control request failed", path=path, error=str(exc))
                return status_for(exc), error_body(exc)
        try:
            status, content = Idempotency(self.plane.redis).run(key, request_fingerprint(method, path, body), guarded)
        except ReembedError as exc:
            status, content = status_for(exc), error_body(exc)
        return JSONResponse(content, status_code=status)

    def close(self) -> None:
        if self._jobs is not None:
            self._jobs.close()

    def router(self, keys: Keys) -> APIRouter:
        return control_router(self, keys)


def control_router(control: Control, keys: Keys) -> APIRouter:
    admin = [Depends(keys.admin)]
    read = [Depends(keys.read)]
    router = APIRouter(tags=["control"])

    def post(path: str, summary: str, accepted: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return router.post(path, dependencies=admin, summary=summary, status_code=202 if accepted else 200,
                           responses={code: {"model": ErrorBody, "description": why} for code, why in ERRORS.items()})

    @post("/aliases/{alias}/migrations", "Start a migration of ALIAS to another model (202)", accepted=True)
    def migrate(alias: ALIAS, body: MigrateBody, idempotency_key: IDEMPOTENCY_KEY = None) -> JSONResponse:
        def run() -> Answer:
            record = control.plane.migrate(alias, body.to_model, body.batch_size, body.cutover,
                                           body.skip_missing_text, body.max_cost, body.webhook_url,
                                           dimensions=body.dimensions, re_embed=body.re_embed)
            return 202, control.plane.migration_status(record)
        return control.answer("POST", f"/aliases/{alias}/migrations", body.model_dump(), idempotency_key, run)

    @post("/aliases/{alias}/ingests", "Create ALIAS from a corpus file the server can read (202; a job feeds it)", accepted=True)
    def ingest(alias: ALIAS, body: IngestBody, idempotency_key: IDEMPOTENCY_KEY = None) -> JSONResponse:
        def run() -> Answer:
            plane, file = control.plane, Path(body.file)
            record = plane.begin_ingest(alias, file, body.model, body.batch_size, body.skip_missing_text,
                                        body.max_cost)
            job = control.jobs.submit("ingest", {"migration_id": record.id, "file": body.file},
                                      lambda: plane.feed_file(record, file))
            return 202, {**plane.migration_status(record), "job": job}
        return control.answer("POST", f"/aliases/{alias}/ingests", body.model_dump(), idempotency_key, run)

    @router.get("/migrations/{migration_id}", dependencies=read, summary="A migration's exact progress")
    def get_migration(migration_id: MIGRATION) -> dict[str, Any]:
        return control.plane.status(migration_id)

    @router.get("/aliases/{alias}/history", dependencies=read, summary="Every migration of ALIAS, newest first")
    def history(alias: ALIAS) -> dict[str, Any]:
        return control.plane.history(alias)

    @post("/migrations/{migration_id}/pause", "Pause a running migration")
    def pause(migration_id: MIGRATION, idempotency_key: IDEMPOTENCY_KEY = None) -> JSONResponse:
        return control.answer("POST", f"/migrations/{migration_id}/pause", None, idempotency_key,
                              lambda: (200, control.plane.pause(migration_id)))

    @post("/migrations/{migration_id}/resume", "Resume a paused or failed migration (an ingest: 202, a job)")
    def resume(migration_id: MIGRATION, body: ResumeBody | None = None,
               idempotency_key: IDEMPOTENCY_KEY = None) -> JSONResponse:
        max_cost = body.max_cost if body else None

        def run() -> Answer:
            plane = control.plane
            if plane.registry.get_migration(migration_id).kind == "ingest":  # feeds its file: long
                job = control.jobs.submit("resume", {"migration_id": migration_id},
                                          lambda: plane.resume(migration_id, max_cost=max_cost))
                return 202, {"migration_id": migration_id, "job": job}
            return 200, plane.resume(migration_id, max_cost=max_cost)
        return control.answer("POST", f"/migrations/{migration_id}/resume", body.model_dump() if body else None,
                              idempotency_key, run)

    @post("/migrations/{migration_id}/cancel", "Cancel a migration and delete its partial target")
    def cancel(migration_id: MIGRATION, idempotency_key: IDEMPOTENCY_KEY = None) -> JSONResponse:
        return control.answer("POST", f"/migrations/{migration_id}/cancel", None, idempotency_key,
                              lambda: (200, control.plane.cancel(migration_id)))

    @post("/aliases/{alias}/cutover", "Point ALIAS at its complete migration's target")
    def cutover(alias: ALIAS, body: CutoverBody | None = None, idempotency_key: IDEMPOTENCY_KEY = None) -> JSONResponse:
        wait = body.search_wait_s if body else None
        return control.answer("POST", f"/aliases/{alias}/cutover", body.model_dump() if body else None,
                              idempotency_key, lambda: (200, control.plane.cutover(alias, wait)))

    @post("/aliases/{alias}/rollback", "Point ALIAS back at its previous collection")
    def rollback(alias: ALIAS, idempotency_key: IDEMPOTENCY_KEY = None) -> JSONResponse:
        return control.answer("POST", f"/aliases/{alias}/rollback", None, idempotency_key,
                              lambda: (200, control.plane.rollback(alias)))

    @post("/aliases/{alias}/canary", "Serve a share of ALIAS's queries from its migration's target (0 ends it)")
    def canary(alias: ALIAS, body: CanaryBody, idempotency_key: IDEMPOTENCY_KEY = None) -> JSONResponse:
        return control.answer("POST", f"/aliases/{alias}/canary", body.model_dump(), idempotency_key,
                              lambda: (200, control.plane.canary(alias, body.percent, body.fuse)))

    @post("/aliases/{alias}/retire", "Delete ALIAS's collections that nothing serves or can roll back to")
    def retire(alias: ALIAS, body: RetireBody | None = None, idempotency_key: IDEMPOTENCY_KEY = None) -> JSONResponse:
        also = body.also_previous if body else None
        return control.answer("POST", f"/aliases/{alias}/retire", body.model_dump() if body else None,
                              idempotency_key, lambda: (200, control.plane.retire(alias, also)))

    @post("/aliases/{alias}/plans", "Plan a migration: time, cost, space (202, a job)", accepted=True)
    def plan(alias: ALIAS, body: PlanBody, idempotency_key: IDEMPOTENCY_KEY = None) -> JSONResponse:
        from producer.plan import plan as make_plan

        def run() -> Answer:
            control.plane.registry.get_alias(alias)  # 404 now rather than in the job
            return 202, control.jobs.submit("plan", {"alias": alias, **body.model_dump()}, lambda: make_plan(
                control.settings, alias, body.to_model, body.workers, body.sample))
        return control.answer("POST", f"/aliases/{alias}/plans", body.model_dump(), idempotency_key, run)

    @post("/aliases/{alias}/evaluations", "Evaluate the live model against another (202, a job)", accepted=True)
    def evaluate(alias: ALIAS, body: EvaluateBody, idempotency_key: IDEMPOTENCY_KEY = None) -> JSONResponse:
        from producer.evaluate import Evaluator

        def run() -> Answer:
            control.plane.registry.get_alias(alias)
            return 202, control.jobs.submit("evaluate", {"alias": alias, **body.model_dump()}, lambda: Evaluator(
                control.settings, on_workers=True).run(
                    alias, body.to_model, Path(body.queries_file) if body.queries_file else None,
                    Path(body.qrels_file) if body.qrels_file else None, body.sample, body.k,
                    compare=body.compare, apply_fusion=body.apply_fusion))
        return control.answer("POST", f"/aliases/{alias}/evaluations", body.model_dump(), idempotency_key, run)

    @router.get("/aliases/{alias}/webhook", dependencies=read, summary="Where ALIAS's migration events go")
    def get_webhook(alias: ALIAS) -> dict[str, Any]:
        return control.plane.webhook(alias)

    @router.put("/aliases/{alias}/webhook", dependencies=admin, summary="Deliver ALIAS's migration events to a URL")
    def put_webhook(alias: ALIAS, body: WebhookBody) -> dict[str, Any]:
        return control.plane.set_webhook(alias, body.url)

    @router.delete("/aliases/{alias}/webhook", dependencies=admin, summary="Deliver ALIAS's events nowhere")
    def delete_webhook(alias: ALIAS) -> dict[str, Any]:
        return control.plane.set_webhook(alias, None)

    @router.get("/jobs/{job_id}", dependencies=read, summary="A plan, evaluation or ingest job: state and result")
    def job(job_id: Annotated[str, PathParam(min_length=1, max_length=64)]) -> dict[str, Any]:
        return control.jobs.get(job_id)

    @router.get("/events", dependencies=read, summary="State changes of migrations, oldest first, after an id")
    def list_events(after: Annotated[str, Query(max_length=64, pattern=r"^\d+-\d+$")] = "0-0",
                    limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
        try:
            found = events.read(control.plane.redis, after, limit)
        except redis.RedisError as exc:
            raise QueueUnavailableError(f"Redis could not list the events: {exc}") from exc
        return {"events": [e.to_json() for e in found], "last_id": found[-1].id if found else after}

    return router
