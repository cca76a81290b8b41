"""`reembed evaluate`: measure old vs new on the same documents and queries before deciding.

Systems scored: the old model, the new model, BM25, and hybrid (BM25 fused with each model as
search would serve it on this alias). With judged queries, the fusion those queries choose for
each model is reported too (and carried by the alias with ``--apply-fusion``).
The old side uses the vectors the live collection already stores; the new side uses the target
of a complete migration to the new model when there is one (so `migrate --cutover manual`, then
`evaluate`, then `canary`, then `cutover` costs no extra embedding), and otherwise embeds the
sample on the workers (their GPUs when they have them; ``on_workers=False`` embeds in this
process). Retrieval over the sample is exact (brute-force cosine), so a sample of a large
collection is evaluated without touching the rest of it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from reembed import evaluation as ev
from reembed.bm25 import Bm25Index, IndexSignature
from reembed.errors import InputError, QueueUnavailableError
from reembed.fusion import FusionSpec
from reembed.fusion_tuning import tune
from reembed.metrics import METRICS, Qrels, mean_scores, per_query, read_qrels, read_queries
from reembed.models import LoadedModel, load_configured, resolve_configured
from reembed.registry import MigrationRecord, MigrationState, Registry
from reembed.settings import Settings
from reembed.store import PAGE_SIZE, Store

log = structlog.get_logger(__name__)

DEPTH = 100
SYSTEMS = ("old", "new", "bm25", "hybrid-old", "hybrid-new")


#: Documents per embedding task sent to the workers.
EMBED_CHUNK = 256
#: How long to wait for the workers to embed one chunk before saying none is running.
EMBED_TIMEOUT_S = 600


class Evaluator:
    def __init__(self, settings: Settings, on_workers: bool = False) -> None:
        self.settings = settings
        self.store = Store.from_settings(settings)
        self.registry = Registry(self.store)
        self.on_workers = on_workers

    def _embed_documents(self, model: LoadedModel, texts: list[str]) -> tuple[np.ndarray, str]:
        """The documents' vectors, embedded on the workers or here; and where that happened."""
        if not self.on_workers:
            return model.embed_documents(texts), "embedded here"
        from celery.exceptions import TimeoutError as CeleryTimeout

        from reembed.messages import Embeddings, EmbedRequest, Outbox
        from reembed.queue import client_app
        from reembed.vectors import decode_vectors

        outbox = Outbox(client_app(self.settings))
        pending = [outbox.embed(EmbedRequest(model=model.spec.name, texts=texts[i:i + EMBED_CHUNK]))
                   for i in range(0, len(texts), EMBED_CHUNK)]
        parts, devices = [], set()
        for result in pending:
            try:
                payload = result.get(timeout=EMBED_TIMEOUT_S)
            except CeleryTimeout as exc:
                raise QueueUnavailableError(
                    f"no worker embedded the evaluation sample within {EMBED_TIMEOUT_S} s; start workers "
                    "(`reembed worker`) or pass --here to embed in this process") from exc
            answer = Embeddings.model_validate(payload)
            model.require_fingerprint(answer.fingerprint, "a worker's answer")
            parts.append(decode_vectors(payload))
            devices.add(answer.device)
            result.forget()
        return np.concatenate(parts), f"embedded on the workers ({', '.join(sorted(devices))})"

    def _model(self, name: str) -> LoadedModel:
        return load_configured(self.settings, name)

    def _target(self, alias: str, model_name: str) -> MigrationRecord | None:
        for record in self.registry.migrations(alias):
            if (record.kind == "migrate" and record.to_model == model_name and record.verified
                    and record.state in (MigrationState.COMPLETE, MigrationState.LIVE, MigrationState.ROLLED_BACK)
                    and self.store.exists(record.target_collection)):
                return record
        return None

    def _documents(self, collection: str, sample: int | None, judged: set[str]) -> dict[str, str]:
        """id -> text of the documents to evaluate on: all of them, or with ``sample`` the judged
        ones present plus a uniform random sample of the rest (reservoir sampling over an ids-only
        scan), so a 10-million-document collection never has its texts in memory at once."""
        if sample is None:
            docs: dict[str, str] = {}
            for page in self.store.pages(collection):
                docs.update((i, t) for i, t in zip(page.ids, page.documents, strict=True) if t)
            return docs
        rng = random.Random(11)
        present: list[str] = []
        reservoir: list[str] = []
        seen = 0
        for page in self.store.pages(collection, documents=False):
            for doc_id in page.ids:
                if doc_id in judged:
                    present.append(doc_id)
                    continue
                seen += 1
                if len(reservoir) < sample:
                    reservoir.append(doc_id)
                else:
                    slot = rng.randrange(seen)
                    if slot < sample:
                        reservoir[slot] = doc_id
        chosen = present + reservoir[:max(0, sample - len(present))]
        docs = {}
        for start in range(0, len(chosen), PAGE_SIZE):
            page = self.store.get(collection, chosen[start:start + PAGE_SIZE])
            docs.update((i, t) for i, t in zip(page.ids, page.documents, strict=True) if t)
        return dict(sorted(docs.items()))

    def _vectors(self, collection: str, ids: list[str]) -> np.ndarray:
        rows: dict[str, np.ndarray] = {}
        for start in range(0, len(ids), PAGE_SIZE):
            page = self.store.get(collection, ids[start:start + PAGE_SIZE], embeddings=True)
            assert page.embeddings is not None
            rows.update(zip(page.ids, page.embeddings, strict=True))
        missing = [i for i in ids if i not in rows]
        if missing:
            raise InputError(f"{len(missing)} sampled documents are missing from {collection!r} (first: {missing[0]})")
        return np.stack([rows[i] for i in ids])

    def _fusion(self, served: dict[str, FusionSpec], scored: dict[str, dict[str, list[tuple[str, float]]]],
                qrels: Qrels, metric: str, judged_queries: bool) -> dict[str, Any]:
        """Per side: the fusion served now and, from judged queries, the one they choose."""
        out: dict[str, Any] = {}
        for side, spec in served.items():
            row: dict[str, Any] = {"served": spec.describe(), "recommended": None}
            if judged_queries:
                lists = {q: (scored["bm25"][q], scored[side][q]) for q in scored[side]}
                try:
                    tuning = tune(lists, qrels, metric)
                except InputError as exc:
                    row["why_not"] = str(exc)
                else:
                    row.update(recommended=tuning.chosen.model_dump(), recommended_fusion=tuning.chosen.describe(),
                               in_sample=tuning.in_sample, cross_validated=tuning.cross_validated,
                               references=tuning.references)
            else:
                row["why_not"] = "synthetic queries (cut out of the documents) favour BM25: give judged queries"
            out[side] = row
        return out

    def _apply_fusion(self, alias: str, fusion: dict[str, Any], models: dict[str, str]) -> None:
        """Make the alias carry each recommended fusion for its model."""
        from producer.fusion import set_fusion
        from reembed.progress import redis_client

        client = redis_client(self.settings.redis_url)
        for side, row in fusion.items():
            if row.get("recommended") is None:
                raise InputError(f"no fusion to apply for the {side} model: {row.get('why_not')}")
            set_fusion(self.registry, client, self.settings, alias, models[side], FusionSpec.model_validate(row["recommended"]))

    def run(self, alias: str, to_model: str, queries_file: Path | None = None, qrels_file: Path | None = None,
            sample: int | None = None, k: int = 10, min_gain: float = 0.01, tolerance: float = 0.01,
            synthetic: int = 200, compare: str = "semantic", metric: str = "ndcg@10",
            apply_fusion: bool = False) -> dict[str, Any]:
        """Score every system and give the verdict for ``compare`` (semantic or hybrid) on ``metric``.

        With judged queries, also choose the fusion of each model with BM25 on these documents
        (``reembed.fusion_tuning``); ``apply_fusion`` makes the alias carry both choices.
        """
        if (queries_file is None) != (qrels_file is None):
            raise InputError("give both --queries and --qrels (BEIR files), or neither for synthetic queries")
        if apply_fusion and queries_file is None:
            raise InputError("--apply-fusion needs judged queries (--queries and --qrels): a fusion chosen on "
                             "synthetic queries, cut out of the documents, would favour BM25")
        if compare not in ("semantic", "hybrid") or metric not in METRICS:
            raise InputError(f"compare semantic or hybrid on one of {', '.join(METRICS)}")
        current = self.registry.get_alias(alias)
        old_record = self.registry.get_collection(current.live_collection)
        new_spec = resolve_configured(self.settings, to_model)
        target = self._target(alias, new_spec.name)
        judged_files = read_qrels(qrels_file) if qrels_file is not None else {}
        docs = self._documents(current.live_collection, sample, {d for j in judged_files.values() for d in j})
        if queries_file is not None and qrels_file is not None:
            kind = f"judged (BEIR files {queries_file.name}, {qrels_file.name})"
            texts = read_queries(queries_file)
            qrels = {q: {d: g for d, g in j.items() if d in docs} for q, j in judged_files.items() if q in texts}
            qrels = {q: j for q, j in qrels.items() if any(g > 0 for g in j.values())}
            if not qrels:
                raise InputError("no judged query has a relevant document in this collection; check the files")
            queries = {q: texts[q] for q in qrels}
            edited: dict[str, str] = {}
        else:
            kind = "synthetic (a distinctive sentence cut out of each of a sample of documents)"
            queries, qrels, edited = ev.synthetic_queries(sorted(docs.items()), synthetic)
        judged = {d for j in qrels.values() for d in j}
        ids = ev.sample_ids(sorted(docs), judged, sample)
        texts_used = [edited.get(i, docs[i]) for i in ids]
        old_model, new_model = self._model(old_record.model), self._model(new_spec.name)
        if edited:  # documents changed: both sides are embedded anew, the same way
            old_vectors, _ = self._embed_documents(old_model, texts_used)
            new_vectors, where = self._embed_documents(new_model, texts_used)
            new_source = f"{where} (synthetic queries change the documents)"
        else:
            old_vectors = self._vectors(current.live_collection, ids)
            if target is not None:
                new_vectors, new_source = self._vectors(target.target_collection, ids), target.target_collection
            else:
                new_vectors, new_source = self._embed_documents(new_model, texts_used)
        qids = list(queries)
        qtexts = [queries[q] for q in qids]
        scored = {  # each retriever's top DEPTH as (id, score): what a fusion needs
            "old": dict(zip(qids, ev.dense_rankings(old_model.embed_queries(qtexts), old_vectors, ids, DEPTH), strict=True)),
            "new": dict(zip(qids, ev.dense_rankings(new_model.embed_queries(qtexts), new_vectors, ids, DEPTH), strict=True)),
        }
        index = Bm25Index.build(IndexSignature("evaluation", len(ids), 0), ids, list(texts_used), [None] * len(ids))
        scored["bm25"] = {q: [(h.id, h.score) for h in index.query(queries[q], DEPTH)] for q in qids}
        runs = {name: {q: [i for i, _ in hits] for q, hits in by_query.items()} for name, by_query in scored.items()}
        served = {"old": current.fusion.get(old_record.model) or self.settings.fusion,
                  "new": current.fusion.get(new_spec.name) or self.settings.fusion}
        for side, spec in served.items():  # what `hybrid` would serve with each model on this alias
            runs[f"hybrid-{side}"] = {q: [f.id for f in spec.fuse(scored["bm25"][q], scored[side][q])][:DEPTH]
                                      for q in qids}
        fusion = self._fusion(served, scored, qrels, metric, judged_queries=not edited and queries_file is not None)
        scores = {name: mean_scores(run, qrels) for name, run in runs.items()}
        pair = ("new", "old") if compare == "semantic" else ("hybrid-new", "hybrid-old")
        new_q, old_q = (per_query(runs[p], qrels)[metric] for p in pair)
        diff = ev.bootstrap_difference([new_q[q] for q in new_q], [old_q[q] for q in new_q])
        decision = ev.verdict(diff, min_gain, tolerance)
        report = {
            "alias": alias, "old_model": old_record.model, "new_model": new_spec.name,
            "old_collection": current.live_collection, "new_vectors": new_source, "queries": len(qids),
            "queries_kind": kind, "documents": len(ids),
            "collection_documents": self.store.count(current.live_collection), "k": k,
            "metrics": scores, "compare": f"{pair[0]} vs {pair[1]}", "metric": metric,
            "difference": {"mean": diff.mean, "ci95": [diff.low, diff.high], "queries": diff.queries},
            "min_gain": min_gain, "tolerance": tolerance, "verdict": decision, "fusion": fusion,
        }
        if apply_fusion:
            self._apply_fusion(alias, fusion, {"old": old_record.model, "new": new_spec.name})
        if target is not None:
            self.registry.record_verdict(target.id, decision)
        log.info("evaluation done", alias=alias, verdict=decision, mean=round(diff.mean, 4))
        return report


def write_report(report: dict[str, Any], directory: Path) -> list[Path]:
    """report.json, report.md and metrics.png (a bar chart of every metric per system)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.json").write_text(json.dumps(report, indent=1))
    metrics = list(next(iter(report["metrics"].values())))
    lines = [
        f"# Evaluation of {report['alias']}: {report['old_model']} → {report['new_model']}", "",
        f"**Verdict: {report['verdict']}** — {report['compare']} on {report['metric']}: mean difference "
        f"{report['difference']['mean']:+.4f}, 95% CI [{report['difference']['ci95'][0]:+.4f}, "
        f"{report['difference']['ci95'][1]:+.4f}] over {report['difference']['queries']} queries "
        f"(GO needs > {report['min_gain']} with the interval above 0).", "",
        f"Queries: {report['queries']}, {report['queries_kind']}. Documents: {report['documents']} of "
        f"{report['collection_documents']}. New vectors: {report['new_vectors']}.", "",
        "| system | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics),
    ]
    lines += [f"| {name} | " + " | ".join(f"{values[m]:.4f}" for m in metrics) + " |"
              for name, values in report["metrics"].items()]
    for side, row in report.get("fusion", {}).items():
        chosen = (f"the judged queries choose **{row['recommended_fusion']}**: {report['metric']} "
                  f"{row['cross_validated']:.4f} cross-validated ({row['in_sample']:.4f} in sample; BM25 "
                  f"{row['references']['bm25']:.4f}, semantic {row['references']['semantic']:.4f})"
                  if row["recommended"] else row["why_not"])
        lines += ["", f"Fusion with the {side} model: serves {row['served']}; {chosen}."]
    lines += ["", "![metrics](metrics.png)", ""]
    (directory / "report.md").write_text("\n".join(lines))
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(report["metrics"])
    for i, (name, values) in enumerate(report["metrics"].items()):
        ax.bar(np.arange(len(metrics)) + i * width, [values[m] for m in metrics], width, label=name)
    ax.set_xticks(np.arange(len(metrics)) + 0.4 - width / 2, metrics)
    ax.set_ylim(0, 1)
    ax.set_title(f"{report['old_model']} → {report['new_model']}: {report['verdict']}")
    ax.legend(fontsize=8, ncols=len(report["metrics"]))
    fig.tight_layout()
    fig.savefig(directory / "metrics.png", dpi=100)
    plt.close(fig)
    return [directory / n for n in ("report.json", "report.md", "metrics.png")]
