"""Fault 5: poison documents, which make the model itself fail, in a running migration.

The poison is real: a copy of the m2v mpnet model whose embedding row for one word is NaN (as
corrupt weights would be). Every text containing that word embeds to NaN; the worker must find
those documents by splitting their batch, record them as failed with the reason, and finish
every other document of the batch.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

from producer import ControlPlane
from reembed.registry import MigrationState
from cli.services import Workers
from tests.conftest import M2V_MINILM, M2V_MPNET, need
from tests.faults.conftest import BATCH, DOCS, VISIBILITY_S, Source, check_outcome, read_all, scifact_subset

pytestmark = pytest.mark.integration

POISON_WORD = "saxophone"


def poisoned_model(tmp_path: Path) -> tuple[Path, int]:
    """A copy of the m2v mpnet model whose row for POISON_WORD is NaN."""
    target = tmp_path / "m2v-mpnet-poisoned"
    shutil.copytree(need(M2V_MPNET), target)
    token_ids = Tokenizer.from_file(str(target / "tokenizer.json")).encode(POISON_WORD, add_special_tokens=False).ids
    assert len(token_ids) == 1, "the poison word must be one token"
    weights = load_file(str(target / "model.safetensors"))
    weights["embeddings"][token_ids[0]] = np.nan
    save_file(weights, str(target / "model.safetensors"))
    return target, token_ids[0]


def test_poison_documents_are_isolated_and_recorded_while_the_rest_completes(
        tmp_path: Path, control: ControlPlane, start_workers: Callable[..., Workers]) -> None:
    # Given a 2,000-document corpus with 3 poison documents spread over different batches
    corpus = scifact_subset(tmp_path / "corpus.jsonl", DOCS)
    poison_ids = {"poison-a", "poison-b", "poison-c"}
    with open(corpus, "a") as out:
        for i, doc_id in enumerate(sorted(poison_ids)):
            out.write(json.dumps({"_id": doc_id, "title": "", "text": f"A {POISON_WORD} solo number {i} "
                                  "in a study of cell growth and protein folding."}) + "\n")
    model, _ = poisoned_model(tmp_path)
    for _ in range(2):
        start_workers(1, visibility_timeout_s=VISIBILITY_S)
    ingest = control.ingest("poison", corpus, str(need(M2V_MINILM)), batch_size=250)
    assert control.wait(ingest.id, timeout=300).state == MigrationState.LIVE
    ids, texts, _ = read_all(control, ingest.target_collection)
    assert sum(POISON_WORD in t for t in texts) == 3, "the poison word must appear only in the poison documents"
    source = Source("poison", ingest.target_collection, set(ids), target_model=str(model))
    # When the alias is migrated to the poisoned model
    migration = control.migrate("poison", str(model), batch_size=BATCH)
    # Then the migration goes live with everything but the poison documents
    check_outcome(control, source, migration, failed=frozenset(poison_ids))
    # ... each recorded as failed with the reason
    failures = control.status(migration.id)["failures"]
    assert set(failures) == poison_ids
    assert all("NaN" in reason for reason in failures.values())
