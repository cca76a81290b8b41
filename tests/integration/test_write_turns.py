"""Turns at a Chroma server's writes, through a real Redis: one write in flight per server."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from cli.services import ChromaServer, Workers, free_port
from producer import ControlPlane
from reembed.progress import Progress
from reembed.registry import MigrationState
from reembed.settings import Settings
from reembed.write_turns import WriteTurns, server_key
from tests.conftest import M2V_MINILM, M2V_MPNET, need
from tests.integration.conftest import scifact_subset

SERVER = "http://chroma.internal:8000"


def client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True)


@pytest.mark.parametrize("slots", [1, 2])
def test_no_more_writes_at_once_than_the_server_has_turns(redis_url: str, slots: int) -> None:
    inside, most, guard = [0], [0], threading.Lock()
    done: list[int] = []

    def write(n: int) -> None:  # stands for a Chroma write: counts the writes in flight
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.01)
        with guard:
            inside[0] -= 1
            done.append(n)

    waits: list[float] = []
    workers = [WriteTurns(client(redis_url), SERVER, slots) for _ in range(4)]  # one per worker process
    def writes(turns: WriteTurns) -> None:
        for i in range(15):
            with turns.turn() as waited:
                waits.append(waited)
                write(i)

    threads = [threading.Thread(target=writes, args=(t,)) for t in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(done) == sorted(list(range(15)) * 4)  # every write ran, once
    assert most[0] == slots  # never more at once, and the turns were used
    assert max(waits) > 0 and len(waits) == 60
    assert not client(redis_url).keys(server_key(SERVER) + "*")  # every turn given back


def test_another_server_is_not_held_up_and_a_dead_holders_turn_lapses(redis_url: str) -> None:
    r = client(redis_url)
    r.set(f"{server_key(SERVER)}:0", "a worker that died mid-write", px=400)
    with WriteTurns(r, "http://other:8000", 1).turn() as waited:
        assert waited < 0.2  # another server's turns are its own
    with WriteTurns(r, SERVER, 1).turn() as waited:
        assert waited >= 0.25  # waited for the dead holder's turn to lapse
        held = r.get(f"{server_key(SERVER)}:0")
        assert held and held != "a worker that died mid-write"
    assert r.get(f"{server_key(SERVER)}:0") is None
    assert "chroma.internal" not in " ".join(r.keys("*"))  # no URL stored, only its digest


def test_a_write_goes_ahead_without_a_turn_when_redis_cannot_be_asked() -> None:
    unreachable = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    written: list[str] = []
    with WriteTurns(unreachable, SERVER, 1).turn():
        written.append("batch")
    assert written == ["batch"]


def test_no_turns_taken_with_zero_slots(redis_url: str) -> None:
    r = client(redis_url)
    with WriteTurns(r, SERVER, 0).turn() as waited:
        assert waited == 0.0 and not r.keys(server_key(SERVER) + "*")


class WriteCounter:
    """A reverse proxy in front of a real Chroma server: passes every request through and counts
    the writes (``add`` / ``upsert``) in flight at once."""

    def __init__(self, upstream: str) -> None:
        self.upstream, self.http = upstream.rstrip("/"), httpx.Client(timeout=300)
        self.inside = self.most = self.writes = 0
        self.lock = threading.Lock()
        counter = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as Chroma's client expects

            def log_message(self, *args: Any) -> None:
                return None

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                write = self.command == "POST" and self.path.rstrip("/").endswith(("/add", "/upsert"))
                if write:
                    with counter.lock:
                        counter.inside += 1
                        counter.writes += 1
                        counter.most = max(counter.most, counter.inside)
                try:
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in ("host", "content-length", "connection", "accept-encoding")}
                    answer = counter.http.request(self.command, counter.upstream + self.path, content=body,
                                                  headers=headers)
                finally:
                    if write:
                        with counter.lock:
                            counter.inside -= 1
                self.send_response(answer.status_code)
                for k, v in answer.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(k, v)
                self.send_header("content-length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward  # noqa: N815 - http.server's names

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.http.close()


@pytest.mark.integration
def test_two_workers_write_to_a_real_chroma_one_at_a_time(tmp_path: Path, chroma: ChromaServer,
                                                          settings: Settings) -> None:
    counter = WriteCounter(chroma.url)
    through = settings.with_(chroma_url=counter.url)
    control = ControlPlane(through)
    corpus = scifact_subset(tmp_path / "corpus.jsonl", 3000)
    try:
        for writers, at_most in ((1, 1), (0, 2)):  # the default, then no turns: the counter sees both at once
            workers = Workers(through.with_(chroma_writers=writers), 2, name=f"turns{writers}-{time.monotonic_ns()}@%h",
                              queues="reembed.batches,reembed.control").start(tmp_path / f"worker-{writers}.log")
            try:
                counter.most = counter.writes = 0
                if writers:
                    ingest = control.ingest("sci", corpus, str(need(M2V_MPNET)), batch_size=250)
                    assert control.wait(ingest.id, timeout=600).state == MigrationState.LIVE
                migration = control.migrate("sci", str(need(M2V_MINILM if writers else M2V_MPNET)), batch_size=250)
                final = control.wait(migration.id, timeout=600)
                assert final.state == MigrationState.LIVE, final.error
                assert (final.done, final.failed) == (3000, 0)
                assert counter.writes >= 12 and counter.most == at_most, (writers, counter.writes, counter.most)
                if writers:
                    waited = Progress(control.redis, migration.id).timings().get("write_turn", 0.0)
                    assert waited > 0  # the second worker did wait for its turn
            finally:
                workers.stop(timeout=20)
    finally:
        counter.close()
