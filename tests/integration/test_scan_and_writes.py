"""Reading a whole collection at a flat cost per page, and the write path's kept collection handles,
against a real `chroma run`."""

from __future__ import annotations

import chromadb
import numpy as np
import pytest

from cli.services import ChromaServer
from reembed import pipeline, store as store_module
from reembed.errors import CollectionNotFoundError
from reembed.store import Store

pytestmark = pytest.mark.integration


def _fill(store: Store, name: str, n: int) -> list[str]:
    store.create(name, {"test": "scan"})
    ids = [f"d{i:03d}" for i in range(n)]
    vectors = np.random.default_rng(0).standard_normal((n, 8)).astype(np.float32)
    store.add(name, ids, vectors, [f"text {i}" for i in range(n)], [{"i": i} for i in range(n)])
    return ids


def test_pages_list_ids_in_chunks_and_read_each_document_once(chroma: ChromaServer,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(chroma.url)
    ids = _fill(store, "col", 50)
    monkeypatch.setattr(store_module, "ID_CHUNK", 7)  # several listings, pages that straddle them
    pages = list(store.pages("col", page_size=3))
    seen = [i for page in pages for i in page.ids]
    assert sorted(seen) == ids and len(seen) == len(set(seen))
    assert all(page.documents[k] == f"text {int(i[1:])}" for page in pages for k, i in enumerate(page.ids))
    assert [p.metadatas for p in store.pages("col", page_size=50, documents=False)][0][0] is not None
    assert [i for p in store.pages("col", page_size=50, documents=False) for i in p.ids] == \
        [i for p in store.pages("col", page_size=50) for i in p.ids]


@pytest.mark.parametrize("regex", [store_module.HAS_TEXT, "("])  # "(": a regex the server refuses
def test_documents_without_text_are_found_as_python_strips_them(chroma: ChromaServer, regex: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # Chroma picks out the documents with text by a regex; a migration then refuses (or skips) the
    # rest. Every character Python counts as white space must count as no text, none other may.
    store = Store(chroma.url)
    store.create("col", {"test": "text"})
    col = store.collection("col")
    blank = {f"ws-{ord(c):04x}": c * 2 for c in map(chr, range(0x3001)) if c.isspace()}
    texts = {"empty": "", **blank, "a": "a", "padded": " \t b \u3000", "zero-width": "\u200b", "sep": "\x1c x"}
    rng = np.random.default_rng(0)
    col.add(ids=list(texts), documents=list(texts.values()),
            embeddings=rng.standard_normal((len(texts), 4)).astype(np.float32))
    col.add(ids=["none-1", "none-2"], embeddings=rng.standard_normal((2, 4)).astype(np.float32))  # stored without text
    monkeypatch.setattr(store_module, "HAS_TEXT", regex)
    monkeypatch.setattr(store_module, "ID_CHUNK", 7)
    read: list[int] = []
    get = store.get
    monkeypatch.setattr(store, "get", lambda name, ids, **kw: read.append(len(ids)) or get(name, ids, **kw))
    total, missing = store.without_text("col")
    assert total == len(texts) + 2 and len(blank) == 29
    # with the regex only the documents without text are read; without it, every one
    assert read == ([total] if regex == "(" else [len(missing)])
    assert sorted(missing) == sorted(["empty", *blank, "none-1", "none-2"])


def test_a_scan_window_spans_positions_even_when_documents_were_deleted_since_listing(
        chroma: ChromaServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # Positions after a deletion shift, in a listing as in a plain get(offset=…): what a shift
    # skips, the verification diff finds missing and a catch-up round sends (tests/integration).
    # Within a listed chunk nothing shifts, and a window spans its positions, found or not.
    store = Store(chroma.url)
    ids = _fill(store, "col", 16)
    monkeypatch.setattr(pipeline, "ID_CHUNK", 16)
    monkeypatch.setattr(pipeline, "_listed", {})
    order = store.ids("col", 0, 100)  # storage order, what the cursor counts in
    got, spans, cursor = [], [], 0
    while True:
        span, page = pipeline.scan_page(store, "m1", "col", cursor, 4)
        if not span:
            break
        if cursor == 0:  # deleted after their window was listed
            store.delete_ids("col", [order[5], order[6]])
        got += page.ids
        spans.append((span, len(page.ids)))
        cursor += span
    assert cursor == 16 and got == [i for i in order if i not in (order[5], order[6])]
    assert spans == [(4, 4), (4, 2), (4, 4), (4, 4)]
    assert sorted(order) == ids and "m1" not in pipeline._listed  # forgotten once the scan ended


def test_a_kept_handle_follows_its_collection_deleted_and_made_again(chroma: ChromaServer) -> None:
    store = Store(chroma.url)
    _fill(store, "col", 5)
    assert store.count("col") == 5  # the handle is kept from here
    other = chromadb.HttpClient(host="127.0.0.1", port=int(chroma.url.rsplit(":", 1)[1]))
    other.delete_collection("col")
    with pytest.raises(CollectionNotFoundError):
        store.add("col", ["x"], np.ones((1, 8), dtype=np.float32), ["x"], [{"i": 1}])
    other.create_collection("col")  # made again under its name, by someone else: a new collection id
    store.add("col", ["x"], np.ones((1, 8), dtype=np.float32), ["x"], [{"i": 1}])
    assert store.count("col") == 1 and other.get_collection("col").get(ids=["x"])["ids"] == ["x"]
