"""`lorafit.tasks.lm_loss`: the output layer runs on labelled positions only, with the full loss's numbers.

Against the plain computation (full logits, shifted labels, summed cross-entropy): the loss and
every LoRA gradient on a Llama with completion-only labels and padding, on a Gemma 2 (soft-capped
logits after the head) and with a LoRA-wrapped ``lm_head``; the head really sees [1, K, H]; and
the fallbacks (a compiled model, a head called on other shapes or twice) give the same numbers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from tests.helpers import tiny_llama

import lorafit
from lorafit.tasks.lm_loss import IGNORE, next_token_loss_sum, shifted_labels


def reference(model, ids, labels, **kw):
    logits = model(input_ids=ids, **kw).logits
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), shifted_labels(labels).flatten(),
                                       ignore_index=IGNORE, reduction="sum")


def batch(vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 12), generator=g)
    labels = torch.full_like(ids, IGNORE)
    labels[0, 7:] = ids[0, 7:]  # a completion at the end
    labels[1, 3:6] = ids[1, 3:6]  # an assistant turn in the middle
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0  # right padding
    labels[2, 5:9] = ids[2, 5:9]
    return ids, labels, mask


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_same(model, ids, labels, mask, expect_selected=True):
    head = model.get_output_embeddings()
    seen = []
    handle = head.register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape)))
    got = next_token_loss_sum(model, ids, labels, attention_mask=mask)
    handle.remove()
    got.backward()
    g_got = grads(model)
    model.zero_grad(set_to_none=True)
    want = reference(model, ids, labels, attention_mask=mask)
    want.backward()
    g_want = grads(model)
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert g_got.keys() == g_want.keys() and g_got
    for k in g_want:
        torch.testing.assert_close(g_got[k], g_want[k], atol=1e-5, rtol=1e-4)
    k = int((shifted_labels(labels) != IGNORE).sum())
    if expect_selected:
        assert seen[0][:2] == (1, k), seen  # the head ran on the K labelled positions only
    return seen


@pytest.mark.parametrize("target", [["q_proj", "v_proj"], ["q_proj", "lm_head"]])
def test_llama_loss_and_lora_gradients_equal_the_full_logits(target):
    torch.manual_seed(0)
    model = tiny_llama()
    lorafit.inject(model, lorafit.LoraConfig(r=4, target_modules=target, init=False))
    ids, labels, mask = batch()
    check_same(model, ids, labels, mask)


def test_soft_capped_logits_after_the_head_still_apply():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=2.0,
                       max_position_embeddings=64)
    model = Gemma2ForCausalLM(cfg).eval()
    lorafit.inject(model, lorafit.LoraConfig(r=4, target_modules=["q_proj"], init=False))
    ids, labels, mask = batch()
    check_same(model, ids, labels, mask)


def test_no_label_at_all_is_a_zero_loss():
    model = tiny_llama()
    lorafit.inject(model, lorafit.LoraConfig(r=2, target_modules=["q_proj"], init=False))
    ids, _, mask = batch()
    loss = next_token_loss_sum(model, ids, torch.full_like(ids, IGNORE), attention_mask=mask)
    assert loss.item() == 0.0


class HeadOnOtherShapes(nn.Module):
    """A model whose head is called on [B * L, H] (``twice=False``) or twice on [B, L, H]."""

    def __init__(self, twice: bool):
        super().__init__()
        self.emb, self.head, self.twice = nn.Embedding(64, 16), nn.Linear(16, 64), twice

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        if self.twice:
            logits = (self.head(h) + self.head(h * 2)) / 2
        else:
            logits = self.head(h.flatten(0, 1)).view(*h.shape[:2], -1)
        return type("Out", (), {"logits": logits})()


@pytest.mark.parametrize("twice", [False, True])
def test_heads_called_otherwise_fall_back_to_the_full_logits(twice):
    torch.manual_seed(0)
    model = HeadOnOtherShapes(twice)
    ids, labels, mask = batch()
    seen = check_same(model, ids, labels, mask, expect_selected=False)
    assert seen[-1][0] != 1  # the last forward (the fallback or the declined hook) ran on every position


def test_compiled_model_keeps_the_full_path():
    model = tiny_llama()
    lorafit.inject(model, lorafit.LoraConfig(r=2, target_modules=["q_proj"], init=False))
    compiled = torch.compile(model, backend="eager")
    ids, labels, mask = batch()
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape)))
    got = next_token_loss_sum(compiled, ids, labels, attention_mask=mask)
    handle.remove()
    torch.testing.assert_close(got, reference(model, ids, labels, attention_mask=mask), atol=1e-4, rtol=1e-5)
    assert seen and seen[0][:2] == tuple(ids.shape)
