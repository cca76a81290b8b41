"""Exact progress under redelivery (real Redis), and the CLI's contract (--json, one-line errors)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from reembed.progress import Progress, redis_client
from reembed.settings import Settings

pytestmark = pytest.mark.integration


def test_a_batch_counts_once_and_completion_fires_once(redis_url: str) -> None:
    p = Progress(redis_client(redis_url), "m1")
    p.init(total=30, state="running")
    p.set(total_batches=3, enqueue_complete=1)
    finished = [p.record_batch("b1", 10), p.record_batch("b1", 10), p.record_batch("b2", 10)]
    finished += [p.record_batch("b3", 10), p.record_batch("b3", 10)]
    assert finished == [False, False, False, True, False]
    assert p.counts()["done"] == 30
    assert p.claim_finalize_if_done() is False


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **settings.to_env()}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_cli_json_and_one_line_errors(settings: Settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ok = _cli(settings, "models", "--json")
    assert ok.returncode == 0
    assert {m["name"] for m in json.loads(ok.stdout)["models"]} >= {"all-MiniLM-L6-v2", "all-mpnet-base-v2"}
    missing = _cli(settings, "status", "nosuchalias", "--json")
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.strip().splitlines()[-1].startswith("reembed: error: no alias or migration id 'nosuchalias'")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "text": "x"}\n{"id": "1", "text": "y"}\n')
    dup = _cli(settings, "ingest", "docs", str(bad), "--model", "all-MiniLM-L6-v2", "--json", "--workers", "0")
    assert dup.returncode == 2 and "duplicate id '1'" in dup.stderr
    unknown = _cli(settings, "migrate", "docs", "--to", "no-such-model", "--workers", "0")
    assert unknown.returncode == 2 and "unknown model 'no-such-model'" in unknown.stderr
