"""Security: JSON-only Celery (a pickled message is refused, never unpickled), credentials and
document text kept out of logs and status, the HTTP service on loopback by default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from celery import Celery

from producer import ControlPlane
from reembed.queue import QUEUE_BATCHES, TASK_BATCH, celery_config
from reembed.registry import MigrationState
from cli.services import Workers
from reembed.settings import Settings
from tests.conftest import M2V_MINILM, M2V_MPNET, need
from tests.faults.conftest import RedisServer, read_all, wait_until

pytestmark = pytest.mark.integration

PASSWORD = "hunter2-redis-pw"
SECRET_TEXT = "confidential-merger-plan-7781"


class Unpickled:
    """Unpickling this writes a file: proof that a worker deserialised it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A Redis of the test's own that requires a password (overrides the shared one)."""
    server = RedisServer(tmp_path / "redis", appendonly=False)
    server.start()
    subprocess.run(["redis-cli", "-p", str(server.port), "CONFIG", "SET", "requirepass", PASSWORD],
                   check=True, capture_output=True)
    yield f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"
    server.kill()


def test_pickled_message_is_refused_and_credentials_and_text_never_logged(
        tmp_path: Path, settings: Settings, control: ControlPlane, start_workers: Callable[..., Workers]) -> None:
    # Given a worker on a password-protected Redis, and a corpus with a confidential text
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": f"{SECRET_TEXT} paragraph {i}"}) + "\n"
                              for i in range(40)))
    start_workers(1)
    ingest = control.ingest("secure", corpus, str(need(M2V_MINILM)), batch_size=10)
    assert control.wait(ingest.id, timeout=120).state == MigrationState.LIVE
    # When a pickled task is sent to the batch queue (a sender that allows pickle)
    marker = tmp_path / "unpickled"
    attacker = Celery("attacker")
    attacker.conf.update({**celery_config(settings), "task_serializer": "pickle", "accept_content": ["pickle"]})
    attacker.send_task(TASK_BATCH, kwargs={"payload": Unpickled(marker)}, queue=QUEUE_BATCHES, serializer="pickle")
    log = tmp_path / "worker.log"
    wait_until("the worker to refuse the pickled message",
               lambda: "Refusing to deserialize untrusted content of type pickle" in log.read_text(), timeout=60)
    # Then it was never unpickled, and the worker still works: a migration completes
    time.sleep(1)
    assert not marker.exists()
    migration = control.migrate("secure", str(need(M2V_MPNET)), batch_size=10)
    assert control.wait(migration.id, timeout=120).state == MigrationState.LIVE
    assert len(read_all(control, migration.target_collection)[0]) == 40
    # ... and `reembed status` shows neither the Redis password nor any document text
    env = {**os.environ, **settings.to_env(), "HF_HUB_OFFLINE": "1"}
    status = subprocess.run([sys.executable, "-m", "cli.main", "status", "secure", "--json"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert PASSWORD not in status.stdout + status.stderr and SECRET_TEXT not in status.stdout
    # ... nor does any log line of the worker, whose batches all carried the confidential text
    text = log.read_text()
    assert "batch done" in text
    assert PASSWORD not in text
    assert SECRET_TEXT not in text


def test_http_service_binds_to_loopback_by_default() -> None:
    from cli.main import main

    serve = main.commands["serve"]  # type: ignore[attr-defined]
    assert next(p for p in serve.params if p.name == "host").default == "127.0.0.1"
