"""The OpenVINO runtime gives torch's vectors, in process and through real workers.

Skipped only when openvino is not installed (``pip install 'reembed[openvino]'``); CI installs it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from producer import ControlPlane
from reembed.errors import ConfigError
from reembed.models import load_model, locate_weights_if_installed, resolve_model
from reembed.registry import MigrationState
from reembed.runtimes import openvino_cache
from cli.services import ChromaServer, Workers
from tests.conftest import M2V_MINILM, SCIFACT, need
from tests.integration.conftest import scifact_subset
from tests.integration.test_migration import all_docs

pytestmark = pytest.mark.integration
pytest.importorskip("openvino")


def scifact_texts(n: int) -> list[str]:
    with open(need(SCIFACT / "corpus.jsonl")) as handle:
        rows = [json.loads(line) for _, line in zip(range(n), handle)]
    return [f"{r['title']} {r['text']}" for r in rows]


def test_openvino_embeds_like_torch_and_caches_its_conversion(models_dir: Path) -> None:
    texts = scifact_texts(40) + ["", "a", "x " * 2000]  # empty, one character, far past the 256-token limit
    spec = resolve_model("all-MiniLM-L6-v2")
    # Given the same model loaded with each runtime (one thread each, as a worker runs it)
    torch_model = load_model(spec, models_dir, "cpu", threads=1, backend="torch")
    ov_model = load_model(spec, models_dir, "cpu", threads=1, backend="openvino")
    # Then each says which runtime runs it, and the converted model is cached under its fingerprint
    assert (torch_model.backend, ov_model.backend) == ("torch", "openvino")
    cached = openvino_cache(models_dir, ov_model.fingerprint) / "model.xml"
    assert cached.exists() and cached.with_suffix(".bin").stat().st_size > 80e6  # fp32 weights, not fp16
    # ... and their vectors agree far inside the 1e-3 cosine the issue allows, texts in any order
    a = torch_model.embed_documents(texts)
    b = ov_model.embed_documents(list(reversed(texts)))[::-1]
    cosine = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosine.min() > 1 - 1e-5, cosine.min()
    np.testing.assert_allclose(a, b, atol=1e-4)
    # ... and with sentence-transformers itself, untouched by reembed
    reference = SentenceTransformer(str(locate_weights_if_installed(spec)), device="cpu")
    reference.max_seq_length = spec.max_seq_length
    np.testing.assert_allclose(b, reference.encode(texts, normalize_embeddings=True), atol=1e-4)
    # ... and queries too (the search service embeds them with the same runtime)
    np.testing.assert_allclose(ov_model.embed_queries(["vitamin D and bone density"]),
                               torch_model.embed_queries(["vitamin D and bone density"]), atol=1e-4)


def test_openvino_falls_back_to_torch_for_a_static_model_and_refuses_a_gpu(models_dir: Path) -> None:
    # A static model has no transformer to convert: it runs with torch, and says so
    static = load_model(resolve_model(str(need(M2V_MINILM))), models_dir, "cpu", backend="openvino")
    assert static.backend == "torch"
    # OpenVINO on a GPU is refused before anything loads, with the fix in the message
    with pytest.raises(ConfigError, match="REEMBED_DEVICE=cpu or REEMBED_BACKEND=torch"):
        load_model(resolve_model("all-MiniLM-L6-v2"), models_dir, "cuda", backend="openvino")


def test_workers_on_openvino_migrate_to_the_same_vectors_as_torch(
        tmp_path: Path, chroma: ChromaServer, control: ControlPlane, start_workers: Callable[..., Workers]) -> None:
    # Given 120 SciFact documents ingested with a static model
    corpus = scifact_subset(tmp_path / "corpus.jsonl", 120)
    torch_workers = start_workers(2)
    ingest = control.ingest("sci", corpus, str(need(M2V_MINILM)), batch_size=40)
    assert control.wait(ingest.id, timeout=300).state == MigrationState.LIVE
    torch_workers.stop()
    # When two worker processes running MiniLM with OpenVINO migrate it
    ov_workers = start_workers(2, backend="openvino", preload_model="all-MiniLM-L6-v2")
    migration = control.migrate("sci", "all-MiniLM-L6-v2", batch_size=32)
    final = control.wait(migration.id, timeout=600)
    ov_workers.stop()
    # Then it is live with every document, each stored vector equal to torch's embedding of its text
    assert final.state == MigrationState.LIVE, final.error
    stored = all_docs(chroma, migration.target_collection)
    assert len(stored) == 120
    ids = sorted(stored)
    spec = resolve_model("all-MiniLM-L6-v2")
    reference = SentenceTransformer(str(locate_weights_if_installed(spec)), device="cpu")
    reference.max_seq_length = spec.max_seq_length
    expected = reference.encode([stored[i][0] for i in ids], normalize_embeddings=True)
    np.testing.assert_allclose(np.stack([stored[i][2] for i in ids]), expected, atol=1e-3)
    # ... and the workers' log says which runtime ran the model
    log = (tmp_path / "worker.log").read_text()
    loaded = [json.loads(line) for line in log.splitlines() if '"model loaded"' in line and "MiniLM-L6" in line]
    assert loaded and all(entry["backend"] == "openvino" for entry in loaded)
