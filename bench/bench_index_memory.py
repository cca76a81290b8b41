"""Memory of one BM25 index held by N search processes: mapped files against Python lists.

A 100,000-document index (SciFact sentences recombined, five metadata keys) is built once and
published. Then, for N = 1 and 2, N fresh processes each load it as `reembed serve` does
(``Bm25Index.load``: memory maps), answer 200 queries with their documents' text (and a filter,
which builds its columns), and report their memory; and N processes do the same after copying
the documents and metadata onto the heap as Python lists, as the index did before (the
baseline, same run). RSS counts shared pages in every process; PSS splits them between the
processes that share them (what N processes really cost the machine).

Writes "BM25 index memory: mapped vs copied" to BENCHMARKS.md.

    .venv/bin/python bench/bench_index_memory.py           # ~2 min
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, SCIFACT, recombined_corpus, write_section  # noqa: E402

TITLE = "BM25 index memory: mapped vs copied"
DOCS = 100_000


def child(directory: str, copy: bool, ready: str, go: str) -> None:
    """One search process: load, use, report its memory when every sibling has loaded."""
    import psutil

    from reembed.bm25 import Bm25Index
    from reembed.filters import parse_filter
    from reembed.metrics import read_queries

    index = Bm25Index.load(Path(directory))
    held: Any = None
    if copy:  # the former layout: every text and metadata row a Python object of this process
        held = (list(index.documents), list(index.metadatas))
    queries = list(read_queries(SCIFACT / "queries.jsonl").values())[:200]
    flt = parse_filter({"year": {"$gte": 2000}})
    for query in queries:
        for hit in index.query(query, 10, flt):
            index.document(hit.id)
    Path(ready).touch()
    while not Path(go).exists():
        time.sleep(0.05)
    info = psutil.Process().memory_full_info()
    print(json.dumps({"rss": info.rss, "pss": info.pss, "uss": info.uss, "held": held is not None}))


def run(directory: Path, processes: int, copy: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as flags:
        go = Path(flags) / "go"
        started = [subprocess.Popen([sys.executable, __file__, "--child", str(directory), str(int(copy)),
                                     str(Path(flags) / f"ready{i}"), str(go)], stdout=subprocess.PIPE, text=True)
                   for i in range(processes)]
        while not all((Path(flags) / f"ready{i}").exists() for i in range(processes)):
            time.sleep(0.05)
        go.touch()
        found = [json.loads(p.communicate()[0]) for p in started]
    return {key: sum(f[key] for f in found) / 2**20 for key in ("rss", "pss", "uss")}


def main() -> None:
    from reembed.bm25 import Bm25Index, IndexSignature

    work = ROOT / ".reembed" / "bench-index-memory"
    work.mkdir(parents=True, exist_ok=True)
    corpus = recombined_corpus(work / "corpus.jsonl", DOCS)
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    index_dir = work / "index"
    if not (index_dir / "reembed-index.json").exists():
        metas = [{"year": 1990 + i % 35, "source": f"s{i % 7}", "rank": i, "score": i / 7, "open": bool(i % 2)}
                 for i in range(len(rows))]
        Bm25Index.build(IndexSignature("bench", len(rows), 0), [r["id"] for r in rows], [r["text"] for r in rows],
                        metas).save(index_dir)
    on_disk = sum(f.stat().st_size for f in index_dir.iterdir()) / 2**20
    results: dict[str, list[dict[str, float]]] = {}
    for _ in range(3):  # interleaved rounds
        for processes in (1, 2):
            for copy in (False, True):
                results.setdefault(f"{processes}-{copy}", []).append(run(index_dir, processes, copy))
    rows_out = []
    for processes in (1, 2):
        for copy in (False, True):
            got = results[f"{processes}-{copy}"]
            cells = [f"{statistics.median(r[k] for r in got):.0f}" for k in ("rss", "pss", "uss")]
            rows_out.append(f"| {processes} | {'copied (Python lists, as before)' if copy else 'mapped'} | "
                            + " | ".join(cells) + " |")
    pss = {key: statistics.median(r["pss"] for r in got) for key, got in results.items()}
    body = f"""`.venv/bin/python bench/bench_index_memory.py`. One index of {DOCS:,} documents (SciFact sentences
recombined, five metadata keys; {on_disk:.0f} MiB on disk). N fresh processes each load it as `reembed serve` does,
answer 200 SciFact queries with a metadata filter and read every hit's document; "copied" also holds the documents and
metadata as Python lists, as indexes did before. Memory summed over the N processes (MiB), medians of 3 interleaved
rounds:

| processes | documents | RSS | PSS | USS |
|---|---|---|---|---|
{chr(10).join(rows_out)}

- The second process costs (PSS, 2 − 1): mapped {pss['2-False'] - pss['1-False']:.0f} MiB, copied
  {pss['2-True'] - pss['1-True']:.0f} MiB.
"""
    write_section(TITLE, body)
    print(body)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3] == "1", sys.argv[4], sys.argv[5])
    else:
        main()
