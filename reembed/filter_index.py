"""Evaluating a checked filter (``reembed.filters``) over the keyword side's copy of a collection:
metadata as numpy columns built once per index, text as the index's UTF-8 blob searched by ``find``.
The semantics are Chroma's, as the docstring of ``reembed.filters`` lists them."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from reembed.filters import (
    INT64_MAX,
    INT64_MIN,
    Filter,
    Logical,
    Mask,
    Node,
    Scalar,
    Text,
)
from reembed.text_column import TextColumn

#: Document masks kept per index, by pattern: a repeated ``$contains`` costs nothing.
TEXT_CACHE_SIZE = 64


class _Column:
    """One metadata key over every document, one array per value type that occurs."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.ints: tuple[Mask, np.ndarray] | None = None  # (present, int64 values)
        self.floats: tuple[Mask, np.ndarray] | None = None  # (present, float64 values)
        self.bools: tuple[Mask, Mask] | None = None  # (present, values)
        self.codes: np.ndarray | None = None  # int32 string code per document, -1 absent
        self.vocabulary: dict[str, int] = {}

    def equal(self, value: Scalar) -> Mask:
        if isinstance(value, bool):
            return self.bools[0] & (self.bools[1] == value) if self.bools else self._none()
        if isinstance(value, str):
            code = self.vocabulary.get(value)
            return self.codes == code if self.codes is not None and code is not None else self._none()
        found = self._none()
        if self.ints is not None:
            found |= self.ints[0] & (self.ints[1] == _as_int64(value))
        if self.floats is not None:
            found |= self.floats[0] & (self.floats[1] == value)
        return found

    def among(self, values: tuple[Scalar, ...]) -> Mask:
        first = values[0]
        if isinstance(first, bool):
            return self.bools[0] & np.isin(self.bools[1], list(values)) if self.bools else self._none()
        if isinstance(first, str):
            codes = [self.vocabulary[v] for v in values if isinstance(v, str) and v in self.vocabulary]
            return np.isin(self.codes, codes) if self.codes is not None and codes else self._none()
        found = self._none()
        if self.ints is not None:
            ints = np.asarray([_as_int64(v) for v in values], dtype=np.int64)
            found |= self.ints[0] & np.isin(self.ints[1], ints)
        if self.floats is not None:
            found |= self.floats[0] & np.isin(self.floats[1], np.asarray(values, dtype=np.float64))
        return found

    def compare(self, op: str, value: Scalar) -> Mask:
        """Documents whose value is a number (int or float, never bool) that ``op`` ``value``."""
        test = _ORDER[op]
        found = self._none()
        if self.ints is not None:
            found |= self.ints[0] & test(self.ints[1], _as_int64(value))
        if self.floats is not None:
            found |= self.floats[0] & test(self.floats[1], value)
        return found

    def _none(self) -> Mask:
        return np.zeros(self.n, dtype=bool)


class FilterIndex:
    """The columns and text a filter is evaluated over, for one immutable BM25 index.

    Built on the first filtered query (a pass over the metadata, about a second at 100,000
    documents), then shared by every query of that index. Thread-safe.
    """

    def __init__(self, documents: TextColumn, metadatas: Sequence[dict[str, Any]]) -> None:
        self.n = len(documents)
        self._documents = documents  # possibly memory-mapped: searched in place, never copied
        self._columns = _columns(metadatas, self.n)
        self._found: OrderedDict[str, Mask] = OrderedDict()
        self._lock = threading.Lock()

    def mask(self, flt: Filter) -> Mask:
        """Which documents pass ``flt`` (both parts), in the index's order."""
        passing = np.ones(self.n, dtype=bool)
        if flt.metadata is not None:
            passing &= self._evaluate(flt.metadata)
        if flt.document is not None:
            passing &= self._evaluate(flt.document)
        return passing

    def _evaluate(self, node: Node) -> Mask:
        if isinstance(node, Logical):
            combined = self._evaluate(node.children[0])
            for child in node.children[1:]:
                combined = combined & self._evaluate(child) if node.op == "$and" else combined | self._evaluate(child)
            return combined
        if isinstance(node, Text):
            found = self._contains(node.text)
            return found if node.op == "$contains" else ~found
        column = self._columns.get(node.key) or _Column(self.n)
        value = node.value
        if node.op in ("$eq", "$ne"):
            assert not isinstance(value, tuple)
            equal = column.equal(value)
            return equal if node.op == "$eq" else ~equal
        if node.op in ("$in", "$nin"):
            assert isinstance(value, tuple)
            found = column.among(value)
            return found if node.op == "$in" else ~found
        assert not isinstance(value, tuple)
        return column.compare(node.op, value)

    def _contains(self, pattern: str) -> Mask:
        """Documents whose text contains ``pattern`` (case-sensitive), cached by pattern.

        One ``find`` walks the UTF-8 blob of every text; after a hit it jumps to the next
        document, so the Python loop runs once per matching document, not per document. A UTF-8
        pattern can only match at character boundaries, so bytes give the same answer as text.
        """
        with self._lock:
            cached = self._found.get(pattern)
            if cached is not None:
                self._found.move_to_end(pattern)
                return cached
        texts = self._documents
        blob, starts = texts.blob, texts.starts
        needle = pattern.encode("utf-8")
        found = np.zeros(self.n, dtype=bool)
        at = blob.find(needle)
        while at != -1:
            doc = int(np.searchsorted(starts, at, side="right")) - 1
            if at + len(needle) <= texts.end(doc):  # not across the separator into the next text
                found[doc] = True
                if doc + 1 >= self.n:
                    break
                at = blob.find(needle, int(starts[doc + 1]))
            else:
                at = blob.find(needle, at + 1)
        with self._lock:
            self._found[pattern] = found
            while len(self._found) > TEXT_CACHE_SIZE:
                self._found.popitem(last=False)
        return found


def passing(flt: Filter, documents: list[str | None], metadatas: list[dict[str, Any] | None]) -> Mask:
    """Which of a few rows Chroma returned pass ``flt`` (the same rules as a whole index's)."""
    return FilterIndex(TextColumn.of(d or "" for d in documents), [m or {} for m in metadatas]).mask(flt)


_ORDER = {"$gt": np.greater, "$gte": np.greater_equal, "$lt": np.less, "$lte": np.less_equal}


def _as_int64(value: Scalar) -> int:
    """The bound an integer value is compared with: Chroma casts a float to int64 (toward zero,
    saturating), so ``{"$lt": 1.5}`` does not match 1 while ``{"$eq": 1.5}`` does. Measured, and
    mirrored so that both retrievers agree (see the module docstring)."""
    assert not isinstance(value, (bool, str))
    return min(max(int(value), INT64_MIN), INT64_MAX)


def _columns(metadatas: Sequence[dict[str, Any]], n: int) -> dict[str, _Column]:
    """Turn the metadata into one column per key (a single pass; arrays per type that occurs)."""
    by_key: dict[str, dict[type, tuple[list[int], list[Any]]]] = {}
    for at, metadata in enumerate(metadatas):
        for key, value in metadata.items():
            kind = type(value)
            if kind not in (bool, int, float, str):  # None, or an array from another writer: never equal
                continue
            positions, values = by_key.setdefault(key, {}).setdefault(kind, ([], []))
            positions.append(at)
            values.append(value)
    columns: dict[str, _Column] = {}
    for key, kinds in by_key.items():
        column = columns[key] = _Column(n)
        for kind, (positions, values) in kinds.items():
            present = np.zeros(n, dtype=bool)
            present[positions] = True
            if kind is bool:
                flags = np.zeros(n, dtype=bool)
                flags[positions] = values
                column.bools = (present, flags)
            elif kind is int:
                ints = np.zeros(n, dtype=np.int64)
                ints[positions] = values
                column.ints = (present, ints)
            elif kind is float:
                floats = np.zeros(n, dtype=np.float64)
                floats[positions] = values
                column.floats = (present, floats)
            elif kind is str:
                codes = np.full(n, -1, dtype=np.int32)
                column.codes = codes
                for position, text in zip(positions, values, strict=True):
                    codes[position] = column.vocabulary.setdefault(text, len(column.vocabulary))
    return columns
