"""Applications that read Chroma directly: after a migration, the live collection is an ordinary
Chroma collection that embeds queries with the right model, in the source's own space."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import chromadb
import numpy as np
from chromadb.utils.embedding_functions import SentenceTransformerEmbeddingFunction
import pytest

from cli.services import ChromaServer, Workers
from producer import ControlPlane
from reembed.registry import MigrationState
from reembed.settings import Settings
from search.searcher import Searcher
from tests.conftest import M2V_MINILM, M2V_MPNET, SCIFACT, need, readme_snippet

pytestmark = pytest.mark.integration

FOLLOWER = """
import json, sys
import chromadb
from reembed.client import live_collection
host, port = sys.argv[1], int(sys.argv[2])
queries = json.loads(sys.stdin.read())
collection = live_collection(chromadb.HttpClient(host=host, port=port), "app")
print(json.dumps({"name": collection.name, "ids": collection.query(query_texts=queries, n_results=10)["ids"],
                  "queue": sorted(m for m in ("redis", "celery") if m in sys.modules)}))
"""

READER = """
import json, sys
import chromadb
host, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
queries = json.loads(sys.stdin.read())
collection = chromadb.HttpClient(host=host, port=port).get_collection(name)  # its persisted embedding function
ids = collection.query(query_texts=queries, n_results=10)["ids"]
assert "reembed" not in sys.modules
print(json.dumps(ids))
"""


def test_the_target_mirrors_the_source_and_a_plain_client_gets_the_same_answers(
        settings: Settings, chroma: ChromaServer, control: ControlPlane, start_workers: Callable[..., Workers],
        tmp_path: Path) -> None:
    port = int(chroma.url.rsplit(":", 1)[1])
    client = chromadb.HttpClient(host="127.0.0.1", port=port)
    # A collection made the way an application makes one: l2 space, its own HNSW settings, metadata
    # and Chroma's SentenceTransformerEmbeddingFunction.
    embed = SentenceTransformerEmbeddingFunction(model_name=str(need(M2V_MINILM)), normalize_embeddings=True)
    source = client.create_collection(
        "app-docs", metadata={"team": "search", "lang": "en"}, embedding_function=embed,  # type: ignore[arg-type]
        configuration={"hnsw": {"space": "l2", "ef_construction": 150, "max_neighbors": 24}})
    with open(need(SCIFACT) / "corpus.jsonl") as src:
        rows = [json.loads(line) for _, line in zip(range(300), src, strict=False)]
    source.add(ids=[r["_id"] for r in rows], documents=[f"{r['title']} {r['text']}" for r in rows],
               metadatas=[{"n": i, "year": 2000 + i % 30} for i in range(len(rows))])

    start_workers(1)
    control.adopt("app", "app-docs", timeout=120)
    record = control.migrate("app", str(need(M2V_MPNET)), batch_size=50)
    assert control.wait(record.id, timeout=300).state == MigrationState.LIVE
    live = control.registry.get_alias("app").live_collection
    assert live == record.target_collection

    target = client.get_collection(live)
    hnsw = target.configuration_json["hnsw"]
    assert (hnsw["space"], hnsw["ef_construction"], hnsw["max_neighbors"]) == ("l2", 150, 24)
    assert {"team": "search", "lang": "en"}.items() <= (target.metadata or {}).items()
    function = target.configuration_json["embedding_function"]
    assert function["name"] == "sentence_transformer"
    assert function["config"]["model_name"] == str(need(M2V_MPNET).resolve())

    with open(need(SCIFACT) / "queries.jsonl") as src:
        queries = [json.loads(line)["text"] for _, line in zip(range(20), src, strict=False)]
    searcher = Searcher(settings)
    ours = [[hit.id for hit in searcher.search("app", q, k=10, mode="semantic").results] for q in queries]
    # In the l2 space too, a semantic score is the cosine similarity of query and document (within
    # what the static model's normalisation leaves: its unit vectors have norms of 1 ± 3e-4).
    top = searcher.search("app", queries[0], k=3, mode="semantic").results
    vectors = target.get(ids=[h.id for h in top], include=["embeddings"])
    q = searcher.model_for(control.registry.get_collection(live)).embed_queries([queries[0]])[0]
    cosine = {doc_id: float(np.dot(q, v) / np.linalg.norm(q) / np.linalg.norm(v))
              for doc_id, v in zip(vectors["ids"], np.asarray(vectors["embeddings"]), strict=True)}
    assert [h.score for h in top] == pytest.approx([cosine[h.id] for h in top], abs=2e-3)
    theirs = subprocess.run([sys.executable, "-c", READER, "127.0.0.1", str(port), live], input=json.dumps(queries),
                            capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert theirs.returncode == 0, theirs.stderr[-2000:]
    assert json.loads(theirs.stdout) == ours
    # The documented way to find it: reembed.client reads the alias from Chroma alone.
    follower = subprocess.run([sys.executable, "-c", FOLLOWER, "127.0.0.1", str(port)], input=json.dumps(queries),
                              capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2],
                              check=False)
    assert follower.returncode == 0, follower.stderr[-2000:]
    found = json.loads(follower.stdout)
    assert found == {"name": live, "ids": ours, "queue": []}, found

    # The README's snippets, as a user copies them (only the address and the alias's name changed:
    # "localhost" does not resolve on every test machine).
    query, where = "how do zebrafish regrow fins?", {"year": {"$gte": 2020}}
    expected = [hit.id for hit in Searcher(settings).search("app", query, k=10, mode="semantic", where=where).results]
    assert len(expected) == 10
    for name in ("plain-chromadb", "langchain"):
        code = (readme_snippet(name).replace('host="localhost", port=8000', f'host="127.0.0.1", port={port}')
                .replace('"docs"', '"app"'))
        ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             cwd=Path(__file__).parents[2], check=False)
        assert ran.returncode == 0, f"{name}: {ran.stderr[-2000:]}"
        assert ast.literal_eval(ran.stdout.strip()) == expected, name

