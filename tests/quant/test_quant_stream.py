"""Quantize while loading (lorafit.quant.load_streamed): the same model as load-then-quantize, tensor by tensor."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import lorafit
from lorafit.quant import empty_weights, load_streamed


def _save(tmp_path, tie=False, shard=None):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path, **kwargs)
    return cfg


def _skeleton(cfg, dtype=None):
    with empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype) if dtype else AutoModelForCausalLM.from_config(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())  # computed buffers (rotary tables) stay real
    return model


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
@pytest.mark.parametrize("shard", [None, "60KB"], ids=["one-file", "sharded"])
def test_streamed_equals_load_then_quantize(tmp_path, fmt, shard):
    cfg = _save(tmp_path, shard=shard)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    ref = lorafit.quantize(AutoModelForCausalLM.from_pretrained(tmp_path), fmt)
    got = load_streamed(_skeleton(cfg), tmp_path, fmt=fmt)
    ref_state, got_state = ref.state_dict(), got.state_dict()
    assert ref_state.keys() == got_state.keys()
    for k in ref_state:
        assert torch.equal(ref_state[k], got_state[k]), k
    ids = torch.randint(0, 96, (2, 10))
    torch.testing.assert_close(got(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0)
    assert sorted(lorafit.quant.quantized_modules(got)) == sorted(lorafit.quant.quantized_modules(ref))


def test_tied_embeddings_and_plain_bf16_load(tmp_path):
    cfg = _save(tmp_path, tie=True)
    got = load_streamed(_skeleton(cfg, torch.bfloat16), tmp_path, fmt=None, dtype=torch.bfloat16)
    assert got.lm_head.weight is got.model.embed_tokens.weight
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for k, v in ref.state_dict().items():
        assert got.state_dict()[k].dtype == torch.bfloat16 and torch.equal(got.state_dict()[k], v), k
    nf4 = load_streamed(_skeleton(cfg), tmp_path, fmt="nf4", dtype=torch.bfloat16)
    assert nf4.lm_head.weight is nf4.model.embed_tokens.weight  # the output layer stays full precision, tied
    assert next(iter(lorafit.quant.quantized_modules(nf4).values())).compute_dtype == torch.bfloat16


def test_a_checkpoint_that_does_not_fit_is_named(tmp_path):
    _save(tmp_path)
    other = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=32)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight' has shape"):
        load_streamed(_skeleton(other), tmp_path, fmt="nf4")
    deeper = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    with pytest.raises(ValueError, match="no tensor for .* model tensor"):
        load_streamed(_skeleton(deeper), tmp_path, fmt="nf4")
    with pytest.raises(ValueError, match="no .safetensors checkpoint"):
        load_streamed(_skeleton(deeper), tmp_path / "nothing-here", fmt="nf4")
