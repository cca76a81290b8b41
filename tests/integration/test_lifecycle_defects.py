"""Orders of commands that once lost a user's write, each kept as a named test (real services).

Found by trying reembed as a new user would, and by the stateful test
(``test_lifecycle_stateful.py``); each test reads Chroma directly to check the outcome. The tests
share one `chroma run`, two worker processes and Redis database 12 (each test its own alias):
starting them once keeps the module fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import chromadb
import pytest

from cli.services import ChromaServer, Workers
from cli.stack import LocalStack
from producer import ControlPlane, Writer
from reembed.documents import Document, content_hash, user_metadata
from reembed.errors import InputError, MigrationStateError
from reembed.registry import MigrationState
from reembed.settings import Settings
from tests.conftest import M2V_MINILM, M2V_MPNET, need, redis_db
from tests.integration.conftest import flushed_redis

pytestmark = pytest.mark.integration

#: This module's own Redis database (the shared fixtures flush 13 around every test).
MODULE_REDIS_URL = f"redis://127.0.0.1:6379/{redis_db(12)}"


@dataclass
class Env:
    settings: Settings
    chroma: ChromaServer
    control: ControlPlane


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Env]:
    client = flushed_redis(MODULE_REDIS_URL)
    root = tmp_path_factory.mktemp("defects")
    chroma = ChromaServer(root / "chroma").start()
    settings = Settings.from_env({
        "REEMBED_REDIS_URL": MODULE_REDIS_URL, "REEMBED_CHROMA_URL": chroma.url, "REEMBED_DATA_DIR": str(models_dir),
        "REEMBED_DEVICE": "cpu", "REEMBED_LOG_FORMAT": "json", "REEMBED_MAX_WAITING_BATCHES": "4"})
    workers = Workers(settings, 2, name=f"defects-{time.monotonic_ns()}@%h").start(root / "worker.log")
    try:
        yield Env(settings, chroma, ControlPlane(settings))
    finally:
        workers.stop(timeout=20)
        chroma.stop()
        client.flushdb()


def corpus(tmp_path: Path, n: int = 12, name: str = "corpus.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": f"note {i} on zebrafish heart cells",
                                        "metadata": {"n": i, "lang": "en"}}) + "\n" for i in range(n)))
    return path


def stored(chroma: ChromaServer, collection: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """Ids, text and metadata straight from Chroma."""
    col = chromadb.HttpClient(host="127.0.0.1", port=int(chroma.url.rsplit(":", 1)[1])).get_collection(collection)
    raw = col.get(include=["documents", "metadatas"])
    return {i: (t, m) for i, t, m in zip(raw["ids"], raw["documents"], raw["metadatas"], strict=True)}


def live(control: ControlPlane, alias: str) -> str:
    return control.registry.get_alias(alias).live_collection


def wait_for(what: str, check: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def migrated(tmp_path: Path, control: ControlPlane, alias: str) -> tuple[str, str]:
    """An alias ingested with one static model, migrated to the other, cut over: (old, new) collections."""
    ingest = control.ingest(alias, corpus(tmp_path), str(need(M2V_MINILM)), batch_size=4)
    assert control.wait(ingest.id, timeout=120).state == MigrationState.LIVE
    migration = control.migrate(alias, str(need(M2V_MPNET)), batch_size=4, cutover="manual")
    assert control.wait(migration.id, timeout=120).state == MigrationState.COMPLETE
    assert control.cutover(alias)["catching_up"] == 0
    return ingest.target_collection, migration.target_collection


@pytest.mark.parametrize("back_with", ["cutover", "rollback"])
def test_a_write_after_a_rollback_is_live_after_switching_back(
        back_with: str, tmp_path: Path, env: Env) -> None:
    settings, chroma, control = env.settings, env.chroma, env.control
    alias = f"back-{back_with}"
    old, new = migrated(tmp_path, control, alias)
    control.rollback(alias)
    assert live(control, alias) == old
    # When a document is added while rolled back, then the alias switches to the new collection again
    Writer(settings).upsert(alias, [Document("late", "a late note on axolotl regeneration", {"k": 1})], only_new=True)
    getattr(control, back_with)(alias)
    wait_for("the switch back", lambda: live(control, alias) == new)
    # Then the new live collection holds it (it was written there too, and diffed at the switch)
    assert "late" in stored(chroma, new) and set(stored(chroma, new)) == set(stored(chroma, old))


def test_a_write_around_reembed_after_a_rollback_is_caught_up_at_the_cutover(
        tmp_path: Path, env: Env) -> None:
    settings, chroma, control = env.settings, env.chroma, env.control
    alias = "around"
    old, new = migrated(tmp_path, control, alias)
    control.rollback(alias)
    # A write straight into the old collection, behind reembed's back (vector of its own model)
    from reembed.models import load_configured
    vector = load_configured(settings, str(need(M2V_MINILM))).embed_documents(["behind the back"])
    control.store.upsert(old, ids=["behind"], embeddings=vector, documents=["behind the back"], metadatas=[{"v": 1}])
    answer = control.cutover(alias)
    assert answer["catching_up"] == 1
    wait_for("the catch-up and switch", lambda: live(control, alias) == new)
    assert stored(chroma, new)["behind"][0] == "behind the back"


def test_a_rollback_while_a_migration_runs_is_refused_and_changes_nothing(
        tmp_path: Path, env: Env) -> None:
    settings, chroma, control = env.settings, env.chroma, env.control
    alias = "running"
    migrated(tmp_path, control, alias)
    second = control.migrate(alias, str(need(M2V_MINILM)), batch_size=2)
    control.pause(second.id)
    before = control.registry.get_alias(alias)
    with pytest.raises(MigrationStateError, match=f"reembed cancel {second.id}"):
        control.rollback(alias)
    assert control.registry.get_alias(alias) == before
    # The migration goes on; a write made meanwhile is live when it cuts over by itself
    control.resume(second.id)
    Writer(settings).upsert(alias, [Document("during", "written during the second migration", {})], only_new=True)
    assert control.wait(second.id, timeout=120).state == MigrationState.LIVE
    assert live(control, alias) == second.target_collection
    assert "during" in stored(chroma, second.target_collection)


def test_a_migration_whose_source_stopped_being_live_does_not_cut_over(
        tmp_path: Path, env: Env) -> None:
    """The rule under the refusal above, checked where the switch happens (another alias record
    written behind the control plane's back stands for a rollback made by an older reembed)."""
    control = env.control
    alias = "moved"
    old, _ = migrated(tmp_path, control, alias)
    second = control.migrate(alias, str(need(M2V_MINILM)), batch_size=2, cutover="manual")
    assert control.wait(second.id, timeout=120).state == MigrationState.COMPLETE
    control.registry.switch_alias(alias, old, None)
    with pytest.raises(MigrationStateError, match="serves"):
        control.cutover(alias)
    assert live(control, alias) == old


def test_a_migration_while_another_waits_for_its_cutover_is_refused(tmp_path: Path, env: Env) -> None:
    """Found by the long stateful run: a second migration was accepted while a manual one waited
    for its cutover; the waiting target then missed every write, and retire deleted its source."""
    control, alias = env.control, "waiting"
    ingest = control.ingest(alias, corpus(tmp_path), str(need(M2V_MINILM)), batch_size=4)
    assert control.wait(ingest.id, timeout=120).state == MigrationState.LIVE
    first = control.migrate(alias, str(need(M2V_MPNET)), batch_size=4, cutover="manual")
    assert control.wait(first.id, timeout=120).state == MigrationState.COMPLETE
    before = control.registry.get_alias(alias)
    with pytest.raises(MigrationStateError, match=f"waits for its cutover; `reembed cutover {alias}`, or "
                                                  f"`reembed cancel {first.id}`"):
        control.migrate(alias, str(need(M2V_MPNET)), batch_size=4)
    assert control.registry.get_alias(alias) == before and len(control.registry.migrations(alias)) == 2
    control.cancel(first.id)
    second = control.migrate(alias, str(need(M2V_MPNET)), batch_size=4)
    assert control.wait(second.id, timeout=120).state == MigrationState.LIVE


def test_one_collection_belongs_to_one_alias(
        tmp_path: Path, env: Env) -> None:
    chroma, control = env.chroma, env.control
    old, new = migrated(tmp_path, control, "a")
    # adopt refuses the live and the previous collection of another alias
    for name in (new, old):
        with pytest.raises(InputError, match="belongs to alias 'a'"):
            control.adopt("b", name, str(need(M2V_MPNET)), timeout=30)
    assert not control.registry.has_alias("b")
    # and retire never deletes another alias's collection, even in a registry an older reembed shared
    control.registry.switch_alias("b", old, None)
    plan = control.retire_candidates("b")
    assert old not in plan["deletable"]
    control.retire("b")
    assert set(stored(chroma, old)) and set(stored(chroma, new))


def test_upsert_replaces_metadata_and_the_next_migration_needs_no_catch_up(
        tmp_path: Path, env: Env) -> None:
    settings, chroma, control = env.settings, env.chroma, env.control
    alias = "meta"
    ingest = control.ingest(alias, corpus(tmp_path), str(need(M2V_MINILM)), batch_size=4)
    assert control.wait(ingest.id, timeout=120).state == MigrationState.LIVE
    # When a document is upserted with fewer metadata keys than it had
    Writer(settings).upsert(alias, [Document("d3", "a new text for d3", {"n": 33})])
    text, meta = stored(chroma, live(control, alias))["d3"]
    # Then its metadata is replaced, not merged, and its content hash agrees with it
    assert user_metadata(meta) == {"n": 33} and meta["content_hash"] == content_hash(text, meta)
    # ... so the next migration verifies in one pass and carries the same metadata
    migration = control.migrate(alias, str(need(M2V_MPNET)), batch_size=4)
    assert control.wait(migration.id, timeout=120).state == MigrationState.LIVE
    assert control.status(migration.id)["done"] == 12
    assert control.migration(migration.id).progress.get().get("round", "0") == "0"
    assert user_metadata(stored(chroma, migration.target_collection)["d3"][1]) == {"n": 33}


def test_adopt_with_no_worker_running_exits_3_naming_the_fix(
        tmp_path: Path, settings: Settings, chroma: ChromaServer) -> None:
    client = chromadb.HttpClient(host="127.0.0.1", port=int(chroma.url.rsplit(":", 1)[1]))
    client.create_collection("orphan").add(ids=["x"], embeddings=[[1.0, 0.0]], documents=["x"])
    env = {**os.environ, **settings.to_env(), "HF_HUB_OFFLINE": "1", "REEMBED_WORKER_WAIT_S": "3"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "cli.main", "adopt", "orphan", "--collection", "orphan",
                           "--model", str(need(M2V_MINILM)), "--workers", "0"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 3, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("reembed: error: ") and "reembed worker" in last, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert time.monotonic() - started < 60


def test_a_cutover_on_embedded_defaults_runs_its_catch_up_and_switches(tmp_path: Path) -> None:
    """No REEMBED_REDIS_URL: no other worker can see the catch-up a cutover starts, so the
    command runs it with its own workers and waits, instead of leaving it queued for nobody."""
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("REEMBED_")}
    env.update(REEMBED_DATA_DIR=str(data), HF_HUB_OFFLINE="1", REEMBED_LOG_FORMAT="json")

    def cli(*args: str) -> dict[str, Any]:
        done = subprocess.run([sys.executable, "-m", "cli.main", *args, "--json"], capture_output=True, text=True,
                              env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return dict(json.loads(done.stdout))

    # Ingest and a manual migration on the data folder's embedded stack (in process: one start-up)
    with LocalStack(Settings.from_env(env)) as local:
        local.start_workers(1)
        plane = ControlPlane(local.settings)
        ingest = plane.ingest("emb", corpus(tmp_path), str(need(M2V_MINILM)), batch_size=4)
        assert plane.wait(ingest.id, timeout=120).state == MigrationState.LIVE
        record = plane.migrate("emb", str(need(M2V_MPNET)), batch_size=4, cutover="manual")
        assert plane.wait(record.id, timeout=120).state == MigrationState.COMPLETE
        migration = plane.migration_status(record)
    # A write straight into the live collection while nothing runs (the data folder's Chroma)
    client = chromadb.PersistentClient(path=str(data / "chroma"))
    source = client.get_collection(migration["source_collection"])
    source.upsert(ids=["d1"], documents=["changed behind reembed's back"], metadatas=[{"n": 1}],
                  embeddings=source.get(ids=["d1"], include=["embeddings"])["embeddings"])
    del client
    answer = cli("cutover", "emb")
    assert answer["state"] == "live" and answer["live_collection"] == migration["target_collection"]
    client = chromadb.PersistentClient(path=str(data / "chroma"))
    assert client.get_collection(migration["target_collection"]).get(ids=["d1"])["documents"] == [
        "changed behind reembed's back"]
