"""Canary routing: the share over many callers, and the same answer for the same caller."""

from __future__ import annotations

import pytest

from reembed.registry import AliasRecord, Canary
from search.routing import bucket, choose_collection


def alias_with(percent: float | None) -> AliasRecord:
    canary = Canary(collection="new", percent=percent, migration_id="m1") if percent else None
    return AliasRecord(alias="docs", live_collection="old", canary=canary)


@pytest.mark.parametrize("percent", [1, 10, 25, 50, 90])
def test_share_of_10000_client_keys_is_within_a_few_percent(percent: float) -> None:
    alias = alias_with(percent)
    to_canary = sum(choose_collection(alias, "same query", f"client-{i}")[1] for i in range(10_000))
    assert abs(to_canary / 100 - percent) < 1.5


def test_routing_is_stable_per_key_and_monotonic_in_percent() -> None:
    keys = [f"client-{i}" for i in range(2000)]
    at_10 = {k for k in keys if choose_collection(alias_with(10), "q", k)[1]}
    assert at_10 == {k for k in keys if choose_collection(alias_with(10), "other q", k)[1]}  # the key decides
    at_30 = {k for k in keys if choose_collection(alias_with(30), "q", k)[1]}
    assert at_10 <= at_30  # raising the share only moves callers to the canary


def test_without_a_key_the_query_text_decides_and_no_canary_means_live() -> None:
    alias = alias_with(50)
    assert choose_collection(alias, "what is a vector", None) == choose_collection(alias, "what is a vector", None)
    assert choose_collection(alias_with(None), "anything", "client-1") == ("old", False)
    assert choose_collection(alias_with(100), "anything", "client-1") == ("new", True)
    assert bucket("a") == bucket("a") and 0 <= bucket("b") < 10_000
