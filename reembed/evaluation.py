"""Old model vs new model on the same documents and queries: metrics, confidence, verdict.

Pure functions (numpy only), so the statistics are unit-tested on their own:

- :func:`dense_rankings` ranks documents by cosine similarity (brute force: exact, and fast
  for the samples evaluation works on);
- :func:`bootstrap_difference` gives the mean per-query difference new − old and a percentile
  bootstrap 95 % interval (queries resampled with replacement, seeded);
- :func:`verdict` turns that into GO / NO-GO / INCONCLUSIVE;
- :func:`synthetic_queries` makes judged queries from the corpus itself when the user has none:
  a distinctive sentence is cut out of a sampled document, and that document is the answer.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

GO, NO_GO, INCONCLUSIVE = "GO", "NO-GO", "INCONCLUSIVE"
#: Exit codes of `reembed evaluate` by verdict (2 is an error, as everywhere).
VERDICT_EXIT = {GO: 0, NO_GO: 1, INCONCLUSIVE: 3}


def dense_rankings(query_vectors: np.ndarray, doc_vectors: np.ndarray, doc_ids: Sequence[str],
                   k: int) -> list[list[tuple[str, float]]]:
    """Top ``k`` (document id, cosine similarity) per query, best first."""
    q = query_vectors / (np.linalg.norm(query_vectors, axis=1, keepdims=True) + 1e-12)
    d = doc_vectors / (np.linalg.norm(doc_vectors, axis=1, keepdims=True) + 1e-12)
    scores = q @ d.T
    k = min(k, len(doc_ids))
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    out = []
    for row, candidates in zip(scores, top, strict=True):
        ordered = candidates[np.argsort(-row[candidates], kind="stable")]
        out.append([(doc_ids[i], float(row[i])) for i in ordered])
    return out


@dataclass(frozen=True)
class Difference:
    mean: float
    low: float
    high: float
    queries: int


def bootstrap_difference(new: Sequence[float], old: Sequence[float], samples: int = 2000,
                         seed: int = 13) -> Difference:
    """Mean of ``new - old`` over paired queries and its 95 % percentile bootstrap interval."""
    diffs = np.asarray(new, dtype=np.float64) - np.asarray(old, dtype=np.float64)
    if diffs.size == 0:
        return Difference(0.0, 0.0, 0.0, 0)
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, diffs.size, size=(samples, diffs.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return Difference(float(diffs.mean()), float(low), float(high), int(diffs.size))


def verdict(diff: Difference, min_gain: float, tolerance: float) -> str:
    """GO: the gain beats ``min_gain`` and the interval is above zero. NO-GO: worse by more than
    ``tolerance`` with the interval below zero. Anything else is INCONCLUSIVE: not a confident call."""
    if diff.mean > min_gain and diff.low > 0:
        return GO
    if diff.mean < -tolerance and diff.high < 0:
        return NO_GO
    return INCONCLUSIVE


_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"\w\w+")


def synthetic_queries(docs: Sequence[tuple[str, str]], count: int, seed: int = 7,
                      ) -> tuple[dict[str, str], dict[str, dict[str, int]], dict[str, str]]:
    """Queries made from the corpus: for ``count`` sampled documents of at least three sentences,
    the sentence with the rarest words (highest mean idf) becomes a query and is cut out of the
    document, so neither retriever can find it by an exact copy.

    Returns:
        (query id -> text, qrels, document id -> its text without the cut sentence).
    """
    df: Counter[str] = Counter()
    for _, text in docs:
        df.update(set(_WORD.findall(text.lower())))
    n = len(docs)
    rng = random.Random(seed)
    candidates = [(doc_id, text) for doc_id, text in docs if len(_SENTENCE.split(text)) >= 3]
    rng.shuffle(candidates)
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    edited: dict[str, str] = {}
    for doc_id, text in candidates[:count]:
        sentences = _SENTENCE.split(text)

        def rarity(sentence: str) -> float:
            words = _WORD.findall(sentence.lower())
            return sum(math.log(n / df[w]) for w in words) / len(words) if len(words) >= 5 else -1.0

        best = max(range(len(sentences)), key=lambda i: rarity(sentences[i]))
        if rarity(sentences[best]) < 0:
            continue
        qid = f"synthetic-{len(queries)}"
        queries[qid] = sentences[best]
        qrels[qid] = {doc_id: 1}
        edited[doc_id] = " ".join(s for i, s in enumerate(sentences) if i != best)
    return queries, qrels, edited


def sample_ids(all_ids: Sequence[str], judged: set[str], size: int | None, seed: int = 11) -> list[str]:
    """A random subset of ``size`` ids that always contains every judged document."""
    if size is None or size >= len(all_ids):
        return list(all_ids)
    rest = [i for i in all_ids if i not in judged]
    rng = random.Random(seed)
    extra = rng.sample(rest, max(0, min(len(rest), size - len(judged))))
    keep = judged | set(extra)
    return [i for i in all_ids if i in keep]
