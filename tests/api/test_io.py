"""Saving/loading: the file format, and every bad input giving a clear error with the model unchanged."""

import copy
import json

import pytest
import torch
import torch.nn as nn
from tests.helpers import Tiny, same_state, state, tiny_llama

import lorafit


@pytest.fixture
def saved(tmp_path):
    model = Tiny()
    lorafit.inject(model, lorafit.LoraConfig(r=2, target_modules=["lin", "emb"], init=False, modules_to_save=["cls"]))
    lorafit.save_adapter(model, tmp_path / "a", base_model_name_or_path="tiny")
    return model, tmp_path / "a"


def test_file_layout_and_round_trip(saved):
    model, d = saved
    from safetensors import safe_open
    with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert keys == {"base_model.model.lin.lora_A.weight", "base_model.model.lin.lora_B.weight",
                    "base_model.model.emb.lora_embedding_A", "base_model.model.emb.lora_embedding_B",
                    "base_model.model.cls.weight", "base_model.model.cls.bias"}
    assert meta["format"] == "pt" and len(meta["lorafit_base_fingerprint"]) == 32
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "tiny" and cfg["r"] == 2 and cfg["peft_type"] == "LORA"
    base = copy.deepcopy(model)
    lorafit.unload(base)
    ids = torch.randint(0, 20, (2, 5))
    again = lorafit.load_adapter(base, d)
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids))
    assert not list(d.glob("*.tmp"))


def test_fingerprint_mismatch_warns(saved):
    _, d = saved
    other = Tiny()
    with pytest.warns(UserWarning, match="fingerprint"):
        lorafit.load_adapter(other, d)


def test_fingerprint_holds_for_the_same_base_cast_to_bf16_or_fp16(saved, tmp_path):
    """An adapter trained on an fp32 base loads onto that base in bf16 or fp16 without a mismatch warning;
    other bf16 weights, or a file from before the bf16 fingerprint, still warn."""
    import warnings

    from safetensors.torch import load_file, save_file

    model, d = saved
    base = copy.deepcopy(model)
    lorafit.unload(base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorafit.load_adapter(copy.deepcopy(base).to(torch.bfloat16), d)
        lorafit.load_adapter(copy.deepcopy(base).to(torch.bfloat16).float(), d)  # bf16 and back: same bf16 values
        lorafit.load_adapter(copy.deepcopy(base).to(torch.float16), d)
    trained_bf16 = copy.deepcopy(model).to(torch.bfloat16)  # adapters trained on a bf16-loaded base ...
    lorafit.save_adapter(trained_bf16, tmp_path / "bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorafit.load_adapter(copy.deepcopy(base), tmp_path / "bf16")  # ... load onto its fp32 weights
    other = copy.deepcopy(base).to(torch.bfloat16)
    with torch.no_grad():
        other.lin.weight[0, 0] += 0.5  # the first sampled value
    with pytest.warns(UserWarning, match="fingerprint"):
        lorafit.load_adapter(other, d)
    from safetensors import safe_open
    with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
    meta.pop("lorafit_base_fingerprint_bf16"), meta.pop("lorafit_base_fingerprint_fp16")
    old = tmp_path / "old"
    old.mkdir()
    (old / "adapter_config.json").write_text((d / "adapter_config.json").read_text())
    save_file(load_file(d / "adapter_model.safetensors"), old / "adapter_model.safetensors", metadata=meta)
    with pytest.warns(UserWarning, match="fingerprint"):
        lorafit.load_adapter(copy.deepcopy(base).to(torch.bfloat16), old)


def _assert_load_fails(model, d, match):
    before = state(model)
    types = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=match):
        lorafit.load_adapter(model, d)
    assert same_state(before, state(model)) and types == [type(m) for m in model.modules()]


def test_shape_mismatch_names_key_and_shapes(saved, tmp_path):
    _, d = saved

    class Wider(Tiny):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 13)
            self.cls = nn.Linear(13, 5)

    _assert_load_fails(Wider(), d,
                       r"'base_model.model.lin.lora_B.weight' has shape \(12, 2\) but the model needs \(13, 2\)")


def test_truncated_and_non_safetensors(saved):
    _, d = saved
    f = d / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    _assert_load_fails(Tiny(), d, "adapter_model.safetensors: not a valid safetensors file")
    f.write_bytes(b"PK\x03\x04 this is a zip/pickle, not safetensors")
    _assert_load_fails(Tiny(), d, "not a valid safetensors file")
    f.unlink()
    (d / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    _assert_load_fails(Tiny(), d, "pickled adapters are not loaded")


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.pop("peft_type"), "missing key 'peft_type'"),
    (lambda c: c.pop("r"), "missing key 'r'"),
    (lambda c: c.update(layers_to_transform=[0]), "'layers_to_transform'=\\[0\\] is not supported"),
    (lambda c: c.update(lora_bias=True), "'lora_bias'=True is not supported"),
    (lambda c: c.update(target_parameters=["x.weight"]), "'target_parameters'"),
    (lambda c: c.update(r=0), "r must be an integer >= 1"),
])
def test_bad_config(saved, edit, match):
    _, d = saved
    cfg = json.loads((d / "adapter_config.json").read_text())
    edit(cfg)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    _assert_load_fails(Tiny(), d, match)


def test_bad_json_and_missing_dir(saved, tmp_path):
    _, d = saved
    _assert_load_fails(Tiny(), tmp_path / "nope", "adapter directory not found")
    (d / "adapter_config.json").write_text("{not json")
    _assert_load_fails(Tiny(), d, "adapter_config.json: not valid JSON")


def test_rank_mismatch_with_config(saved):
    _, d = saved
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["r"] = 3
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    _assert_load_fails(Tiny(), d, r"has shape \(2, (8|20)\) but the model needs \(3, (8|20)\)")


def test_unknown_module_in_file(saved):
    _, d = saved

    class Renamed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.other = nn.Linear(8, 12)
            self.cls = nn.Linear(12, 5)

    _assert_load_fails(Renamed(), d, "the model has no module 'lin'")


def test_loading_into_partially_matching_model_does_not_half_modify(tmp_path):
    """A failure on the last layer must not leave the first layers wrapped."""
    model = tiny_llama()
    lorafit.inject(model, lorafit.LoraConfig(r=2, target_modules="all-linear", init=False))
    lorafit.save_adapter(model, tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM
    other = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    _assert_load_fails(other, tmp_path, "mlp.*has shape")


def test_config_validation_and_aliases():
    cfg = lorafit.LoraConfig(lora_alpha=32, lora_dropout=0.1, init_lora_weights="gaussian", target_modules=["q"])
    assert (cfg.alpha, cfg.dropout, cfg.init) == (32, 0.1, "gaussian")
    with pytest.raises(ValueError, match="r must be an integer >= 1"):
        lorafit.LoraConfig(r=0)
    with pytest.raises(ValueError, match="init must be one of"):
        lorafit.LoraConfig(init="zeros")
    with pytest.raises(ValueError, match="dropout must satisfy"):
        lorafit.LoraConfig(dropout=1.0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        lorafit.LoraConfig(alpha=0)
    with pytest.raises(ValueError, match="bias must be one of"):
        lorafit.LoraConfig(bias="some")
    with pytest.raises(TypeError, match="unknown argument 'lora_rank'"):
        lorafit.LoraConfig(lora_rank=4)
    with pytest.raises(AttributeError):
        cfg.r = 4
    assert cfg.replace(r=4).r == 4 and cfg.r == 8
    rs = lorafit.LoraConfig(r=16, alpha=8, use_rslora=True, rank_pattern={"k": 4})
    assert rs.scaling_for("a.q") == pytest.approx(2.0) and rs.scaling_for("a.k") == pytest.approx(4.0)
