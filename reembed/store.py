"""The Chroma adapter: the one module that talks to ``chromadb``.

Every Chroma or HTTP exception is mapped to reembed's own tree here, the httpx way, so that
workers can tell "retry me" (server unreachable) from "never retry" (bad input).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlparse

import numpy as np

from reembed.errors import (
    CollectionExistsError,
    CollectionNotFoundError,
    ConfigError,
    InputError,
    StoreAuthError,
    StoreError,
    StoreUnavailableError,
)

if TYPE_CHECKING:
    from reembed.filters import Filter
    from reembed.settings import Settings

_T = TypeVar("_T")

#: Page size when reading a collection: Chroma answers 1,000-document pages in a few ms.
PAGE_SIZE = 1000
#: Ids read per request of the ids-only pass of a scan (:meth:`Store.pages`). Chroma's cost of a
#: ``get(offset=…)`` grows with the offset, whatever the page size: few large id pages make that
#: cost small per document, and the documents themselves are then read by id (flat cost).
ID_CHUNK = 20_000
#: A document holds text when it has a character ``str.strip`` keeps: not Unicode white space
#: (``\s``), nor the separators U+001C to U+001F that Python's ``str.isspace`` also counts.
HAS_TEXT = r"[^\s\x1c-\x1f]"
#: Ids per ``get(ids=…)`` request: Chroma binds each id as an SQL variable (and refuses too many).
GET_IDS = 4096


@dataclass
class Page:
    """One page of a collection; ``embeddings`` only when asked for."""

    ids: list[str]
    documents: list[str | None]
    metadatas: list[dict[str, Any] | None]
    embeddings: np.ndarray | None = None
    distances: np.ndarray | None = None


@contextlib.contextmanager
def mapped_errors(what: str) -> Iterator[None]:
    """Turn chromadb/httpx exceptions into reembed errors that name ``what`` and the fix."""
    import chromadb.errors as cerr
    import httpx

    try:
        yield
    except (httpx.TransportError, ConnectionError, TimeoutError) as exc:
        raise StoreUnavailableError(f"Chroma is unreachable during {what}: {exc}; is the server running?") from exc
    except cerr.NotFoundError as exc:
        raise CollectionNotFoundError(f"{what}: {exc}") from exc
    except cerr.UniqueConstraintError as exc:
        raise CollectionExistsError(f"{what}: {exc}") from exc
    except (cerr.InvalidArgumentError, cerr.DuplicateIDError, ValueError, TypeError) as exc:
        if "Could not connect" in str(exc):
            raise StoreUnavailableError(f"Chroma is unreachable during {what}: {exc}") from exc
        status = refused_credentials(str(exc))
        if status:
            raise StoreAuthError(f"Chroma (or its proxy) refused the credentials during {what} (HTTP {status}); "
                                 "check REEMBED_CHROMA_HEADERS") from exc
        raise InputError(f"Chroma rejected {what}: {exc}") from exc
    except cerr.ChromaError as exc:
        raise StoreError(f"Chroma failed during {what}: {exc}") from exc
    except Exception as exc:  # chromadb passes a proxy's error page on as a bare Exception
        page = _SERVER_ERROR.search(str(exc))
        if page:
            raise StoreUnavailableError(f"Chroma (or its proxy) answered HTTP {page.group(1)} during {what}; "
                                        "retrying") from exc
        raise


#: A proxy's or Chroma's own refusal of the credentials, as chromadb passes it on (the body of the answer).
_REFUSED = re.compile(r"\b(401|403)\b.{0,80}(Unauthori[sz]ed|Authori[sz]ation Required|Forbidden)"
                      r"|(Unauthori[sz]ed|Forbidden).{0,80}\b(401|403)\b", re.IGNORECASE | re.DOTALL)


#: A server error page (a proxy's 502 while Chroma restarts, a 500): worth retrying.
_SERVER_ERROR = re.compile(r"\b(5\d\d)\b\s*(Internal Server Error|Bad Gateway|Service (Temporarily )?Unavailable"
                           r"|Gateway Time-?out)", re.IGNORECASE)


def refused_credentials(text: str) -> int | None:
    """The HTTP status (401 or 403) when ``text`` is a refusal of the credentials, else None."""
    found = _REFUSED.search(text)
    if not found:
        return None
    return int(next(g for g in found.groups() if g in ("401", "403")))


#: The HNSW settings a collection can be created with (Chroma 1.x ``CreateHNSWConfiguration``).
HNSW_KEYS = ("space", "ef_construction", "ef_search", "max_neighbors", "num_threads", "batch_size",
             "sync_threshold", "resize_factor")


def lazy_sentence_transformer() -> type:
    """Chroma's ``SentenceTransformerEmbeddingFunction``, loading its model on first use.

    chromadb rebuilds a collection's recorded embedding function whenever it reads the
    collection (every ``get_collection``): with Chroma's own class that loads the model (seconds,
    hundreds of MB, or a hub download) in processes that embed with their own copy anyway.
    Registered under Chroma's name when a ``Store`` is made, so reading is cheap; it records
    itself exactly as Chroma's class does, and embeds the same when called.
    """
    from chromadb.utils.embedding_functions import known_embedding_functions
    from chromadb.utils.embedding_functions.sentence_transformer_embedding_function import (
        SentenceTransformerEmbeddingFunction,
    )

    current = known_embedding_functions.get("sentence_transformer")
    if current is not None and getattr(current, "lazy", False):
        return current

    class LazySentenceTransformer(SentenceTransformerEmbeddingFunction):
        lazy = True

        def __init__(self, model_name: str = "all-MiniLM-L6-v2", device: str = "cpu",
                     normalize_embeddings: bool = False, **kwargs: Any) -> None:
            self.model_name, self.device, self.normalize_embeddings, self.kwargs = (
                model_name, device, normalize_embeddings, kwargs)

        @property
        def _model(self) -> Any:  # what Chroma's __call__ uses
            if self.model_name not in self.models:
                from sentence_transformers import SentenceTransformer

                self.models[self.model_name] = SentenceTransformer(self.model_name, device=self.device, **self.kwargs)
            return self.models[self.model_name]

        @staticmethod
        def build_from_config(config: dict[str, Any]) -> LazySentenceTransformer:
            return LazySentenceTransformer(config["model_name"], config.get("device") or "cpu",
                                           bool(config.get("normalize_embeddings")), **(config.get("kwargs") or {}))

    known_embedding_functions["sentence_transformer"] = LazySentenceTransformer
    return LazySentenceTransformer


def lazy_openai() -> type:
    """Chroma's ``OpenAIEmbeddingFunction``, recorded on the collections of a model behind an
    API so that a plain Chroma client embeds its queries through the same endpoint.

    Chroma's own class needs the ``openai`` package and the key at construction, and chromadb
    builds it on every ``get_collection``: reading a collection would then fail wherever either
    is missing (every reembed process). This one records itself exactly as Chroma's does and
    builds Chroma's class only when it is called to embed.
    """
    from chromadb.utils.embedding_functions import known_embedding_functions
    from chromadb.utils.embedding_functions.openai_embedding_function import OpenAIEmbeddingFunction

    current = known_embedding_functions.get("openai")
    if current is not None and getattr(current, "lazy", False):
        return current

    class LazyOpenAI(OpenAIEmbeddingFunction):
        lazy = True
        KEYS = ("api_key_env_var", "model_name", "organization_id", "api_base", "api_type", "api_version",
                "deployment_id", "default_headers", "dimensions")

        def __init__(self, **config: Any) -> None:
            for key in self.KEYS:
                setattr(self, key, config.get(key))
            self._real: OpenAIEmbeddingFunction | None = None

        def __call__(self, input: Any) -> Any:  # noqa: A002 - Chroma's signature
            if self._real is None:
                self._real = OpenAIEmbeddingFunction(**{k: getattr(self, k) for k in self.KEYS
                                                        if getattr(self, k) is not None})
            return self._real(input)

        @staticmethod
        def build_from_config(config: dict[str, Any]) -> LazyOpenAI:
            return LazyOpenAI(**config)

    known_embedding_functions["openai"] = LazyOpenAI
    return LazyOpenAI


class Store:
    """A Chroma server, addressed by URL, with the few operations reembed needs.

    ``headers`` (a token for a proxy or Chroma Cloud), ``tenant``, ``database`` and
    ``ssl_verify`` (True, False or a CA bundle's path) come from the settings
    (:meth:`from_settings`). Connecting checks them once and says which is wrong.
    """

    def __init__(self, url: str, headers: dict[str, str] | None = None, tenant: str = "default_tenant",
                 database: str = "default_database", ssl_verify: bool | str = True) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(f"REEMBED_CHROMA_URL={url!r} is not an http(s) URL such as http://127.0.0.1:8000")
        import chromadb
        import chromadb.errors as cerr
        from chromadb.config import Settings as ChromaSettings

        self.url = url
        self._handles: dict[str, Any] = {}
        lazy_sentence_transformer()
        lazy_openai()
        self._check_credentials(headers or {}, ssl_verify)
        try:
            with mapped_errors(f"connecting to {url}"):
                self.client = chromadb.HttpClient(
                    host=parsed.hostname,
                    port=parsed.port or (443 if parsed.scheme == "https" else 80),
                    ssl=parsed.scheme == "https", headers=headers or None, tenant=tenant, database=database,
                    # chromadb shares one client per server and refuses a second with other settings:
                    # the defaults stay the defaults, so plain clients in the same process still work.
                    settings=None if ssl_verify is True else ChromaSettings(chroma_server_ssl_verify=ssl_verify),
                )
        except CollectionNotFoundError as exc:  # chromadb's NotFoundError: the tenant or the database
            cause = exc.__cause__
            which = "tenant" if isinstance(cause, cerr.NotFoundError) and "Tenant" in str(cause) else "database"
            name = tenant if which == "tenant" else database
            raise ConfigError(f"Chroma at {url} has no {which} {name!r}: create it, or fix "
                              f"REEMBED_CHROMA_{which.upper()}") from exc

    @classmethod
    def from_settings(cls, settings: Settings, url: str | None = None) -> Store:
        """The store every process uses: the settings' Chroma URL (or ``url``) and credentials."""
        verify: bool | str = {"true": True, "false": False}.get(settings.chroma_ssl_verify, settings.chroma_ssl_verify)
        return cls(url or settings.chroma_url, dict(settings.chroma_headers), settings.chroma_tenant,
                   settings.chroma_database, verify)

    def _check_credentials(self, headers: dict[str, str], ssl_verify: bool | str) -> None:
        """One request before chromadb's client: it reports a refused token as an HTML page and an
        untrusted certificate as "could not connect"; this says which, in one line."""
        import httpx

        try:
            answer = httpx.get(f"{self.url}/api/v2/heartbeat", headers=headers, verify=ssl_verify, timeout=10)
        except httpx.ConnectError as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc) or "certificate verify failed" in str(exc):
                raise ConfigError(f"the TLS certificate of Chroma at {self.url} is not trusted; set "
                                  "REEMBED_CHROMA_SSL_VERIFY to the CA bundle (PEM) that signed it") from exc
            raise StoreUnavailableError(f"Chroma is unreachable at {self.url}: {exc}; is the server running?") from exc
        except httpx.TransportError as exc:
            raise StoreUnavailableError(f"Chroma is unreachable at {self.url}: {exc}; is the server running?") from exc
        if answer.status_code in (401, 403):
            raise StoreAuthError(f"Chroma at {self.url} (or its proxy) refused the credentials (HTTP "
                                 f"{answer.status_code}); set REEMBED_CHROMA_HEADERS to the token it expects")

    @classmethod
    def from_client(cls, client: Any, url: str = "in-process") -> Store:
        """A store over an already built chromadb client (tests use Chroma in process)."""
        store = cls.__new__(cls)
        store.url, store.client, store._handles = url, client, {}
        lazy_sentence_transformer()
        lazy_openai()
        return store

    def collection(self, name: str) -> Any:
        """An existing collection. Never builds its persisted embedding function: we embed ourselves."""
        with mapped_errors(f"opening collection {name!r}"):
            try:
                return self.client.get_collection(name, embedding_function=None)
            except ValueError as exc:  # chromadb raises ValueError for a missing collection too
                if "does not exist" in str(exc):
                    raise CollectionNotFoundError(f"collection {name!r} does not exist in Chroma at {self.url}") from exc
                raise

    def _handle(self, name: str) -> Any:
        """The collection for a read or write on the hot path, kept between calls: opening it is a
        request of its own (a third of a small write's time). A handle whose collection was
        deleted fails with not-found, and :meth:`_on` then opens the name again once."""
        cached = self._handles.get(name)
        if cached is None:
            cached = self._handles[name] = self.collection(name)
        return cached

    def _on(self, name: str, what: str, call: Callable[[Any], _T]) -> _T:
        """``call(collection)`` with mapped errors; once more on a freshly opened handle when the
        kept one names a collection that is gone (deleted, maybe made again under its name)."""
        for attempt in (0, 1):
            handle = self._handle(name)
            try:
                with mapped_errors(what):
                    return call(handle)
            except CollectionNotFoundError:
                self._handles.pop(name, None)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def exists(self, name: str) -> bool:
        try:
            self.collection(name)
        except CollectionNotFoundError:
            return False
        return True

    def create(self, name: str, metadata: dict[str, Any], hnsw: dict[str, Any] | None = None,
               model_name: str | None = None, normalize: bool = True,
               openai_config: dict[str, Any] | None = None) -> Any:
        """Create a collection for vectors we provide: ``hnsw`` settings (default: cosine space),
        and, when ``model_name`` is given, that sentence-transformers model recorded as its
        embedding function the way Chroma's own ``SentenceTransformerEmbeddingFunction`` records
        it, so that a plain Chroma client embeds queries with the right model; ``openai_config``
        records Chroma's ``OpenAIEmbeddingFunction`` instead (a model behind an API)."""
        if self.exists(name):
            raise CollectionExistsError(f"collection {name!r} already exists; pick another name or delete it first")
        configuration: dict[str, Any] = {"hnsw": {k: v for k, v in (hnsw or {"space": "cosine"}).items()
                                                  if k in HNSW_KEYS and v is not None}}
        if openai_config:
            configuration["embedding_function"] = lazy_openai()(**openai_config)
        elif model_name:
            configuration["embedding_function"] = lazy_sentence_transformer()(model_name, "cpu", normalize)
        with mapped_errors(f"creating collection {name!r}"):
            return self.client.create_collection(name, metadata=metadata, embedding_function=None,
                                                 configuration=configuration)  # type: ignore[arg-type]

    def delete(self, name: str) -> None:
        self._handles.pop(name, None)
        with mapped_errors(f"deleting collection {name!r}"):
            self.client.delete_collection(name)

    def metadata(self, name: str) -> dict[str, Any]:
        """The collection's own metadata (not its documents')."""
        return dict(self.collection(name).metadata or {})

    def configuration(self, name: str) -> dict[str, Any]:
        """The collection's persisted configuration (embedding function name and config, space)."""
        col = self.collection(name)
        return dict(col.configuration_json or {})

    def space(self, name: str) -> str:
        """The collection's distance space: ``cosine``, ``l2`` (Chroma's default) or ``ip``."""
        hnsw = self.configuration(name).get("hnsw") or {}
        return str(hnsw.get("space") or "l2")

    def count(self, name: str) -> int:
        return int(self._on(name, f"counting {name!r}", lambda col: col.count()))

    def documents_held(self) -> int:
        """Documents in every collection this client sees. A single-node Chroma server keeps them
        all in one SQLite database, and its size, not one collection's, slows each write
        (``producer.plan.chroma_growth``)."""
        with mapped_errors("listing collections"):
            return sum(int(col.count()) for col in self.client.list_collections())

    def get(self, name: str, ids: Sequence[str], embeddings: bool = False, documents: bool = True) -> Page:
        """The documents of ``ids`` that exist, in Chroma's storage order. The cost follows the
        number of ids, not the size of the collection."""
        include = (["documents"] if documents else []) + ["metadatas"] + (["embeddings"] if embeddings else [])
        parts = [_page(self._on(name, f"reading {len(ids)} documents of {name!r}",
                                lambda col: col.get(ids=list(ids[i:i + GET_IDS]), include=include)), embeddings)
                 for i in range(0, len(ids), GET_IDS)]
        if len(parts) <= 1:  # no ids: nothing asked, nothing read (Chroma would answer every document)
            return parts[0] if parts else Page([], [], [], np.zeros((0, 0), np.float32) if embeddings else None)
        return Page(ids=[i for p in parts for i in p.ids], documents=[d for p in parts for d in p.documents],
                    metadatas=[m for p in parts for m in p.metadatas],
                    embeddings=np.concatenate([p.embeddings for p in parts if p.embeddings is not None])
                    if embeddings else None)

    def page(self, name: str, offset: int, limit: int, embeddings: bool = False,
             documents: bool = True) -> Page:
        """One page in Chroma's storage order (stable while nothing is deleted). Its cost grows with
        ``offset``: to read a whole collection, :meth:`pages`."""
        include = (["documents"] if documents else []) + ["metadatas"] + (["embeddings"] if embeddings else [])
        raw = self._on(name, f"paging {name!r} at {offset}",
                       lambda col: col.get(offset=offset, limit=limit, include=include))
        return _page(raw, embeddings)

    def ids(self, name: str, offset: int, limit: int) -> list[str]:
        """Ids only, in storage order from ``offset``: the cheap half of a scan."""
        raw = self._on(name, f"listing ids of {name!r} at {offset}",
                       lambda col: col.get(offset=offset, limit=limit, include=[]))
        return list(raw["ids"])

    def all_ids(self, name: str) -> list[str]:
        """Every id of ``name`` in storage order, listed ``ID_CHUNK`` at a time."""
        found: list[str] = []
        while True:
            chunk = self.ids(name, len(found), ID_CHUNK)
            found += chunk
            if len(chunk) < ID_CHUNK:
                return found

    def without_text(self, name: str) -> tuple[int, list[str]]:
        """How many documents ``name`` holds, and the ids of those without text (none, or only
        white space): what no model can embed.

        Chroma picks out the documents with text itself, with a regex over what it stores (0.06 s
        for 20,000 documents, where reading them takes 1 s, and the gap grows with the
        collection); only the rest are read and checked here. A server that refuses the regex
        gets every document read instead.
        """
        ids = self.all_ids(name)
        try:
            with_text = set(self._on(name, f"finding the documents of {name!r} that have text",
                                     lambda col: col.get(where_document={"$regex": HAS_TEXT}, include=[]))["ids"])
        except InputError:
            with_text = set()
        unsure = [i for i in ids if i not in with_text]
        page = self.get(name, unsure)
        return len(ids), [i for i, t in zip(page.ids, page.documents, strict=True) if t is None or not t.strip()]

    def pages(self, name: str, page_size: int = PAGE_SIZE, documents: bool = True) -> Iterator[Page]:
        """The whole collection, page by page, at a cost per page that does not grow with the
        position: ids are listed ``ID_CHUNK`` at a time, then each page is read by id."""
        offset = 0
        while True:
            chunk = self.ids(name, offset, ID_CHUNK)
            for start in range(0, len(chunk), page_size):
                page = self.get(name, chunk[start:start + page_size], documents=documents)
                if page.ids:  # all of a page may have been deleted since it was listed
                    yield page
            if len(chunk) < ID_CHUNK:
                return
            offset += len(chunk)

    def upsert(self, name: str, ids: list[str], embeddings: np.ndarray, documents: list[str],
               metadatas: list[dict[str, Any]]) -> None:
        """Add or **replace** documents: the same batch written twice leaves one copy of each.

        Chroma's own upsert *merges* metadata into a stored record (a key the new version drops
        stays), so the stored metadata would disagree with the document and its content hash.
        Keys the stored version has and the new one lacks are therefore written as ``None``,
        which Chroma treats as "remove this key".
        """
        def replace(col: Any) -> None:
            stored = col.get(ids=list(ids), include=["metadatas"])
            old = {i: (m or {}) for i, m in zip(stored["ids"], stored.get("metadatas") or [], strict=False)}
            replaced = [{**dict.fromkeys(set(old.get(i, {})) - set(meta)), **meta}
                        for i, meta in zip(ids, metadatas, strict=True)]
            col.upsert(ids=ids, embeddings=embeddings, documents=documents, metadatas=replaced)

        self._on(name, f"upserting {len(ids)} documents into {name!r}", replace)

    def add(self, name: str, ids: list[str], embeddings: np.ndarray, documents: list[str],
            metadatas: list[dict[str, Any]]) -> None:
        """First write of new documents: several times faster than ``upsert``. Chroma keeps (and
        silently skips) ids that already exist, so a repeated add never duplicates; it never
        updates either, which is why redeliveries and catch-up use :meth:`upsert`."""
        self._on(name, f"adding {len(ids)} documents to {name!r}",
                 lambda col: col.add(ids=ids, embeddings=embeddings, documents=documents, metadatas=metadatas))

    def delete_ids(self, name: str, ids: list[str]) -> None:
        self._on(name, f"deleting {len(ids)} documents from {name!r}", lambda col: col.delete(ids=ids))

    def query(self, name: str, vector: np.ndarray, k: int, where: Filter | None = None) -> Page:
        """The ``k`` nearest documents (among those passing ``where``: Chroma filters them itself,
        at a cost that grows with the number of documents passing, see search.searcher)."""
        narrowed = where.chroma_arguments() if where is not None else {}
        raw = self._on(name, f"querying {name!r}", lambda col: col.query(
            query_embeddings=[vector], n_results=k, include=["documents", "metadatas", "distances"], **narrowed))
        return Page(ids=raw["ids"][0], documents=raw["documents"][0], metadatas=raw["metadatas"][0],
                    distances=np.asarray(raw["distances"][0]))


def _page(raw: Any, embeddings: bool) -> Page:
    return Page(
        ids=list(raw["ids"]),
        documents=list(raw.get("documents") or [None] * len(raw["ids"])),
        metadatas=[dict(m) if m else None for m in (raw.get("metadatas") or [None] * len(raw["ids"]))],
        embeddings=np.asarray(raw["embeddings"], dtype=np.float32) if embeddings else None,
    )
