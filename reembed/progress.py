"""Progress and coordination in Redis. Every Redis key reembed uses is built here.

Progress is exact under redelivery: a batch counts once, when its id first enters the set of
finished batches (one Lua script does the check and the counting atomically). Completion is
detected exactly once by the same script claiming a flag. All of this can be rebuilt after a
Redis loss by diffing source and target (``producer.finalize``), so Redis holds nothing that
cannot be recomputed.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import time
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlparse

import redis

from reembed.errors import ConfigError, MigrationStateError, QueueUnavailableError

PREFIX = "reembed"
#: Times a batch may be delivered before its documents are recorded as failed: bounds the
#: retries of a batch that kills its worker (OOM, segfault) so nothing runs forever.
MAX_DELIVERIES = 5
#: Truncated documents named in `reembed status` (their count is exact whatever this is).
TRUNCATED_SAMPLE = 100
#: Lifetime of an alias lock: long enough for a producer's set-up, short enough to free a
#: lock whose holder was killed.
ALIAS_LOCK_TTL_S = 120
#: How long a producer waits for another holder of an alias's lock before it is refused.
PRODUCER_LOCK_WAIT_S = 5.0


def migration_key(migration_id: str) -> str:
    return f"{PREFIX}:migration:{migration_id}"


def done_batches_key(migration_id: str) -> str:
    return f"{PREFIX}:migration:{migration_id}:done"


def failed_docs_key(migration_id: str) -> str:
    return f"{PREFIX}:migration:{migration_id}:failed"


def skipped_docs_key(migration_id: str) -> str:
    return f"{PREFIX}:migration:{migration_id}:skipped"


def truncated_docs_key(migration_id: str) -> str:
    """Hash of documents longer than the model reads: id -> their token count."""
    return f"{PREFIX}:migration:{migration_id}:truncated"


def deliveries_key(migration_id: str) -> str:
    return f"{PREFIX}:migration:{migration_id}:deliveries"


def inflight_key(migration_id: str) -> str:
    """Hash of batches sent and not yet finished: batch id -> {"ids": [...], "at": sent time}."""
    return f"{PREFIX}:migration:{migration_id}:inflight"


def todo_key(migration_id: str) -> str:
    """List of document ids a catch-up round feeds again (missing or changed in the target)."""
    return f"{PREFIX}:migration:{migration_id}:todo"


def spend_checkpoint_key(migration_id: str) -> str:
    """Present (with a TTL) while the last durable copy of the spend is recent enough."""
    return f"{PREFIX}:migration:{migration_id}:spend-checkpoint"


def pump_lock_key(migration_id: str) -> str:
    return f"{PREFIX}:lock:pump:{migration_id}"


def alias_lock_key(alias: str) -> str:
    return f"{PREFIX}:lock:alias:{alias}"


def collection_writes_key(collection: str) -> str:
    """A counter bumped by every write reembed makes to a collection: search indexes compare it."""
    return f"{PREFIX}:collection:{collection}:writes"


def _fields(mapping: Mapping[str, Any]) -> Mapping[Any, Any]:
    """Our hash fields as redis-py's ``hset`` wants them (it types a mapping's keys invariantly)."""
    return mapping


def redis_client(url: str) -> redis.Redis:
    """A client for ``redis://``, ``rediss://``, ``unix://`` or Celery's ``redis+socket://`` URL."""
    parsed = urlparse(url)
    if parsed.scheme == "redis+socket":
        return redis.Redis(unix_socket_path=parsed.path, decode_responses=True,
                           socket_timeout=10, socket_connect_timeout=5)
    if parsed.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"REEMBED_REDIS_URL={_safe(url)!r}: use redis://HOST:PORT/DB or redis+socket:///PATH")
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5)


def _safe(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url


@contextlib.contextmanager
def redis_errors(what: str) -> Iterator[None]:
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise QueueUnavailableError(f"Redis is unreachable during {what}: {exc}; is it running?") from exc


# KEYS: progress hash, done set, in-flight hash. ARGV: batch id, documents done, documents truncated.
# Returns 1 exactly once: for the call that finishes the last batch after enqueueing ended.
_RECORD_BATCH = """
redis.call('HDEL', KEYS[3], ARGV[1])
if redis.call('SADD', KEYS[2], ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'done', tonumber(ARGV[2]))
  if tonumber(ARGV[3]) > 0 then redis.call('HINCRBY', KEYS[1], 'truncated', tonumber(ARGV[3])) end
end
local total = tonumber(redis.call('HGET', KEYS[1], 'total_batches') or '-1')
if redis.call('HGET', KEYS[1], 'enqueue_complete') == '1' and redis.call('SCARD', KEYS[2]) >= total then
  if redis.call('HSETNX', KEYS[1], 'finalize_claimed', '1') == 1 then return 1 end
end
return 0
"""


# KEYS[1]: the progress hash, whose ``max_cost`` is the limit (absent: none). ARGV: cost wanted.
# 1 when reserved. The limit is read here, not handed in: a resume may have raised it.
_RESERVE_COST = """
local spent = tonumber(redis.call('HGET', KEYS[1], 'cost') or '0')
local reserved = tonumber(redis.call('HGET', KEYS[1], 'reserved_cost') or '0')
local limit = tonumber(redis.call('HGET', KEYS[1], 'max_cost') or '-1')
local want = tonumber(ARGV[1])
if limit >= 0 and spent + reserved + want > limit then return 0 end
redis.call('HINCRBYFLOAT', KEYS[1], 'reserved_cost', want)
return 1
"""


class Progress:
    """The Redis side of one migration: counters, finished batches, failures, state cache."""

    def __init__(self, client: redis.Redis, migration_id: str) -> None:
        self.r = client
        self.id = migration_id
        self.key = migration_key(migration_id)
        self._record = client.register_script(_RECORD_BATCH)
        self._reserve = client.register_script(_RESERVE_COST)

    def exists(self) -> bool:
        """True when ``init`` ran in this Redis. A straggling batch that finishes after Redis lost
        its data may recreate a counter or two; only ``init`` writes ``started_at``."""
        with redis_errors("reading progress"):
            return bool(self.r.hexists(self.key, "started_at"))

    def init(self, total: int, state: str, skipped: dict[str, str] | None = None,
             spent: tuple[int, float] = (0, 0.0)) -> None:
        """Start from zero (or rebuild after a Redis loss, with what was ``spent`` as recorded)."""
        with redis_errors("initialising progress"):
            pipe = self.r.pipeline()
            pipe.delete(self.key, done_batches_key(self.id), deliveries_key(self.id), inflight_key(self.id))
            pipe.hset(self.key, mapping=_fields({"total": total, "done": 0, "enqueued_batches": 0, "cursor": 0,
                                         "state": state, "started_at": time.time(), "round": 0,
                                         "tokens": spent[0], "cost": spent[1]}))
            if skipped:
                pipe.hset(skipped_docs_key(self.id), mapping=_fields(skipped))
            pipe.execute()

    def get(self) -> dict[str, str]:
        with redis_errors("reading progress"):
            return dict(self.r.hgetall(self.key))  # type: ignore[arg-type]

    def set(self, **fields: Any) -> None:
        with redis_errors("writing progress"):
            self.r.hset(self.key, mapping={k: v for k, v in fields.items()})

    def state(self) -> str | None:
        with redis_errors("reading state"):
            value = self.r.hget(self.key, "state")
        return str(value) if value is not None else None

    def record_batch(self, batch_id: str, done: int, truncated: int = 0) -> bool:
        """Count a finished batch once (its documents done and truncated). Returns True for the one
        call that completes the migration."""
        with redis_errors("recording a batch"):
            return bool(self._record(keys=[self.key, done_batches_key(self.id), inflight_key(self.id)],
                                     args=[batch_id, done, truncated]))

    def mark_in_flight(self, batch_ids: dict[str, list[str]]) -> None:
        """Remember what each sent batch holds until it is recorded done (see ``lost_batches``)."""
        now = time.time()
        with redis_errors("recording batches in flight"):
            self.r.hset(inflight_key(self.id), mapping={
                b: json.dumps({"ids": ids, "at": now}) for b, ids in batch_ids.items()})

    def expire_in_flight(self) -> int:
        """Count every unfinished batch as lost now: a failed migration's workers dropped them, so
        waiting out the usual redelivery would stall its resume. Returns how many."""
        with redis_errors("marking batches in flight as lost"):
            entries = self.r.hgetall(inflight_key(self.id))
            if entries:
                self.r.hset(inflight_key(self.id), mapping={
                    b: json.dumps({**json.loads(raw), "at": 0}) for b, raw in entries.items()})
        return len(entries)

    def lost_batches(self, older_than_s: float) -> dict[str, list[str]]:
        """Batches sent more than ``older_than_s`` ago and never finished: their message was lost
        (a broker that died with it, a retry that could not be published) or is stuck."""
        with redis_errors("reading batches in flight"):
            entries = self.r.hgetall(inflight_key(self.id))
            done = self.r.smismember(done_batches_key(self.id), list(entries)) if entries else []
        cutoff = time.time() - older_than_s
        lost: dict[str, list[str]] = {}
        for (batch_id, raw), finished in zip(entries.items(), done, strict=True):
            entry = json.loads(raw)
            if not finished and entry["at"] < cutoff:
                lost[str(batch_id)] = list(entry["ids"])
        return lost

    def start_round(self, redo: list[str], total: int, done: int) -> int:
        """A catch-up round: list ``redo`` to feed, reset the feeding fields. Returns its number."""
        round_no = int(self.get().get("round", 0)) + 1
        with redis_errors("starting a catch-up round"):
            pipe = self.r.pipeline()
            pipe.delete(todo_key(self.id))
            for start in range(0, len(redo), 10_000):
                pipe.rpush(todo_key(self.id), *redo[start:start + 10_000])
            pipe.hdel(self.key, "enqueue_complete", "finalize_claimed", "total_batches")
            pipe.hset(self.key, mapping=_fields({
                "phase": "todo", "cursor": 0, "round": round_no, "total": total, "done": done,
                "enqueued_batches": self.batches_done()}))
            pipe.execute()
        return round_no

    def todo(self, start: int, count: int) -> list[str]:
        """``count`` ids of the catch-up list from ``start``."""
        with redis_errors("reading the catch-up list"):
            return [str(i) for i in self.r.lrange(todo_key(self.id), start, start + count - 1)]

    def waiting(self) -> int:
        """Batches sent and not yet finished: what backpressure bounds."""
        with redis_errors("reading progress"):
            enqueued = self.r.hget(self.key, "enqueued_batches")
        return int(enqueued or 0) - self.batches_done()

    def batches_done(self) -> int:
        with redis_errors("reading progress"):
            return int(self.r.scard(done_batches_key(self.id)))

    def claim_finalize_if_done(self) -> bool:
        """After enqueueing ends: True once, if every batch is already finished."""
        with redis_errors("checking completion"):
            fields = self.r.hmget(self.key, ["enqueue_complete", "total_batches"])
            if fields[0] != "1" or self.batches_done() < int(fields[1] or -1):
                return False
            return bool(self.r.hsetnx(self.key, "finalize_claimed", "1"))

    def record_probe(self, probe: Any, dimension: int) -> None:
        """The first worker of a migration records its model's probe vector; later ones compare."""
        with redis_errors("recording the migration's probe vector"):
            self.r.hsetnx(self.key, "probe", json.dumps([round(float(x), 6) for x in probe]))
            self.r.hsetnx(self.key, "dimension", dimension)

    def probe(self) -> list[float] | None:
        with redis_errors("reading the migration's probe vector"):
            raw = self.r.hget(self.key, "probe")
        return json.loads(raw) if raw else None

    def count_delivery(self, batch_id: str) -> int:
        with redis_errors("counting a delivery"):
            return int(self.r.hincrby(deliveries_key(self.id), batch_id, 1))

    def add_timings(self, seconds: dict[str, float], batches: int = 1) -> None:
        """Accumulate where a batch's time went (``t_embed``, ``t_write``...): status and benches read
        them. The pump adds ``t_fetch`` (reading the source) with ``batches=0``."""
        with redis_errors("recording batch timings"):
            pipe = self.r.pipeline(transaction=False)
            for name, value in seconds.items():
                pipe.hincrbyfloat(self.key, f"t_{name}", round(value, 6))
            if batches:
                pipe.hincrby(self.key, "t_batches", batches)
            pipe.execute()

    def set_budget(self, max_cost: float | None) -> None:
        """The most this migration may spend (None: no limit), read by every reservation."""
        with redis_errors("writing the budget"):
            if max_cost is None:
                self.r.hdel(self.key, "max_cost")
            else:
                self.r.hset(self.key, "max_cost", max_cost)

    def reserve_cost(self, amount: float) -> bool:
        """Reserve ``amount`` of money for a request about to go, unless what is spent and
        reserved by every worker would then pass the budget: atomic, so two workers never both
        take the last of it."""
        with redis_errors("reserving budget"):
            return bool(self._reserve(keys=[self.key], args=[amount]))

    def settle_cost(self, reserved: float, tokens: int, cost: float) -> None:
        """A request answered: its reservation becomes what it really cost."""
        with redis_errors("recording spend"):
            pipe = self.r.pipeline(transaction=False)
            pipe.hincrbyfloat(self.key, "reserved_cost", -reserved)
            pipe.hincrby(self.key, "tokens", tokens)
            pipe.hincrbyfloat(self.key, "cost", cost)
            pipe.execute()

    def checkpoint_due(self, every_s: float) -> bool:
        """True for one caller per ``every_s`` seconds, whichever process asks (a Redis key with a TTL)."""
        with redis_errors("timing the spend checkpoint"):
            return bool(self.r.set(spend_checkpoint_key(self.id), 1, nx=True, ex=max(1, int(every_s))))

    def spend(self) -> tuple[int, float]:
        """Tokens sent to an API model so far, and their cost."""
        fields = self.get()
        return int(fields.get("tokens", 0)), float(fields.get("cost", 0))

    def timings(self) -> dict[str, float]:
        """Seconds per phase summed over batches, and ``batches`` timed."""
        fields = self.get()
        return {k[2:]: float(v) for k, v in fields.items() if k.startswith("t_")}

    def record_failures(self, reasons: dict[str, str]) -> None:
        if reasons:
            with redis_errors("recording failed documents"):
                self.r.hset(failed_docs_key(self.id), mapping=_fields(reasons))

    def record_skipped(self, reasons: dict[str, str]) -> None:
        """Documents that cannot be embedded (no text), with the reason: fed never, counted skipped."""
        if reasons:
            with redis_errors("recording skipped documents"):
                self.r.hset(skipped_docs_key(self.id), mapping=_fields(reasons))

    def record_truncated_sample(self, tokens: dict[str, int]) -> None:
        """Keep a few truncated documents with their token count (at most TRUNCATED_SAMPLE: the
        count itself is kept exactly by ``record_batch``, so Redis never holds one per document)."""
        if tokens:
            with redis_errors("recording truncated documents"):
                if self.r.hlen(truncated_docs_key(self.id)) < TRUNCATED_SAMPLE:
                    self.r.hset(truncated_docs_key(self.id), mapping=_fields(tokens))

    def truncated(self, limit: int = 10) -> tuple[int, dict[str, int]]:
        """How many documents were truncated by the model, and a few of them with their length."""
        with redis_errors("reading truncated documents"):
            count = int(self.r.hget(self.key, "truncated") or 0)
            _, found = self.r.hscan(truncated_docs_key(self.id), count=limit)
        assert isinstance(found, dict)
        return count, {str(k): int(v) for k, v in list(found.items())[:limit]}

    def failures(self, limit: int = 20) -> dict[str, str]:
        with redis_errors("reading failed documents"):
            _, found = self.r.hscan(failed_docs_key(self.id), count=limit)
        assert isinstance(found, dict)
        return {str(k): str(v) for k, v in list(found.items())[:limit]}

    def failed_ids(self) -> builtins.set[str]:
        with redis_errors("reading failed documents"):
            return {str(k) for k in self.r.hkeys(failed_docs_key(self.id))}

    def skipped_ids(self) -> builtins.set[str]:
        with redis_errors("reading skipped documents"):
            return {str(k) for k in self.r.hkeys(skipped_docs_key(self.id))}

    def counts(self) -> dict[str, int]:
        with redis_errors("reading progress"):
            pipe = self.r.pipeline()
            pipe.hmget(self.key, ["total", "done"])
            pipe.hlen(failed_docs_key(self.id))
            pipe.hlen(skipped_docs_key(self.id))
            (total, done), failed, skipped = pipe.execute()
        return {"total": int(total or 0), "done": int(done or 0), "failed": int(failed), "skipped": int(skipped)}

@contextlib.contextmanager
def alias_lock(client: redis.Redis, alias: str, wait_s: float = PRODUCER_LOCK_WAIT_S) -> Iterator[None]:
    """Serialise the writers of one alias across processes and machines.

    Every holder keeps it for moments, so a producer waits up to ``PRODUCER_LOCK_WAIT_S`` before
    it is refused: a worker switching the alias at the end of an ingest or of an automatic
    cutover publishes ``live`` while it holds the lock, and a script's next command, started the
    moment ``--wait`` saw that event, must not be refused for it. Two producers starting
    migrations on one alias still end with one refused (by this lock, or by the running
    migration the second finds once it has it). An automatic cutover waits ``wait_s`` (longer)
    for the producer that started its migration to let go.

    Raises:
        MigrationStateError: another producer holds the lock.
    """
    lock = client.lock(alias_lock_key(alias), timeout=ALIAS_LOCK_TTL_S, blocking=wait_s > 0,
                       blocking_timeout=wait_s or None)
    with redis_errors(f"locking alias {alias!r}"):
        acquired = lock.acquire()
    if not acquired:
        raise MigrationStateError(f"alias {alias!r} is being changed by another producer; wait and retry")
    try:
        yield
    finally:
        with contextlib.suppress(redis.RedisError):
            lock.release()


def bump_writes(client: redis.Redis, collection: str) -> None:
    """Tell every search process that ``collection``'s documents changed (its BM25 index is stale)."""
    with redis_errors(f"counting a write to {collection!r}"):
        client.incr(collection_writes_key(collection))


def read_writes(client: redis.Redis, collection: str) -> int:
    with redis_errors(f"reading the write counter of {collection!r}"):
        return int(client.get(collection_writes_key(collection)) or 0)
