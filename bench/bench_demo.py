"""End-to-end migration rate of the demo next to the raw `encode` rate of the same model.

Both are measured in the same run on the same documents, so the ratio says how much the
queue, the serialisation, the Chroma writes and the bookkeeping cost on top of the model.
Run: `.venv/bin/python bench/bench_demo.py` (writes a section of BENCHMARKS.md).
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cli.demo import run_demo  # noqa: E402
from reembed.documents import demo_corpus_path, read_corpus  # noqa: E402
from reembed.models import load_model, resolve_model  # noqa: E402
from reembed.settings import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKERS = 2


def raw_encode_rate(settings: Settings, model_name: str, texts: list[str], threads: int) -> float:
    model = load_model(resolve_model(model_name), settings.data_dir, "cpu", threads)
    model.embed_documents(texts[:4])  # warm-up
    start = time.perf_counter()
    model.embed_documents(texts)
    return len(texts) / (time.perf_counter() - start)


def main() -> None:
    settings = Settings.from_env()
    texts = [d.text for d in read_corpus(demo_corpus_path())]
    result = run_demo(settings, None, "all-MiniLM-L6-v2", "all-mpnet-base-v2", WORKERS, quiet=True)
    e2e = result["migration"]["docs_per_s"]
    raw_1 = raw_encode_rate(settings, "all-mpnet-base-v2", texts, 1)
    import torch

    torch.set_num_threads(2)
    raw_2 = len(texts) / _time(lambda: load_model(resolve_model("all-mpnet-base-v2"), settings.data_dir,
                                                   "cpu").embed_documents(texts))
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, CPU only"
    section = f"""## Demo migration vs raw encode (bench/bench_demo.py)

Machine: {machine}; measured {time.strftime('%Y-%m-%d')}. Corpus: the shipped demo corpus
({len(texts)} short documents). Migration all-MiniLM-L6-v2 -> all-mpnet-base-v2 with {WORKERS} worker
processes (one torch thread each), embedded Redis and a local `chroma run`.

| measure | docs/s |
|---|---|
| end-to-end migration (enqueue, embed, upsert, verify, cutover; model load included) | {e2e:.1f} |
| raw `encode`, same model, same documents, 1 thread, model already loaded | {raw_1:.1f} |
| raw `encode`, 2 threads | {raw_2:.1f} |
| ratio end-to-end / raw 2 threads (baseline) | {e2e / raw_2:.2f} |

The whole demo (ingest, searches, migration, searches) took {result['elapsed_s']} s.
On a corpus this small the end-to-end figure is dominated by loading mpnet in each worker
(a few seconds) and by per-batch fixed costs; see issue 6 for the large-corpus figures.
"""
    out = ROOT / "BENCHMARKS.md"
    text = out.read_text() if out.exists() else "# Benchmarks\n\nFigures written by the scripts in `bench/`.\n\n"
    start = text.find("## Demo migration vs raw encode")
    if start >= 0:
        end = text.find("\n## ", start + 5)
        text = text[:start] + text[end + 1:] if end >= 0 else text[:start]
    out.write_text(text.rstrip() + "\n\n" + section)
    print(section)


def _time(fn) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
