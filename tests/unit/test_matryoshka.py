"""The Matryoshka shortcut's pure parts: names, cuts, when it applies, and the per-batch embed."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from reembed.api_models import ApiModelDeclaration, api_spec, declared_for_openai
from reembed.errors import InputError, ModelNotFoundError
from reembed.matryoshka import check_sample, cut, from_source, sized_name, unavailable, unit_rows
from reembed.models import resolve_model
from reembed.store import Page

FULL = ApiModelDeclaration(name="openai:text-embedding-3-small", base_url="https://api.example/v1", dimension=8,
                           model="text-embedding-3-small", matryoshka=True)


def test_sized_names_cut_the_base_model_never_a_cut_of_a_cut() -> None:
    assert sized_name("openai:text-embedding-3-small", 256) == "openai:text-embedding-3-small@256"
    assert sized_name("openai:text-embedding-3-small@512", 256) == "openai:text-embedding-3-small@256"
    assert sized_name("local@model", 4) == "local@model@4"  # "@model" is not a size


def test_a_cut_keeps_the_first_dimensions_at_unit_length() -> None:
    vectors = np.array([[3.0, 4.0, 12.0], [0.0, 0.0, 5.0]], dtype=np.float32)
    assert np.allclose(cut(vectors, 2), [[0.6, 0.8], [0.0, 0.0]])  # a zero row stays zero, no NaN
    assert np.allclose(np.linalg.norm(unit_rows(vectors), axis=1), 1.0)


def test_name_at_size_resolves_to_its_own_space_only_for_a_matryoshka_model() -> None:
    declared = {FULL.name: FULL}
    spec = resolve_model(f"{FULL.name}@4", declared)
    assert spec.api is not None and spec.dimension == 4 and spec.api.dimensions == 4
    assert spec.api.fingerprint() != FULL.fingerprint()
    with pytest.raises(ModelNotFoundError, match="between 1 and 7"):
        resolve_model(f"{FULL.name}@8", declared)
    plain = replace(FULL, matryoshka=False)
    with pytest.raises(ModelNotFoundError, match="not declared with matryoshka = true"):
        resolve_model(f"{FULL.name}@4", {FULL.name: plain})


def test_the_shortcut_applies_only_to_the_same_endpoint_and_model_made_smaller() -> None:
    source, target = api_spec(FULL), api_spec(FULL.at_dimensions(4, "models.toml"))
    assert unavailable(source, target) is None
    assert "not smaller" in (unavailable(target, source) or "")
    elsewhere = api_spec(replace(FULL.at_dimensions(4, "m"), base_url="https://other.example/v1"))
    assert "another endpoint" in (unavailable(source, elsewhere) or "")
    local = resolve_model("all-MiniLM-L6-v2")
    assert "declared behind an API" in (unavailable(local, target) or "")


def test_adopt_maps_a_cut_collection_to_the_matryoshka_declaration() -> None:
    config = {"model_name": FULL.model, "api_base": FULL.base_url, "dimensions": 4}
    assert declared_for_openai({FULL.name: FULL}, config, "docs", Path("m.toml")) == f"{FULL.name}@4"


class Stored:
    """A source collection's stored documents and vectors (what ``Store.get``/``page`` read)."""

    def __init__(self, rows: dict[str, tuple[str, np.ndarray]]) -> None:
        self.rows = rows

    def get(self, name: str, ids: list[str], embeddings: bool = False) -> Page:
        hit = [i for i in ids if i in self.rows]
        return Page(hit, [self.rows[i][0] for i in hit], [None] * len(hit), np.stack([self.rows[i][1] for i in hit]))

    def page(self, name: str, offset: int, limit: int, embeddings: bool = False) -> Page:
        return self.get(name, sorted(self.rows)[offset:offset + limit])


class Endpoint:
    """The smaller model as the endpoint serves it: ``truth`` cut, counting what it is sent."""

    def __init__(self, truth: dict[str, np.ndarray], dimension: int) -> None:
        self.truth, self.dimension, self.sent = truth, dimension, []  # type: ignore[var-annotated]
        self.spec = api_spec(FULL.at_dimensions(dimension, "m"))

    def embed_documents(self, texts: list[str]) -> np.ndarray:
        self.sent += texts
        return cut(np.stack([self.truth[t] for t in texts]), self.dimension)


def test_a_batch_cuts_what_the_source_holds_and_embeds_only_changed_texts() -> None:
    rng = np.random.default_rng(7)
    truth = {f"text {i}": rng.normal(size=8).astype(np.float32) for i in range(6)}
    store = Stored({f"d{i}": (f"text {i}", truth[f"text {i}"]) for i in range(5)})
    store.rows["d2"] = ("an older text", rng.normal(size=8).astype(np.float32))  # written since the batch was read
    truth["an older text"] = store.rows["d2"][1]
    endpoint = Endpoint(truth, 4)
    ids, texts = ["d0", "d1", "d2", "d5"], ["text 0", "text 1", "text 2", "text 5"]  # d5: not in the source yet
    embed, sent = from_source(store, "src", ids, texts, endpoint)  # type: ignore[arg-type]
    vectors = (embed(texts[:3]), embed(texts[3:]))
    assert endpoint.sent == ["text 2", "text 5"] and sent() == 2
    expected = cut(np.stack([truth[t] for t in texts]), 4)
    assert np.allclose(np.concatenate(vectors), expected, atol=1e-6)


def test_the_sample_check_refuses_vectors_that_are_not_the_endpoint_s_cut() -> None:
    rng = np.random.default_rng(3)
    truth = {f"text {i}": rng.normal(size=8).astype(np.float32) for i in range(40)}
    store = Stored({f"d{i:02}": (f"text {i}", truth[f"text {i}"]) for i in range(40)})
    endpoint = Endpoint(truth, 4)
    assert check_sample(store, "src", 40, endpoint) > 0.9999  # type: ignore[arg-type]
    assert 8 <= len(endpoint.sent) <= 16  # a sample, from several places
    swapped = Endpoint({t: np.roll(v, 3) for t, v in truth.items()}, 4)  # another model behind the endpoint
    with pytest.raises(InputError, match="--re-embed"):
        check_sample(store, "src", 40, swapped)  # type: ignore[arg-type]
