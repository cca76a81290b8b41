"""Padding: what the order of a batch's texts costs a transformer on the CPU.

A forward pass pads every text to the longest one in it, so a chunk that mixes short and long
texts computes mostly padding. This measures a worker's embedding of the same texts in three
orders, with the model as a worker loads it (``reembed.models.load_model``, one torch thread,
forward passes of ``REEMBED_EMBED_BATCH_SIZE``) and batches of 64 as the producer queues them:

- **arrival**: each batch in the order its documents came (what a worker did before it sorted;
  an ingest's file, a catch-up round's ids);
- **batch sorted**: each batch shortest text first (``worker.embedding.length_order``, what a
  worker does with every batch now);
- **window sorted**: batches cut from a window of 8 sorted by length
  (``reembed.pipeline.length_sorted_batches``, what a scan and a new ingest send), then each
  batch sorted as above.

Two corpora: short texts of mixed lengths (one, two or four SciFact sentences each: FAQ
entries, product descriptions, chat messages) and SciFact abstracts (most longer than
all-MiniLM-L6-v2's 256 tokens, so truncated to the same length: little padding in any order).
Orders are interleaved within each round; figures are medians (min–max) over rounds.

    python bench/bench_padding.py --rounds 3
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.common import ROOT, scifact_texts, write_section  # noqa: E402
from reembed.documents import Document  # noqa: E402
from reembed.models import LoadedModel, load_model, resolve_model  # noqa: E402
from reembed.pipeline import SORT_WINDOW_BATCHES, length_sorted_batches  # noqa: E402
from worker.embedding import length_order  # noqa: E402

BATCH = 64
ORDERS = ("arrival", "batch sorted", "window sorted")


def corpora(short: int, abstracts: int, seed: int = 11) -> dict[str, list[str]]:
    docs = scifact_texts()
    sentences = [s.strip() + "." for _, text in docs for s in text.split(". ") if len(s) > 20]
    rng = random.Random(seed)
    mixed = [" ".join(rng.sample(sentences, rng.choice((1, 1, 2, 4)))) for _ in range(short)]
    return {"short, mixed lengths": mixed, "SciFact abstracts": [text for _, text in docs[:abstracts]]}


def batches_in(order: str, texts: list[str]) -> list[list[str]]:
    """The batches a worker embeds, each in the order it embeds its texts."""
    if order == "window sorted":
        window = BATCH * SORT_WINDOW_BATCHES
        cut = [[d.text for d in batch]
               for start in range(0, len(texts), window)
               for batch in length_sorted_batches([Document(str(i), t, {}) for i, t in
                                                   enumerate(texts[start:start + window], start)], BATCH)]
    else:
        cut = [texts[i:i + BATCH] for i in range(0, len(texts), BATCH)]
    if order == "arrival":
        return cut
    return [[batch[i] for i in length_order(batch)] for batch in cut]


def embed_rate(model: LoadedModel, batches: list[list[str]]) -> float:
    """Documents per second, each batch embedded in chunks of the model's forward-pass size."""
    chunk = model.batch_size
    start = time.perf_counter()
    for batch in batches:
        for i in range(0, len(batch), chunk):
            model.embed_documents(batch[i:i + chunk])
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def tokens(model: LoadedModel, texts: list[str]) -> tuple[int, float]:
    """Median token count and the share longer than the model takes."""
    counts = model.count_tokens(texts)
    limit = model.max_tokens or max(counts)
    return int(statistics.median(counts)), sum(c > limit for c in counts) / len(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--short", type=int, default=512, help="short mixed-length texts")
    parser.add_argument("--abstracts", type=int, default=256, help="SciFact abstracts")
    parser.add_argument("--no-write", action="store_true", help="print, do not write BENCHMARKS.md")
    args = parser.parse_args()

    model = load_model(resolve_model(args.model), ROOT / ".reembed", "cpu", threads=1)
    texts = corpora(args.short, args.abstracts)
    model.embed_documents(texts["SciFact abstracts"][:model.batch_size])  # warm-up
    lengths = {name: tokens(model, corpus) for name, corpus in texts.items()}
    rates: dict[tuple[str, str], list[float]] = {}
    for round_no in range(args.rounds):
        for name, corpus in texts.items():
            # the orders rotate from round to round, so none always runs first
            for order in ORDERS[round_no % 3:] + ORDERS[:round_no % 3]:
                rate = embed_rate(model, batches_in(order, corpus))
                rates.setdefault((name, order), []).append(rate)
                print(f"round {round_no + 1} {name} {order}: {rate:.1f} docs/s", flush=True)

    lines = [
        f"{args.model} (torch, one thread, as a worker loads it; forward passes of {model.batch_size}), "
        f"batches of {BATCH}, windows of {SORT_WINDOW_BATCHES} batches; {args.rounds} rounds, the orders "
        "interleaved; docs/s median (min–max), and ÷ arrival per round, median (min–max). *arrival*: each "
        "batch as its documents came; *batch sorted*: shortest text first (what a worker does with every "
        "batch); *window sorted*: batches cut from a length-sorted window of 8, each then sorted (what a scan "
        "and an ingest send).",
        "",
        "| corpus | texts | tokens, median | longer than the model takes | order | docs/s | ÷ arrival |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, corpus in texts.items():
        median_tokens, truncated = lengths[name]
        base = rates[(name, "arrival")]
        for order in ORDERS:
            got = rates[(name, order)]
            ratios = [g / b for g, b in zip(got, base, strict=True)]
            lines.append(
                f"| {name} | {len(corpus)} | {median_tokens} | {truncated:.0%} | {order} | "
                f"{statistics.median(got):.1f} ({min(got):.1f}–{max(got):.1f}) | "
                f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f}) |")
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("Padding: the order of a batch's texts (bench/bench_padding.py)", body)


if __name__ == "__main__":
    main()
