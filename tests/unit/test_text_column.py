"""The strings a BM25 index keeps, saved once and memory-mapped by every search process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reembed.bm25 import Bm25Index, IndexSignature
from reembed.errors import StoreError
from reembed.text_column import JsonColumn, TextColumn

TEXTS = ["plain", "", "café ünïcode ĞĞ 🧬", "a\x00NUL inside", "last"]


def test_a_column_round_trips_through_its_files_and_reads_like_a_list(tmp_path: Path) -> None:
    column = TextColumn.of(TEXTS)
    assert list(column) == TEXTS and len(column) == 5 and column[-1] == "last" and column[1:3] == TEXTS[1:3]
    column.save(tmp_path / "texts.bin")
    loaded = TextColumn.load(tmp_path / "texts.bin")
    assert list(loaded) == TEXTS and loaded[2] == TEXTS[2]
    with pytest.raises(IndexError):
        loaded[5]


def test_an_empty_column_and_json_rows_round_trip(tmp_path: Path) -> None:
    TextColumn.of([]).save(tmp_path / "empty.bin")
    assert list(TextColumn.load(tmp_path / "empty.bin")) == []
    rows = [{"n": 1, "s": "ü"}, {}, {"nested": [1, 2]}]
    JsonColumn.of(rows).texts.save(tmp_path / "meta.bin")
    assert list(JsonColumn(TextColumn.load(tmp_path / "meta.bin"))) == rows


def test_a_torn_blob_is_refused_rather_than_misread(tmp_path: Path) -> None:
    TextColumn.of(TEXTS).save(tmp_path / "texts.bin")
    with open(tmp_path / "texts.bin", "ab") as handle:
        handle.write(b"more")
    with pytest.raises(ValueError, match="offsets end at"):
        TextColumn.load(tmp_path / "texts.bin")


def test_an_index_saved_in_another_format_is_refused_so_that_it_is_rebuilt(tmp_path: Path) -> None:
    Bm25Index.build(IndexSignature("t", 2, 0), ["a", "b"], ["solar cell", "wind"], [None, None]).save(tmp_path / "idx")
    header = tmp_path / "idx" / "reembed-index.json"
    header.write_text(json.dumps({**json.loads(header.read_text()), "format": 1}))
    with pytest.raises(StoreError, match="format 1, this reembed reads format 2.*delete the directory"):
        Bm25Index.load(tmp_path / "idx")


def test_a_collection_of_stop_words_only_gets_an_index_that_finds_nothing(tmp_path: Path) -> None:
    index = Bm25Index.build(IndexSignature("t", 2, 0), ["a", "b"], ["the", "of a"], [None, None])
    index.save(tmp_path / "idx")
    loaded = Bm25Index.load(tmp_path / "idx")
    assert index.query("the cell", 5) == loaded.query("the cell", 5) == [] and loaded.document("b") == ("of a", {})
