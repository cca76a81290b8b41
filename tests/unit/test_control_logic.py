"""The control API's pure parts: key scopes, event names, and Idempotency-Key against a real
Redis (its claim, its wait, its refusal of a reused key)."""

from __future__ import annotations

import os
import threading
import time

import pytest
import redis

from reembed.errors import InputError
from reembed.events import name_of
from reembed.registry import MigrationRecord, MigrationState
from reembed.settings import Settings
from reembed.access import Forbidden, Keys, Unauthorised
from producer.idempotency import Idempotency, request_fingerprint

S = MigrationState


def test_keys_have_scopes_and_the_control_api_is_off_without_an_admin_key() -> None:
    keys = Keys(Settings.from_env({"REEMBED_API_KEY": "r", "REEMBED_ADMIN_KEY": "a"}))
    assert (keys.scope_of("a"), keys.scope_of("r"), keys.scope_of("x"), keys.scope_of("")) == \
        ("admin", "read", None, None)
    off = Keys(Settings.from_env({}))
    assert off.scope_of("") is None  # an empty key never matches an unset one
    with pytest.raises(Forbidden, match="REEMBED_ADMIN_KEY"):
        off.admin(None)
    off.read(None)  # search stays open without a read key


def test_an_admin_key_equal_to_the_read_key_is_refused() -> None:
    from reembed.errors import ConfigError

    with pytest.raises(ConfigError, match="key of its own"):
        Settings.from_env({"REEMBED_API_KEY": "same", "REEMBED_ADMIN_KEY": "same"})


def test_wrong_keys_are_refused_with_the_right_error() -> None:
    from fastapi.security import HTTPAuthorizationCredentials

    keys = Keys(Settings.from_env({"REEMBED_API_KEY": "r", "REEMBED_ADMIN_KEY": "a"}))

    def bearer(value: str) -> HTTPAuthorizationCredentials:
        return HTTPAuthorizationCredentials(scheme="Bearer", credentials=value)

    with pytest.raises(Forbidden, match="may read"):
        keys.admin(bearer("r"))
    with pytest.raises(Unauthorised):
        keys.admin(bearer("x"))
    with pytest.raises(Unauthorised):
        keys.read(None)
    keys.read(bearer("a"))  # the admin key reads too


def record(state: MigrationState) -> MigrationRecord:
    return MigrationRecord(alias="a", source_collection="s", target_collection="t", from_model="m",
                           to_model="n", to_fingerprint="f", batch_size=10, state=state)


def test_event_names() -> None:
    assert name_of(None, record(S.RUNNING)) == "started"
    assert name_of(S.PAUSED, record(S.RUNNING)) == "resumed"
    assert name_of(S.RUNNING, record(S.PAUSED), budget=True) == "budget_reached"
    assert name_of(S.RUNNING, record(S.PAUSED)) == "paused"
    assert [name_of(S.RUNNING, record(s)) for s in (S.VERIFYING, S.COMPLETE, S.LIVE, S.ROLLED_BACK, S.FAILED,
                                                    S.CANCELLED)] == \
        ["verifying", "complete", "live", "rolled_back", "failed", "cancelled"]


@pytest.fixture
def client() -> redis.Redis:
    url = os.environ.get("REEMBED_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
    found = redis.Redis.from_url(url)
    try:
        found.ping()
    except redis.ConnectionError:
        if os.environ.get("CI"):
            raise
        pytest.skip("no Redis")
    for key in found.scan_iter("reembed:idempotency:*"):
        found.delete(key)
    return found


def test_concurrent_requests_with_one_key_run_once_and_share_the_answer(client: redis.Redis) -> None:
    runs: list[int] = []

    def slow() -> tuple[int, object]:
        runs.append(1)
        time.sleep(0.3)
        return 202, {"migration_id": f"m{len(runs)}"}

    fingerprint = request_fingerprint("POST", "/x", {"a": 1})
    answers: list[tuple[int, object]] = []
    threads = [threading.Thread(target=lambda: answers.append(Idempotency(client).run("k1", fingerprint, slow)))
               for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(runs) == 1 and answers == [(202, {"migration_id": "m1"})] * 10
    with pytest.raises(InputError, match="another request"):
        Idempotency(client).run("k1", request_fingerprint("POST", "/x", {"a": 2}), slow)
    assert Idempotency(client).run(None, fingerprint, slow)[1] == {"migration_id": "m2"}  # no key: runs


def test_a_5xx_answer_is_not_kept_so_the_retry_runs_again(client: redis.Redis) -> None:
    answers = iter([(503, {"detail": "Redis down"}), (202, {"ok": True})])
    idem = Idempotency(client)
    assert idem.run("k2", "f", lambda: next(answers))[0] == 503
    assert idem.run("k2", "f", lambda: next(answers)) == (202, {"ok": True})
    assert idem.run("k2", "f", lambda: (500, {})) == (202, {"ok": True})  # kept now
