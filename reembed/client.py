"""For applications that read Chroma directly: the collection an alias serves now.

Chroma has no aliases; reembed keeps them as durable records in the ``reembed-registry``
collection of the same Chroma tenant and database. This module reads that record with the
application's own chromadb client (no Redis, no workers, no reembed settings, no model loaded
here) and returns an ordinary Collection. reembed records each collection's model as Chroma's
``sentence_transformer`` embedding function, so ``query(query_texts=...)`` embeds the
application's queries with the live collection's own model::

    import chromadb
    from reembed.client import live_collection

    docs = live_collection(chromadb.HttpClient(host="chroma", port=8000), "docs")
    docs.query(query_texts=["how do zebrafish regrow fins?"], n_results=10)

The name changes with every migration: look it up again after a cutover (one small read, cheap
enough to do per request, or every few seconds).

LangChain's Chroma vector store (``langchain-chroma``) wants its own ``Embeddings`` object;
:func:`langchain_embeddings` wraps the live collection's embedding function as one (the README
has the recipe, and a test runs it).
"""

from __future__ import annotations

import json
from typing import Any

from reembed.errors import AliasNotFoundError
from reembed.registry import REGISTRY_COLLECTION


def live_name(client: Any, alias: str) -> str:
    """The name of the collection ``alias`` serves now.

    Raises:
        AliasNotFoundError: no such alias, or no reembed registry in the client's tenant and database.
    """
    try:
        registry = client.get_collection(REGISTRY_COLLECTION, embedding_function=None)
    except Exception as exc:  # chromadb raises NotFoundError or ValueError, by version
        raise AliasNotFoundError(f"no reembed registry ({REGISTRY_COLLECTION!r}) in this Chroma tenant and "
                                 "database: point the client at the ones reembed uses") from exc
    found = registry.get(ids=[f"alias/{alias}"], include=["documents"])
    documents = found.get("documents") or []
    if not documents or not documents[0]:
        raise AliasNotFoundError(f"alias {alias!r} is not registered with reembed in this Chroma")
    return str(json.loads(documents[0])["live_collection"])


def live_collection(client: Any, alias: str) -> Any:
    """The collection ``alias`` serves now, with its model's embedding function (see the module)."""
    return client.get_collection(live_name(client, alias))


class CollectionEmbeddings:
    """LangChain's ``Embeddings`` interface (``embed_documents``, ``embed_query``) over a Chroma
    collection's own embedding function. Duck-typed: reembed does not depend on LangChain."""

    def __init__(self, function: Any) -> None:
        self.function = function

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [[float(x) for x in vector] for vector in self.function(list(texts))]

    def embed_query(self, text: str) -> list[float]:
        return [float(x) for x in self.function.embed_query([text])[0]]


def langchain_embeddings(collection: Any) -> CollectionEmbeddings:
    """The embeddings a LangChain ``Chroma`` store needs to query ``collection`` with its own model.

    Raises:
        AliasNotFoundError: the collection records no embedding function (not one reembed wrote).
    """
    # The persisted function, as chromadb itself resolves query_texts (not the client-side default
    # that a Collection object also carries).
    function = collection.configuration.get("embedding_function")
    if function is None:
        raise AliasNotFoundError(f"collection {collection.name!r} records no embedding function; open it with "
                                 "reembed.client.live_collection")
    return CollectionEmbeddings(function)
