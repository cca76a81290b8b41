"""Long work the control API accepts with 202 and a job to poll: plan, evaluate, feeding an ingest.

A job runs on a thread of the server process that accepted it, one at a time per process
(plans and evaluations load models and read whole collections), and its state lives in Redis
so that any server process answers ``GET /jobs/{id}``. A job whose process died says so:
each running job refreshes a heartbeat, and one not refreshed for ``STALE_S`` is ``lost``.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
import structlog

from reembed.errors import JobNotFoundError, QueueUnavailableError, ReembedError
from reembed.progress import PREFIX

log = structlog.get_logger(__name__)

TTL_S = 7 * 24 * 3600
HEARTBEAT_S = 5.0
STALE_S = 30.0


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


class Jobs:
    def __init__(self, client: redis.Redis, status_for: Callable[[ReembedError], int]) -> None:
        self.client = client
        self.status_for = status_for
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="control-job")
        self._active: set[str] = set()  # queued or running here: their heartbeat is ours
        self._lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._beat, name="control-job-heartbeat", daemon=True).start()

    def submit(self, kind: str, what: dict[str, Any], work: Callable[[], Any]) -> dict[str, Any]:
        """Queue ``work``; returns the job as ``get`` shows it."""
        job_id = uuid.uuid4().hex[:12]
        job = {"job_id": job_id, "kind": kind, "request": json.dumps(what), "state": "queued",
               "created_at": repr(time.time()), "heartbeat": repr(time.time())}
        self._write(job_id, job)
        with self._lock:
            self._active.add(job_id)
        self._pool.submit(self._run, job_id, work)
        return self.get(job_id)

    def get(self, job_id: str) -> dict[str, Any]:
        """Raises JobNotFoundError (404) for an unknown or expired id."""
        try:
            raw = self.client.hgetall(job_key(job_id))
        except redis.RedisError as exc:
            raise QueueUnavailableError(f"Redis is unreachable reading job {job_id}: {exc}") from exc
        if not raw:
            raise JobNotFoundError(f"no job {job_id!r} (jobs are kept {TTL_S // 86400} days)")
        job = {_text(k): _text(v) for k, v in raw.items()}
        state = job["state"]
        if state in ("queued", "running") and time.time() - float(job["heartbeat"]) > STALE_S:
            state = "lost"  # its process died: submit it again
        return {"job_id": job_id, "kind": job["kind"], "state": state, "request": json.loads(job["request"]),
                "created_at": float(job["created_at"]), "finished_at": float(job["finished_at"])
                if job.get("finished_at") else None, "result": json.loads(job["result"]) if job.get("result")
                else None, "error": json.loads(job["error"]) if job.get("error") else None}

    def _run(self, job_id: str, work: Callable[[], Any]) -> None:
        self._write(job_id, {"state": "running"})
        try:
            result = work()
            ended = {"state": "done", "result": json.dumps(result, default=str)}
        except ReembedError as exc:
            ended = {"state": "failed", "error": json.dumps({"status": self.status_for(exc), "detail": str(exc),
                                                             "error": type(exc).__name__})}
        except Exception as exc:  # noqa: BLE001 - a job must end with a state, whatever went wrong
            log.exception("control job failed", job_id=job_id)
            ended = {"state": "failed", "error": json.dumps({"status": 500, "detail": str(exc),
                                                             "error": type(exc).__name__})}
        with self._lock:
            self._active.discard(job_id)
        self._write(job_id, {**ended, "finished_at": repr(time.time())})

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self._lock:
                active = list(self._active)
            for job_id in active:
                try:
                    self.client.hset(job_key(job_id), "heartbeat", repr(time.time()))
                except redis.RedisError:
                    continue  # Redis down: the job shows lost until it is back

    def _write(self, job_id: str, fields: dict[str, str]) -> None:
        try:
            pipe = self.client.pipeline()
            pipe.hset(job_key(job_id), mapping=fields)  # type: ignore[arg-type]
            pipe.expire(job_key(job_id), TTL_S)
            pipe.execute()
        except redis.RedisError as exc:
            raise QueueUnavailableError(f"Redis is unreachable writing job {job_id}: {exc}") from exc

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
