"""Webhooks against a real receiver that is down for 30 s during a migration: the migration does
not wait for it, the deliverer is killed and restarted meanwhile, and afterwards every event
arrives, once per delivery id, in order, with a valid signature."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis

from cli.services import Workers, free_port
from producer import ControlPlane
from reembed.events import STREAM
from reembed.registry import MigrationState
from reembed.settings import Settings
from tests.conftest import M2V_MINILM, M2V_MPNET, need
from tests.integration.conftest import scifact_subset

pytestmark = pytest.mark.integration

SECRET = "webhook-secret-for-tests-5e1a"
DOWN_S = 30.0


class Receiver:
    """A receiver as a user would write one: it checks the signature before it trusts anything."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[dict[str, Any]] = []
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                expected = "sha256=" + hmac.new(SECRET.encode(), self.headers["X-Reembed-Timestamp"].encode() + b"."
                                                + body, hashlib.sha256).hexdigest()
                valid = hmac.compare_digest(expected, self.headers["X-Reembed-Signature"])
                received.append({"delivery": self.headers["X-Reembed-Delivery"], "valid": valid,
                                  "body": json.loads(body)})
                self.send_response(204 if valid else 401)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def deliverer(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings.to_env(), "REEMBED_WEBHOOK_SECRET": SECRET, "HF_HUB_OFFLINE": "1",
           "REEMBED_LOG_LEVEL": "INFO"}
    return subprocess.Popen([sys.executable, "-m", "cli.main", "webhooks"], env=env,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115


def test_a_receiver_down_for_30_s_gets_every_event_afterwards_once_in_order_and_signed(
        settings: Settings, start_workers: Callable[..., Workers], tmp_path: Path) -> None:
    start_workers(2)
    control = ControlPlane(settings)
    ingest = control.ingest("hooked", scifact_subset(tmp_path / "corpus.jsonl", 60), str(need(M2V_MINILM)))
    assert control.wait(ingest.id, timeout=300).state == MigrationState.LIVE
    port = free_port()
    control.set_webhook("hooked", f"http://127.0.0.1:{port}/reembed")
    client = redis.Redis.from_url(settings.redis_url)
    log = tmp_path / "webhooks.log"
    first = deliverer(settings, log)
    deadline = time.monotonic() + 60
    while not any(g["name"] == b"reembed-webhooks" for g in _groups(client)):  # it reads from its start on
        assert first.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    receiver = Receiver(port)  # down: nothing listens on the port yet
    started = time.monotonic()
    migration = control.migrate("hooked", str(need(M2V_MPNET)))
    assert control.wait(migration.id, timeout=300).state == MigrationState.LIVE
    assert time.monotonic() - started < DOWN_S, "the migration waited for the receiver"
    # The deliverer holds the events it read, unacknowledged; killed now, its successor must
    # find them in the group's pending list.
    deadline = time.monotonic() + 30
    while client.xpending(STREAM, "reembed-webhooks")["pending"] < 4:
        assert time.monotonic() < deadline, client.xpending(STREAM, "reembed-webhooks")
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    second = deliverer(settings, log)
    try:
        time.sleep(max(0.0, DOWN_S - (time.monotonic() - started)))
        receiver.start()
        deadline = time.monotonic() + 90
        while len({r["delivery"] for r in receiver.received}) < 4:
            assert second.poll() is None and time.monotonic() < deadline, (receiver.received, log.read_text())
            time.sleep(0.2)
        time.sleep(2)  # nothing more, nothing twice
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=30)
        receiver.stop()
    got = receiver.received
    assert all(r["valid"] for r in got)
    assert [r["delivery"] for r in got] == sorted({r["delivery"] for r in got}, key=_stream_order), got
    assert [r["body"]["event"] for r in got] == ["started", "verifying", "complete", "live"]
    assert {r["body"]["migration_id"] for r in got} == {migration.id}
    assert all(r["body"]["delivery_id"] == r["delivery"] for r in got)
    assert client.xpending(STREAM, "reembed-webhooks")["pending"] == 0
    assert SECRET not in log.read_text()


def _groups(client: redis.Redis) -> list[dict[str, Any]]:
    try:
        return list(client.xinfo_groups(STREAM))
    except redis.ResponseError:  # no stream yet
        return []


def _stream_order(entry_id: str) -> tuple[int, int]:
    millis, sequence = entry_id.split("-")
    return int(millis), int(sequence)


def test_a_waiting_control_plane_wakes_on_the_next_event_and_sleeps_when_redis_is_away(
        control: ControlPlane) -> None:
    # `wait` sleeps between looks at the record until the next migration event, so the state a
    # worker writes is seen at once. The event path is the one that returns the event's id; the
    # fallback (Redis not answering) sleeps and returns None, and never raises.
    after = control._last_event()
    assert after is not None
    published: list[str] = []

    def publish() -> None:
        time.sleep(0.1)
        published.append(str(control.redis.xadd(STREAM, {
            "event": "complete", "migration_id": "m-wake", "alias": "a", "kind": "migration", "state": "complete",
            "previous": "verifying", "at": repr(time.time()), "error": ""})))

    thread = threading.Thread(target=publish)
    thread.start()
    woke_at = control._await_event(after, 60.0)
    thread.join()
    assert woke_at == published[0]
    assert control._await_event(woke_at, 0.05) == woke_at  # nothing new: the same place
    control.redis = redis.Redis(port=free_port(), socket_connect_timeout=0.5)
    assert control._await_event(woke_at, 0.05) is None
    assert control._last_event() is None
