"""Search by alias, served only from the alias's live collection with that collection's own model."""

from search.semantic import Searcher, SearchResult

__all__ = ["Searcher", "SearchResult"]
