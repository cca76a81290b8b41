"""Fusion on BEIR SciFact: which hybrid serves best, chosen on the train split, reported on the test split.

For each semantic model (a static model, MiniLM, mpnet) the 5,183 documents and every train and
test query are embedded in this process, and each query gets two top-100 lists: BM25 (reembed's
``Bm25Index``) and exact cosine over the model's vectors. Fusions are then computed on those
lists, so every figure of one model comes from the same rankings:

- equal-weight RRF (k=60), what ``hybrid`` served before;
- the default fusion (``reembed.fusion.DEFAULT_FUSION``), chosen on the train split only: among
  the fusions that give both retrievers equal shares (with no judged queries nothing says which is
  the stronger), the one whose worst loss to the better half of its two retrievers, over the three
  models, is smallest (``--choose-default`` prints that choice, and the unrestricted one);
- the fusion ``reembed evaluate`` would choose from the train split's judged queries
  (``reembed.fusion_tuning.tune``), with its 5-fold cross-validated train score;
- the fused canary (``old+new+bm25``): a first model's and a second model's lists fused with BM25,
  against ``new+bm25``.

Nothing is tuned on the test split. Vectors are cached under ``.reembed/bench-fusion``.

Run: ``.venv/bin/python bench/bench_fusion.py`` (the first time about 2 hours on 2 CPU cores, mpnet's
5,183 documents 98 minutes of it; minutes once the vectors are cached).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import ROOT, SCIFACT, SHARED, scifact_texts, write_section  # noqa: E402
from reembed.bm25 import Bm25Index, IndexSignature  # noqa: E402
from reembed.fusion import DEFAULT_FUSION, FusionSpec  # noqa: E402
from reembed.fusion_tuning import Lists, grid, per_query_scores, tune  # noqa: E402
from reembed.metrics import METRICS, read_qrels, read_queries  # noqa: E402
from reembed.models import load_configured  # noqa: E402
from reembed.settings import Settings  # noqa: E402

DEPTH = 100
METRIC = "ndcg@10"
MODELS = (str(SHARED / "models" / "m2v-minilm-256"), "all-MiniLM-L6-v2", "all-mpnet-base-v2")


def short(model: str) -> str:
    return Path(model).name


def vectors(settings: Settings, model_name: str, texts: list[str], kind: str, cache: Path) -> np.ndarray:
    path = cache / f"{short(model_name)}-{kind}.npy"
    if path.exists():
        return np.load(path)
    model = load_configured(settings, model_name)
    started = time.monotonic()
    out = model.embed_documents(texts) if kind == "docs" else model.embed_queries(texts)
    print(f"{short(model_name)} {kind}: {len(texts)} in {time.monotonic() - started:.0f} s", flush=True)
    np.save(path, out)
    return out


def top(query_vectors: np.ndarray, doc_vectors: np.ndarray, ids: list[str]) -> list[list[tuple[str, float]]]:
    scores = query_vectors @ doc_vectors.T
    out = []
    for row in scores:
        best = np.argpartition(-row, DEPTH)[:DEPTH]
        best = best[np.argsort(-row[best], kind="stable")]
        out.append([(ids[i], float(row[i])) for i in best])
    return out


def mean(values: dict[str, float], queries: list[str]) -> float:
    return sum(values[q] for q in queries) / len(queries)


def choose_default(train: dict[str, dict[str, Lists]], qrels: dict[str, dict[str, int]],
                   symmetric: bool = True) -> tuple[FusionSpec, dict]:
    """The grid entry (``symmetric``: of equal shares) whose worst loss to the better half, over
    the models, is smallest (train split)."""
    rows = []
    for spec in grid():
        if symmetric and spec.semantic_weight != 0.5:
            continue
        regrets = {}
        for model, lists in train.items():
            queries = [q for q in lists if q in qrels]
            fused = mean(per_query_scores(spec, lists, qrels, METRIC), queries)
            halves = [mean(per_query_scores(FusionSpec(method="convex", semantic_weight=w), lists, qrels, METRIC),
                           queries) for w in (0.0, 1.0)]
            regrets[model] = fused - max(halves)
        rows.append((min(regrets.values()), spec, regrets))
    best = max(rows, key=lambda r: r[0])
    return best[1], {"worst_gain": best[0], "gain_by_model": best[2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--choose-default", action="store_true", help="print the default the train split picks")
    args = parser.parse_args()
    models = args.models.split(",")
    cache = ROOT / ".reembed" / "bench-fusion"
    cache.mkdir(parents=True, exist_ok=True)
    settings = Settings.from_env().with_(data_dir=cache, redis_url="", chroma_url="", device="cpu")
    docs = scifact_texts()
    ids = [d for d, _ in docs]
    queries = read_queries(SCIFACT / "queries.jsonl")
    splits = {name: read_qrels(SCIFACT / "qrels" / f"{name}.tsv") for name in ("train", "test")}
    qids = {name: sorted(q for q in qrels if q in queries) for name, qrels in splits.items()}
    index = Bm25Index.build(IndexSignature("scifact", len(ids), 0), ids, [t for _, t in docs], [None] * len(ids))
    bm25 = {q: [(h.id, h.score) for h in index.query(queries[q], DEPTH)] for name in qids for q in qids[name]}
    all_q = qids["train"] + qids["test"]
    dense: dict[str, dict[str, list[tuple[str, float]]]] = {}
    for model in models:
        d = vectors(settings, model, [t for _, t in docs], "docs", cache)
        qv = vectors(settings, model, [queries[q] for q in all_q], "queries", cache)
        d = d / (np.linalg.norm(d, axis=1, keepdims=True) + 1e-12)
        qv = qv / (np.linalg.norm(qv, axis=1, keepdims=True) + 1e-12)
        dense[model] = dict(zip(all_q, top(qv, d, ids), strict=True))
    lists = {split: {m: {q: (bm25[q], dense[m][q]) for q in qids[split]} for m in models} for split in qids}
    default, why = choose_default(lists["train"], splits["train"])
    print(f"default chosen on train: {default.describe()} {json.dumps(why, default=str)}", flush=True)
    unrestricted, why_not = choose_default(lists["train"], splits["train"], symmetric=False)
    print(f"without equal shares it would be {unrestricted.describe()} {json.dumps(why_not)}", flush=True)
    if args.choose_default:
        return
    results: dict[str, Any] = {"default_on_train": {"spec": default.describe(), **why},
                               "unrestricted_on_train": {"spec": unrestricted.describe(), **why_not}, "models": {}}
    for model in models:
        tuning = tune(lists["train"][model], splits["train"], METRIC)
        test = lists["test"][model]
        tq = qids["test"]

        def on_test(spec: FusionSpec, test: dict[str, Lists] = test, tq: list[str] = tq) -> float:
            return mean(per_query_scores(spec, test, splits["test"], METRIC), tq)

        results["models"][short(model)] = {
            "tuned_on_train": tuning.chosen.describe(), "train_cross_validated": tuning.cross_validated,
            "train_in_sample": tuning.in_sample,
            "test": {
                "bm25": on_test(FusionSpec(method="convex", semantic_weight=0.0)),
                "semantic": on_test(FusionSpec(method="convex", semantic_weight=1.0)),
                "rrf-equal (before)": on_test(FusionSpec(method="rrf", semantic_weight=0.5)),
                f"default ({DEFAULT_FUSION.describe()})": on_test(DEFAULT_FUSION),
                "tuned on train": on_test(tuning.chosen),
            },
        }
        print(short(model), json.dumps(results["models"][short(model)], indent=1), flush=True)
    if len(models) >= 3:
        results["canary"] = canary_figures(models[1], models[2], bm25, dense, splits["test"], qids["test"])
    (ROOT / "bench" / "results" / "fusion.json").write_text(json.dumps(results, indent=1))
    report(results)


def canary_figures(old: str, new: str, bm25: dict, dense: dict, qrels: dict, tq: list[str]) -> dict[str, float]:
    """Test-split nDCG@10 of new+bm25 against old+new+bm25 (what the fused canary serves: the two
    semantic rankings share the semantic weight), with equal-weight RRF and with the default."""
    measure = METRICS[METRIC]
    out = {}
    for spec in (FusionSpec(method="rrf", semantic_weight=0.5), DEFAULT_FUSION):
        for name, sides in (("new+bm25", (new,)), ("old+new+bm25", (old, new))):
            total = sum(measure([f.id for f in spec.fuse(bm25[q], *(dense[m][q] for m in sides))], qrels[q])
                        for q in tq)
            out[f"{name}, {spec.describe()} ({short(old)} old, {short(new)} new)"] = total / len(tq)
    return out


def report(results: dict[str, Any]) -> None:
    lines = [
        "SciFact, nDCG@10 on the **test split** (300 queries); everything chosen on the **train split** "
        "(809 queries) only. Each model's two top-100 lists (BM25 = reembed's `Bm25Index`, semantic = exact "
        "cosine over the model's vectors) are computed once and every fusion of that model is applied to the "
        "same lists. `.venv/bin/python bench/bench_fusion.py`.", "",
        f"Default, chosen on train among the fusions that give both retrievers equal shares (with no judged "
        f"queries nothing says which is the stronger) as the one whose worst gain over the better half, across "
        f"the models, is largest: **{results['default_on_train']['spec']}**, worst gain on train "
        f"{results['default_on_train']['worst_gain']:+.4f}. Unrestricted, the same rule picks "
        f"{results['unrestricted_on_train']['spec']} (worst gain {results['unrestricted_on_train']['worst_gain']:+.4f}): "
        "almost BM25 alone, because BM25 is strong on SciFact; it would lose most of the semantic model's "
        "quality where BM25 is the weak one.", "",
    ]
    names = list(next(iter(results["models"].values()))["test"])
    lines += ["| model | " + " | ".join(names) + " | the fusion chosen on train (its 5-fold CV nDCG@10 on train) |",
              "|---|" + "---|" * (len(names) + 1)]
    for model, row in results["models"].items():
        lines.append(f"| {model} | " + " | ".join(f"{row['test'][n]:.4f}" for n in names)
                     + f" | {row['tuned_on_train']} ({row['train_cross_validated']:.4f}) |")
    if "canary" in results:
        lines += ["", "Fused canary (both models' rankings and BM25's; the two semantic rankings share the semantic "
                  "weight), test split:", ""]
        lines += [f"- {name}: {value:.4f}" for name, value in results["canary"].items()]
    write_section("Fusion (SciFact: default and tuned, train split only)", "\n".join(lines))


if __name__ == "__main__":
    main()
