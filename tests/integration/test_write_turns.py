"""Turns at a Chroma server's writes, through a real Redis: one write in flight per server."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from reembed.write_turns import WriteTurns, server_key

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
    threads = [threading.Thread(target=lambda t=t: [t.wrap(write, waits.append)(i) for i in range(15)])
               for t in workers]
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
    WriteTurns(unreachable, SERVER, 1).wrap(written.append, lambda s: None)("batch")
    assert written == ["batch"]


def test_no_turns_taken_with_zero_slots(redis_url: str) -> None:
    r = client(redis_url)
    with WriteTurns(r, SERVER, 0).turn() as waited:
        assert waited == 0.0 and not r.keys(server_key(SERVER) + "*")
