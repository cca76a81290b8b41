"""Writes during a migration, final catch-up at cutover, canary, history and retire, for real.

Writes go through the alias (``Writer``) and also straight into the source collection behind
reembed's back; the migration must end with the target equal to the source either way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from producer import ControlPlane, Writer
from reembed.documents import Document
from reembed.errors import InputError, MigrationStateError
from reembed.models import load_model, resolve_model
from reembed.registry import MigrationState
from cli.services import ChromaServer, Workers
from reembed.settings import Settings
from search import Searcher
from tests.conftest import M2V_MPNET, need
from tests.integration.conftest import scifact_subset
from tests.integration.test_migration import all_docs

pytestmark = pytest.mark.integration


def wait_for(predicate: Callable[[], bool], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def test_writes_during_migration_reach_the_target_and_cutover_catches_up(
        tmp_path: Path, settings: Settings, chroma: ChromaServer, control: ControlPlane,
        start_workers: Callable[..., Workers]) -> None:
    start_workers(2)
    corpus = scifact_subset(tmp_path / "corpus.jsonl", 200)
    ingest = control.ingest("sci", corpus, "all-MiniLM-L6-v2", batch_size=50)
    assert control.wait(ingest.id, timeout=600).state == MigrationState.LIVE
    source = control.registry.get_alias("sci").live_collection
    writer = Writer(settings)
    minilm = load_model(resolve_model("all-MiniLM-L6-v2"), settings.data_dir, "cpu")
    target_model = str(need(M2V_MPNET))
    migration = control.migrate("sci", target_model, batch_size=10, cutover="manual")
    wait_for(lambda: control.status(migration.id)["done"] >= 20)
    # During the run: through the alias...
    writer.upsert("sci", [Document(f"new-{i}", f"Brand new abstract number {i} about zebrafish", {"n": i})
                          for i in range(3)], only_new=True)
    with pytest.raises(InputError, match="already exist"):
        writer.upsert("sci", [Document("new-0", "again", {})], only_new=True)
    first_ids = sorted(all_docs(chroma, source))[:5]
    writer.upsert("sci", [Document(first_ids[0], "A changed abstract about zebrafish hearts", {"v": 2}),
                          Document(first_ids[1], "Another changed abstract", {"v": 2})])
    writer.delete("sci", first_ids[2:4])
    # ...and straight into the source collection, behind reembed's back
    text = "Written around reembed: a note on axolotl regeneration"
    control.store.upsert(source, ids=["behind-1"], embeddings=minilm.embed_documents([text]), documents=[text],
                         metadatas=[{"via": "chroma"}])
    final = control.wait(migration.id, timeout=600)
    assert final.state == MigrationState.COMPLETE, final.error
    # After completion, before cutover: another write behind reembed's back
    control.store.delete_ids(source, [first_ids[4]])
    # Canary: 30 % of client keys are served by the new collection, each answer naming its model
    control.canary("sci", 30)
    searcher = Searcher(settings)
    served = [searcher.search("sci", "zebrafish heart", 5, "hybrid", client_key=f"c{i}").served_by
              for i in range(200)]
    canary_share = sum(s.canary for s in served) / len(served)
    assert 0.2 < canary_share < 0.4
    for s in served:
        assert s.model == searcher.collection_record(s.collection).model
        assert (s.collection == migration.target_collection) == s.canary
    # A fused canary: both collections answer, each with its own model; every hit says which found it.
    control.canary("sci", 100, fuse=True)
    fused = searcher.search("sci", "zebrafish heart", 10, "hybrid")
    served = fused.served_by
    assert (served.collection, served.model, served.canary) == (source, "all-MiniLM-L6-v2", True)
    assert served.fused_with is not None and (served.fused_with.collection, served.fused_with.model) == (
        migration.target_collection, target_model)
    assert any(h.ranks.semantic_canary is not None for h in fused.results)
    # ...and each rank is that collection's own ranking by its own model.
    control.canary("sci", 100)
    routed = searcher.search("sci", "zebrafish heart", 100, "semantic")
    assert routed.served_by.collection == migration.target_collection and routed.served_by.fused_with is None
    control.canary("sci", 0)
    old = searcher.search("sci", "zebrafish heart", 100, "semantic")
    new_rank = {h.id: i for i, h in enumerate(routed.results, start=1)}
    old_rank = {h.id: i for i, h in enumerate(old.results, start=1)}
    for hit in fused.results:
        assert (hit.ranks.semantic, hit.ranks.semantic_canary) == (old_rank.get(hit.id), new_rank.get(hit.id))
    control.canary("sci", 0)
    assert not searcher.search("sci", "zebrafish", 5, client_key="c1").served_by.canary
    # Cutover runs a final catch-up (the deletion above), then switches by itself
    answer = control.cutover("sci")
    assert answer["catching_up"] >= 1
    wait_for(lambda: control.registry.get_alias("sci").live_collection == migration.target_collection)
    src, tgt = all_docs(chroma, source), all_docs(chroma, migration.target_collection)
    assert set(tgt) == set(src)
    assert {"new-0", "new-1", "new-2", "behind-1"} <= set(tgt) and not set(first_ids[2:5]) & set(tgt)
    for doc_id in src:
        assert tgt[doc_id][0] == src[doc_id][0]
    model = SentenceTransformer(target_model, device="cpu")
    check = [first_ids[0], "new-1", "behind-1"]
    expected = model.encode([tgt[i][0] for i in check], normalize_embeddings=True)
    np.testing.assert_allclose(np.stack([tgt[i][2] for i in check]), expected, atol=1e-3)
    # History and retire
    history = control.history("sci")
    assert [m["kind"] for m in history["migrations"]] == ["migrate", "ingest"]
    assert history["migrations"][0]["live"] and history["migrations"][0]["state"] == "live"
    plan = control.retire_candidates("sci")
    assert plan["previous"] == source and plan["deletable"] == [] and plan["keep"] == [migration.target_collection]
    with pytest.raises(InputError, match="not 'sci'"):
        control.retire("sci", also_previous="some-other-collection")
    assert control.retire("sci", also_previous=source)["deleted"] == [source]
    assert not control.store.exists(source)
    with pytest.raises(MigrationStateError, match="no previous collection"):
        control.rollback("sci")
