"""Many strings in one UTF-8 blob with offsets: what a BM25 index keeps of its documents.

Why not a list of ``str``: every process of ``reembed serve --workers N`` would hold its own copy
of every document (100,000 SciFact abstracts are ~150 MB of Python strings). Saved as a blob and
an offsets array, a loaded column is two memory maps: the pages are the operating system's page
cache, shared by every process that maps the same files, and a string is decoded only when asked
for (the hits of one query). The blob separates texts with a NUL byte, so the text filter's
``find`` over the whole blob (``reembed.filter_index``) runs on it unchanged.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

_SEPARATOR = b"\x00"


class TextColumn(Sequence[str]):
    """An immutable sequence of strings backed by ``blob`` and ``starts`` (``n + 1`` offsets).

    Text ``i`` is ``blob[starts[i]:starts[i + 1] - 1]``: each text is followed by one separator.
    """

    def __init__(self, blob: bytes | mmap.mmap, starts: np.ndarray) -> None:
        self.blob = blob
        self.starts = starts

    @classmethod
    def of(cls, texts: Iterable[str]) -> TextColumn:
        """A column in memory (while building an index, or for a few rows)."""
        encoded = [text.encode("utf-8") for text in texts]
        starts = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) + 1 for e in encoded], out=starts[1:])
        return cls(b"".join(e + _SEPARATOR for e in encoded), starts)

    def __len__(self) -> int:
        return len(self.starts) - 1

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"text {index} of {len(self)}")
        return bytes(self.blob[int(self.starts[index]):int(self.starts[index + 1]) - 1]).decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))

    def end(self, index: int) -> int:
        """Where text ``index`` ends in the blob (its separator's offset)."""
        return int(self.starts[index + 1]) - 1

    # -- files ---------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write ``path`` (the blob) and ``path.npy``-style offsets next to it."""
        path.write_bytes(bytes(self.blob))
        np.save(_offsets(path), self.starts)

    @classmethod
    def load(cls, path: Path) -> TextColumn:
        """Map a saved column; nothing is read until a text is asked for.

        Raises:
            ValueError: the offsets do not fit the blob (a torn or foreign file).
        """
        starts = np.load(_offsets(path), mmap_mode="r")
        size = path.stat().st_size
        if starts.ndim != 1 or len(starts) == 0 or int(starts[0]) != 0 or int(starts[-1]) != size:
            raise ValueError(f"{path}: its offsets end at {int(starts[-1]) if len(starts) else None}, the file "
                             f"holds {size} bytes")
        if size == 0:
            return cls(b"", starts)
        with open(path, "rb") as handle:  # the map outlives the descriptor
            return cls(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ), starts)


class JsonColumn(Sequence[dict[str, Any]]):
    """One JSON object per row over a ``TextColumn`` (a document's metadata), decoded on access."""

    def __init__(self, texts: TextColumn) -> None:
        self.texts = texts

    @classmethod
    def of(cls, rows: Iterable[dict[str, Any]]) -> JsonColumn:
        return cls(TextColumn.of(json.dumps(row, ensure_ascii=False) for row in rows))

    def __len__(self) -> int:
        return len(self.texts)

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(index, slice):
            return [json.loads(text) for text in self.texts[index]]
        row: dict[str, Any] = json.loads(self.texts[index])
        return row

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (json.loads(text) for text in self.texts)


def _offsets(path: Path) -> Path:
    return path.with_name(path.name + ".offsets.npy")
