"""Fast tests of pure logic: settings, documents, batch splitting, the state machine, fingerprints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from reembed.documents import check_metadata, content_hash, validate_corpus
from reembed.errors import ConfigError, InputError, ModelNotFoundError
from reembed.migrations import check_alias_name, check_batch_size
from reembed.models import KNOWN_MODELS, fingerprint, locate_weights_if_installed, resolve_model
from reembed.registry import TRANSITIONS, MigrationState
from reembed.settings import Settings
from worker.embedding import embed_isolating


def test_settings_defaults_and_bounds() -> None:
    s = Settings.from_env({})
    assert (s.redis_url, s.chroma_url, s.device, s.batch_size) == ("", "", "auto", 64)
    assert Settings.from_env(s.to_env()) == s
    with pytest.raises(ConfigError, match="REEMBED_BATCH_SIZE"):
        Settings.from_env({"REEMBED_BATCH_SIZE": "-3"})
    with pytest.raises(ConfigError, match="REEMBED_DEVICE"):
        Settings.from_env({"REEMBED_DEVICE": "tpu"})


def test_content_hash_covers_text_and_user_metadata_only() -> None:
    base = content_hash("text", {"a": 1, "b": "x"})
    assert base == content_hash("text", {"b": "x", "a": 1})
    assert base == content_hash("text", {"a": 1, "b": "x", "embedding_model": "m", "content_hash": "h"})
    assert base != content_hash("text!", {"a": 1, "b": "x"})
    assert base != content_hash("text", {"a": 2, "b": "x"})


def test_corpus_validation_rejects_bad_input(tmp_path: Path) -> None:
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"_id": "1", "title": "T", "text": "body"}) + "\n" + json.dumps({"id": "1", "text": "x"}) + "\n")
    with pytest.raises(InputError, match="duplicate id '1'"):
        validate_corpus(f)
    f.write_bytes(b'{"id": "1", "text": "\xff"}\n')
    with pytest.raises(InputError, match="UTF-8"):
        validate_corpus(f)
    f.write_text('{"id": "1", "text": "ok", "metadata": {"tags": ["a"]}}\n')
    with pytest.raises(InputError, match="metadata 'tags'"):
        validate_corpus(f)
    f.write_text('{"id": "1", "text": "ok"}\n{"id": "2", "text": " "}\n')
    assert validate_corpus(f) == (2, ["2"])
    with pytest.raises(InputError, match="does not exist"):
        validate_corpus(tmp_path / "nope.jsonl")
    assert check_metadata("x", None, "here") == {}


def test_embed_isolating_finds_poison_documents() -> None:
    def embed(texts: list[str]) -> np.ndarray:
        if any("POISON" in t for t in texts):
            raise RuntimeError("model blew up")
        return np.array([[float(len(t)), 1.0] for t in texts])

    texts = ["a", "bb", "POISON one", "ccc", "dddd", "POISON two", "e"]
    ids = [f"id{i}" for i in range(len(texts))]
    ok, vectors, failed = embed_isolating(embed, ids, texts)
    assert ok == [0, 1, 3, 4, 6]
    assert vectors is not None and vectors[:, 0].tolist() == [1, 2, 3, 4, 1]
    assert set(failed) == {"id2", "id5"} and "model blew up" in failed["id2"]


def test_state_machine_refuses_going_live_from_running() -> None:
    assert MigrationState.LIVE not in TRANSITIONS[MigrationState.RUNNING]
    assert MigrationState.LIVE in TRANSITIONS[MigrationState.COMPLETE]
    assert not TRANSITIONS[MigrationState.CANCELLED]


def test_names_and_batch_sizes() -> None:
    assert check_alias_name("docs-v1.2") == "docs-v1.2"
    for bad in ("", "-docs", "a b", "x" * 70, "a..b"):
        with pytest.raises(InputError):
            check_alias_name(bad)
    with pytest.raises(InputError, match="batch size"):
        check_batch_size(0, Settings.from_env({}))


def test_unknown_model_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="all-MiniLM-L6-v2"):
        resolve_model("bge-large-xx")
    with pytest.raises(ModelNotFoundError, match="modules.json"):
        resolve_model(str(tmp_path))
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2").name == "all-MiniLM-L6-v2"


def test_two_models_of_the_same_dimension_get_different_fingerprints(tmp_path: Path) -> None:
    minilm = KNOWN_MODELS["all-MiniLM-L6-v2"]
    copy = tmp_path / "minilm-copy"
    shutil.copytree(locate_weights_if_installed(minilm), copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of one weight: another model, still 384-d
    weights.write_bytes(bytes(data))
    other = resolve_model(str(copy))
    assert other.dimension == minilm.dimension == 384
    assert fingerprint(other, tmp_path) != fingerprint(minilm, tmp_path)
    assert fingerprint(minilm, tmp_path) == fingerprint(minilm, tmp_path)  # stable (and cached)


def test_readme_settings_table_is_generated_from_fields() -> None:
    from pathlib import Path

    from reembed.settings import settings_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert settings_table() in readme, "regenerate README's table with reembed.settings.settings_table()"


def test_log_redactor_drops_task_arguments_passwords_and_the_api_key() -> None:
    from reembed.logs import Redactor

    redact = Redactor(("api-key-123",))
    celery_line = ("Failed to cancel active request <Request: reembed.batch[202a] () {'migration_id': 'm1', "
                   "'batch_id': 's-0-1', 'ids': ['1'], 'documents': ['a private text']}>")
    assert "private" not in redact.clean(celery_line) and "reembed.batch[202a]" in redact.clean(celery_line)
    assert redact.clean("redis://:pw@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redact.clean("rediss://user:pw@host/1 and key api-key-123") == "rediss://user:***@host/1 and key ***"
    assert redact.clean("Task reembed.batch[abc] received") == "Task reembed.batch[abc] received"
    event = redact(None, "info", {"event": "x", "url": "http://u:p@h", "n": 3})
    assert event == {"event": "x", "url": "http://u:***@h", "n": 3}


def test_text_and_metadata_checks_name_the_document_and_the_fix() -> None:
    from reembed.documents import MAX_DOCUMENT_CHARS, check_metadata, check_text

    assert check_text("a", "tab\tnewline\nok", "f:1") == "tab\tnewline\nok"
    for bad, needle in (("nul\x00", "U\\+0000"), ("bell\x07", "U\\+0007"), ("x" * (MAX_DOCUMENT_CHARS + 1), "limit")):
        with pytest.raises(InputError, match=needle):
            check_text("doc-1", bad, "f:1")
    for meta, needle in (({"": 1}, "reserved or empty"), ({"chroma:document": "x"}, "reserved"),
                         ({"content_hash": "x"}, "reserved"), ({"k": None}, "NoneType"),
                         ({"k": {"nested": 1}}, "dict"), ({"k": [1, 2]}, "list"),
                         ({"k": float("nan")}, "finite"), ({"k": float("-inf")}, "finite"),
                         ({"k": 2**63}, "64-bit"), ({"k": -(2**63) - 1}, "64-bit"), ({"k": "a\ud800"}, "surrogate")):
        with pytest.raises(InputError, match=needle):
            check_metadata("doc-1", meta, "f:1")
    assert check_metadata("d", {"k": 2**63 - 1, "b": True, "f": 1.5}, "f:1") == {"k": 2**63 - 1, "b": True, "f": 1.5}
    with pytest.raises(InputError, match="surrogate"):
        check_text("doc-1", "lone \udc80 surrogate", "f:1")


@pytest.mark.parametrize(("space", "normalized", "similarity", "warned"), [
    ("cosine", True, "cosine", False), ("l2", True, "cosine", False), ("ip", True, "dot", False),
    ("cosine", False, "cosine", False), ("ip", False, "dot", False), ("l2", False, "euclidean", False),
    ("l2", False, "cosine", True), ("ip", False, "cosine", True), ("cosine", False, "dot", True),
    ("cosine", False, "manhattan", True),
])
def test_plan_warns_when_the_source_space_does_not_rank_as_the_model_does(
        space: str, normalized: bool, similarity: str, warned: bool) -> None:
    from producer.plan import space_warning

    warning = space_warning(space, "new-model", normalized, similarity)
    assert (warning is not None) == warned
    if warning:
        assert f"{space!r} distance space" in warning and "new-model" in warning and "needs" in warning


def test_metadata_read_back_is_the_same_within_chromas_float_parsing() -> None:
    """Chroma returned 123456789.1234568 for 123456789.12345679 and 0.0 for -0.0 (measured)."""
    from reembed.documents import same_metadata

    assert same_metadata({"v": 123456789.1234568, "content_hash": "x"}, {"v": 123456789.12345679})
    assert same_metadata({"v": 0.0}, {"v": -0.0})
    assert not same_metadata({"v": 123456789.13}, {"v": 123456789.12345679})
    assert not same_metadata({"v": 1.0}, {"v": 1})  # Chroma keeps ints and floats apart
    assert not same_metadata({"v": 1}, {"v": 1, "w": 2})
    assert not same_metadata({"v": "a"}, {"v": "b"})
