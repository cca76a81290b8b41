"""Ingest then migrate a real corpus through real Redis, a real Chroma server and real workers.

Checks are made independently of reembed's bookkeeping: ids are read straight from Chroma, and
stored vectors are compared with the new model's embedding computed here by sentence-transformers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import chromadb
import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from producer import ControlPlane
from reembed.errors import MissingTextError
from reembed.registry import MigrationState
from cli.services import ChromaServer, Workers
from tests.conftest import M2V_MINILM, M2V_MPNET, need
from tests.integration.conftest import scifact_subset

pytestmark = pytest.mark.integration


def all_docs(chroma: ChromaServer, name: str) -> dict[str, tuple[str, dict, np.ndarray]]:
    client = chromadb.HttpClient(host="127.0.0.1", port=chroma.port)
    col = client.get_collection(name)
    raw = col.get(include=["documents", "metadatas", "embeddings"], limit=100_000)
    return {i: (d, m, np.asarray(e)) for i, d, m, e in zip(raw["ids"], raw["documents"], raw["metadatas"],
                                                           raw["embeddings"], strict=True)}


def test_ingest_then_migrate_keeps_ids_metadata_and_uses_new_model(
        tmp_path: Path, chroma: ChromaServer, control: ControlPlane, start_workers: Callable[..., Workers]) -> None:
    # Given a 300-document SciFact corpus ingested with MiniLM by two worker processes
    corpus = scifact_subset(tmp_path / "corpus.jsonl", 300)
    start_workers(2)
    ingest = control.ingest("sci", corpus, "all-MiniLM-L6-v2", batch_size=32)
    assert control.wait(ingest.id, timeout=600).state == MigrationState.LIVE
    source = control.registry.get_alias("sci").live_collection
    # When it is migrated to another model (a static model distilled from mpnet, 256-d)
    target_model = str(need(M2V_MPNET))
    migration = control.migrate("sci", target_model, batch_size=50)
    final = control.wait(migration.id, timeout=600)
    # Then the migration is live and the alias points at the target
    assert final.state == MigrationState.LIVE, final.error
    assert control.registry.get_alias("sci").live_collection == migration.target_collection
    # ... the target holds exactly the source's ids (read from Chroma, not from reembed)
    src = all_docs(chroma, source)
    tgt = all_docs(chroma, migration.target_collection)
    assert set(tgt) == set(src) and len(tgt) == 300
    # ... the metadata is kept, with provenance added
    for doc_id, (text, meta, _) in src.items():
        assert tgt[doc_id][0] == text
        assert tgt[doc_id][1]["source"] == "scifact" and tgt[doc_id][1]["position"] == meta["position"]
        assert tgt[doc_id][1]["embedding_model"] == final.to_model
        assert tgt[doc_id][1]["model_fingerprint"] == final.to_fingerprint
    # ... and a sample of stored vectors equals the new model's embedding of the text
    model = SentenceTransformer(target_model, device="cpu")
    sample = sorted(tgt)[::30]
    expected = model.encode([tgt[i][0] for i in sample], normalize_embeddings=True)
    stored = np.stack([tgt[i][2] for i in sample])
    assert stored.shape == (len(sample), 256)
    np.testing.assert_allclose(stored, expected, atol=1e-3)
    # ... and the source's vectors are still MiniLM's 384-d vectors
    assert next(iter(src.values()))[2].shape == (384,)
    # ... and the progress counters equal the truth
    status = control.status("sci")
    assert (status["done"], status["failed"], status["skipped"], status["total"]) == (300, 0, 0, 300)
    # When rolled back, the alias serves the old collection again; the new one is kept
    control.rollback("sci")
    assert control.registry.get_alias("sci").live_collection == source
    control.cutover("sci")
    assert control.registry.get_alias("sci").live_collection == migration.target_collection


def test_documents_without_text_are_refused_and_listed(
        tmp_path: Path, chroma: ChromaServer, control: ControlPlane, start_workers: Callable[..., Workers]) -> None:
    # Given a corpus file with two documents whose text is empty or whitespace
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps(d) for d in [
        {"id": "a", "text": "a real document"}, {"id": "b", "text": ""}, {"id": "c", "text": "   "}]) + "\n")
    # Then ingest refuses, names them, and writes nothing
    with pytest.raises(MissingTextError) as caught:
        control.ingest("empty", corpus, str(need(M2V_MINILM)))
    assert caught.value.count == 2 and caught.value.first_ids == ["b", "c"]
    assert not control.registry.has_alias("empty")
    # Given an alias whose collection holds a document added with a vector but no text
    good = tmp_path / "g.jsonl"
    good.write_text("\n".join(json.dumps({"id": f"d{i}", "text": f"document number {i}"}) for i in range(20)) + "\n")
    start_workers(1)
    rec = control.ingest("notext", good, str(need(M2V_MINILM)))
    control.wait(rec.id, timeout=300)
    client = chromadb.HttpClient(host="127.0.0.1", port=chroma.port)
    client.get_collection(rec.target_collection).add(ids=["ghost"], embeddings=[[0.1] * 256])
    # Then migrate refuses and lists it, unless told to skip, which records it as skipped
    with pytest.raises(MissingTextError) as caught2:
        control.migrate("notext", str(need(M2V_MPNET)))
    assert caught2.value.first_ids == ["ghost"]
    migration = control.migrate("notext", str(need(M2V_MPNET)), skip_missing_text=True)
    assert control.wait(migration.id, timeout=300).state == MigrationState.LIVE
    status = control.status(migration.id)
    assert (status["done"], status["skipped"], status["total"]) == (20, 1, 21)
    assert client.get_collection(migration.target_collection).count() == 20


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def test_worker_killed_mid_migration_every_document_once(
        tmp_path: Path, chroma: ChromaServer, control: ControlPlane, start_workers: Callable[..., Workers]) -> None:
    # Given 300 documents ingested with a fast static model, migrating to MiniLM (slow) in small batches
    corpus = scifact_subset(tmp_path / "corpus.jsonl", 300)
    first = start_workers(1, visibility_timeout_s=20)  # longer than a batch even on a busy machine
    ingest = control.ingest("kill", corpus, str(need(M2V_MINILM)), batch_size=100)
    control.wait(ingest.id, timeout=300)
    migration = control.migrate("kill", "all-MiniLM-L6-v2", batch_size=16)
    # When some batches are done, the whole worker (main process and pool) is SIGKILLed mid-batch
    deadline = time.monotonic() + 300
    while control.status(migration.id)["done"] < 48 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.process is not None
    os.killpg(first.process.pid, signal.SIGKILL)
    first.process.wait()
    done_at_kill = control.status(migration.id)["done"]
    assert done_at_kill < 300, "the migration finished before the kill; the test proves nothing"
    # ... and another worker is started
    start_workers(2, visibility_timeout_s=20)
    final = control.wait(migration.id, timeout=600)
    # Then the migration completes with every document exactly once
    assert final.state == MigrationState.LIVE, final.error
    tgt = all_docs(chroma, migration.target_collection)
    src = all_docs(chroma, ingest.target_collection)
    assert set(tgt) == set(src) and len(tgt) == 300
    assert all(m["embedding_model"] == "all-MiniLM-L6-v2" for _, m, _ in tgt.values())
    status = control.status(migration.id)
    assert (status["done"], status["failed"], status["total"]) == (300, 0, 300)


def test_resume_after_redis_lost_everything_finishes_by_diffing(
        tmp_path: Path, chroma: ChromaServer, control: ControlPlane, start_workers: Callable[..., Workers],
        redis_url: str) -> None:
    import redis as redis_lib

    # Given an alias of 120 documents and a migration that half ran
    corpus = scifact_subset(tmp_path / "corpus.jsonl", 120)
    first = start_workers(1)
    ingest = control.ingest("lost", corpus, str(need(M2V_MINILM)), batch_size=40)
    control.wait(ingest.id, timeout=300)
    first.stop()
    migration = control.migrate("lost", str(need(M2V_MPNET)), batch_size=20)
    client = chromadb.HttpClient(host="127.0.0.1", port=chroma.port)
    source = client.get_collection(ingest.target_collection)
    half = source.get(limit=60, include=["documents", "metadatas"])
    from reembed.documents import content_hash
    client.get_collection(migration.target_collection).upsert(
        ids=half["ids"], embeddings=[[0.0] * 255 + [1.0]] * 60, documents=half["documents"],
        metadatas=[{**m, "content_hash": content_hash(d, m), "model_fingerprint": migration.to_fingerprint}
                   for d, m in zip(half["documents"], half["metadatas"], strict=True)])
    # When Redis loses everything (queue, progress) and workers come back
    redis_lib.Redis.from_url(redis_url).flushdb()
    start_workers(1)
    control.resume(migration.id)
    final = control.wait(migration.id, timeout=300)
    # Then the migration finishes from the durable records: the diff fed only the missing 60
    assert final.state == MigrationState.LIVE, final.error
    tgt = all_docs(chroma, migration.target_collection)
    assert len(tgt) == 120
    status = control.status(migration.id)
    assert (status["done"], status["total"], status["failed"]) == (120, 120, 0)
    recomputed = [i for i, (_, _, v) in tgt.items() if v[-1] < 0.999]
    assert len(recomputed) == 60  # the other 60 were trusted by id + content hash, not re-embedded


def test_backpressure_bounds_the_batches_waiting_in_redis(
        tmp_path: Path, control: ControlPlane, start_workers: Callable[..., Workers], redis_url: str) -> None:
    import redis as redis_lib

    # Given an alias of 200 documents and a worker that only runs control tasks (nobody embeds)
    corpus = scifact_subset(tmp_path / "corpus.jsonl", 200)
    first = start_workers(1)
    ingest = control.ingest("bp", corpus, str(need(M2V_MINILM)), batch_size=50)
    control.wait(ingest.id, timeout=300)
    first.stop()
    start_workers(1, queues="reembed.control")
    # When a migration in batches of 10 (20 batches) is started with at most 4 waiting
    migration = control.migrate("bp", str(need(M2V_MPNET)), batch_size=10)
    client = redis_lib.Redis.from_url(redis_url)
    deadline = time.monotonic() + 60
    while client.llen("reembed.batches") < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # the pump keeps running every 0.5 s meanwhile
    # Then exactly 4 batches wait in Redis, not 20
    assert client.llen("reembed.batches") == 4
    assert control.status(migration.id)["done"] == 0
    # And when an embedding worker joins, the migration drains and completes
    start_workers(1)
    assert control.wait(migration.id, timeout=300).state == MigrationState.LIVE
    assert control.status(migration.id)["done"] == 200
