"""Search by alias: hybrid BM25 + semantic, served only from the alias's live collection with
that collection's own model. ``Searcher`` is the Python API; ``search.api`` the HTTP service."""

from search.results import Hit, SearchResponse, ServedBy
from search.searcher import Searcher

__all__ = ["Hit", "SearchResponse", "Searcher", "ServedBy"]
