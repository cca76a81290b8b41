"""Models behind an OpenAI-compatible embeddings API, declared by the user.

A model that reembed does not run itself (OpenAI's ``text-embedding-3-small``, or any model on a
Text Embeddings Inference, vLLM, Ollama or infinity server) is declared once in a TOML file
(``REEMBED_MODELS_FILE``, by default ``DATA_DIR/models.toml``), under a name with a provider
prefix, and is then used by that name everywhere a model is (ingest, migrate, evaluate, search)::

    [models."openai:text-embedding-3-small"]
    base_url = "https://api.openai.com/v1"
    dimension = 1536
    api_key_env = "OPENAI_API_KEY"
    price_per_million_tokens = 0.02

Every process that embeds with it (workers, the search service) reads the same file and finds
the key in the environment variable the declaration names: the key itself is never in the file,
a log line, Redis or Chroma.

There are no weights to hash, so the **fingerprint** digests what defines the vector space as
declared (provider, model, dimension, the ``dimensions`` asked for, prefixes), and the **probe**
checks what the endpoint really serves: its vector of a fixed text is recorded with the
migration, and the same text rides first in every request, so a model swapped behind the
endpoint mid-migration is caught at the next request, before any of its vectors is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from reembed.api_client import EmbeddingClient, Endpoint, Limiter, Meter
from reembed.errors import ConfigError, ModelMismatchError, ModelNotFoundError
from reembed.matryoshka import unit_rows
from reembed.models import PROBE_MIN_COSINE, PROBE_TEXT, LoadedModel, ModelSpec, probe_cosine

#: An environment variable's name; anything else in ``api_key_env`` is likely the key itself.
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: What an "estimate" tokenizer assumes: at most one token per 3 UTF-8 bytes of English is rare,
#: so counts err high (by about a quarter for English prose), and so do the plan's cost and the
#: packing's safety margin.
BYTES_PER_TOKEN = 3


@dataclass(frozen=True)
class ApiModelDeclaration:
    """One ``[models."provider:name"]`` table of the models file, validated."""

    name: str
    base_url: str
    dimension: int
    model: str = ""  # the endpoint's model id; default: the name after the provider prefix
    dimensions: int | None = None  # the request's ``dimensions`` (a Matryoshka model cut short)
    api_key_env: str = ""  # the environment variable holding the key; empty: no key sent
    api_key_header: str = "Authorization"  # Azure OpenAI: "api-key"
    query: dict[str, str] = field(default_factory=dict)  # Azure OpenAI: {"api-version" = "…"}
    price_per_million_tokens: float = 0.0
    tokenizer: str = "estimate"  # or a tokenizer.json, or a model directory that holds one
    max_input_tokens: int = 8191  # longer inputs are cut to this many tokens (and counted)
    max_inputs_per_request: int = 2048
    max_tokens_per_request: int = 300_000
    concurrency: int = 4  # requests in flight per process
    requests_per_minute: int = 0  # shared by every process, in Redis; 0: no limit of ours
    tokens_per_minute: int = 0
    timeout_s: float = 60.0
    max_retries: int = 8
    probe_every_request: bool = True
    normalized: bool = True  # unit vectors (normalised here when the endpoint's answer is not: a cut one)
    matryoshka: bool = False  # trained to be cut short (``NAME@SIZE``, and the shortcut of reembed.matryoshka)
    query_prefix: str = ""
    document_prefix: str = ""

    @property
    def provider(self) -> str:
        return self.name.split(":", 1)[0]

    def fingerprint(self) -> str:
        """What defines the vector space as declared; the probe checks what is really served."""
        descriptor = {"kind": "openai-compatible", "provider": self.provider, "model": self.model,
                      "dimension": self.dimension, "dimensions": self.dimensions,
                      "query_prefix": self.query_prefix, "document_prefix": self.document_prefix}
        return "sha256:" + hashlib.sha256(json.dumps(descriptor, sort_keys=True).encode()).hexdigest()[:32]

    def chroma_config(self) -> dict[str, Any]:
        """How Chroma's ``OpenAIEmbeddingFunction`` records this model on a collection (so that an
        application reading Chroma directly embeds its queries through the same endpoint)."""
        azure = self.api_key_header.lower() == "api-key"
        return {"api_key_env_var": self.api_key_env or "OPENAI_API_KEY", "model_name": self.model,
                "api_base": self.base_url, "dimensions": self.dimensions, "api_type": "azure" if azure else None,
                "api_version": self.query.get("api-version")}

    def endpoint(self) -> Endpoint:
        """The endpoint with the key read from the environment now.

        Raises:
            ModelNotFoundError: the declared key variable is not set in this process.
        """
        key = ""
        if self.api_key_env:
            key = os.environ.get(self.api_key_env, "")
            if not key:
                raise ModelNotFoundError(
                    f"model {self.name!r} needs its API key in the environment variable {self.api_key_env}, which "
                    "is not set in this process; set it wherever reembed embeds (workers, search service)")
        return Endpoint(base_url=self.base_url, model=self.model, dimension=self.dimension,
                        dimensions=self.dimensions, api_key=key, api_key_header=self.api_key_header,
                        query=dict(self.query), max_inputs=self.max_inputs_per_request,
                        max_tokens=self.max_tokens_per_request, concurrency=self.concurrency,
                        timeout_s=self.timeout_s, max_retries=self.max_retries)

    def at_dimensions(self, size: int, models_file: Path | str) -> ApiModelDeclaration:
        """This model cut to its first ``size`` dimensions (the name ``NAME@SIZE``): the same
        endpoint asked for ``dimensions = size``, a vector space of its own (its own fingerprint).

        Raises:
            ModelNotFoundError: the model is not declared Matryoshka, or ``size`` is not smaller.
        """
        name = f"{self.name}@{size}"
        if not self.matryoshka:
            raise ModelNotFoundError(
                f"model {name!r}: {self.name!r} is not declared with matryoshka = true in {models_file}; only a model "
                "trained to be cut short (OpenAI text-embedding-3-*, nomic-embed-text-v1.5, …) keeps its quality at "
                "fewer dimensions. Add matryoshka = true to its declaration if it is one, or declare the smaller "
                "model as its own table")
        if not 1 <= size < self.dimension:
            raise ModelNotFoundError(f"model {name!r}: the size after @ must be between 1 and {self.dimension - 1} "
                                     f"({self.name!r} is declared {self.dimension}-d)")
        return replace(self, name=name, dimension=size, dimensions=size)


#: The type each key of a declaration takes in the file.
FIELD_TYPES: dict[str, Any] = {
    f.name: {"int": int, "int | None": int, "float": (int, float), "str": str, "bool": bool,
             "dict[str, str]": dict}[str(f.type)]
    for f in fields(ApiModelDeclaration) if f.name != "name"
}
TYPE_WORDS: dict[Any, str] = {int: "an integer", (int, float): "a number", str: "a string", bool: "true or false",
                              dict: "a table of strings"}


def parse_declaration(name: str, table: Any, where: str) -> ApiModelDeclaration:
    """One table of the models file, checked key by key.

    Raises:
        ConfigError: naming the file, the model, the key and what is allowed.
    """
    what = f"{where}: model {name!r}"
    if ":" not in name or not name.split(":", 1)[0] or not name.split(":", 1)[1]:
        raise ConfigError(f"{what}: a declared model's name is provider:model, e.g. \"openai:text-embedding-3-small\"")
    if not isinstance(table, dict):
        raise ConfigError(f"{what}: expected a table of settings")
    if "api_key" in table:
        raise ConfigError(f"{what}: never put the key in the file; put it in an environment variable and name "
                          "that variable with api_key_env")
    known = FIELD_TYPES
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(f"{what}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for required in ("base_url", "dimension"):
        if required not in table:
            raise ConfigError(f"{what}: {required} is required")
    values: dict[str, Any] = {"name": name, "model": name.split(":", 1)[1]}
    for key, value in table.items():
        expect = FIELD_TYPES[key]
        if isinstance(value, bool) is not (expect is bool) or not isinstance(value, expect):
            raise ConfigError(f"{what}: {key} = {value!r} should be {TYPE_WORDS[expect]}")
        values[key] = float(value) if expect == (int, float) else value
    decl = ApiModelDeclaration(**values)
    if not decl.base_url.startswith(("http://", "https://")):
        raise ConfigError(f"{what}: base_url {decl.base_url!r} should start with http:// or https:// and end where "
                          "/embeddings is appended (e.g. https://api.openai.com/v1)")
    if decl.api_key_env and not ENV_NAME.match(decl.api_key_env):
        raise ConfigError(f"{what}: api_key_env names an environment variable (e.g. OPENAI_API_KEY); it does not "
                          "look like one, so it may be the key itself: never put the key in the file")
    for key in ("dimension", "max_input_tokens", "max_inputs_per_request", "max_tokens_per_request", "concurrency"):
        if getattr(decl, key) < 1:
            raise ConfigError(f"{what}: {key} must be at least 1")
    if decl.dimensions is not None and decl.dimensions != decl.dimension:
        raise ConfigError(f"{what}: dimensions (asked of the endpoint) is {decl.dimensions} but dimension (what it "
                          f"answers) is {decl.dimension}; set both to the size you want")
    return decl


def read_declarations(path: Path) -> dict[str, ApiModelDeclaration]:
    """Every model the file declares (none when it does not exist).

    Raises:
        ConfigError: the file is not valid TOML or a declaration is wrong.
    """
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"models file {path} is not valid TOML: {exc}") from None
    models = data.get("models", {})
    extra = sorted(set(data) - {"models"})
    if extra or not isinstance(models, dict):
        raise ConfigError(f"models file {path}: declare each model as a [models.\"provider:name\"] table "
                          f"(found {', '.join(extra) or 'models = ' + type(models).__name__})")
    return {name: parse_declaration(name, table, str(path)) for name, table in models.items()}


_cache: dict[Path, tuple[int, dict[str, ApiModelDeclaration]]] = {}


def declared_models(path: Path) -> dict[str, ApiModelDeclaration]:
    """The declarations of ``path``, read again only when the file changes."""
    mtime = path.stat().st_mtime_ns if path.exists() else -1
    cached = _cache.get(path)
    if cached is None or cached[0] != mtime:
        cached = _cache[path] = (mtime, read_declarations(path))
    return cached[1]


#: Where Chroma's ``OpenAIEmbeddingFunction`` sends requests when its config names no ``api_base``.
OPENAI_BASE_URL = "https://api.openai.com/v1"


def declared_for_openai(declared: dict[str, ApiModelDeclaration], config: dict[str, Any], collection: str,
                        models_file: Path) -> str:
    """The declared model that a collection made with Chroma's ``OpenAIEmbeddingFunction`` was
    embedded with, from its persisted configuration: same model, endpoint and ``dimensions``.

    Raises:
        ModelNotFoundError: none is declared; the message holds the declaration to add.
    """
    model, base = config.get("model_name") or "text-embedding-ada-002", config.get("api_base") or OPENAI_BASE_URL
    dimensions = config.get("dimensions")
    same = [d for d in declared.values() if d.model == model and d.base_url.rstrip("/") == base.rstrip("/")]
    for decl in same:
        if decl.dimensions == dimensions:
            return decl.name
    for decl in same:  # the full model declared Matryoshka: the collection holds it cut short
        if decl.matryoshka and isinstance(dimensions, int) and 0 < dimensions < decl.dimension:
            return f"{decl.name}@{dimensions}"
    key = config.get("api_key_env_var") or "OPENAI_API_KEY"
    extra = f"dimensions = {dimensions}\ndimension = {dimensions}" if dimensions else "dimension = <its vectors' size>"
    raise ModelNotFoundError(
        f"collection {collection!r} was made with Chroma's OpenAIEmbeddingFunction ({model} at {base}), which no "
        f"declaration in {models_file} matches; add:\n[models.\"openai:{model}\"]\nbase_url = \"{base}\"\n"
        f"model = \"{model}\"\n{extra}\napi_key_env = \"{key}\"\nthen run adopt again")


class TokenCounter(Protocol):
    def count(self, texts: list[str]) -> list[int]:
        """Tokens per text, special tokens included."""

    def truncate(self, text: str, limit: int) -> tuple[str, bool]:
        """The longest prefix of ``text`` of at most ``limit`` tokens, and whether it was cut."""


class EstimatedTokens:
    """No tokenizer at hand (OpenAI's is not installable offline): bytes / 3, rounded up."""

    def count(self, texts: list[str]) -> list[int]:
        return [max(1, math.ceil(len(t.encode("utf-8")) / BYTES_PER_TOKEN)) for t in texts]

    def truncate(self, text: str, limit: int) -> tuple[str, bool]:
        raw = text.encode("utf-8")
        if len(raw) <= limit * BYTES_PER_TOKEN:
            return text, False
        return raw[:limit * BYTES_PER_TOKEN].decode("utf-8", errors="ignore"), True


class HuggingFaceTokens:
    """The server's own tokenizer, from a ``tokenizer.json`` (exact counts and cuts)."""

    def __init__(self, file: Path) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(file))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()

    def count(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self._tokenizer.encode_batch(texts)]

    def truncate(self, text: str, limit: int) -> tuple[str, bool]:
        encoding = self._tokenizer.encode(text)
        if len(encoding.ids) <= limit:
            return text, False
        content = [i for i, special in enumerate(encoding.special_tokens_mask) if not special]
        keep = limit - (len(encoding.ids) - len(content))
        if keep <= 0:
            return "", True
        return text[:encoding.offsets[content[keep - 1]][1]], True


def token_counter(setting: str, name: str) -> TokenCounter:
    """``estimate``, a ``tokenizer.json``, or a directory holding one.

    Raises:
        ConfigError: the path holds no tokenizer.
    """
    if setting == "estimate":
        return EstimatedTokens()
    path = Path(setting).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"model {name!r}: tokenizer {setting!r} is neither \"estimate\" nor a tokenizer.json (or a "
                          "directory holding one)")
    return HuggingFaceTokens(file)


def api_spec(decl: ApiModelDeclaration) -> ModelSpec:
    """The ``ModelSpec`` of a declared model: how the rest of reembed sees it."""
    return ModelSpec(name=decl.name, dimension=decl.dimension, normalize=decl.normalized,
                     query_prefix=decl.query_prefix, document_prefix=decl.document_prefix,
                     max_seq_length=decl.max_input_tokens,
                     price_per_million_tokens=decl.price_per_million_tokens, api=decl)


class ApiModel(LoadedModel):
    """A declared model behind its endpoint, used wherever a loaded model is.

    Loading it is one request (the probe). ``embed_documents`` cuts inputs longer than
    ``max_input_tokens`` (counted in ``truncated``), packs them into requests with the probe
    text first, and refuses the whole answer when the probe's vector moved.
    """

    def __init__(self, spec: ModelSpec, decl: ApiModelDeclaration, limiter: Limiter | None = None) -> None:
        self.spec = spec
        self.declaration = decl
        self.fingerprint = decl.fingerprint()
        self.device, self.backend = "api", "openai-compatible"
        self.batch_size = min(2048, decl.max_inputs_per_request * decl.concurrency)
        self.similarity = "cosine"
        self.tokens = token_counter(decl.tokenizer, decl.name)
        self.client = EmbeddingClient(decl.endpoint(), limiter)
        self._lock = threading.Lock()
        self._queries = None  # requests run concurrently: nothing to batch behind a lock
        self.truncated = 0  # inputs cut to max_input_tokens by this process
        self._probe_tokens = self.tokens.count([PROBE_TEXT])[0]
        self.probe = self.client.embed([PROBE_TEXT], [self._probe_tokens])[0][0]
        self.dimension = int(self.probe.shape[0])

    def _encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        cut = [self.tokens.truncate(t, self.declaration.max_input_tokens) for t in texts]
        inputs = [c[0] for c in cut]
        with self._lock:
            self.truncated += sum(c[1] for c in cut)
        probe = PROBE_TEXT if self.declaration.probe_every_request else None
        vectors, probes = self.client.embed(inputs, self.tokens.count(inputs), probe, self._probe_tokens)
        for answered in probes:
            cosine = probe_cosine(answered, self.probe)
            if cosine < PROBE_MIN_COSINE:
                raise ModelMismatchError(
                    f"{self.client.what} now embeds the probe text differently (cosine {cosine:.3f} to its first "
                    "answer in this process): the model behind it changed, and nothing of this request was written. "
                    f"Point the declaration of {self.spec.name!r} back at the model the migration started with, or "
                    "start a new migration")
        # A server asked for fewer ``dimensions`` may answer the cut without re-normalising it
        # (infinity does); what is stored must not depend on which server it was.
        return unit_rows(vectors) if self.spec.normalize else vectors

    @contextlib.contextmanager
    def metered(self, meter: Meter) -> Iterator[None]:
        self.client.meter = meter
        try:
            yield
        finally:
            self.client.meter = None

    def count_tokens(self, texts: list[str]) -> list[int]:
        return self.tokens.count(texts)

    @property
    def max_tokens(self) -> int | None:
        return self.declaration.max_input_tokens
