"""Vectors over JSON (Celery accepts JSON only): float32 bytes, base64, with their shape."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np


def encode_vectors(vectors: np.ndarray) -> dict[str, Any]:
    array = np.ascontiguousarray(vectors, dtype="<f4")
    return {"shape": list(array.shape), "vectors": base64.b64encode(array.tobytes()).decode("ascii")}


def decode_vectors(payload: dict[str, Any]) -> np.ndarray:
    raw = np.frombuffer(base64.b64decode(payload["vectors"]), dtype="<f4")
    return raw.reshape(payload["shape"]).astype(np.float32)
