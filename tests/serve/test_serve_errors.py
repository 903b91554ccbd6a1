"""`lorafit serve` error cases: 4xx JSON naming the field / file, never a crash, every other adapter still served."""

from __future__ import annotations

import json
import shutil

import httpx
import openai
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import lorafit
from lorafit.serve import Background, Limits, Server
from lorafit.tree import adapter_names
from tests.serve.helpers import causal_adapter, greedy, load_reference, randomize


@pytest.fixture(scope="module")
def served(tiny_llama, tiny_gpt2, tmp_path_factory):
    """(client, server, directory, expected text of adapter 'good') with good and broken adapters on disk."""
    d = tmp_path_factory.mktemp("serve-errors")
    good = causal_adapter(tiny_llama, d / "good", seed=1)
    truncated = shutil.copytree(good, d / "truncated")
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    causal_adapter(tiny_gpt2, d / "other-arch", seed=2)  # GPT-2 module names: nothing fits the Llama
    other_base = LlamaForCausalLM(AutoModelForCausalLM.from_pretrained(tiny_llama).config)  # same shapes, other weights
    lorafit.inject(other_base, lorafit.LoraConfig(r=4, target_modules="all-linear"))
    randomize(other_base, 3)
    lorafit.save_adapter(other_base, d / "other-weights")
    shutil.copytree(good, d / "other-task")
    (d / "other-task" / "lorafit_job.json").write_text(json.dumps({"task": "text-classification"}))
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    expected = greedy(load_reference(tiny_llama, good), tok, "the film was", 8)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    server = Server(model, tok, d, task="causal-lm", base_name="tiny", max_resident=4, window_ms=1,
                    limits=Limits(max_tokens=64, max_inputs=4, max_request_bytes=4096))
    with Background(server.app()) as bg, httpx.Client(base_url=bg.url, timeout=60) as client:
        yield client, server, d, expected


def good_text(client) -> str:
    r = client.post("/v1/completions", json={"model": "good", "prompt": "the film was", "max_tokens": 8,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.mark.parametrize("name, words", [
    ("truncated", ["truncated/adapter_model.safetensors", "not a valid safetensors file"]),
    ("other-arch", ["other-arch/adapter_model.safetensors", "the model has no module"]),
    ("other-weights", ["other-weights/adapter_model.safetensors", "fingerprint mismatch"]),
    ("other-task", ["other-task/lorafit_job.json", "'text-classification'"]),
])
def test_broken_adapter_is_422_naming_the_file_and_the_rest_keeps_serving(served, name, words):
    client, server, d, expected = served
    assert good_text(client) == expected
    before = adapter_names(server.model)
    r = client.post("/v1/completions", json={"model": name, "prompt": "the film was", "max_tokens": 4})
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert all(w in message for w in words), message
    assert adapter_names(server.model) == before and name not in server.store.resident  # all-or-nothing
    assert good_text(client) == expected


BAD = [  # (body, status, words of the message)
    ({"model": "nope", "prompt": "x"}, 404, ["'nope' not found"]),
    ({"model": "../good", "prompt": "x"}, 404, ["'../good' not found"]),
    ({"model": "g" * 300, "prompt": "x"}, 404, ["not found"]),  # longer than a file name may be
    ({"model": "good", "prompt": ""}, 400, ["'prompt'", "empty"]),
    ({"model": "good", "prompt": []}, 400, ["'prompt'"]),
    ({"model": "good", "prompt": ["a", 3]}, 400, ["'prompt'", "list of token ids"]),
    ({"model": "good", "prompt": [True]}, 400, ["'prompt'", "list of token ids"]),
    ({"model": "good", "prompt": [1, -2]}, 400, ["'prompt'", "non-negative integers"]),
    ({"model": "good", "prompt": [[1, 2], []]}, 400, ["'prompt[1]'", "non-empty"]),
    ({"model": "good", "prompt": [1, 2, 99999]}, 400, ["token id 99999", "outside the vocabulary"]),
    ({"model": "good", "prompt": ["a"] * 5}, 400, ["at most 4"]),
    ({"model": "good", "prompt": "x", "max_tokens": 65}, 400, ["'max_tokens'", "[0, 64]"]),
    ({"model": "good", "prompt": "x", "max_tokens": "5"}, 400, ["'max_tokens'", "integer"]),
    ({"model": "good", "prompt": "x", "temperature": -1}, 400, ["'temperature'"]),
    ({"model": "good", "prompt": "x", "n": 17}, 400, ["'n'", "[1, 16]"]),
    ({"model": "good", "prompt": ["x", "y"], "n": 3}, 400, ["'n'", "6 choices", "at most 4"]),
    ({"model": "good", "prompt": "x", "logprobs": 6}, 400, ["'logprobs'", "[0, 5]"]),
    ({"model": "good", "prompt": "x", "logprobs": 2, "stream": True}, 400, ["'logprobs'", "stream"]),
    ({"model": "good", "prompt": "x", "echo": True, "stream": True}, 400, ["'echo'", "stream"]),
    ({"model": "good", "prompt": "x", "max_tokens": 0}, 400, ["'max_tokens'", "'echo': true"]),
    ({"model": "good", "prompt": "x", "best_of": 2}, 400, ["'best_of'", "not supported"]),
    ({"model": "good", "prompt": "x", "max_token": 5}, 400, ["unknown field 'max_token'"]),
    ({"prompt": "x"}, 400, ["'model'", "required"]),
    ({"model": "good", "prompt": "the film was " * 60, "max_tokens": 64}, 400, ["positions"]),
    ({"model": "good", "prompt": "x" * 5000}, 413, ["4096"]),
]


@pytest.mark.parametrize("body, status, words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_completion_requests(served, body, status, words):
    client = served[0]
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert all(w in message for w in words), message


def test_bad_chat_requests_wrong_json_and_routes(served):
    client, server, _, expected = served
    for messages, words in [([{"role": "wizard", "content": "hi"}], "'messages[0].role'"),
                            ([{"role": "user"}], "'messages[0].content'"),
                            ([{"role": "user", "content": "hi", "extra": 1}], "unknown key 'extra'"),
                            ("hi", "'messages'")]:
        r = client.post("/v1/chat/completions", json={"model": "good", "messages": messages})
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    hi = [{"role": "user", "content": "hi"}]
    for extra, words in [({"top_logprobs": 2}, "needs 'logprobs': true"), ({"logprobs": 1}, "must be bool"),
                         ({"logprobs": True, "top_logprobs": 21}, "[0, 20]")]:
        r = client.post("/v1/chat/completions", json={"model": "good", "messages": hi, **extra})
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    for raw, words in [(b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"), (b"\xff\xfe", "not valid JSON")]:
        r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    r = client.get("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
    r = client.post("/v1/classify", json={"model": "good", "input": "x"})  # not a classification server
    assert r.status_code == 404 and "/v1/completions" in r.json()["error"]["message"]
    oa = openai.OpenAI(base_url=str(client.base_url) + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="'missing' not found"):
        oa.completions.create(model="missing", prompt="x")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        oa.chat.completions.create(model="good", messages=[{"role": "user", "content": "x"}], max_tokens=1000)
    assert good_text(client) == expected and client.get("/health").json()["status"] == "ok"


def test_worker_survives_an_unexpected_error(served, monkeypatch):
    client, server, _, expected = served
    real = server.store._ensure_one
    calls = []

    def broken_once(name, keep):
        if not calls:
            calls.append(name)
            raise TypeError("a bug somewhere")
        return real(name, keep)

    monkeypatch.setattr(server.store, "_ensure_one", broken_once)
    r = client.post("/v1/completions", json={"model": "good", "prompt": "the film was", "max_tokens": 4})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    r = client.post("/v1/completions", json={"model": "good", "prompt": "the film was", "max_tokens": 8,
                                             "temperature": 0}, timeout=20)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
