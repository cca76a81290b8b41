"""Readiness keys: what each search process publishes, and how a switch waits on them."""

from __future__ import annotations

import time

import fakeredis

from reembed import readiness


def test_a_switch_waits_for_every_live_process_and_no_longer() -> None:
    client = fakeredis.FakeRedis()
    assert readiness.wait_until_ready(client, "docs--b", timeout_s=5) == []  # no search process: nothing to wait for
    readiness.publish(client, "a", {"docs--a", "docs--b"})
    readiness.publish(client, "b", {"docs--a"})
    assert readiness.processes(client) == {"a": {"docs--a", "docs--b"}, "b": {"docs--a"}}
    assert readiness.not_ready(client, "docs--b") == ["b"]
    started = time.monotonic()
    assert readiness.wait_until_ready(client, "docs--b", timeout_s=0.5) == ["b"]
    assert time.monotonic() - started >= 0.5
    readiness.publish(client, "b", {"docs--a", "docs--b"})
    assert readiness.wait_until_ready(client, "docs--b", timeout_s=5) == []
    readiness.withdraw(client, "a")
    assert set(readiness.processes(client)) == {"b"}


def test_a_process_that_stops_publishing_drops_out_by_itself() -> None:
    client = fakeredis.FakeRedis()
    readiness.publish(client, "gone", set(), ttl_s=1)
    assert readiness.not_ready(client, "docs--b") == ["gone"]
    time.sleep(1.2)
    assert readiness.not_ready(client, "docs--b") == []
    assert readiness.process_id() != readiness.process_id()  # two apps in one process are two names
