"""Documents: reading corpus files, content hashes, and the provenance fields on every vector.

The content hash covers the text *and* the user's metadata, so an edit to either is seen by the
diff that verifies a migration and catches up writes made during it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reembed.errors import InputError

if TYPE_CHECKING:
    from reembed.models import LoadedModel

#: Provenance written on every document reembed stores; stripped before hashing user metadata.
PROVENANCE_KEYS = ("embedding_model", "model_fingerprint", "embedded_at", "content_hash")


@dataclass(frozen=True)
class Document:
    """One document as it travels in a batch."""

    id: str
    text: str
    metadata: dict[str, Any]


def user_metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
    """The metadata as the user wrote it, without reembed's provenance fields."""
    return {k: v for k, v in (metadata or {}).items() if k not in PROVENANCE_KEYS}


def content_hash(text: str, metadata: dict[str, Any] | None) -> str:
    """sha256 of the text and the user's metadata (key order does not matter)."""
    payload = json.dumps([text, user_metadata(metadata)], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


#: Chroma's server parses a float's JSON text without correct rounding (1-2 units in the last
#: place off for about one full-precision float in nine, and -0.0 comes back as 0.0), so a float
#: read back may differ from the one written by that much, never more.
FLOAT_REL_TOL = 1e-12


def same_metadata(stored: dict[str, Any] | None, written: dict[str, Any] | None) -> bool:
    """Whether the user's metadata Chroma returned is what was written, floats within
    :data:`FLOAT_REL_TOL` (a value's type must be the same: Chroma keeps ints and floats apart)."""
    a, b = user_metadata(stored), user_metadata(written)
    if a.keys() != b.keys():
        return False
    for key, value in a.items():
        other = b[key]
        if type(value) is not type(other):
            return False
        if isinstance(value, float):
            if not math.isclose(value, other, rel_tol=FLOAT_REL_TOL, abs_tol=0.0):
                return False
        elif value != other:
            return False
    return True


def provenance(model: LoadedModel, text: str, metadata: dict[str, Any] | None) -> dict[str, Any]:
    """The user's metadata plus the fields that trace a vector back to its model."""
    return {
        **user_metadata(metadata),
        "embedding_model": model.spec.name,
        "model_fingerprint": model.fingerprint,
        "embedded_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "content_hash": content_hash(text, metadata),
    }


#: The longest document accepted (characters). Models truncate long texts anyway (a recorded
#: warning); this bound keeps one document from making a worker allocate without limit.
MAX_DOCUMENT_CHARS = 4_000_000
#: Chroma stores metadata integers as signed 64-bit.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: C0 control characters other than tab, newline and carriage return: never text, often a sign
#: of a binary file or a broken export.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def check_text(doc_id: str, text: str, where: str) -> str:
    """Refuse texts a model should not see: control characters, or too long to hold.

    Raises:
        InputError: naming the document, what is wrong and the fix.
    """
    if len(text) > MAX_DOCUMENT_CHARS:
        raise InputError(f"{where}: document {doc_id!r} has {len(text):,} characters; the limit is "
                         f"{MAX_DOCUMENT_CHARS:,} (split it into several documents)")
    _check_utf8(doc_id, doc_id, where, "id")
    _check_utf8(doc_id, text, where, "text")
    found = _CONTROL.search(text)
    if found:
        raise InputError(f"{where}: document {doc_id!r} contains control character U+{ord(found.group()):04X} at "
                         f"position {found.start()}; remove control characters (tab, newline and CR are fine)")
    return text


def _check_utf8(doc_id: str, value: str, where: str, what: str) -> None:
    """A lone surrogate (``"\\ud800"`` in JSON) is valid Python but not UTF-8: Chroma refuses it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{where}: document {doc_id!r} {what} has an invalid character at position {exc.start} "
                         "(a lone UTF-16 surrogate); fix the export that wrote it") from exc


def check_metadata(doc_id: str, metadata: Any, where: str) -> dict[str, Any]:
    """Keep only what Chroma stores: a flat mapping of str/int/float/bool values.

    Raises:
        InputError: naming the document and the key, with what Chroma accepts.
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InputError(f"{where}: document {doc_id!r} has metadata of type {type(metadata).__name__}; use an object")
    for key in metadata:
        if not key or key.startswith("chroma:") or key in PROVENANCE_KEYS:
            raise InputError(
                f"{where}: document {doc_id!r} metadata key {key!r} is reserved or empty (reembed writes "
                f"{', '.join(PROVENANCE_KEYS)}; Chroma reserves 'chroma:'); rename it"
            )
    for key, value in metadata.items():
        if not isinstance(value, (str, int, float, bool)):
            raise InputError(
                f"{where}: document {doc_id!r} metadata {key!r} is {type(value).__name__}; Chroma stores only "
                "str, int, float and bool values (flatten it or encode it as a string)"
            )
        if isinstance(value, str):
            _check_utf8(doc_id, value, where, f"metadata {key!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{where}: document {doc_id!r} metadata {key!r} is {value}; Chroma stores only finite "
                             "numbers (drop the key, or store it as a string)")
        if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
            raise InputError(f"{where}: document {doc_id!r} metadata {key!r} is {value}, outside the 64-bit "
                             "integers Chroma stores (store it as a string)")
    return dict(metadata)


def read_corpus(path: Path) -> Iterator[Document]:
    """Read a BEIR ``corpus.jsonl`` (``_id``, ``title``, ``text``) or plain JSONL (``id``, ``text``).

    Title and text are joined with a space, as BEIR's dense baselines do. The whole file is
    validated by :func:`validate_corpus` before anything is enqueued, so bad input changes nothing.
    """
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise InputError(f"{where}: not valid UTF-8 ({exc.reason}); re-encode the file as UTF-8") from None
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: not a JSON object ({exc.msg}); one JSON object per line") from None
            if not isinstance(obj, dict):
                raise InputError(f"{where}: expected a JSON object per line")
            doc_id = obj.get("_id", obj.get("id"))
            if not isinstance(doc_id, (str, int)) or str(doc_id).strip() == "":
                raise InputError(f"{where}: missing '_id' (BEIR) or 'id' (JSONL)")
            title = obj.get("title") or ""
            text = obj.get("text")
            if not isinstance(text, str) or not isinstance(title, str):
                raise InputError(f"{where}: document {doc_id!r} has no 'text' string")
            joined = f"{title} {text}".strip() if title else text.strip()
            check_text(str(doc_id), joined, where)
            yield Document(str(doc_id), joined, check_metadata(str(doc_id), obj.get("metadata"), where))


def validate_corpus(path: Path) -> tuple[int, list[str]]:
    """Read the whole file once: count documents, reject duplicates, list those without text.

    Returns:
        (number of documents, ids of documents whose text is empty or whitespace).

    Raises:
        InputError: unreadable file, malformed line, duplicate id or bad metadata.
    """
    if not path.is_file():
        raise InputError(f"corpus file {str(path)!r} does not exist")
    seen: set[str] = set()
    empty: list[str] = []
    for doc in read_corpus(path):
        if doc.id in seen:
            raise InputError(f"{path}: duplicate id {doc.id!r}; ids must be unique within a corpus")
        seen.add(doc.id)
        if not doc.text.strip():
            empty.append(doc.id)
    if not seen:
        raise InputError(f"corpus file {str(path)!r} holds no documents")
    return len(seen), empty


def demo_corpus_path() -> Path:
    """The small corpus shipped with the package, written for this project (CC0)."""
    return Path(__file__).parent / "data" / "demo_corpus.jsonl"
