"""The whole lifecycle, driven in random orders against real services, checked against a model.

A hypothesis ``RuleBasedStateMachine`` plays a user: it ingests two aliases, then runs migrate
(auto and manual cutover, waited for or left running), add, upsert, delete, pause, resume, cancel,
cutover, rollback, canary, adopt (of another alias's collection: refused), retire, waiting, and
SIGKILLs of worker processes, in any order. Beside the real services (Redis, a
`chroma run`, a `celery worker`, the two static models) it keeps a plain dict of what the user
wrote. After every step it reads Chroma directly and checks:

* the collection each alias serves holds exactly the user's current documents (ids, text,
  metadata), each embedded by that collection's own model (vectors recomputed here);
* no collection an alias or an unfinished migration still needs is gone;
* no collection belongs to two aliases;
* a command either did what it said or refused with a one-line message and changed nothing.

The test command runs a few examples (``REEMBED_STATEFUL_EXAMPLES``, default 3, of up to
``REEMBED_STATEFUL_STEPS`` steps, default 24); ``bash scripts/stateful.sh 80 30`` runs many
more (shrinking is off on real services unless ``REEMBED_STATEFUL_SHRINK`` is set).
Every failing sequence it ever found is kept as a named test in ``test_lifecycle_defects.py``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import chromadb
import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, Phase, settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from producer import ControlPlane, Writer
from reembed.documents import Document, user_metadata
from reembed.errors import ReembedError
from reembed.models import LoadedModel, load_configured
from reembed.registry import ACTIVE_STATES, MigrationState, Registry
from cli.services import ChromaServer, Workers
from reembed.settings import Settings
from tests.conftest import M2V_MINILM, M2V_MPNET, need

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("REEMBED_STATEFUL_EXAMPLES", "3"))
STEPS = int(os.environ.get("REEMBED_STATEFUL_STEPS", "24"))
#: A step that waits (ingest, settle) gives up after this: a migration that never ends is a defect.
SETTLE_S = 120.0

WORDS = ["zebrafish", "heart", "vitamin", "cell", "protein", "cancer", "gene", "brain", "virus", "bone",
         "insulin", "sleep", "axolotl", "mouse", "enzyme", "lung"]
texts = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join)
metadatas = st.fixed_dictionaries({}, optional={
    "lang": st.sampled_from(["en", "de"]), "year": st.integers(1990, 2030), "tag": st.sampled_from(["a", "b"])})
doc_ids = st.sampled_from([f"d{i}" for i in range(24)])


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message and "\n" not in message, f"refusal without a one-line message: {type(exc).__name__}: {message!r}"
    return message


class Lifecycle(RuleBasedStateMachine):
    """One example: two aliases named uniquely for it, on services shared by every example."""

    env: dict[str, Any]  # set by the test: settings, control, writer, models, chroma client, workers
    counter = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        self.n = next(self.counter)
        self.control: ControlPlane = self.env["control"]
        self.writer: Writer = self.env["writer"]
        self.client: chromadb.HttpClient = self.env["client"]  # type: ignore[valid-type]
        self.models: list[str] = self.env["models"]
        self.aliases = [f"e{self.n}-a", f"e{self.n}-b"]
        #: What the user wrote: alias -> id -> (text, metadata). The alias exists iff it is here.
        self.docs: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {}
        self.log: list[str] = []
        self.kills = 0
        self.migrated: set[str] = set()  # aliases with a migration started (cutover, rollback need one)

    # -- helpers -----------------------------------------------------------------------------

    def note(self, line: str) -> None:
        self.log.append(line)
        print(f"[stateful e{self.n}] {line}", flush=True)

    def alias_state(self, alias: str) -> Any:
        registry = self.control.registry
        return registry.get_alias(alias).model_dump_json() if registry.has_alias(alias) else None

    def refused(self, alias: str, action: Callable[[], Any], what: str) -> Any:
        """Run ``action``; a refusal must be one line and leave the alias record as it was."""
        before = self.alias_state(alias)
        pending = self.latest(alias)
        try:
            result = action()
        except ReembedError as exc:
            self.note(f"{what}: refused: {_one_line(exc)}")
            after = self.alias_state(alias)
            if after != before and self.went_live_meanwhile(pending, before, after):
                self.note(f"  (meanwhile migration {pending.id} went live by itself)")
            else:
                assert after == before, f"{what} was refused but changed alias {alias!r}"
            return None
        self.note(f"{what}: ok")
        return result if result is not None else True

    def went_live_meanwhile(self, pending: Any, before: str | None, after: str | None) -> bool:
        """Whether the only change to the alias is the automatic cutover of the migration that was
        running when the command started (the worker does that on its own, under the alias lock)."""
        if pending is None or pending.cutover != "auto" or before is None or after is None:
            return False
        if pending.state not in ACTIVE_STATES | {MigrationState.COMPLETE}:
            return False
        old, new = json.loads(before), json.loads(after)
        # The worker switches the alias, then records the migration live, both under the alias
        # lock; a refusal caused by that lock can read the alias between the two writes.
        deadline = time.monotonic() + 10
        now = self.control.registry.get_migration(pending.id)
        while now.state != MigrationState.LIVE and time.monotonic() < deadline:
            time.sleep(0.1)
            now = self.control.registry.get_migration(pending.id)
        return (now.state == MigrationState.LIVE and new["live_collection"] == pending.target_collection
                and new["previous_collection"] == old["live_collection"] == pending.source_collection)

    def latest(self, alias: str) -> Any:
        return self.control.registry.latest_migration(alias) if alias in self.docs else None

    # -- rules -------------------------------------------------------------------------------

    def _ingest(self, alias: str, model: int, docs: dict[str, tuple[str, dict[str, Any]]]) -> None:
        path = Path(self.env["tmp"]) / f"{alias}-{time.monotonic_ns()}.jsonl"
        path.write_text("".join(json.dumps({"id": k, "text": t, "metadata": m}) + "\n" for k, (t, m) in docs.items()))
        record = self.refused(alias, lambda: self.control.ingest(alias, path, self.models[model], batch_size=3),
                              f"ingest {alias} ({len(docs)} docs, model {model})")
        if record is None:
            assert alias in self.docs, f"ingest of a new alias {alias!r} was refused"
            return
        assert alias not in self.docs, f"ingest over the existing alias {alias!r} was accepted"
        final = self.control.wait(record.id, timeout=SETTLE_S)
        assert final.state == MigrationState.LIVE, (final.state, final.error)
        self.docs[alias] = dict(docs)

    @initialize(model=st.integers(0, 1), docs=st.dictionaries(doc_ids, st.tuples(texts, metadatas), min_size=1,
                                                              max_size=10))
    def ingest_first(self, model: int, docs: dict[str, tuple[str, dict[str, Any]]]) -> None:
        self._ingest(self.aliases[0], model, docs)

    @initialize(model=st.integers(0, 1), docs=st.dictionaries(doc_ids, st.tuples(texts, metadatas), min_size=1,
                                                              max_size=6))
    def ingest_second(self, model: int, docs: dict[str, tuple[str, dict[str, Any]]]) -> None:
        self._ingest(self.aliases[1], model, docs)

    def _migrate(self, i: int, manual: bool, batch: int, leave_running: bool) -> None:
        """Start a migration to the other model; wait for it to end unless it is left running
        under the next steps."""
        alias = self.aliases[i]
        serving = self.control.registry.get_collection(self.control.registry.get_alias(alias).live_collection).model
        model = 1 - self.models.index(serving)
        started = self.refused(alias, lambda: self.control.migrate(alias, self.models[model], batch_size=batch,
                                                                   cutover="manual" if manual else "auto"),
                               f"migrate {alias} to model {model} ({'manual' if manual else 'auto'})")
        if started is not None:
            self.migrated.add(alias)
        if started is not None and not leave_running:
            self.settle(i)

    @precondition(lambda self: self.docs)
    @rule(i=st.integers(0, 1), batch=st.integers(1, 4), leave_running=st.booleans())
    def migrate_auto(self, i: int, batch: int, leave_running: bool) -> None:
        self._migrate(i, False, batch, leave_running)

    @precondition(lambda self: self.docs)
    @rule(i=st.integers(0, 1), batch=st.integers(1, 4), leave_running=st.booleans())
    def migrate_manual(self, i: int, batch: int, leave_running: bool) -> None:
        self._migrate(i, True, batch, leave_running)

    @precondition(lambda self: self.docs)
    @rule(i=st.integers(0, 1), docs=st.dictionaries(doc_ids, st.tuples(texts, metadatas), min_size=1, max_size=3),
          only_new=st.booleans())
    def write(self, i: int, docs: dict[str, tuple[str, dict[str, Any]]], only_new: bool) -> None:
        alias = self.aliases[i]
        batch = [Document(k, t, m) for k, (t, m) in docs.items()]
        verb = "add" if only_new else "upsert"
        done = self.refused(alias, lambda: self.writer.upsert(alias, batch, only_new=only_new),
                            f"{verb} {alias} {sorted(docs)}")
        if done is None:
            assert alias not in self.docs or (only_new and set(docs) & set(self.docs[alias])), \
                f"{verb} refused for no reason"
            return
        self.docs[alias].update(docs)

    @precondition(lambda self: self.docs)
    @rule(i=st.integers(0, 1), ids=st.lists(doc_ids, min_size=1, max_size=3, unique=True))
    def delete(self, i: int, ids: list[str]) -> None:
        alias = self.aliases[i]
        if self.refused(alias, lambda: self.writer.delete(alias, ids), f"delete {alias} {ids}") is not None:
            for doc_id in ids:
                self.docs[alias].pop(doc_id, None)

    @precondition(lambda self: self.docs)
    @rule(i=st.integers(0, 1), verb=st.sampled_from(["pause", "resume", "cancel"]))
    def control_migration(self, i: int, verb: str) -> None:
        alias = self.aliases[i]
        record = self.latest(alias)
        if record is None:
            return
        self.refused(alias, lambda: getattr(self.control, verb)(record.id), f"{verb} {alias} {record.id}")

    @precondition(lambda self: self.migrated)
    @rule(i=st.integers(0, 1))
    def cutover(self, i: int) -> None:
        """(Refusals are checked too; a cutover with no migration at all says so once per alias.)"""
        alias = self.aliases[i]
        self.refused(alias, lambda: self.control.cutover(alias), f"cutover {alias}")

    @precondition(lambda self: self.migrated)
    @rule(i=st.integers(0, 1))
    def rollback(self, i: int) -> None:
        alias = self.aliases[i]
        self.refused(alias, lambda: self.control.rollback(alias), f"rollback {alias}")

    @precondition(lambda self: self.migrated)
    @rule(i=st.integers(0, 1), percent=st.sampled_from([30, 0]))
    def canary(self, i: int, percent: int) -> None:
        alias = self.aliases[i]
        self.refused(alias, lambda: self.control.canary(alias, percent), f"canary {alias} {percent}")

    @precondition(lambda self: self.docs)
    @rule(i=st.integers(0, 1), j=st.integers(0, 1), which=st.sampled_from(["previous", "live"]))
    def adopt(self, i: int, j: int, which: str) -> None:
        """Adopt another alias's collection: it must be refused (one collection, one alias)."""
        alias, other = f"e{self.n}-c{i}", self.aliases[j]
        if other not in self.docs:
            return
        record = self.control.registry.get_alias(other)
        name = record.live_collection if which == "live" else record.previous_collection
        if not name:
            return
        done = self.refused(alias, lambda: self.control.adopt(alias, name, timeout=60), f"adopt {alias} <- {name}")
        assert done is None, f"{alias!r} adopted {name!r}, which alias {other!r} serves or may roll back to"

    @precondition(lambda self: self.docs)
    @rule(i=st.integers(0, 1), previous=st.booleans())
    def retire(self, i: int, previous: bool) -> None:
        alias = self.aliases[i]
        if alias not in self.docs:
            return
        name = self.control.registry.get_alias(alias).previous_collection if previous else None
        self.refused(alias, lambda: self.control.retire(alias, also_previous=name), f"retire {alias} previous={name}")

    @precondition(lambda self: self.docs)
    @rule(i=st.integers(0, 1))
    def settle(self, i: int) -> None:
        """Wait for the alias's latest migration to end (a paused one is left paused)."""
        alias = self.aliases[i]
        record = self.latest(alias)
        if record is None:
            return
        deadline = time.monotonic() + SETTLE_S
        while record.state in ACTIVE_STATES - {MigrationState.PAUSED}:
            assert time.monotonic() < deadline, f"migration {record.id} of {alias} stuck {record.state.value}: " \
                                                f"{self.control.status(record.id)}"
            time.sleep(0.3)
            record = self.control.registry.get_migration(record.id)
        self.note(f"settle {alias}: {record.state.value}")

    @precondition(lambda self: self.docs and self.kills < 2)
    @rule()
    def kill_worker(self) -> None:
        """SIGKILL one worker process (the pool starts another; Celery redelivers its task)."""
        def alive(process: psutil.Process) -> bool:  # not one killed here that the pool has not reaped yet
            with contextlib.suppress(psutil.Error):
                return bool(process.status() != psutil.STATUS_ZOMBIE)
            return False

        children = [c for c in psutil.Process(self.env["workers"].process.pid).children() if alive(c)]
        if children:
            victim = children[0]
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                os.kill(victim.pid, signal.SIGKILL)
            self.note(f"killed worker process {victim.pid}")
            self.kills += 1

    # -- what must hold after every step -----------------------------------------------------

    @invariant()
    def aliases_serve_exactly_what_the_user_wrote(self) -> None:
        registry: Registry = self.control.registry
        owners: dict[str, str] = {}
        for alias, expected in self.docs.items():
            record = registry.get_alias(alias)
            for name in filter(None, (record.live_collection, record.previous_collection,
                                      record.canary.collection if record.canary else None)):
                assert owners.setdefault(name, alias) == alias, f"{name} belongs to {owners[name]} and {alias}"
                assert name in self.env["names"](), f"{alias}'s collection {name} was deleted"
            for migration in registry.migrations(alias):
                if migration.state in ACTIVE_STATES | {MigrationState.COMPLETE}:
                    for name in filter(None, (migration.source_collection, migration.target_collection)):
                        assert name in self.env["names"](), f"{migration.id} ({migration.state.value}) lost {name}"
            self.check_collection(alias, record.live_collection, expected)

    def check_collection(self, alias: str, name: str, expected: dict[str, tuple[str, dict[str, Any]]]) -> None:
        col = self.client.get_collection(name, embedding_function=None)
        got = col.get(include=["documents", "metadatas", "embeddings"])
        stored = {i: (t, m) for i, t, m in zip(got["ids"], got["documents"], got["metadatas"], strict=True)}
        assert set(stored) == set(expected), (
            f"{alias} serves {name}: missing {sorted(set(expected) - set(stored))}, "
            f"extra {sorted(set(stored) - set(expected))}; steps: {self.log}")
        recorded = self.control.registry.get_collection(name)
        model: LoadedModel = self.env["model"](recorded.model)
        for doc_id, (text, meta) in expected.items():
            got_text, got_meta = stored[doc_id]
            assert got_text == text, f"{alias}/{doc_id}: text {got_text!r}, user wrote {text!r}; steps: {self.log}"
            assert user_metadata(got_meta) == meta, \
                f"{alias}/{doc_id}: metadata {user_metadata(got_meta)}, user wrote {meta}; steps: {self.log}"
            assert got_meta["model_fingerprint"] == recorded.fingerprint, f"{alias}/{doc_id} of another model"
        if expected:
            order = list(got["ids"])
            vectors = np.asarray(got["embeddings"], dtype=np.float32)
            again = model.embed_documents([stored[i][0] for i in order])
            np.testing.assert_allclose(vectors, again, atol=1e-3, err_msg=f"{alias}: vectors of another model")

    def teardown(self) -> None:
        """End this example's migrations so the next example starts on a quiet queue."""
        for alias in self.docs:
            for record in self.control.registry.migrations(alias):
                if record.state in ACTIVE_STATES:
                    with contextlib.suppress(ReembedError):
                        self.control.cancel(record.id)


def test_lifecycle_in_random_orders(settings: Settings, chroma: ChromaServer, control: ControlPlane,
                                    start_workers: Callable[..., Workers], tmp_path: Path,
                                    models_dir: Path) -> None:
    settings = settings.with_(visibility_timeout_s=10)
    control = ControlPlane(settings)
    workers = start_workers(2, visibility_timeout_s=10)
    loaded: dict[str, LoadedModel] = {}
    client = chromadb.HttpClient(host="127.0.0.1", port=int(chroma.url.rsplit(":", 1)[1]))

    def model(name: str) -> LoadedModel:
        if name not in loaded:
            loaded[name] = load_configured(settings, name)
        return loaded[name]

    Lifecycle.env = {
        "settings": settings, "control": control, "writer": Writer(settings), "client": client, "tmp": tmp_path,
        "models": [str(need(M2V_MINILM)), str(need(M2V_MPNET))], "model": model, "workers": workers,
        "names": lambda: {c.name for c in client.list_collections()},
    }
    run_state_machine_as_test(Lifecycle, settings=hsettings(
        max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, database=None,
        phases=[Phase.generate] if not os.environ.get("REEMBED_STATEFUL_SHRINK") else list(Phase),
        suppress_health_check=list(HealthCheck), print_blob=True))
