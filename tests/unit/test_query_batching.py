"""Concurrent single queries share forward passes, and each caller gets its own row."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from reembed.models import load_model, resolve_model
from reembed.query_batching import QueryBatcher
from tests.conftest import M2V_MINILM, need


def test_callers_waiting_behind_a_pass_are_embedded_together() -> None:
    sizes: list[int] = []

    def encode(texts: list[str]) -> np.ndarray:
        sizes.append(len(texts))
        time.sleep(0.05)  # a forward pass
        return np.array([[float(t)] for t in texts])

    batcher = QueryBatcher(encode, threading.Lock())
    with ThreadPoolExecutor(16) as pool:
        rows = list(pool.map(lambda i: batcher.embed(str(i)), range(16)))
    assert [float(r[0]) for r in rows] == [float(i) for i in range(16)]  # each caller its own row
    assert sum(sizes) == 16 and len(sizes) < 16 and batcher.passes == len(sizes)
    assert batcher.embed("3")[0] == 3.0 and sizes[-1] == 1  # alone: no waiting for company


def test_a_failed_pass_fails_every_caller_in_it_and_the_next_pass_works() -> None:
    fail = threading.Event()
    fail.set()
    gate = threading.Lock()

    def encode(texts: list[str]) -> np.ndarray:
        time.sleep(0.05)
        if fail.is_set():
            raise RuntimeError("model fell over")
        return np.ones((len(texts), 1))

    batcher = QueryBatcher(encode, gate)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(batcher.embed, "q") for _ in range(4)]
        errors = [f.exception() for f in futures]
    assert all(isinstance(e, RuntimeError) for e in errors)
    fail.clear()
    assert batcher.embed("q")[0] == 1.0


def test_batched_queries_equal_queries_embedded_alone(tmp_path: Path) -> None:
    model = load_model(resolve_model(str(need(M2V_MINILM))), tmp_path, "cpu")
    texts = [f"query number {i} about {'zebrafish ' * (i % 5)}hearts" for i in range(24)]
    alone = np.stack([model.embed_documents([t])[0] for t in texts])  # no query prefix for this model
    assert model._queries is not None
    before = model._queries.passes  # the model is cached per process: other tests used it too
    with ThreadPoolExecutor(12) as pool:
        together = np.stack(list(pool.map(lambda t: model.embed_queries([t])[0], texts)))
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert 1 <= model._queries.passes - before <= len(texts)
    with pytest.raises(AssertionError):  # the check above can fail: a wrong row would not pass it
        np.testing.assert_allclose(together[::-1], alone, atol=1e-5)
