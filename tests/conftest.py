"""Shared fixtures: real Redis (a dedicated, flushed database), a real `chroma run`, real models.

A missing Redis skips the integration tests locally and fails them in CI (dramatiq's rule).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("REEMBED_TEST_SHARED", ROOT.parent / "shared"))
SCIFACT = SHARED / "datasets" / "scifact"
M2V_MINILM = SHARED / "models" / "m2v-minilm-256"
M2V_MPNET = SHARED / "models" / "m2v-mpnet-256"
#: Which of pytest-xdist's processes this is (0 without xdist): each gets its own Redis databases.
XDIST_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)


def redis_db(base: int) -> int:
    """Database ``base`` for the first test process, ``base - 2n`` for the n-th: 13 and 12 (the
    lifecycle-defects module's) for gw0, 11 and 10 for gw1, and so on."""
    return base - 2 * XDIST_WORKER


#: Redis database used by the tests; flushed before and after each test that uses it.
TEST_REDIS_URL = os.environ.get("REEMBED_TEST_REDIS_URL", f"redis://127.0.0.1:6379/{redis_db(13)}")


def need(path: Path) -> Path:
    if not path.exists():
        if os.environ.get("CI"):
            raise FileNotFoundError(f"{path} is missing; CI needs shared/ beside the checkout")
        pytest.skip(f"{path} not present")
    return path


def readme_snippet(name: str) -> str:
    """The first code block after ``<!-- snippet: NAME`` in the README: what a user copies."""
    readme = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- snippet: {re.escape(name)}\b.*?-->\s*```\w*\n(.*?)```", readme, re.S)
    assert found, f"README has no snippet {name!r}"
    return found.group(1)
