"""The logic behind throughput: device choices, length-sorted batches, overlapped writes.

The CUDA paths are covered here by their logic (no GPU on CI); the GPU figures themselves are
in BENCHMARKS.md, measured by bench/gpu_run.sh on a lent GPU.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from reembed.documents import Document
from reembed.errors import ConfigError, StoreUnavailableError
from reembed.models import embed_batch_size, pick_device, use_half_precision
from reembed.pipeline import file_batches, length_sorted_batches, scan_window, window_batches
from reembed.runtimes import check_backend, parse_backend
from reembed.settings import Settings
from worker import embedding
from worker.embedding import embed_and_write, last_hidden_chance


@pytest.mark.parametrize(("device", "setting", "expected"), [
    ("cpu", 0, 16), ("cuda", 0, 256), ("cuda:1", 0, 256), ("mps", 0, 64), ("cuda", 100, 100), ("cpu", 8, 8),
])
def test_forward_batch_is_chosen_per_device(device: str, setting: int, expected: int) -> None:
    assert embed_batch_size(device, setting) == expected
    assert embed_batch_size(device, setting, static=True) == (setting or 1024)


def test_half_precision_only_on_cuda_and_explicit_devices_are_kept() -> None:
    assert use_half_precision("cuda") and use_half_precision("cuda:3")
    assert not use_half_precision("cpu") and not use_half_precision("mps")
    assert pick_device("cuda:1") == "cuda:1" and pick_device("cpu") == "cpu"


def test_runtime_setting_accepts_torch_and_openvino_and_names_the_fix_otherwise() -> None:
    assert Settings.from_env({}).backend == "torch"
    assert Settings.from_env({"REEMBED_BACKEND": " OpenVINO "}).backend == "openvino"
    assert parse_backend("torch") == "torch"
    with pytest.raises(ConfigError, match=r"REEMBED_BACKEND='onnx' is not a runtime: use torch or openvino"):
        Settings.from_env({"REEMBED_BACKEND": "onnx"})
    check_backend("torch", "cuda:0")  # torch runs anywhere
    for gpu in ("cuda", "cuda:1", "mps"):  # OpenVINO here is a CPU runtime
        with pytest.raises(ConfigError, match="REEMBED_DEVICE=cpu or REEMBED_BACKEND=torch"):
            check_backend("openvino", gpu)


def test_a_scan_window_is_sent_longest_batch_first_under_stable_names() -> None:
    docs = [Document(f"d{i}", "w " * ((i * 7) % 23 + 1), {}) for i in range(20)]
    window = scan_window(640, docs, 6)
    assert [name for name, _ in window] == ["s-640-3", "s-640-2", "s-640-1", "s-640-0"]
    longest = [max(len(d.text) for d in batch) for _, batch in window]
    assert longest == sorted(longest, reverse=True)
    assert sorted(d.id for _, batch in window for d in batch) == sorted(d.id for d in docs)
    assert scan_window(640, list(reversed(docs)), 6) == window  # re-sent after a crash: same names, same batches
    assert scan_window(0, [], 6) == [("s-0-0", [])]  # a page whose documents were all skipped still counts


def test_scan_windows_start_with_one_batch_and_double_up_to_the_most() -> None:
    cursor, sizes = 0, []
    while cursor < 40 * 100:
        sizes.append(window_batches(cursor, 100, 8))
        cursor += sizes[-1] * 100
    assert sizes == [1, 2, 4, 1, 8, 8, 8, 8]
    assert window_batches(0, 100, 1) == 1 and window_batches(10_000, 100, 3) == 3  # never more than the most
    assert [window_batches(c, 100, 8) for c in (99, 100, 199, 200, 700)] == [1, 2, 2, 4, 1]  # from the cursor alone
    for most in range(1, 20):  # the first windows add up to the bound exactly: the queue fills to it
        sent = 0
        while sent < most:
            sent += window_batches(sent * 100, 100, most)
        assert sent == most


def test_length_sorted_batches_are_deterministic_and_complete() -> None:
    docs = [Document(f"d{i}", "x" * ((i * 7) % 13), {}) for i in range(20)]
    batches = length_sorted_batches(docs, 6)
    assert [len(b) for b in batches] == [6, 6, 6, 2]
    flat = [d for b in batches for d in b]
    assert sorted(d.id for d in flat) == sorted(d.id for d in docs)
    assert [len(d.text) for d in flat] == sorted(len(d.text) for d in docs)
    assert length_sorted_batches(list(reversed(docs)), 6) == batches  # same window, same batches


def test_a_corpus_file_is_cut_by_length_window_by_window_and_read_again_identically(tmp_path: Path) -> None:
    # 23 documents of mixed lengths, batches of 3 in windows of 2 batches; d4 skipped (no text).
    lengths = [(i * 11) % 17 + 1 for i in range(23)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "text": "w" * n}) + "\n" for i, n in enumerate(lengths)))
    batches = list(file_batches(corpus, 3, {"d4"}, window=2))
    assert [name for name, _ in batches] == [f"f-{i}" for i in range(8)]
    assert [len(b) for _, b in batches] == [3, 3, 3, 3, 3, 3, 1, 3]  # the last window's short batch holds its longest
    assert sorted(d.id for _, b in batches for d in b) == sorted(f"d{i}" for i in range(23) if i != 4)
    for first in range(0, 8, 2):  # a window: its own 6 documents of the file, longest batch first
        window = [d for _, b in batches[first:first + 2] for d in b]
        expected = [f"d{i}" for i in range(23) if i != 4][first * 3:first * 3 + 6]
        assert sorted(d.id for d in window) == sorted(expected)
        assert min(len(d.text) for d in batches[first][1]) >= max(len(d.text) for d in batches[first + 1][1])
    assert list(file_batches(corpus, 3, {"d4"}, window=2)) == batches  # a resume or a re-send sees the same
    # window 1 (an ingest recorded before windows): the file's own order, as it was cut then
    assert [d.id for _, b in file_batches(corpus, 3, {"d4"}) for d in b] == [f"d{i}" for i in range(23) if i != 4]


class FakeModel:
    """Records when each chunk is embedded; 'poison' texts make the model raise."""

    def __init__(self, batch_size: int, delay_s: float = 0.05) -> None:
        self.batch_size = batch_size
        self.delay_s = delay_s
        self.spec = type("Spec", (), {"name": "fake"})()
        self.fingerprint = "sha256:fake"
        self.events: list[tuple[str, float]] = []

    def embed_documents(self, texts: list[str]) -> np.ndarray:
        if any("poison" in t for t in texts):
            raise ValueError("cannot embed this")
        self.events.append(("embed", time.perf_counter()))
        time.sleep(self.delay_s)
        return np.ones((len(texts), 4), dtype=np.float32)


def test_writes_overlap_the_next_embedding_and_keep_every_document(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedding, "_write_s_per_doc", 0.001)  # what earlier writes of this process taught it
    model = FakeModel(batch_size=4)
    written: list[list[str]] = []
    in_write = threading.Event()
    overlapped: list[bool] = []

    def write(collection: str, ids: list[str], embeddings: np.ndarray, documents: list[str],
              metadatas: list[dict[str, Any]]) -> None:
        in_write.set()
        time.sleep(0.08)
        written.append(ids)
        in_write.clear()

    original = model.embed_documents

    def embed(texts: list[str]) -> np.ndarray:
        overlapped.append(in_write.is_set())
        return original(texts)

    model.embed_documents = embed  # type: ignore[method-assign]
    ids = [f"d{i}" for i in range(10)]
    texts = [f"text {i}" for i in range(10)]
    texts[5] = "poison"
    done, failed, timings = embed_and_write(model, "target", ids, texts, [{}] * 10, write)  # type: ignore[arg-type]
    assert done == 9 and set(failed) == {"d5"} and "ValueError" in failed["d5"]
    assert [i for chunk in written for i in chunk] == [i for i in ids if i != "d5"]  # order kept, poison left out
    assert any(overlapped), "a chunk was embedded while the previous one was being written"
    assert timings["write"] > 0 and timings["embed"] > 0


def test_a_batch_is_embedded_by_length_and_every_row_keeps_its_own_id_text_and_metadata() -> None:
    # Mixed lengths in arrival order: each forward pass of 4 should hold texts of similar length
    # (a transformer pads to the longest), and the reordering must not shift a vector, a text or
    # a metadata onto another id.
    lengths = [3, 40, 7, 25, 1, 33, 12, 18]
    ids = [f"d{i}" for i in range(8)]
    texts = ["w" * n for n in lengths]
    metas = [{"n": n} for n in lengths]
    chunks: list[list[str]] = []
    rows: dict[str, tuple[float, str, int]] = {}

    def embed(batch: list[str]) -> np.ndarray:
        chunks.append(batch)
        return np.array([[float(len(t))] * 4 for t in batch], dtype=np.float32)

    def write(collection: str, ids: list[str], embeddings: np.ndarray, documents: list[str],
              metadatas: list[dict[str, Any]]) -> None:
        rows.update({i: (float(v[0]), d, m["n"]) for i, v, d, m in zip(ids, embeddings, documents, metadatas, strict=True)})

    done, failed, _ = embed_and_write(FakeModel(4), "target", ids, texts, metas, write, embed)  # type: ignore[arg-type]
    assert done == 8 and not failed
    assert [[len(t) for t in c] for c in chunks] == [[1, 3, 7, 12], [18, 25, 33, 40]]
    assert all(rows[i] == (float(n), "w" * n, n) for i, n in zip(ids, lengths, strict=True))


@pytest.mark.parametrize(("delay_s", "write_s_per_doc", "expected"), [(0.0, 0.5, [12]), (0.05, 0.002, [8, 4])])
def test_writes_start_early_only_when_embedding_the_rest_hides_them(
        monkeypatch: pytest.MonkeyPatch, delay_s: float, write_s_per_doc: float, expected: list[int]) -> None:
    # Chroma's write has a fixed cost: a fast model (static, GPU) sends its batch whole; a slow
    # one writes what it has embedded while it embeds the last chunk, then the last chunk. The
    # margins are wide on purpose: the fast case flips only if embedding 4 texts stalls for a
    # second, the slow one only if a 50 ms sleep returns early or an instant write is still
    # running 50 ms later.
    monkeypatch.setattr(embedding, "_write_s_per_doc", write_s_per_doc)
    sizes: list[int] = []

    def write(collection: str, ids: list[str], **_: Any) -> None:
        sizes.append(len(ids))

    ids = [f"d{i}" for i in range(12)]
    done, _, _ = embed_and_write(FakeModel(4, delay_s), "target", ids, ids, [{}] * 12, write)  # type: ignore[arg-type]
    assert done == 12 and sizes == expected


def test_a_write_that_waits_for_its_turn_takes_everything_embedded_meanwhile(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Another worker holds the server's turn until this one has embedded its whole batch (plus a
    # wide margin): the write that was due after the first chunk then carries all three chunks.
    monkeypatch.setattr(embedding, "_write_s_per_doc", 0.002)  # a slow model: the first chunk goes early
    model = FakeModel(4, delay_s=0.05)
    embedded = threading.Semaphore(0)
    sizes: list[int] = []

    def embed(texts: list[str]) -> np.ndarray:
        vectors = FakeModel.embed_documents(model, texts)
        embedded.release()
        return vectors

    @contextlib.contextmanager
    def turn() -> Iterator[float]:
        started = time.perf_counter()
        for _ in range(3):
            assert embedded.acquire(timeout=5)
        time.sleep(0.5)
        yield time.perf_counter() - started

    def write(collection: str, ids: list[str], **_: Any) -> None:
        sizes.append(len(ids))

    ids = [f"d{i}" for i in range(12)]
    done, _, timings = embed_and_write(model, "target", ids, ids, [{}] * 12, write, embed, turn)  # type: ignore[arg-type]
    assert done == 12 and sizes == [12]
    assert timings["write_turn"] >= 0.5


def test_the_batch_bookkeeping_runs_while_its_last_write_is_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedding, "_write_s_per_doc", 0.5)  # a fast model: the batch is written whole, at the end
    in_write, seen = threading.Event(), []

    def write(collection: str, ids: list[str], **_: Any) -> None:
        in_write.set()
        time.sleep(0.3)
        in_write.clear()

    def bookkeeping() -> None:
        seen.append(in_write.wait(timeout=5))  # the write started, and this did not wait for it to end
        seen.append(in_write.is_set())

    ids = [f"d{i}" for i in range(8)]
    done, _, timings = embed_and_write(FakeModel(4), "target", ids, ids, [{}] * 8, write,  # type: ignore[arg-type]
                                       while_writing=bookkeeping)
    assert done == 8 and seen == [True, True]
    assert timings["bookkeeping"] < 0.3 <= timings["bookkeeping"] + timings["write_wait"]


def test_a_write_goes_at_the_last_chunk_that_still_hides_it() -> None:
    # 64 documents in chunks of 16, embedding 50 ms per document, writes 2 ms per document: the
    # first 48 go while the last 16 embed (hidden), not 16 at a time (four fixed costs).
    chances = [last_hidden_chance(64 - done, done, 16, 0.05, 0.002) for done in (16, 32, 48)]
    assert chances == [False, False, True]
    # A write the rest cannot hide waits for the end of the batch (one write).
    assert not any(last_hidden_chance(64 - done, done, 16, 0.001, 0.01) for done in (16, 32, 48))
    # Slower writes go earlier: at 100 ms per document the first 16 are hidden only now.
    assert last_hidden_chance(48, 16, 16, 0.05, 0.1)


def test_a_failed_write_is_raised_so_the_task_retries_the_batch() -> None:
    def write(collection: str, **_: Any) -> None:
        raise StoreUnavailableError("Chroma is unreachable")

    with pytest.raises(StoreUnavailableError):
        embed_and_write(FakeModel(2), "target", ["a", "b", "c"], ["x", "y", "z"], [{}] * 3, write)  # type: ignore[arg-type]


def test_the_plan_slows_chroma_writes_as_the_server_fills() -> None:
    from producer.plan import chroma_growth

    assert chroma_growth(0, 5_000) == 1.0
    # the same migration is slower on a fuller server, and a larger one slower than a smaller
    assert 1.0 < chroma_growth(100_000, 0) < chroma_growth(1_000_000, 0)
    assert chroma_growth(100_000, 1_000_000) < chroma_growth(100_000, 0)  # the probe already met the 1M
    # the closed form equals the mean of 1 + c·√n while the server grows from held to held + N, over
    # 1 + c·√held (what the probe measured)
    for held, n, c in ((0, 1_000_000, 0.00108), (1_000_000, 1_000_000, 0.00108), (5_000, 20_000, 0.002)):
        grown = np.arange(held, held + n, 3, dtype=np.float64)
        expected = float(np.mean(1 + c * np.sqrt(grown)) / (1 + c * np.sqrt(held)))
        assert abs(chroma_growth(n, held, c) - expected) < 1e-3
