"""`lorafit.adapter_batch(..., slots=)`: the stacking order a server keeps fixed across batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import lorafit
from lorafit.tree import lora_layers
from tests.serve.helpers import randomize


def model_with_adapters():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    for i, name in enumerate("abc"):
        lorafit.inject(model, lorafit.LoraConfig(r=2 + i, target_modules=["0", "2"]), adapter=name)
    randomize(model, 0, std=0.5)
    return model


def stacks(model):
    return [next(iter(layer.stack_cache.values()))[2] for _, layer in lora_layers(model)]


def test_slots_give_the_same_rows_and_keep_the_stacks_across_mixes():
    model = model_with_adapters()
    x = torch.randn(3, 8)
    with torch.no_grad():
        with lorafit.adapter_batch(model, ["a", None, "c"]):
            plain = model(x)
        with lorafit.adapter_batch(model, ["a", None, "c"], slots=("c", "b", "a")):
            slotted = model(x)
        torch.testing.assert_close(slotted, plain)
        first = stacks(model)
        with lorafit.adapter_batch(model, ["b", "b", None], slots=("c", "b", "a")):  # another mix, same slots
            mixed = model(x)
        assert all(s is f for s, f in zip(stacks(model), first))  # not stacked again
        for i, name in enumerate(["b", "b", None]):
            with lorafit.adapter_batch(model, [name]):
                torch.testing.assert_close(mixed[i:i + 1], model(x[i:i + 1]))
        with lorafit.adapter_batch(model, ["b", "a", None]):  # without slots the mix decides the stacking
            model(x)
        assert all(s is not f for s, f in zip(stacks(model), first))


def test_slots_are_checked():
    model = model_with_adapters()
    with pytest.raises(ValueError, match="'c' is in names but not in slots"):
        with lorafit.adapter_batch(model, ["a", "c"], slots=("a", "b")):
            pass
    with pytest.raises(ValueError, match="unknown adapter 'z'"):
        with lorafit.adapter_batch(model, ["a"], slots=("a", "z")):
            pass


def test_sampling_rows_each_follow_their_own_settings():
    from lorafit.serve.generate import Row, pick

    logits = torch.tensor([[0.1, 2.0, 0.3, 1.9]] * 3)
    rows = [Row([1], 3), Row([1], 3, temperature=1.0, top_p=0.0), Row([1], 3, temperature=5.0, seed=7)]
    picks = [pick(logits, rows).tolist() for _ in range(20)]
    assert all(p[0] == 1 and p[1] == 1 for p in picks)  # greedy, and top_p 0 = the most likely token alone
    assert len({p[2] for p in picks}) > 1  # a hot temperature really samples
    again = [Row([1], 3, temperature=5.0, seed=7)]
    assert [pick(logits[:1], again).item() for _ in range(20)] == [p[2] for p in picks]  # its own seeded stream


def test_token_bytes_rebuild_text_split_inside_characters():
    """Byte-level BPE tokens that end inside a UTF-8 character decode to U+FFFD alone; their raw bytes
    (what chat logprobs report) join back into the text. SentencePiece byte-fallback pieces too."""
    from lorafit.serve.generate import token_bytes
    from tests.train.train_helpers import make_bpe_tokenizer

    tok = make_bpe_tokenizer()
    text = "the café costs 5 € or 日本円, ÿ\t\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any(tok.decode([i]) == "\ufffd" for i in ids)  # the case this is about occurs here
    assert b"".join(token_bytes(tok, i) for i in ids) == text.encode("utf-8")

    class ByteFallback:  # a SentencePiece vocabulary: bytes as <0xNN> pieces, others as text
        def convert_ids_to_tokens(self, i):
            return {0: "<0xE2>", 1: "▁cat"}[i]

        def decode(self, ids):
            return {0: "\ufffd", 1: " cat"}[ids[0]]

    assert token_bytes(ByteFallback(), 0) == b"\xe2" and token_bytes(ByteFallback(), 1) == b" cat"


def test_a_cancelled_row_is_answered_with_its_scores(tiny_llama):
    """A row cancelled mid-decode (client gone, server stopping) ends like any other: its text so far and,
    when asked, one score per token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafit.serve.generate import Generator, Row, TokenScore

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    gen = Generator(AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), tok, tok.pad_token_id, set())
    got = {}
    row = Row(tok("the film")["input_ids"], max_tokens=8, logprobs=2,
              done=lambda text, reason, n: got.update(text=text, reason=reason, n=n))
    row.cancelled = lambda: len(row.out) >= 3
    gen.run([row], [None])
    assert got == {"text": tok.decode(row.out, skip_special_tokens=True), "reason": "cancelled", "n": 3}
    assert all(isinstance(s, TokenScore) and len(s.top) == 2 for s in row.scores)
    assert [s.token for s in row.scores] == [tok.decode([t]) for t in row.out]
