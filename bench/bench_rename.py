"""How long a reader polling by name sees no collection during a rename-style cutover.

The design question (issue 15): could a cutover keep the alias as the live collection's *name*, so
that applications need no lookup? Chroma renames a collection (``modify(name=...)``) but cannot
swap two names in one step, so such a cutover is two renames: live ``docs`` → ``docs-previous``,
then target ``docs-next`` → ``docs``. Between them no collection is called ``docs``.

A reader thread asks ``get_collection("docs")`` in a tight loop over its own HTTP client while the
main thread performs ``--swaps`` such cutovers (and swaps back), against one ``chroma run``. For
every cutover the gap is the time from the first failed read to the next successful one; reads
that failed are counted. Run: ``.venv/bin/python bench/bench_rename.py`` (under a minute).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import chromadb  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import percentile, write_section  # noqa: E402
from cli.services import ChromaServer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = ChromaServer(Path(tmp) / "chroma").start()
        try:
            writer = chromadb.HttpClient(host="127.0.0.1", port=server.port)
            for name in ("docs", "docs-next"):
                writer.create_collection(name, embedding_function=None).add(
                    ids=[str(i) for i in range(100)], embeddings=np.asarray([[i, 1.0] for i in range(100)], dtype=np.float32))
            reads: list[tuple[float, bool]] = []
            stop = threading.Event()

            def poll() -> None:
                reader = chromadb.HttpClient(host="127.0.0.1", port=server.port)
                while not stop.is_set():
                    try:
                        reader.get_collection("docs", embedding_function=None)
                        reads.append((time.perf_counter(), True))
                    except Exception:  # noqa: BLE001 - NotFoundError: the gap being measured
                        reads.append((time.perf_counter(), False))

            thread = threading.Thread(target=poll, daemon=True)
            thread.start()
            time.sleep(1)
            switches: list[tuple[float, float]] = []
            for _ in range(args.swaps):
                started = time.perf_counter()
                writer.get_collection("docs", embedding_function=None).modify(name="docs-previous")
                writer.get_collection("docs-next", embedding_function=None).modify(name="docs")
                writer.get_collection("docs-previous", embedding_function=None).modify(name="docs-next")
                switches.append((started, time.perf_counter()))
                time.sleep(0.05)
            stop.set()
            thread.join()
        finally:
            server.stop()
    gaps, failed = [], 0
    for started, ended in switches:
        window = [(t, ok) for t, ok in reads if started <= t <= ended + 0.05]
        misses = [t for t, ok in window if not ok]
        failed += len(misses)
        if misses:
            after = next((t for t, ok in reads if ok and t > misses[0]), misses[-1])
            gaps.append((after - misses[0]) * 1000)
        else:
            gaps.append(0.0)
    renames = [(ended - started) * 1000 for started, ended in switches]
    seen = sum(1 for g in gaps if g > 0)
    body = (
        f"One `chroma run`, a reader polling `get_collection(\"docs\")` in a loop ({len(reads):,} reads in all), "
        f"{args.swaps} rename-style cutovers (`docs` → `docs-previous`, `docs-next` → `docs`).\n\n"
        "| | p50 | p95 | max |\n|---|---|---|---|\n"
        f"| reader saw no `docs` (ms) | {percentile(gaps, 50):.1f} | {percentile(gaps, 95):.1f} | {max(gaps):.1f} |\n"
        f"| the renames of one cutover (ms) | {percentile(renames, 50):.1f} | {percentile(renames, 95):.1f} | "
        f"{max(renames):.1f} |\n\n"
        f"The reader hit the gap in {seen} of {args.swaps} cutovers ({failed} failed reads; mean gap when hit "
        f"{statistics.mean([g for g in gaps if g > 0] or [0]):.1f} ms). reembed's cutover is one write of the alias "
        "record instead: no reader ever finds nothing, so a rename-style cutover is not offered (README, "
        "\"Applications that read Chroma directly\").")
    write_section("A rename-style cutover: the gap a reader sees (bench/bench_rename.py)", body)
    print(body)


if __name__ == "__main__":
    main()
