"""Search filters in Chroma's own syntax (``where``, ``where_document``): checked once, applied to
both retrievers.

Chroma applies a filter to the semantic side itself (it is passed to its query). The BM25 side
cannot ask Chroma on every query, so it evaluates the same filter over the copy of the metadata
and text its index holds (``reembed.filter_index.FilterIndex``): metadata as numpy columns built once per index,
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

import json
import math
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
