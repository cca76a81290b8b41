"""The migration state machine in milliseconds: the real owner, pump, verification and batch code,
with a stub in place of Celery (as dramatiq's StubBroker), Chroma in process and fakeredis.

The stub outbox queues every message instead of sending it; ``drain`` delivers them, in order, to
the same functions the Celery tasks call. So every transition, every restart path, redelivery and
duplicate recording runs here without a worker, a server or a model. The real-process tests
(``tests/integration``, ``tests/faults``) walk the same paths with real services.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import hashlib
import logging
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import chromadb
import fakeredis
import numpy as np
import pytest

from reembed import pipeline
from reembed.documents import content_hash, provenance
from reembed.errors import MigrationStateError, ModelMismatchError
from reembed.lifecycle import Migration, current_state
from reembed.messages import BatchMessage, MigrationRef, Outbox, parse
from reembed.progress import Progress
from reembed.registry import TRANSITIONS, CollectionRecord, MigrationRecord, MigrationState, Registry
from reembed.store import Store
from worker.embedding import PausedError, reembed_batch

S = MigrationState
DIM = 8


class FakeModel:
    """Vectors from a hash of the text: deterministic, different from the source's."""

    def __init__(self, name: str = "fake-b", fingerprint: str = "sha256:fake-b") -> None:
        self.spec = type("Spec", (), {"name": name})()
        self.fingerprint = fingerprint
        self.device = "cpu"
        self.batch_size = 4
        self.max_tokens = None
        self.dimension = DIM
        self.probe = self.embed_documents(["probe"])[0]

    def embed_documents(self, texts: list[str]) -> np.ndarray:
        rows = [np.frombuffer(hashlib.sha256(t.encode()).digest()[:DIM], dtype=np.uint8).astype(np.float32)
                for t in texts]
        out = np.asarray(rows, dtype=np.float32).reshape(len(texts), DIM) + 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    @contextlib.contextmanager
    def metered(self, meter: object) -> Iterator[None]:  # a local model: nothing to charge
        yield

    def require_fingerprint(self, expected: str, what: str) -> None:
        if expected != self.fingerprint:
            raise ModelMismatchError(f"{what}: fingerprint {expected}, not {self.fingerprint}")

    def check_probe(self, recorded: list[float], what: str) -> None:
        if not np.allclose(recorded, self.probe, atol=1e-5):
            raise ModelMismatchError(f"probe differs for {what}")


class StubOutbox(Outbox):
    """Queues messages in memory (``sent``) instead of sending them through Celery."""

    def __init__(self) -> None:
        self.sent: deque[tuple[str, Any]] = deque()

    def batch(self, message: BatchMessage) -> None:
        self.sent.append(("batch", message))

    def pump(self, migration_id: str, countdown: float | None = None) -> None:
        self.sent.append(("pump", MigrationRef(migration_id=migration_id)))

    def finalize(self, migration_id: str) -> None:
        self.sent.append(("finalize", MigrationRef(migration_id=migration_id)))


@dataclass
class World:
    store: Store
    registry: Registry
    redis: Any
    outbox: StubOutbox
    model: FakeModel
    record: MigrationRecord
    deliveries: dict[str, int] = field(default_factory=dict)
    held: list[BatchMessage] = field(default_factory=list)  # batches a paused migration sent back

    def migration(self) -> Migration:
        return Migration.load(self.record.id, self.registry, self.redis, self.outbox)

    def deliver(self, kind: str, message: Any) -> None:
        """What the Celery task of ``kind`` does with one message (first delivery of a batch id
        counts as a delivery from the queue; a second one is a redelivery)."""
        if kind == "pump":
            if pipeline.pump(self.migration(), self.store, max_waiting=3, keep_feeding_s=0, lost_after_s=60):
                self.outbox.pump(message.migration_id)
        elif kind == "finalize":
            pipeline.finalize(self.migration(), self.store)
        else:
            try:
                reembed_batch(message, first_delivery=True, store=self.store, registry=self.registry,
                              client=self.redis, outbox=self.outbox, load=lambda _: self.model)  # type: ignore[arg-type,return-value]
            except PausedError:
                self.held.append(message)

    def drain(self, limit: int = 500) -> None:
        """Deliver queued messages until none is left (a paused migration's pump keeps re-queuing
        itself: stop when only such pumps remain)."""
        for _ in range(limit):
            if not self.outbox.sent:
                return
            kind, message = self.outbox.sent.popleft()
            if kind == "pump" and self.migration().state() == S.PAUSED:
                if all(k == "pump" for k, _ in self.outbox.sent):
                    return
            self.deliver(kind, message)
        raise AssertionError(f"messages kept coming: a loop; last {kind}: {message}; state {self.migration().state()}")

    def target(self) -> dict[str, tuple[str, dict[str, Any]]]:
        raw = self.store.collection(self.record.target_collection).get(include=["documents", "metadatas"])
        return {i: (t, m) for i, t, m in zip(raw["ids"], raw["documents"], raw["metadatas"], strict=True)}


@pytest.fixture
def world(request: pytest.FixtureRequest) -> World:
    client = chromadb.EphemeralClient()
    for col in client.list_collections():
        client.delete_collection(col.name)
    store = Store.from_client(client)
    registry = Registry(store)
    source, target = "docs--a--1", "docs--b--2"
    old = FakeModel("fake-a", "sha256:fake-a")
    texts = [f"document number {i} about zebrafish" for i in range(10)]
    metas = [{"n": i} for i in range(10)]
    client.create_collection(source, embedding_function=None).add(  # type: ignore[arg-type]
        ids=[f"d{i}" for i in range(10)], embeddings=old.embed_documents(texts), documents=texts,
        metadatas=[provenance(old, t, m) for t, m in zip(texts, metas, strict=True)])  # type: ignore[arg-type]
    client.create_collection(target, embedding_function=None)  # type: ignore[arg-type]
    registry.put_collection(CollectionRecord(name=source, model="fake-a", fingerprint="sha256:fake-a",
                                             dimension=DIM, origin="ingest"))
    registry.switch_alias("docs", source, None)
    model = FakeModel()
    cutover = getattr(request, "param", "auto")
    record = MigrationRecord(alias="docs", source_collection=source, target_collection=target, from_model="fake-a",
                             to_model="fake-b", to_fingerprint=model.fingerprint, batch_size=3, cutover=cutover,
                             total=10)
    return World(store, registry, fakeredis.FakeRedis(decode_responses=True), StubOutbox(), model, record)


def start(world: World) -> Migration:
    migration = Migration(world.record, world.registry, world.redis, world.outbox)
    migration.begin({})
    return migration


def test_a_migration_runs_to_live_and_every_document_is_the_new_models(world: World) -> None:
    start(world)
    world.drain()
    assert world.migration().refresh().state == S.LIVE
    assert world.registry.get_alias("docs").live_collection == world.record.target_collection
    target = world.target()
    assert sorted(target) == sorted(f"d{i}" for i in range(10))
    assert all(m["model_fingerprint"] == "sha256:fake-b" and m["content_hash"] == content_hash(t, m)
               for t, m in target.values())
    assert Progress(world.redis, world.record.id).counts()["done"] == 10


@pytest.mark.parametrize("world", ["manual"], indirect=True)
def test_manual_cutover_waits_complete_then_goes_live_once(world: World) -> None:
    start(world)
    world.drain()
    migration = world.migration()
    assert migration.state() == S.COMPLETE and migration.record.verified
    migration.go_live(world.store)
    migration.go_live(world.store)  # idempotent
    assert world.registry.get_alias("docs").generation == 2


def test_every_transition_is_allowed_or_refused_by_the_table(world: World) -> None:
    for old in S:
        for new in S:
            world.registry.put_migration(world.record.model_copy(update={"state": old}))
            if new == old or new in TRANSITIONS[old]:
                assert world.registry.transition(world.record, new)[0].state == new
            else:
                with pytest.raises(MigrationStateError, match=f"is {old.value}; it cannot become {new.value}"):
                    world.registry.transition(world.record, new)


def test_the_state_is_written_twice_by_the_owner_and_read_by_one_rule(world: World) -> None:
    migration = start(world)
    assert migration.progress.state() == "running" and migration.refresh().state == S.RUNNING
    migration.pause()
    assert migration.progress.state() == "paused" and migration.refresh().state == S.PAUSED
    # a stale cache never overrides a final state recorded in Chroma
    assert current_state(migration.record.model_copy(update={"state": S.CANCELLED}), "running") == S.CANCELLED
    assert current_state(migration.record, None) == S.PAUSED  # Redis lost: the durable record


def test_pause_holds_batches_and_resume_finishes(world: World) -> None:
    migration = start(world)
    world.deliver(*world.outbox.sent.popleft())  # the pump sends the first window
    migration.pause()
    world.drain()
    assert world.held and migration.refresh().state == S.PAUSED and not world.target()
    migration.restart("resume")
    world.outbox.sent.extend(("batch", m) for m in world.held)  # Celery retries the held batches
    world.drain()
    assert migration.refresh().state == S.LIVE and len(world.target()) == 10


def test_a_redelivered_batch_counts_once_and_is_upserted(world: World) -> None:
    start(world)
    world.deliver(*world.outbox.sent.popleft())
    batches = [m for k, m in world.outbox.sent if k == "batch"]
    assert batches and all(b.write == "add" for b in batches)  # a first pass adds
    world.deliver("batch", batches[0])
    world.deliver("batch", batches[0])  # the broker delivers it again
    progress = Progress(world.redis, world.record.id)
    assert progress.counts()["done"] == len(batches[0].ids)
    assert int(world.redis.hget(f"reembed:migration:{world.record.id}:deliveries", batches[0].batch_id)) == 2
    world.drain()
    assert world.migration().refresh().state == S.LIVE and progress.counts()["done"] == 10


def test_redis_lost_mid_run_then_resume_rebuilds_by_diffing(world: World) -> None:
    migration = start(world)
    world.deliver(*world.outbox.sent.popleft())
    world.deliver(*world.outbox.sent.popleft())  # one batch written
    world.redis.flushall()  # Redis restarted empty: queue and progress gone
    world.outbox.sent.clear()
    assert migration.refresh().state == S.RUNNING and not migration.progress.exists()
    migration.restart("resume")
    world.drain()
    assert migration.refresh().state == S.LIVE and len(world.target()) == 10


def test_a_write_to_the_source_during_the_run_is_caught_up(world: World) -> None:
    start(world)
    world.deliver(*world.outbox.sent.popleft())
    old = FakeModel("fake-a", "sha256:fake-a")
    scanned = [m for k, m in world.outbox.sent if k == "batch"][0].ids[0]  # already read by the scan
    world.store.upsert(world.record.source_collection or "", ids=[scanned], embeddings=old.embed_documents(["new"]),
                       documents=["changed after the scan"], metadatas=[{"n": 99}])
    world.drain()
    assert world.migration().refresh().state == S.LIVE
    text, meta = world.target()[scanned]
    assert (text, meta["n"]) == ("changed after the scan", 99)
    assert Progress(world.redis, world.record.id).get()["round"] == "1"
    sent = [m for k, m in list(world.outbox.sent) if k == "batch"]
    assert not sent  # drained


def test_catch_up_and_resent_batches_upsert(world: World) -> None:
    start(world)
    world.deliver(*world.outbox.sent.popleft())
    first = [m for k, m in world.outbox.sent if k == "batch"][0]
    progress = Progress(world.redis, world.record.id)
    progress.mark_in_flight({first.batch_id: list(first.ids)})
    world.redis.hset(f"reembed:migration:{world.record.id}:inflight", first.batch_id,
                     f'{{"ids": {list(first.ids)!r}, "at": {time.time() - 3600}}}'.replace("'", '"'))
    world.outbox.sent.clear()  # the broker lost every message
    resent = pipeline.Feeder(world.migration(), world.store, 3).resend_lost(60, pipeline.Feeder(
        world.migration(), world.store, 3).from_collection)
    assert resent == 1
    kind, message = world.outbox.sent[-1]
    assert kind == "batch" and message.batch_id == first.batch_id and message.write == "upsert"


def test_cancel_deletes_the_target_never_the_source_or_a_live_one(world: World) -> None:
    migration = start(world)
    migration.cancel(world.store)
    assert migration.refresh().state == S.CANCELLED
    assert not world.store.exists(world.record.target_collection)
    assert world.store.exists(world.record.source_collection or "")
    with pytest.raises(MigrationStateError):
        migration.restart("resume")  # cancelled is final


def test_going_live_is_refused_when_the_alias_serves_another_collection(world: World) -> None:
    world.record.cutover = "manual"
    start(world)
    world.drain()
    world.registry.switch_alias("docs", "somewhere-else", None)
    with pytest.raises(MigrationStateError, match="serves 'somewhere-else'"):
        world.migration().go_live(world.store)


def test_a_malformed_message_is_refused_with_one_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        assert parse(BatchMessage, (), {"migration_id": "m", "batch_id": "b", "write": "add", "ids": ["a"],
                                        "documents": [], "metadatas": []}, "reembed.batch") is None
        assert parse(MigrationRef, (), {"migration_id": "m", "extra": 1}, "reembed.pump") is None
        assert parse(MigrationRef, ("m",), {}, "reembed.pump") is None
    assert parse(MigrationRef, (), {"migration_id": "m"}, "reembed.pump") == MigrationRef(migration_id="m")


@pytest.mark.parametrize("world", ["manual"], indirect=True)
def test_the_final_catch_up_of_a_cutover_restarts_a_complete_migration(world: World) -> None:
    start(world)
    world.drain()
    migration = world.migration()
    assert migration.state() == S.COMPLETE
    old = FakeModel("fake-a", "sha256:fake-a")
    world.store.upsert(world.record.source_collection or "", ids=["after"], embeddings=old.embed_documents(["a"]),
                       documents=["written after completion"], metadatas=[{"n": 1}])
    migration.restart("final catch-up before cutover", verify=True, cutover="auto")
    world.drain()
    assert migration.refresh().state == S.LIVE and "after" in world.target()


def test_a_rolled_back_migration_catches_up_when_it_goes_live_again(world: World) -> None:
    start(world)
    world.drain()
    migration = world.migration()
    alias = world.registry.get_alias("docs")
    world.registry.switch_alias("docs", alias.previous_collection or "", alias.generation)  # the rollback
    migration.rolled_back()
    old = FakeModel("fake-a", "sha256:fake-a")
    world.store.upsert(world.record.source_collection or "", ids=["while-back"], embeddings=old.embed_documents(["w"]),
                       documents=["written while rolled back"], metadatas=[{"n": 2}])
    migration.restart("cutover again", verify=True)
    world.drain()
    assert migration.refresh().state == S.LIVE and "while-back" in world.target()
    assert world.registry.get_alias("docs").live_collection == world.record.target_collection


def test_a_failed_migration_resumes(world: World) -> None:
    migration = start(world)
    migration.fail("a worker raised something unexpected")
    assert migration.refresh().state == S.FAILED and migration.record.error
    world.drain()  # its messages are dropped: it is failed
    migration.restart("resume")
    world.drain()
    assert migration.refresh().state == S.LIVE and migration.record.error is None and len(world.target()) == 10


def test_an_automatic_cutover_waits_for_the_producer_that_holds_the_alias(world: World) -> None:
    """Found by the long stateful run: a small migration finished before the producer that started
    it let go of the alias lock, and its automatic cutover was refused (the migration stayed complete)."""
    import threading

    from reembed.progress import alias_lock

    migration = start(world)
    with alias_lock(world.redis, "docs"):
        finishing = threading.Thread(target=world.drain)
        finishing.start()
        time.sleep(0.3)  # the workers finish while the producer still holds the alias
    finishing.join(timeout=30)
    assert migration.refresh().state == S.LIVE and migration.record.error is None


def test_a_worker_with_other_weights_fails_the_migration_and_writes_nothing(world: World) -> None:
    """Retrying cannot fix another model's (or broken) weights: the migration fails with the
    reason, instead of the batch being lost and the wait hanging; once fixed, resume finishes."""
    migration = start(world)
    right = world.model
    world.model = FakeModel("fake-b", "sha256:other-weights")
    world.drain()
    record = migration.refresh()
    assert record.state == S.FAILED and "cannot embed with 'fake-b'" in (record.error or ""), record.error
    assert world.target() == {}
    world.model = right
    migration.restart("resume")
    world.drain()
    assert migration.refresh().state == S.LIVE and len(world.target()) == 10


def test_a_write_chroma_refuses_records_its_documents_as_failed_and_the_rest_goes_live(world: World) -> None:
    """A fault injector in front of the real (in-memory) Chroma: the batch holding d4 is refused."""
    from reembed.errors import InputError

    real_add, real_upsert = world.store.add, world.store.upsert

    def refusing(real: Any) -> Any:
        def write(name: str, ids: list[str], *args: Any, **kwargs: Any) -> None:
            if "d4" in ids:
                raise InputError("Chroma rejected a write: metadata value out of range")
            real(name, ids, *args, **kwargs)
        return write

    world.store.add = refusing(real_add)  # type: ignore[method-assign]
    world.store.upsert = refusing(real_upsert)  # type: ignore[method-assign]
    start(world)
    world.drain()
    failures = Progress(world.redis, world.record.id).failures(10)
    assert "d4" in failures and "Chroma refused the write" in failures["d4"]
    assert world.migration().refresh().state == S.LIVE
    assert set(world.target()) == {f"d{i}" for i in range(10)} - set(failures)
