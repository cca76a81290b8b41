"""The shape of a search answer, shared by the Python API, the CLI's ``--json`` and HTTP.

Every answer says what served it, so a caller can check that a migration never mixed models.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

Mode = Literal["hybrid", "semantic", "keyword"]
MODES: tuple[Mode, ...] = ("hybrid", "semantic", "keyword")


class Ranks(BaseModel):
    """1-based rank of a hit in each retriever; ``None`` where that retriever did not return it."""

    bm25: int | None = None
    semantic: int | None = Field(None, description="rank by served_by's collection and model")
    semantic_canary: int | None = Field(None, description="a fused canary: rank by served_by.fused_with's "
                                                          "collection and model")


class Hit(BaseModel):
    id: str
    score: float = Field(description="fused score (hybrid), cosine similarity (semantic) or BM25 score (keyword)")
    document: str | None
    metadata: dict[str, Any]
    ranks: Ranks


class IndexInfo(BaseModel):
    """The BM25 index that answered: normally the live collection's; briefly the previous one's
    (same documents) while the live collection's index is rebuilt after a cutover."""

    collection: str
    documents: int
    built_at: float


class ServedCollection(BaseModel):
    collection: str
    model: str
    fingerprint: str


class ServedBy(BaseModel):
    collection: str
    model: str
    fingerprint: str
    canary: bool = Field(False, description="served by the alias's canary collection, not its live one")
    fusion: str | None = Field(None, description="how a hybrid answer fused BM25 and semantic (convex or rrf, "
                                                 "the semantic share, RRF's k)")
    standing_in_for: str | None = Field(
        None, description="the alias's live collection, when this process had not prepared it yet (just switched "
                          "to) and its previous collection, which holds the same documents, answered instead")
    fused_with: ServedCollection | None = Field(
        None, description="a fused canary: the canary collection whose own model's ranking was fused with this one's")
    bm25_index: IndexInfo | None = None


class SearchResponse(BaseModel):
    alias: str
    mode: Mode = Field(description="the mode that answered: hybrid falls back to keyword when Chroma is down")
    query: str
    served_by: ServedBy
    degraded: str | None = Field(None, description="why the answer is not the full requested mode, if it is not")
    results: list[Hit]
    took_ms: float
