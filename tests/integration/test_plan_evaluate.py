"""`plan` and `evaluate` on a real corpus in a real Chroma, with real models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from producer import ControlPlane
from producer.evaluate import Evaluator, write_report
from producer.plan import plan
from reembed.registry import MigrationState
from cli.services import Workers
from reembed.settings import Settings
from tests.conftest import M2V_MPNET, SCIFACT, need
from tests.integration.conftest import scifact_subset

pytestmark = pytest.mark.integration


@pytest.fixture
def sci(tmp_path: Path, control: ControlPlane, start_workers: Callable[..., Workers]) -> str:
    start_workers(1)
    record = control.ingest("sci", scifact_subset(tmp_path / "corpus.jsonl", 150), "all-MiniLM-L6-v2", batch_size=50)
    assert control.wait(record.id, timeout=600).state == MigrationState.LIVE
    return "sci"


def test_plan_counts_measures_and_prices(settings: Settings, sci: str) -> None:
    result = plan(settings, sci, str(need(M2V_MPNET)), workers=2, sample=50, queries_per_month=1e6,
                  value_per_query=0.01, engineering_cost=5000, quality_gain=0.02)
    assert (result["documents"], result["documents_without_text"], result["blocked"]) == (150, 0, False)
    assert result["dimension"] == 256 and result["storage_vectors_bytes"] == 150 * 256 * 4
    assert result["tokens"] > 150 * 50 and result["docs_per_s"] > 0 and result["estimated_wall_s"] > 0
    assert result["api_cost"] == 0 and result["monthly_benefit"] == pytest.approx(1e6 * 0.01 * 0.02)
    assert result["months_to_break_even"] == pytest.approx(5000 / 200)
    # The target mirrors the source's space; unit vectors rank alike in every space: no warning.
    assert (result["space"], result["normalized"], result["warnings"]) == ("cosine", True, [])
    minilm = plan(settings, sci, "all-MiniLM-L6-v2", sample=20)
    assert minilm["max_sequence_length"] == 256 and minilm["documents_truncated"] > 0  # SciFact abstracts are long


def test_evaluate_judged_and_synthetic_with_report_and_exit_code(
        tmp_path: Path, settings: Settings, sci: str) -> None:
    evaluator = Evaluator(settings)
    judged = evaluator.run(sci, str(need(M2V_MPNET)), SCIFACT / "queries.jsonl", SCIFACT / "qrels" / "test.tsv")
    assert judged["queries"] >= 1 and judged["queries_kind"].startswith("judged")
    assert set(judged["metrics"]) == {"old", "new", "bm25", "hybrid-old", "hybrid-new"}
    assert judged["verdict"] in ("GO", "NO-GO", "INCONCLUSIVE") and judged["new_vectors"] == "embedded here"
    synthetic = evaluator.run(sci, str(need(M2V_MPNET)), synthetic=40, sample=120)
    assert synthetic["queries_kind"].startswith("synthetic") and synthetic["queries"] >= 30
    assert synthetic["documents"] == 120
    assert synthetic["metrics"]["bm25"]["recall@100"] > 0.5  # the cut sentence's document is findable
    files = write_report(synthetic, tmp_path / "report")
    assert all(f.stat().st_size > 0 for f in files) and files[2].read_bytes()[:4] == b"\x89PNG"
    env = {**os.environ, **settings.to_env()}
    done = subprocess.run([sys.executable, "-m", "cli.main", "evaluate", sci, "--to", str(M2V_MPNET),
                           "--synthetic", "30", "--json"], env=env, capture_output=True, text=True, timeout=600)
    report = json.loads(done.stdout)
    assert done.returncode == {"GO": 0, "NO-GO": 1, "INCONCLUSIVE": 3}[report["verdict"]], done.stderr


def test_evaluate_embeds_its_sample_on_the_workers(tmp_path: Path, settings: Settings, sci: str) -> None:
    # the `sci` fixture's worker is running
    here = Evaluator(settings).run(sci, str(need(M2V_MPNET)), SCIFACT / "queries.jsonl",
                                   SCIFACT / "qrels" / "test.tsv", sample=60)
    remote = Evaluator(settings, on_workers=True).run(sci, str(need(M2V_MPNET)), SCIFACT / "queries.jsonl",
                                                      SCIFACT / "qrels" / "test.tsv", sample=60)
    assert remote["new_vectors"] == "embedded on the workers (cpu)" and here["new_vectors"] == "embedded here"
    assert remote["documents"] == here["documents"] <= 60 and remote["collection_documents"] == 150
    for system in ("old", "new", "bm25"):
        assert remote["metrics"][system]["ndcg@10"] == pytest.approx(here["metrics"][system]["ndcg@10"], abs=1e-6)
