"""A bulk client for OpenAI-compatible ``POST /v1/embeddings`` endpoints.

One client covers OpenAI, Azure OpenAI and self-hosted servers that speak the same protocol
(Text Embeddings Inference, vLLM, Ollama, infinity). It is built for migrations, not for one
request per batch:

- **Packed requests**: inputs are packed in order up to the endpoint's limits (OpenAI: 2,048
  inputs and 300,000 tokens per request; TEI: 32 inputs by default), and several requests are in
  flight at once (``concurrency``).
- **base64 vectors** (``encoding_format=base64``): a quarter of the bytes of JSON floats, and the
  exact float32 values the server computed.
- **Retries** on 408, 409, 429, 5xx, timeouts and dropped connections, with jittered exponential
  backoff that waits at least what ``retry-after-ms`` / ``retry-after`` asks.
- **A limiter** (see ``reembed.rate_limit``) asked before every request, told what the server's
  ``x-ratelimit-remaining-*`` headers say after it: shared by every worker of an endpoint.
- **Answers checked**: one vector per input, each of the declared dimension and finite. A
  request may carry a fixed probe text first; its vector is handed back so the caller can check
  that the model behind the endpoint is still the one the migration started with.

The API key is sent in a header and never appears in an error, a log line or a ``repr``.
"""

from __future__ import annotations

import base64
import email.utils
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import numpy as np
import structlog

from reembed.errors import ApiInputError, ApiUnavailableError, ModelError, ModelMismatchError

log = structlog.get_logger(__name__)

#: Status codes worth trying again: a timeout, a conflict, too many requests, the server's fault.
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
#: Status codes that blame one of the inputs (too long, refused): the batch is split to find it.
INPUT_STATUSES = frozenset({400, 413, 422})
#: The longest wait between two tries of our own choosing (a minute: one rate window).
MAX_BACKOFF_S = 60.0
#: The longest wait a server may ask for with ``retry-after`` before we try again anyway.
MAX_ASKED_S = 600.0


class Limiter(Protocol):
    """Asked before each request; told the server's rate-limit headers and 429s after."""

    def acquire(self, tokens: int) -> None:
        """Block until one request of ``tokens`` tokens may go."""

    def observe(self, headers: Mapping[str, str]) -> None:
        """The server's ``x-ratelimit-remaining-*`` headers of an answer."""

    def throttled(self, wait_s: float) -> None:
        """The server answered 429: nobody should send for ``wait_s`` seconds."""


class Meter(Protocol):
    """Asked before each request what it may spend, told after what it did (``reembed.budget``)."""

    def reserve(self, tokens: int) -> float:
        """Reserve a request's estimated cost; raises when it could pass the budget."""

    def settle(self, reserved: float, tokens: int) -> None:
        """The request used ``tokens`` (0: never answered)."""


class NoLimit:
    """No shared limit: requests go as fast as retries allow."""

    def acquire(self, tokens: int) -> None:
        return None

    def observe(self, headers: Mapping[str, str]) -> None:
        return None

    def throttled(self, wait_s: float) -> None:
        return None


@dataclass(frozen=True)
class Endpoint:
    """Where and how to ask. ``api_key`` is read from the environment by the caller; it is kept
    out of ``repr`` so that a logged endpoint never shows it."""

    base_url: str
    model: str
    dimension: int
    dimensions: int | None = None  # sent as the request's ``dimensions`` (Matryoshka models)
    api_key: str = field(default="", repr=False)
    api_key_header: str = "Authorization"
    query: Mapping[str, str] = field(default_factory=dict)
    max_inputs: int = 2048
    max_tokens: int = 300_000
    concurrency: int = 4
    timeout_s: float = 60.0
    max_retries: int = 8

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/embeddings"

    def headers(self) -> dict[str, str]:
        if not self.api_key:
            return {}
        value = f"Bearer {self.api_key}" if self.api_key_header.lower() == "authorization" else self.api_key
        return {self.api_key_header: value}


@dataclass
class Usage:
    """What this client sent, for ``status`` and the budget (thread-safe counters)."""

    requests: int = 0
    inputs: int = 0
    tokens: int = 0  # as the server reported them (``usage.prompt_tokens``), else as counted here
    retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, inputs: int, tokens: int) -> None:
        with self.lock:
            self.requests += 1
            self.inputs += inputs
            self.tokens += tokens


def pack(counts: Sequence[int], max_inputs: int, max_tokens: int, reserved: int = 0) -> list[range]:
    """Split inputs (their token counts, in order) into consecutive requests of at most
    ``max_inputs`` inputs and ``max_tokens`` tokens, ``reserved`` of each taken by a probe."""
    groups: list[range] = []
    start, tokens = 0, reserved
    for i, n in enumerate(counts):
        full = (i - start) + (1 if reserved else 0) >= max_inputs or tokens + n > max_tokens
        if i > start and full:
            groups.append(range(start, i))
            start, tokens = i, reserved
        tokens += n
    if start < len(counts):
        groups.append(range(start, len(counts)))
    return groups


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """What the server asked us to wait: ``retry-after-ms`` (OpenAI, Azure), else ``retry-after``
    in seconds or as an HTTP date. None when it said nothing usable."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError):
            return None
        return max(0.0, when - (time.time() if now is None else now))


def backoff_s(attempt: int, asked: float | None, base: float = 0.5, rand: Callable[[], float] = random.random) -> float:
    """Seconds before try ``attempt + 1``: full jitter over an exponential ceiling, never less
    than what the server asked (plus up to a tenth more, so that workers told the same wait do
    not all come back in the same instant)."""
    if asked is not None:
        return min(MAX_ASKED_S, asked) * (1 + 0.1 * rand())
    return min(MAX_BACKOFF_S, base * 2.0 ** attempt) * rand()


def decode_vectors(body: Any, expected: int, dimension: int, what: str) -> np.ndarray:
    """The answer's vectors in input order, float32, checked.

    Raises:
        ModelMismatchError: a vector of another dimension (another model, or ``dimensions`` ignored).
        ModelError: not an embeddings answer, missing or repeated indexes, non-finite values.
    """
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or len(data) != expected:
        got = len(data) if isinstance(data, list) else "no"
        raise ModelError(f"{what} answered {got} vectors for {expected} inputs; is it an OpenAI-compatible "
                         "embeddings endpoint?")
    out = np.empty((expected, dimension), dtype=np.float32)
    seen = set()
    for position, item in enumerate(data):
        index = item.get("index", position) if isinstance(item, dict) else None
        raw = item.get("embedding") if isinstance(item, dict) else None
        if not isinstance(index, int) or not 0 <= index < expected or index in seen or raw is None:
            raise ModelError(f"{what} answered a malformed embeddings list (item {position})")
        seen.add(index)
        vector = (np.frombuffer(base64.b64decode(raw), dtype="<f4") if isinstance(raw, str)
                  else np.asarray(raw, dtype=np.float32))
        if vector.shape != (dimension,):
            raise ModelMismatchError(
                f"{what} answered a {vector.size}-d vector where the model is declared {dimension}-d; fix the "
                "declaration's dimension (or dimensions), or the server's model")
        out[index] = vector
    if not np.all(np.isfinite(out)):
        raise ModelError(f"{what} answered NaN or infinite values")
    return out


class EmbeddingClient:
    """Embeds lists of texts through one endpoint, in packed concurrent requests."""

    def __init__(self, endpoint: Endpoint, limiter: Limiter | None = None,
                 transport: httpx.BaseTransport | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        self.endpoint = endpoint
        self.limiter: Limiter = limiter or NoLimit()
        #: Set by a worker for the batch it runs (one at a time per process): the migration's budget.
        self.meter: Meter | None = None
        self.usage = Usage()
        self._sleep = sleep
        self._http = httpx.Client(timeout=httpx.Timeout(endpoint.timeout_s, connect=min(10.0, endpoint.timeout_s)),
                                  transport=transport, headers=endpoint.headers())
        self._pool = ThreadPoolExecutor(max_workers=max(1, endpoint.concurrency), thread_name_prefix="embed-api")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    @property
    def what(self) -> str:
        """How errors name the endpoint (never with its key)."""
        return f"embedding endpoint {self.endpoint.url} (model {self.endpoint.model!r})"

    def embed(self, texts: Sequence[str], counts: Sequence[int], probe: str | None = None,
              probe_tokens: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
        """Vectors of ``texts`` in order, and the probe's vector from each request (when a
        ``probe`` text is given, it goes first in every request).

        Raises:
            ApiUnavailableError: retries ran out (the endpoint is down or keeps refusing for rate).
            ApiInputError: the endpoint refused a request's inputs (400, 413, 422).
            ModelError: wrong key, unknown model, malformed or mismatched answers.
        """
        if not texts:
            return np.empty((0, self.endpoint.dimension), dtype=np.float32), []
        groups = pack(counts, self.endpoint.max_inputs, self.endpoint.max_tokens, probe_tokens if probe else 0)
        head = [probe] if probe else []

        def one(group: range) -> np.ndarray:
            inputs = head + [texts[i] for i in group]
            return self._request(inputs, probe_tokens * bool(probe) + sum(counts[i] for i in group))

        answers = list(self._pool.map(one, groups)) if len(groups) > 1 else [one(groups[0])]
        skip = len(head)
        vectors = np.concatenate([a[skip:] for a in answers])
        return vectors, [a[0] for a in answers] if probe else []

    def _request(self, inputs: list[str], tokens: int) -> np.ndarray:
        meter = self.meter
        reserved = meter.reserve(tokens) if meter is not None else 0.0  # may raise: the request never goes
        used = 0
        try:
            vectors, used = self._send(inputs, tokens)
            return vectors
        finally:
            if meter is not None:
                meter.settle(reserved, used)

    def _send(self, inputs: list[str], tokens: int) -> tuple[np.ndarray, int]:
        """One request, tried until it is answered or the retries run out; (vectors, tokens used)."""
        body: dict[str, Any] = {"model": self.endpoint.model, "input": inputs, "encoding_format": "base64"}
        if self.endpoint.dimensions:
            body["dimensions"] = self.endpoint.dimensions
        last = ""
        for attempt in range(self.endpoint.max_retries + 1):
            if attempt:
                with self.usage.lock:
                    self.usage.retries += 1
            self.limiter.acquire(tokens)
            try:
                response = self._http.post(self.endpoint.url, json=body, params=dict(self.endpoint.query) or None)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                last = f"{type(exc).__name__}"
                wait = backoff_s(attempt, None)
                log.warning("embedding request will be retried", endpoint=self.endpoint.url, reason=last,
                            attempt=attempt + 1, wait_s=round(wait, 2))
                self._sleep(wait)
                continue
            self.limiter.observe(response.headers)
            if response.status_code == 200:
                try:
                    payload = response.json()
                except ValueError:
                    raise ModelError(f"{self.what} answered 200 with a body that is not JSON") from None
                vectors = decode_vectors(payload, len(inputs), self.endpoint.dimension, self.what)
                reported = (payload.get("usage") or {}).get("prompt_tokens")
                used = int(reported) if isinstance(reported, int) else tokens
                self.usage.add(len(inputs), used)
                return vectors, used
            status, detail = response.status_code, _detail(response)
            if status in RETRY_STATUSES:
                asked = retry_after_s(response.headers)
                if status == 429:
                    self.limiter.throttled(asked if asked is not None else backoff_s(attempt, None))
                wait = backoff_s(attempt, asked)
                last = f"HTTP {status}"
                log.warning("embedding request will be retried", endpoint=self.endpoint.url, status=status,
                            attempt=attempt + 1, wait_s=round(wait, 2), detail=detail)
                self._sleep(wait)
                continue
            if status in INPUT_STATUSES:
                raise ApiInputError(f"{self.what} refused {len(inputs)} input(s) with HTTP {status}: {detail}")
            if status in (401, 403):
                raise ModelError(f"{self.what} refused the credentials (HTTP {status}: {detail}); set the API key "
                                 "in the environment variable the model declaration names (api_key_env)")
            raise ModelError(f"{self.what} answered HTTP {status}: {detail}; check the declaration's base_url and "
                             "model")
        raise ApiUnavailableError(f"{self.what} did not answer after {self.endpoint.max_retries + 1} tries "
                                  f"(last: {last}); the batch will be tried again later")


def _detail(response: httpx.Response) -> str:
    """The server's own error message, short (never the request, which could carry the key)."""
    try:
        body = response.json()
        error = body.get("error") if isinstance(body, dict) else None
        message = (error.get("message") if isinstance(error, dict) else error) or body.get("detail") or body
    except (ValueError, AttributeError):
        message = response.text
    return str(message)[:200]
