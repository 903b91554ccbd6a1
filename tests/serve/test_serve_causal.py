"""`lorafit serve` for causal LMs: the real server (uvicorn on a free loopback port), httpx and the openai client.

Mixed-adapter batches must give each row what the row gives alone (``model.generate`` with that
adapter loaded the ordinary way), the LRU must evict and reload, a new adapter directory must be
served without a restart, and a disconnected client must free its row.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafit.serve import Background, Server
import lorafit.serve.engine as engine_module
from lorafit.tree import adapter_names, lora_layers
from tests.serve.helpers import causal_adapter, greedy, load_reference

PROMPTS = ["the film was", "hello, how are you today? the trip was", "q", "the concert was great, really"]
NAMES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    """DIR with adapters a, b, c (ranks 4, 8, 4) and a spare d outside it (hot-added later)."""
    root = tmp_path_factory.mktemp("serve-adapters")
    for i, (name, r) in enumerate(zip(NAMES, (4, 8, 4))):
        causal_adapter(tiny_llama, root / "dir" / name, seed=i + 1, r=r)
    causal_adapter(tiny_llama, root / "spare" / "d", seed=9)
    return root


@pytest.fixture(scope="module")
def expected(tiny_llama, adapters):
    """(adapter or None, prompt) -> greedy text of 10 tokens from a plain model with that adapter."""
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    out = {}
    for name in [None, *NAMES]:
        model = load_reference(tiny_llama, None if name is None else adapters / "dir" / name)
        for p in PROMPTS:
            out[name, p] = greedy(model, tok, p, 10)
    model = load_reference(tiny_llama, adapters / "spare" / "d")
    out["d", PROMPTS[0]] = greedy(model, tok, PROMPTS[0], 10)
    assert len({out[n, PROMPTS[1]] for n in [None, *NAMES]}) == 4  # the adapters really differ
    return out


def make_server(model_dir, directory, **kw):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return Server(model, AutoTokenizer.from_pretrained(model_dir), directory, task="causal-lm", base_name="tiny",
                  **kw)


async def _complete_all(url, requests):
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        rs = await asyncio.gather(*(client.post("/v1/completions", json=r) for r in requests))
    return [r.json() for r in rs]


def test_mixed_batch_rows_equal_each_adapter_alone(tiny_llama, adapters, expected):
    # a long window: the 8 concurrent requests (4 adapters incl. the base, prompts of 4 lengths) form one batch
    server = make_server(tiny_llama, adapters / "dir", max_resident=3, max_batch=16, window_ms=400)
    with Background(server.app()) as bg:
        reqs = [{"model": name or "tiny", "prompt": p, "max_tokens": 10, "temperature": 0}
                for name, p in zip([None, *NAMES, "b", "a", "c", None], PROMPTS + PROMPTS[::-1])]
        answers = asyncio.run(_complete_all(bg.url, reqs))
        for req, ans in zip(reqs, answers):
            name = None if req["model"] == "tiny" else req["model"]
            assert ans["choices"][0]["text"] == expected[name, req["prompt"]], req
            assert ans["model"] == req["model"] and ans["object"] == "text_completion"
        batch = server.metrics.batch
        assert batch.n < len(reqs) and batch.counts[batch.buckets.index(4)] < batch.n  # a batch of > 4 rows ran
        assert server.metrics.batch_adapters.counts[1] < server.metrics.batch_adapters.n  # with > 2 adapters
        # the openai client, a list prompt (one batch of rows with one adapter), and chat / streaming
        client = openai.OpenAI(base_url=bg.url + "/v1", api_key="unused")
        listed = client.completions.create(model="b", prompt=PROMPTS, max_tokens=10, temperature=0)
        assert [c.text for c in listed.choices] == [expected["b", p] for p in PROMPTS]
        assert [m.id for m in client.models.list().data] == ["tiny", *NAMES]
        chat = client.chat.completions.create(model="c", messages=[{"role": "user", "content": "the film"}],
                                              max_tokens=6, temperature=0)
        streamed = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
            model="c", messages=[{"role": "user", "content": "the film"}], max_tokens=6, temperature=0, stream=True))
        assert streamed == chat.choices[0].message.content and chat.usage.completion_tokens == 6
        tok = AutoTokenizer.from_pretrained(tiny_llama)  # the chat is rendered as training rendered chats
        rendered = tok.apply_chat_template([{"role": "user", "content": "the film"}], tokenize=False,
                                           add_generation_prompt=True)
        ids = torch.tensor([tok(rendered, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = load_reference(tiny_llama, adapters / "dir" / "c").generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        assert chat.choices[0].message.content == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        seeded = [client.completions.create(model="a", prompt="the", max_tokens=8, seed=5).choices[0].text
                  for _ in range(2)]
        assert seeded[0] == seeded[1]  # sampling with a seed is reproducible
        # n choices per prompt, in OpenAI's order (prompt i's choices are i * n ... i * n + n - 1)
        many = client.completions.create(model="b", prompt=PROMPTS[:2], n=3, max_tokens=10, temperature=0)
        assert [c.index for c in many.choices] == list(range(6))
        assert [c.text for c in many.choices] == [expected["b", p] for p in PROMPTS[:2] for _ in range(3)]
        sampled = client.completions.create(model="a", prompt="the", n=4, max_tokens=8, seed=5)
        assert sampled.choices[0].text == seeded[0]  # choice i samples with seed + i
        assert len({c.text for c in sampled.choices}) > 1
        chats = client.chat.completions.create(model="c", messages=[{"role": "user", "content": "the film"}],
                                               n=2, max_tokens=6, temperature=0)
        assert [c.message.content for c in chats.choices] == [chat.choices[0].message.content] * 2
        # a prompt given as token ids answers as the same prompt given as text
        ids = tok(PROMPTS[3])["input_ids"]
        by_ids = client.completions.create(model="a", prompt=[ids, ids[:3]], max_tokens=10, temperature=0)
        assert by_ids.choices[0].text == expected["a", PROMPTS[3]]
        short = torch.tensor([ids[:3]])
        with torch.no_grad():
            out = load_reference(tiny_llama, adapters / "dir" / "a").generate(
                short, attention_mask=torch.ones_like(short), max_new_tokens=10, do_sample=False,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        assert by_ids.choices[1].text == tok.decode(out[0, 3:], skip_special_tokens=True)


def test_lru_evicts_reloads_and_serves_new_directories(tiny_llama, adapters, expected, tmp_path, monkeypatch):
    directory = tmp_path / "dir"
    shutil.copytree(adapters / "dir", directory)
    server = make_server(tiny_llama, directory, max_resident=2, window_ms=1)
    trims = []
    monkeypatch.setattr(engine_module, "_TRIM", lambda pad: trims.append(pad))
    with Background(server.app()) as bg, httpx.Client(base_url=bg.url, timeout=60) as client:
        def text(name, prompt=PROMPTS[1]):
            r = client.post("/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": 10,
                                                     "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        for name in NAMES:
            assert text(name) == expected[name, PROMPTS[1]]
        assert list(server.store.resident) == ["b", "c"] and len(adapter_names(server.model)) == 2
        assert len(trims) == 3  # each of those batches loaded an adapter: freed heap pages handed back
        assert text("a") == expected["a", PROMPTS[1]]  # evicted, reloaded from its file
        assert list(server.store.resident) == ["c", "a"] and len(adapter_names(server.model)) == 2
        assert server.metrics.loads == 4 and server.metrics.evictions == 2
        assert text("c") == expected["c", PROMPTS[1]] and server.metrics.loads == 4  # resident: no reload
        assert len(trims) == 4  # no load, no eviction: no trim
        # one copy: every resident adapter's A and B are views of the layers' stacked weights
        for _, layer in lora_layers(server.model):
            stacks = {t.untyped_storage().data_ptr() for entry in layer.stack_cache.values() for t in entry[2][:2]}
            for key in (r.key for r in server.store.resident.values()):
                for param in layer.adapters[key].parameters():
                    assert param.untyped_storage().data_ptr() in stacks
        # a new directory appears (written elsewhere, then renamed in): served without a restart
        assert client.post("/v1/completions", json={"model": "d", "prompt": "x"}).status_code == 404
        shutil.copytree(adapters / "spare" / "d", tmp_path / "incoming")
        (tmp_path / "incoming").rename(directory / "d")
        assert "d" in [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert text("d", PROMPTS[0]) == expected["d", PROMPTS[0]]
        # a resident adapter's file rewritten in place (temp + rename): reloaded on its next use
        assert text("a") == expected["a", PROMPTS[1]] and list(server.store.resident) == ["d", "a"]
        os.replace(shutil.copy(adapters / "spare" / "d" / "adapter_model.safetensors", tmp_path / "new"),
                   directory / "a" / "adapter_model.safetensors")
        assert text("a", PROMPTS[0]) == expected["d", PROMPTS[0]]
        assert list(server.store.resident) == ["d", "a"] and len(adapter_names(server.model)) == 2
        metrics = client.get("/metrics").text  # evicted: a, b (for c, a), a (for d), c (for a), a (its new file)
        assert "lorafit_resident_adapters 2" in metrics and "lorafit_adapter_evictions_total 5" in metrics
        assert 'lorafit_requests_total{endpoint="completions",status="200"}' in metrics


def test_bf16_server_keeps_adapters_once_in_bf16_and_batches_like_single_requests(tiny_llama, adapters):
    """A base served in bf16: adapters trained on the fp32 base load (the bf16 fingerprint), are cast to
    bf16 and become views of the stacks; a mixed batch answers as the same requests sent one by one."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval().to(torch.bfloat16)
    server = Server(model, AutoTokenizer.from_pretrained(tiny_llama), adapters / "dir", task="causal-lm",
                    base_name="tiny", max_resident=3, window_ms=400)
    reqs = [{"model": name, "prompt": p, "max_tokens": 8, "temperature": 0}
            for name, p in zip(["tiny", *NAMES, "b", "a"], PROMPTS + PROMPTS[:2])]
    with Background(server.app()) as bg, httpx.Client(base_url=bg.url, timeout=60) as client:
        batched = asyncio.run(_complete_all(bg.url, reqs))
        assert server.metrics.batch.n == 1 and server.metrics.load_failures == 0
        for req, ans in zip(reqs, batched):
            alone = client.post("/v1/completions", json=req).json()
            assert ans["choices"][0]["text"] == alone["choices"][0]["text"], req
    for _, layer in lora_layers(model):
        stacks = {t.untyped_storage().data_ptr() for entry in layer.stack_cache.values() for t in entry[2][:2]}
        for key in (r.key for r in server.store.resident.values()):
            for param in layer.adapters[key].parameters():
                assert param.dtype == torch.bfloat16 and param.untyped_storage().data_ptr() in stacks


def test_logprobs_are_the_models_own_scores_in_a_mixed_batch(tiny_llama, adapters, expected):
    """``logprobs`` (completions) and ``logprobs`` / ``top_logprobs`` (chat): each token's log-probability
    and the top alternatives equal log_softmax of the model's logits for that adapter, run alone."""
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ids = torch.tensor([tok(PROMPTS[1])["input_ids"]])
    with torch.no_grad():
        ref = load_reference(tiny_llama, adapters / "dir" / "a").generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, output_logits=True,
            return_dict_in_generate=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = ref.sequences[0, ids.shape[1]:].tolist()
    text = tok.decode(new, skip_special_tokens=True)
    lp = [torch.log_softmax(step[0].float(), -1) for step in ref.logits]
    stop = text[3:5]
    assert len(new) == 6 and len(stop) == 2
    server = make_server(tiny_llama, adapters / "dir", max_resident=3, window_ms=300)
    reqs = [{"model": "a", "prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0, "logprobs": 3},
            {"model": "b", "prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0}]
    with Background(server.app()) as bg:
        with_lp, plain = asyncio.run(_complete_all(bg.url, reqs))
        assert server.metrics.batch.n == 1  # one mixed batch: a row with scores beside one without
        client = openai.OpenAI(base_url=bg.url + "/v1", api_key="unused")
        chat = client.chat.completions.create(model="c", messages=[{"role": "user", "content": "the film"}],
                                              max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
        cut = client.completions.create(model="a", prompt=PROMPTS[1], max_tokens=6, temperature=0, logprobs=1,
                                        stop=[stop])
    assert plain["choices"][0]["text"] == expected["b", PROMPTS[0]] and plain["choices"][0]["logprobs"] is None
    choice = with_lp["choices"][0]
    assert choice["text"] == text
    got = choice["logprobs"]
    assert got["tokens"] == [tok.decode([t]) for t in new] and "".join(got["tokens"]) == text
    assert got["token_logprobs"] == pytest.approx([float(lp[j][t]) for j, t in enumerate(new)], abs=1e-4)
    for j, alts in enumerate(got["top_logprobs"]):
        values, index = lp[j].topk(3)
        want = {tok.decode([int(t)]): float(v) for t, v in zip(index, values)}  # OpenAI's {text: logprob}
        assert list(alts) == list(want) and list(alts.values()) == pytest.approx(list(want.values()), abs=1e-4)
    assert got["text_offset"] == [len("".join(got["tokens"][:j])) for j in range(len(new))]
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and "".join(c.token for c in content) == \
        chat.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].bytes == c.bytes for c in content)  # greedy
    assert all(c.top_logprobs[0].logprob == pytest.approx(c.logprob) for c in content)
    # raw bytes: joined, they are the text (a token ending inside a UTF-8 character shows as U+FFFD alone)
    assert bytes(b for c in content for b in c.bytes).decode("utf-8", "replace") == chat.choices[0].message.content
    # a stop string: the text ends before it, and so do the scored tokens (the one it starts in included)
    scored, at = cut.choices[0].logprobs, text.find(stop)
    assert cut.choices[0].text == text[:at] and cut.choices[0].finish_reason == "stop"
    assert 0 < len(scored.tokens) < len(new) and all(o < at for o in scored.text_offset)
    assert "".join(scored.tokens).startswith(text[:at]) and scored.token_logprobs == got["token_logprobs"][
        :len(scored.tokens)]


def test_echo_scores_the_prompt_as_lm_eval_asks(tiny_llama, adapters, expected):
    """``echo`` + ``logprobs`` + ``max_tokens`` 0 (lm-eval-harness' loglikelihood request): every prompt
    token after the first scored by the adapter's model, in a batch beside an ordinary request."""
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ids = tok(PROMPTS[3])["input_ids"]
    with torch.no_grad():
        logits = load_reference(tiny_llama, adapters / "dir" / "b")(torch.tensor([ids])).logits[0]
    lp = torch.log_softmax(logits.float(), -1)
    server = make_server(tiny_llama, adapters / "dir", max_resident=3, window_ms=300)
    reqs = [{"model": "b", "prompt": PROMPTS[3], "max_tokens": 0, "echo": True, "logprobs": 1},
            {"model": "a", "prompt": PROMPTS[1], "max_tokens": 10, "temperature": 0},
            {"model": "b", "prompt": PROMPTS[3], "max_tokens": 4, "echo": True, "logprobs": 1, "temperature": 0},
            {"model": "b", "prompt": PROMPTS[3], "max_tokens": 4, "logprobs": 1, "temperature": 0}]
    with Background(server.app()) as bg:
        scored, plain, echoed, alone = (r["choices"][0] for r in asyncio.run(_complete_all(bg.url, reqs)))
        assert server.metrics.batch.n == 1
    assert plain["text"] == expected["a", PROMPTS[1]] and plain["logprobs"] is None
    got = scored["logprobs"]
    assert scored["text"] == PROMPTS[3] and scored["finish_reason"] == "length"
    assert got["tokens"] == [tok.decode([t]) for t in ids] and got["token_logprobs"][0] is None
    assert got["token_logprobs"][1:] == pytest.approx([float(lp[j, t]) for j, t in enumerate(ids[1:])], abs=1e-4)
    assert got["top_logprobs"][0] is None and all(len(d) == 1 for d in got["top_logprobs"][1:])
    assert got["text_offset"] == [len(tok.decode(ids[:j], skip_special_tokens=True)) for j in range(len(ids))]
    # echo with new tokens: the prompt's part, then the completion's, offsets running on through both
    assert echoed["text"] == PROMPTS[3] + alone["text"]
    both = echoed["logprobs"]
    assert both["tokens"] == got["tokens"] + alone["logprobs"]["tokens"]
    assert both["token_logprobs"] == pytest.approx(got["token_logprobs"] + alone["logprobs"]["token_logprobs"],
                                                   abs=1e-5)
    assert both["text_offset"][len(ids):] == [o + len(PROMPTS[3]) for o in alone["logprobs"]["text_offset"]]


def _slow(model, seconds):
    """A forward pre-hook that sleeps: generation long enough to disconnect in the middle of it."""
    return model.register_forward_pre_hook(lambda *_: time.sleep(seconds))


def test_disconnected_client_frees_its_row_and_health_answers_meanwhile(tiny_llama, adapters):
    server = make_server(tiny_llama, adapters / "dir", window_ms=1)
    hook = _slow(server.model, 0.02)
    try:
        with Background(server.app()) as bg:
            body = {"model": "a", "prompt": "the film was", "max_tokens": 200, "temperature": 0.7, "stop": None}
            with httpx.Client(base_url=bg.url, timeout=60) as client:
                with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    assert r.status_code == 200
                    next(r.iter_lines())  # the first chunk arrived: the row is decoding
                    health = client.get("/health").json()  # answered while the batch runs
                    assert health["batch_running_s"] is not None
                # the stream is closed: the worker must drop the row long before 200 tokens
                for _ in range(200):
                    if server.engine.busy_since is None:
                        break
                    time.sleep(0.02)
                assert server.engine.busy_since is None
                assert server.metrics.tokens_generated < 100
                before = server.metrics.tokens_generated
                with pytest.raises(httpx.ReadTimeout):  # a plain request whose client gives up
                    client.post("/v1/completions", json=body, timeout=0.5)
                for _ in range(200):
                    if server.engine.busy_since is None:
                        break
                    time.sleep(0.02)
                assert server.engine.busy_since is None and server.metrics.tokens_generated - before < 100
                assert 'status="499"' in client.get("/metrics").text
    finally:
        hook.remove()


def test_requests_join_a_running_batch_and_no_row_changes(tiny_llama, adapters, expected):
    """A short prompt joins (its cache left-padded), then a long one (the running cache left-padded)."""
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    long_prompt = "the film was great, " * 12
    want_running = greedy(load_reference(tiny_llama, adapters / "dir" / "a"), tok, PROMPTS[1], 40)
    want_long = greedy(load_reference(tiny_llama, adapters / "dir" / "c"), tok, long_prompt, 8)
    server = make_server(tiny_llama, adapters / "dir", window_ms=1)
    hook = _slow(server.model, 0.01)
    try:
        with Background(server.app()) as bg, httpx.Client(base_url=bg.url, timeout=60) as client:
            def ask(name, prompt, n):
                return client.post("/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": n,
                                                            "temperature": 0}).json()["choices"][0]["text"]
            box = {}
            worker = threading.Thread(target=lambda: box.update(running=ask("a", PROMPTS[1], 40)))
            worker.start()
            while server.metrics.tokens_generated < 5:  # the first row is decoding
                time.sleep(0.005)
            assert ask("b", PROMPTS[0], 10) == expected["b", PROMPTS[0]]
            assert ask("c", long_prompt, 8) == want_long
            assert "running" not in box  # both answered while the first row still decoded: they joined its batch
            worker.join()
    finally:
        hook.remove()
    assert box["running"] == want_running
    assert server.metrics.batch.n == 3  # the first batch, then each joined row (prefilled alone)
