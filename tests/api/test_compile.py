"""lorafit under ``torch.compile``: no graph breaks, no recompiles across steps, eager's gradients.

A tiny Llama (transformers) in train mode, all linear layers adapted, for each way a user runs
it: plain LoRA (dropout 0 and > 0), two active adapters, DoRA, a QLoRA NF4 base, and
``adapter_batch`` (mixed adapters per row, inference). ``torch._dynamo.explain`` counts the
breaks of the forward; a ``fullgraph=True`` compile then trains a few AdamW steps beside an
eager copy (same start) and must match its losses and gradients and compile one graph only.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorafit

MODES = ["plain", "dropout", "multi", "dora", "nf4", "batch"]


def _model(mode: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg)
    kw = dict(r=4, alpha=8, target_modules="all-linear", init=False, dropout=0.1 if mode == "dropout" else 0.0,
              use_dora=mode == "dora")
    if mode == "nf4":
        lorafit.quantize(model, "nf4")
    lorafit.inject(model, lorafit.LoraConfig(**kw))
    if mode in ("multi", "batch"):
        lorafit.inject(model, lorafit.LoraConfig(**{**kw, "alpha": 4}), adapter="b")
        if mode == "multi":
            lorafit.set_adapter(model, ["default", "b"])
    return model.eval() if mode == "batch" else model.train()


def _ids(seed=1):
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(seed))


def _run(model, mode, ids):
    if mode == "batch":
        with torch.no_grad(), lorafit.adapter_batch(model, ["default", "b"]):
            return model(input_ids=ids).logits
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("mode", MODES)
def test_no_graph_breaks(mode):
    model = _model(mode)
    explained = torch._dynamo.explain(lambda ids: _run(model, mode, ids))(_ids())
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("mode", ["plain", "multi", "dora", "nf4"])
def test_compiled_training_matches_eager_without_recompiles(mode):
    torch._dynamo.reset()
    eager = _model(mode)
    compiled_model = copy.deepcopy(eager)
    step = torch.compile(compiled_model, fullgraph=True, backend="inductor" if mode == "plain" else "aot_eager")
    params_e = [p for p in eager.parameters() if p.requires_grad]
    params_c = [p for p in compiled_model.parameters() if p.requires_grad]
    opt_e, opt_c = torch.optim.AdamW(params_e, lr=1e-2), torch.optim.AdamW(params_c, lr=1e-2)
    torch._dynamo.utils.counters.clear()
    for i in range(3):
        ids = _ids(i)
        loss_e = eager(input_ids=ids, labels=ids).loss
        loss_c = step(input_ids=ids, labels=ids).loss
        loss_e.backward()
        loss_c.backward()
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        for pe, pc in zip(params_e, params_c):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-3, atol=1e-6)
        opt_e.step()
        opt_c.step()
        opt_e.zero_grad()
        opt_c.zero_grad()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # new inputs and weights: no recompile


def test_compiled_dropout_trains_and_compiled_inference_matches_eager():
    model = _model("dropout")
    step = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = step(input_ids=_ids(), labels=_ids()).loss
    loss.backward()
    ads = [m for m in model.modules() if isinstance(m, lorafit.layers.LoraAdapter)]
    assert ads and all(ad.lora_A.grad is not None and ad.lora_B.grad is not None for ad in ads)
    model.eval()  # dropout off: eval output of the compiled model equals eager's
    with torch.no_grad():
        torch.testing.assert_close(step(input_ids=_ids(5)).logits, model(input_ids=_ids(5)).logits,
                                   rtol=1e-5, atol=1e-5)


def test_compiled_adapter_batch_matches_eager():
    model = _model("batch")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids = _ids(7)
    with torch.no_grad(), lorafit.adapter_batch(model, ["default", "b"]):
        want = model(input_ids=ids).logits
        got = compiled(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
