"""Runtimes of a model's transformer on this CPU: torch against OpenVINO (REEMBED_BACKEND).

For each model, the same SciFact documents are embedded by reembed's own ``load_model`` with each
runtime, one thread each (as a worker process runs), alternating runtimes for a few rounds so a
slow spell of a shared machine hits both alike. Reported: docs/s per runtime (median), the ratio
per round, and how far the vectors are apart (the issue allows 1e-3 cosine).

ONNX Runtime is not in the table: measured by hand on this machine it gained at most 2 % over torch
(see BENCHMARKS.md), and sentence-transformers' own ONNX/OpenVINO backends need ``optimum``,
which does not install beside sentence-transformers 6 here.

Run: ``.venv/bin/python bench/bench_runtimes.py`` (about 6 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import ROOT, scifact_texts, write_section  # noqa: E402
from reembed.models import load_model, resolve_model  # noqa: E402

WORK = ROOT / ".reembed" / "bench-runtimes"
#: Documents per model: enough for a stable rate, few enough for mpnet on one thread.
DOCS = {"all-MiniLM-L6-v2": 128, "all-mpnet-base-v2": 24}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DOCS))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)  # the conversion is timed from scratch
    texts = [t for _, t in scifact_texts()]
    lines = [
        "One thread per runtime (as a worker process runs), reembed's `load_model` (ST tokenisation, length "
        "sorting, pooling and normalisation; only the transformer's forward pass changes runtime), forward batch "
        f"32, the first SciFact documents, runtimes alternated for {args.rounds} rounds; docs/s are medians. "
        "`.venv/bin/python bench/bench_runtimes.py`.",
        "",
        "| model | documents | torch docs/s | openvino docs/s | openvino ÷ torch (per round) | min cosine | max abs diff "
        "| first conversion s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in args.models.split(","):
        sample = texts[:DOCS.get(name, 64)]
        spec = resolve_model(name)
        started = time.perf_counter()
        models = {b: load_model(spec, WORK, "cpu", threads=1, backend=b) for b in ("torch", "openvino")}
        convert_s = time.perf_counter() - started
        models["torch"].embed_documents(sample[:8])  # warm-up both
        models["openvino"].embed_documents(sample[:8])
        rates: dict[str, list[float]] = {"torch": [], "openvino": []}
        vectors = {}
        for _ in range(args.rounds):
            for backend, model in models.items():
                start = time.perf_counter()
                vectors[backend] = model.embed_documents(sample)
                rates[backend].append(len(sample) / (time.perf_counter() - start))
        a, b = vectors["torch"], vectors["openvino"]
        cosine = float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())
        ratios = [o / t for o, t in zip(rates["openvino"], rates["torch"], strict=True)]
        lines.append(f"| {name} | {len(sample)} | {statistics.median(rates['torch']):.2f} | "
                     f"{statistics.median(rates['openvino']):.2f} | {statistics.median(ratios):.2f} "
                     f"({', '.join(f'{r:.2f}' for r in ratios)}) | {cosine:.7f} | {np.abs(a - b).max():.1e} | "
                     f"{convert_s:.0f} |")
        print(lines[-1], flush=True)
    lines += ["", "*first conversion s*: loading both runtimes from scratch, mpnet's weights unzipped and the OpenVINO "
              "conversion included (cached afterwards per model fingerprint under `DATA_DIR/cache/openvino`)."]
    write_section("Model runtimes on the CPU: torch vs OpenVINO (bench/bench_runtimes.py)", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
