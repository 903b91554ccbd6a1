"""save_quantized / load_quantized: round trip into a freshly constructed model."""

import json

import pytest
import torch
from tests.quant.quant_models import make_llama, tiny_llama_config
from safetensors import safe_open
from safetensors.torch import save_file

from lorafit.quant import load_quantized, quantize, quantized_modules, read_quantized_config, save_quantized


@pytest.mark.parametrize("fmt,kw", [("nf4", {}), ("nf4", {"double_quant": True, "block_size": 32}), ("int8", {})])
def test_round_trip_into_fresh_model(tmp_path, ids, fmt, kw):
    model = quantize(make_llama(seed=0), fmt, **kw)
    f = tmp_path / "base.safetensors"
    save_quantized(model, f)
    fresh = make_llama(seed=123)  # different random weights: everything must come from the file
    load_quantized(fresh, f)
    assert quantized_modules(fresh).keys() == quantized_modules(model).keys()
    for n, m in quantized_modules(fresh).items():
        assert m.quant_config() == quantized_modules(model)[n].quant_config()
    assert torch.equal(fresh(ids).logits, model(ids).logits)
    with safe_open(str(f), framework="pt") as h:
        assert h.metadata()["format"] == "pt"
        names = list(h.keys())
    assert not any(k.endswith("q_proj.weight") for k in names)  # no full-precision copy


def test_tied_embeddings_and_meta_skeleton(tmp_path, ids):
    from transformers import LlamaForCausalLM

    model = quantize(make_llama(tie=True), "nf4")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    f = tmp_path / "tied.safetensors"
    save_quantized(model, f)
    assert read_quantized_config(f)["aliases"]  # the tied weight is stored once
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(tiny_llama_config(tie=True))
    load_quantized(skeleton, f)
    skeleton.model.rotary_emb.inv_freq = model.model.rotary_emb.inv_freq  # non-persistent buffer
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight
    assert torch.equal(skeleton.eval()(ids).logits, model(ids).logits)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="no quantized layer"):
        save_quantized(make_llama(), tmp_path / "x.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not written by lorafit.save_quantized"):
        load_quantized(make_llama(), plain)
    f = tmp_path / "q.safetensors"
    save_quantized(quantize(make_llama(), "int8", targets=["q_proj"]), f)
    # a model of another shape
    from transformers import LlamaForCausalLM

    cfg = tiny_llama_config()
    cfg.hidden_size = 32
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.q_proj' is 64x32, the file has 64x64"):
        load_quantized(LlamaForCausalLM(cfg), f)
    # metadata naming a module the model lacks
    meta = read_quantized_config(f)
    meta["modules"]["model.layers.9.self_attn.q_proj"] = meta["modules"]["model.layers.0.self_attn.q_proj"]
    bad = tmp_path / "bad.safetensors"
    with safe_open(str(f), framework="pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    save_file(tensors, str(bad), metadata={"format": "pt", "lorafit_quant": json.dumps(meta)})
    with pytest.raises(ValueError, match="no module 'model.layers.9.self_attn.q_proj'"):
        load_quantized(make_llama(), bad)
