"""What every benchmark shares: the machine line and writing its own section of BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reembed.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"
SHARED = Path(os.environ.get("REEMBED_TEST_SHARED", ROOT.parent / "shared"))
SCIFACT = SHARED / "datasets" / "scifact"


def machine() -> str:
    """CPU model, cores, Python, and the GPU when torch sees one."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {gpu}"


def write_section(title: str, body: str, path: Path = BENCHMARKS) -> None:
    """Replace (or append) the ``## title`` section, leaving the other scripts' sections alone."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\nFigures written by the scripts in `bench/`.\n"
    heading = f"## {title}"
    # the whole heading line: a title that begins another's ("... (x.py)" and "... (x.py) — CPU")
    # must not replace it
    start = text.find(f"\n{heading}\n")
    if start >= 0:
        start += 1
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + (text[end + 1:] if end >= 0 else "")
    section = f"{heading}\n\nMeasured {time.strftime('%Y-%m-%d')} on: {machine()}.\n\n{body.strip()}\n"
    path.write_text(text.rstrip() + "\n\n" + section)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def scifact_texts() -> list[tuple[str, str]]:
    """(id, title + text) of every SciFact document, as BEIR joins them."""
    with open(SCIFACT / "corpus.jsonl", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    return [(r["_id"], f"{r['title']} {r['text']}".strip()) for r in rows]


def recombined_corpus(path: Path, n: int, seed: int = 7) -> Path:
    """``n`` JSONL documents of six SciFact sentences each, drawn at random (seeded): real
    vocabulary and realistic lengths at any size. The first 5,183 are SciFact itself."""
    docs = scifact_texts()
    sentences = [s.strip() + "." for _, text in docs for s in text.split(". ") if len(s) > 20]
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as out:
        for i in range(n):
            if i < len(docs):
                doc_id, text = docs[i]
            else:
                doc_id, text = f"r{i}", " ".join(rng.sample(sentences, 6))
            out.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    return path


def fresh_stack(name: str) -> tuple[Path, Settings]:
    """An empty work folder ``.reembed/NAME`` and settings for an embedded stack in it (CPU)."""
    from reembed.settings import Settings

    work = ROOT / ".reembed" / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work, Settings.from_env().with_(data_dir=work, redis_url="", chroma_url="", device="cpu")


def scifact_test_queries() -> list[str]:
    """The text of SciFact's 300 judged test queries."""
    from reembed.metrics import read_qrels, read_queries

    queries = read_queries(SCIFACT / "queries.jsonl")
    return [queries[q] for q in read_qrels(SCIFACT / "qrels" / "test.tsv")]
