"""Search filters in Chroma's own syntax (``where``, ``where_document``): checked once, applied to
both retrievers.

Chroma applies a filter to the semantic side itself (it is passed to its query). The BM25 side
cannot ask Chroma on every query, so it evaluates the same filter over the copy of the metadata
and text its index holds (:class:`FilterIndex`): metadata as numpy columns built once per index,
documents as one UTF-8 blob searched by ``bytes.find`` (C), so no query loops over the corpus in
Python. Both sides must agree, or a hybrid answer would hold documents outside the filter.

The semantics are Chroma's as measured against ``chroma run`` 1.5
(``tests/integration/test_filters.py`` checks them with random filters):

* ``{"key": value}`` is ``{"key": {"$eq": value}}``; one key per object (``$and`` combines more).
* Numbers: a float value is compared with the bound as a float; an **integer** value is compared
  with the bound cast to an integer, toward zero, as Rust's ``as i64`` does: ``{"$eq": 1.0}``
  matches 1 and 1.0, but ``{"$eq": 1.5}`` matches the integer 1 and ``{"$lt": 1.5}`` does not.
  Surprising, but it is what Chroma's semantic side does, so the keyword side does it too.
* A bool is its own type (``True`` never equals ``1``); strings match exactly (case-sensitive).
* ``$gt $gte $lt $lte`` take a number and match numbers only.
* ``$ne`` and ``$nin`` are the negation of ``$eq`` and ``$in``: they also match documents that lack
  the key or hold another type.
* ``$in``/``$nin`` take a non-empty list of values of one type.
* ``where_document``: ``$contains``/``$not_contains`` are case-sensitive substring tests.

Refused with a message naming the part, where Chroma would fail late or reembed cannot follow:
several keys in one object, ``None``, lists outside ``$in``, non-finite numbers, integers outside
int64, ``$contains`` on a metadata key (that tests array values; reembed stores scalars),
``$regex`` (Chroma's dialect is not Python's), and filters nested deeper than
:data:`MAX_DEPTH` or larger than :data:`MAX_NODES`.
"""

from __future__ import annotations

import bisect
import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from reembed.errors import InputError

Scalar = Union[str, int, float, bool]
Mask = np.ndarray

#: Bounds that keep one request from asking for unbounded work.
MAX_DEPTH = 16
MAX_NODES = 256
MAX_IN_VALUES = 1024
#: Document masks kept per index, by pattern: a repeated ``$contains`` costs nothing.
TEXT_CACHE_SIZE = 64

COMPARE_OPS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin")
LOGICAL_OPS = ("$and", "$or")
TEXT_OPS = ("$contains", "$not_contains")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
EXAMPLE = '{"year": {"$gte": 2020}}'


class FilterError(InputError):
    """A ``where`` or ``where_document`` that is not a filter reembed and Chroma both apply."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        super().__init__(f"{path}: {problem}")


@dataclass(frozen=True)
class Field:
    """One comparison of a metadata key (``$eq`` for the shorthand)."""

    key: str
    op: str
    value: Scalar | tuple[Scalar, ...]


@dataclass(frozen=True)
class Text:
    """One substring test of the document text."""

    op: str
    text: str


@dataclass(frozen=True)
class Logical:
    op: str  # $and | $or
    children: tuple[Node, ...]


Node = Union[Field, Text, Logical]


@dataclass(frozen=True)
class Filter:
    """A checked filter: what Chroma is sent (as given) and the tree the BM25 side evaluates."""

    where: dict[str, Any] | None
    where_document: dict[str, Any] | None
    metadata: Node | None
    document: Node | None

    def chroma_arguments(self) -> dict[str, Any]:
        """Keyword arguments for a Chroma ``query`` or ``get``."""
        found: dict[str, Any] = {}
        if self.where is not None:
            found["where"] = self.where
        if self.where_document is not None:
            found["where_document"] = self.where_document
        return found

    def describe(self) -> str:
        """A short, stable rendering for logs and answers (a filter holds no secrets)."""
        return json.dumps(self.chroma_arguments(), sort_keys=True, ensure_ascii=False)


def parse_filter(where: Any = None, where_document: Any = None) -> Filter | None:
    """Check both parts; None when neither is given.

    Raises:
        FilterError: naming the bad part (``where.$and[1].year.$gt``) and what it should be.
    """
    if where is None and where_document is None:
        return None
    budget = _Budget()
    metadata = _where(where, "where", 1, budget) if where is not None else None
    document = _where_document(where_document, "where_document", 1, budget) if where_document is not None else None
    return Filter(where, where_document, metadata, document)


def parse_json_filter(raw: str | None, name: str) -> Any:
    """A filter sent as a JSON string (a query parameter, a CLI option).

    Raises:
        FilterError: the text is not JSON.
    """
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise FilterError(name, f"is not JSON ({exc}); send an object such as {EXAMPLE}") from exc


# -- checking --------------------------------------------------------------------------------------


class _Budget:
    def __init__(self) -> None:
        self.nodes = 0

    def spend(self, path: str) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise FilterError(path, f"the filter has over {MAX_NODES} conditions; split the request")


def _one_key(obj: Any, path: str, depth: int, what: str) -> tuple[str, Any]:
    if depth > MAX_DEPTH:
        raise FilterError(path, f"nested deeper than {MAX_DEPTH} levels")
    if not isinstance(obj, dict):
        raise FilterError(path, f"must be an object such as {what}, got {_kind(obj)}")
    if len(obj) != 1:
        if not obj:
            raise FilterError(path, f"is an empty object; give one condition such as {what}")
        keys = ", ".join(sorted(map(str, obj)))
        raise FilterError(path, f"has {len(obj)} keys ({keys}); Chroma's syntax takes one per object: "
                                'combine them with {"$and": [{...}, {...}]}')
    ((key, value),) = obj.items()
    return key, value


def _children(value: Any, path: str) -> list[Any]:
    if not isinstance(value, list) or len(value) < 2:
        raise FilterError(path, f"must be a list of at least two conditions, got {_kind(value)}")
    return value


def _where(obj: Any, path: str, depth: int, budget: _Budget) -> Node:
    key, value = _one_key(obj, path, depth, EXAMPLE)
    here = f"{path}.{key}"
    budget.spend(here)
    if key in LOGICAL_OPS:
        children = _children(value, here)
        return Logical(key, tuple(_where(c, f"{here}[{i}]", depth + 1, budget) for i, c in enumerate(children)))
    if key.startswith("$"):
        raise FilterError(here, "is not an operator here: a where object is a metadata key or $and/$or "
                                "(text conditions go in where_document)")
    if key.startswith("#"):
        raise FilterError(here, 'is not a metadata key: filter the text with where_document, e.g. '
                                '{"$contains": "word"}')
    if not key:
        raise FilterError(here, "the metadata key is empty")
    if not isinstance(value, dict):
        return Field(key, "$eq", _scalar(value, here))
    op, operand = _one_key(value, here, depth + 1, '{"$eq": "value"}')
    at = f"{here}.{op}"
    if op in TEXT_OPS:
        raise FilterError(at, "tests array values, and reembed stores scalar metadata only; use $eq or $in, "
                              "or where_document for the text")
    if op not in COMPARE_OPS:
        raise FilterError(at, f"is not an operator: use one of {', '.join(COMPARE_OPS)}")
    if op in ("$gt", "$gte", "$lt", "$lte"):
        number = _scalar(operand, at)
        if isinstance(number, (bool, str)):
            raise FilterError(at, f"compares numbers only, got {_kind(operand)}")
        return Field(key, op, number)
    if op in ("$in", "$nin"):
        if not isinstance(operand, list) or not operand:
            raise FilterError(at, f"needs a non-empty list of values, got {_kind(operand)}")
        if len(operand) > MAX_IN_VALUES:
            raise FilterError(at, f"lists {len(operand)} values; the limit is {MAX_IN_VALUES}")
        values = tuple(_scalar(v, f"{at}[{i}]") for i, v in enumerate(operand))
        if any(type(v) is not type(values[0]) for v in values):
            raise FilterError(at, "mixes value types; Chroma needs one type per list (all strings, all "
                                  "integers, all floats or all booleans)")
        return Field(key, op, values)
    return Field(key, op, _scalar(operand, at))


def _where_document(obj: Any, path: str, depth: int, budget: _Budget) -> Node:
    key, value = _one_key(obj, path, depth, '{"$contains": "word"}')
    here = f"{path}.{key}"
    budget.spend(here)
    if key in LOGICAL_OPS:
        children = _children(value, here)
        return Logical(key, tuple(_where_document(c, f"{here}[{i}]", depth + 1, budget)
                                  for i, c in enumerate(children)))
    if key in ("$regex", "$not_regex"):
        raise FilterError(here, "is not supported: the keyword side cannot apply Chroma's regex dialect; "
                                "use $contains or $not_contains")
    if key not in TEXT_OPS:
        raise FilterError(here, f"is not a document operator: use {', '.join(TEXT_OPS + LOGICAL_OPS)} "
                                "(metadata conditions go in where)")
    if not isinstance(value, str) or not value:
        raise FilterError(here, f"needs a non-empty string, got {_kind(value)}")
    return Text(key, value)


def _scalar(value: Any, path: str) -> Scalar:
    if isinstance(value, bool) or isinstance(value, str):
        return value
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise FilterError(path, "is outside the 64-bit integer range Chroma stores")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise FilterError(path, "is not a finite number")
        return value
    if isinstance(value, list):
        raise FilterError(path, 'is a list; to match any of several values use {"$in": [...]}')
    raise FilterError(path, f"must be a string, number or boolean, got {_kind(value)}")


def _kind(value: Any) -> str:
    """What a value is, without echoing it whole (it may be long)."""
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return f"{'an object' if isinstance(value, dict) else 'a list'} of {len(value)}"
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


# -- evaluating over an index's copy -----------------------------------------------------------------


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

    def __init__(self, documents: list[str], metadatas: list[dict[str, Any]]) -> None:
        self.n = len(documents)
        self._documents = documents
        self._columns = _columns(metadatas, self.n)
        self._blob: bytes | None = None
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._texts: OrderedDict[str, Mask] = OrderedDict()
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

        One ``bytes.find`` walks the UTF-8 blob of every text; after a hit it jumps to the next
        document, so the Python loop runs once per matching document, not per document. A UTF-8
        pattern can only match at character boundaries, so bytes give the same answer as text.
        """
        with self._lock:
            cached = self._texts.get(pattern)
            if cached is not None:
                self._texts.move_to_end(pattern)
                return cached
            if self._blob is None:
                self._build_blob()
        blob, starts, ends = self._blob, self._starts, self._ends
        assert blob is not None
        needle = pattern.encode("utf-8")
        found = np.zeros(self.n, dtype=bool)
        at = blob.find(needle)
        while at != -1:
            doc = bisect.bisect_right(starts, at) - 1
            if at + len(needle) <= ends[doc]:  # not across the separator into the next text
                found[doc] = True
                if doc + 1 >= self.n:
                    break
                at = blob.find(needle, starts[doc + 1])
            else:
                at = blob.find(needle, at + 1)
        with self._lock:
            self._texts[pattern] = found
            while len(self._texts) > TEXT_CACHE_SIZE:
                self._texts.popitem(last=False)
        return found

    def _build_blob(self) -> None:
        encoded = [text.encode("utf-8") for text in self._documents]
        start = 0
        for text in encoded:
            self._starts.append(start)
            self._ends.append(start + len(text))
            start += len(text) + 1
        self._blob = b"\x00".join(encoded)


def passing(flt: Filter, documents: list[str | None], metadatas: list[dict[str, Any] | None]) -> Mask:
    """Which of a few rows Chroma returned pass ``flt`` (the same rules as a whole index's)."""
    return FilterIndex([d or "" for d in documents], [m or {} for m in metadatas]).mask(flt)


_ORDER = {"$gt": np.greater, "$gte": np.greater_equal, "$lt": np.less, "$lte": np.less_equal}


def _as_int64(value: Scalar) -> int:
    """The bound an integer value is compared with: Chroma casts a float to int64 (toward zero,
    saturating), so ``{"$lt": 1.5}`` does not match 1 while ``{"$eq": 1.5}`` does. Measured, and
    mirrored so that both retrievers agree (see the module docstring)."""
    assert not isinstance(value, (bool, str))
    return min(max(int(value), INT64_MIN), INT64_MAX)


def _columns(metadatas: list[dict[str, Any]], n: int) -> dict[str, _Column]:
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
