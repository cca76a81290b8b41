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
from producer.plan import PROBE_DOCS, PROBE_PREFIX, plan
from reembed.errors import InputError
from reembed.registry import MigrationState
from cli.services import Workers
from reembed.settings import Settings
from reembed.store import Store
from search import Searcher
from tests.conftest import M2V_MPNET, SCIFACT, need
from tests.integration.conftest import scifact_subset

pytestmark = pytest.mark.integration


@pytest.fixture
def sci(tmp_path: Path, control: ControlPlane, start_workers: Callable[..., Workers]) -> str:
    start_workers(1)
    record = control.ingest("sci", scifact_subset(tmp_path / "corpus.jsonl", 150), "all-MiniLM-L6-v2", batch_size=50)
    assert control.wait(record.id, timeout=600).state == MigrationState.LIVE
    return "sci"


def test_plan_counts_measures_and_prices(settings: Settings, control: ControlPlane, sci: str) -> None:
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
    # Chroma's write rate, measured on a throw-away collection that is gone afterwards; the wall
    # time follows the slower of the model and the server.
    for made in (result, minilm):
        assert made["chroma_write_docs_per_s"] > 0 and made["chroma_probe_documents"] == PROBE_DOCS
        assert made["docs_per_s"] == pytest.approx(min(made["model_docs_per_s"], made["chroma_write_docs_per_s"]),
                                                   rel=1e-3)
        assert made["bound_by"] == ("model" if made["model_docs_per_s"] <= made["chroma_write_docs_per_s"]
                                    else "chroma")
    names = [getattr(c, "name", c) for c in Store.from_settings(settings).client.list_collections()]
    assert not [n for n in names if n.startswith(PROBE_PREFIX)], names

    # The next migration of the alias to that model keeps the plan; `history` shows both.
    made = plan(settings, sci, str(need(M2V_MPNET)), workers=1, sample=20)
    record = control.migrate(sci, str(M2V_MPNET))
    assert record.plan is not None and record.plan.wall_s == pytest.approx(made["estimated_wall_s"], abs=1e-3)
    assert control.wait(record.id, timeout=600).state == MigrationState.LIVE
    row = control.history(sci)["migrations"][0]
    assert row["migration_id"] == record.id and row["wall_s"] > 0 and row["docs_per_s"] > 0
    assert (row["planned_workers"], row["planned_bound_by"]) == (1, made["bound_by"])
    assert row["planned_wall_s"] == pytest.approx(made["estimated_wall_s"], abs=1e-3)
    env = {**os.environ, **settings.to_env()}
    shown = subprocess.run([sys.executable, "-m", "cli.main", "history", sci], env=env, capture_output=True,
                           text=True, timeout=120)
    assert f"(planned {made['estimated_wall_s']:.0f} s, {made['bound_by']}-bound, 1 worker)" in shown.stdout, shown
    # the ingest had no plan: no planned figures
    assert control.history(sci)["migrations"][1]["planned_wall_s"] is None


def test_evaluate_judged_synthetic_on_the_workers_with_report_and_exit_code(
        tmp_path: Path, settings: Settings, sci: str) -> None:
    evaluator = Evaluator(settings)
    judged = evaluator.run(sci, str(need(M2V_MPNET)), SCIFACT / "queries.jsonl", SCIFACT / "qrels" / "test.tsv")
    assert judged["queries"] >= 1 and judged["queries_kind"].startswith("judged")
    assert set(judged["metrics"]) == {"old", "new", "bm25", "hybrid-old", "hybrid-new"}
    assert judged["verdict"] in ("GO", "NO-GO", "INCONCLUSIVE") and judged["new_vectors"] == "embedded here"
    assert "too few" in judged["fusion"]["new"]["why_not"]  # 5 test queries judge these 150 documents
    # The train split judges 23 of them: enough to choose each model's fusion, which the alias then carries.
    tuned = evaluator.run(sci, str(need(M2V_MPNET)), SCIFACT / "queries.jsonl", SCIFACT / "qrels" / "train.tsv",
                          apply_fusion=True)
    alias = evaluator.registry.get_alias(sci)
    for side, model in (("old", "all-MiniLM-L6-v2"), ("new", str(M2V_MPNET))):
        row = tuned["fusion"][side]
        assert row["in_sample"] >= max(row["references"]["bm25"], row["references"]["semantic"]) - 1e-9
        assert alias.fusion[model].describe() == row["recommended_fusion"]
    searcher = Searcher(settings)
    served = searcher.search(sci, "vitamin D deficiency", 5).served_by
    searcher.close()
    assert served.fusion == tuned["fusion"]["old"]["recommended_fusion"]
    with pytest.raises(InputError, match="needs judged queries"):
        evaluator.run(sci, str(need(M2V_MPNET)), synthetic=30, apply_fusion=True)
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

    # On the workers (the `sci` fixture's worker is running): the same figures as here.
    here = Evaluator(settings).run(sci, str(need(M2V_MPNET)), SCIFACT / "queries.jsonl",
                                   SCIFACT / "qrels" / "test.tsv", sample=60)
    remote = Evaluator(settings, on_workers=True).run(sci, str(need(M2V_MPNET)), SCIFACT / "queries.jsonl",
                                                      SCIFACT / "qrels" / "test.tsv", sample=60)
    assert remote["new_vectors"] == "embedded on the workers (cpu)" and here["new_vectors"] == "embedded here"
    assert remote["documents"] == here["documents"] <= 60 and remote["collection_documents"] == 150
    for system in ("old", "new", "bm25"):
        assert remote["metrics"][system]["ndcg@10"] == pytest.approx(here["metrics"][system]["ndcg@10"], abs=1e-6)
