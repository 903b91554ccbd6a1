"""LoRA on bitsandbytes bases (issue 13 point 4): a tiny Llama loaded by transformers with
BitsAndBytesConfig (4-bit NF4 and 8-bit), injected, trained, saved for PEFT, merged.

Runs where bitsandbytes runs: on CUDA when there is a GPU, else on bitsandbytes' CPU backend
(0.50 runs Linear4bit / Linear8bitLt forward and backward on CPU); if neither works the tests
skip with the device and bitsandbytes' own error.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

import lorafit
from lorafit.layers import BnbLora

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (the bnb extra)")
transformers = pytest.importorskip("transformers")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@functools.cache
def bnb_problem() -> str | None:
    """Why bitsandbytes cannot run a Linear4bit / Linear8bitLt forward + backward on DEVICE (None: it can)."""
    try:
        for layer in (bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4"),
                      bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False)):
            layer = layer.to(DEVICE)
            x = torch.randn(2, 64, device=DEVICE, requires_grad=True)
            layer(x).sum().backward()
            assert x.grad is not None and torch.isfinite(x.grad).all()
    except Exception as exc:  # noqa: BLE001 - any failure of the backend is the skip reason
        return f"bitsandbytes {bnb.__version__} does not run on {DEVICE}: {type(exc).__name__}: {exc}"
    return None


@pytest.fixture(autouse=True)
def _needs_backend():
    if bnb_problem():
        pytest.skip(bnb_problem())


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    """A tiny Llama (hidden 64: a multiple of bitsandbytes' 4-bit block) saved with random weights."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    d = tmp_path_factory.mktemp("llama-fp32")
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def load(float_dir, bits):
    qc = (transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float32) if bits == 4
          else transformers.BitsAndBytesConfig(load_in_8bit=True))
    return transformers.AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=qc,
                                                             device_map={"": DEVICE})


def bnb_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


def ids(seed=0):
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("bits", [4, 8])
def test_inject_trains_the_adapter_and_the_base_stays_quantized(float_dir, bits):
    model = load(float_dir, bits)
    storage = {n: m.weight.data.clone() for n, m in bnb_layers(model).items()}
    assert len(storage) == 14 and {v.dtype for v in storage.values()} == {torch.uint8 if bits == 4 else torch.int8}
    lorafit.inject(model, lorafit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, BnbLora)}
    assert sorted(n.rsplit(".", 1)[1] for n in wrapped) == sorted(TARGETS * 2)
    assert not isinstance(model.lm_head, BnbLora)  # the output layer is not "all-linear"
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # fp32 masters
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    batch = ids()
    losses = []
    for _ in range(6):
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for name, layer in wrapped.items():
        assert layer.adapters["default"].lora_B.abs().sum() > 0, name  # every adapter learned
        assert torch.equal(layer.base_layer.weight.data, storage[name]), name  # the base did not move


@pytest.mark.parametrize("bits", [4, 8])
def test_wrapped_layer_is_the_decoded_weight_plus_the_update(float_dir, bits):
    from lorafit.layers.bnb import dequantize

    model = load(float_dir, bits).train()
    lorafit.inject(model, lorafit.LoraConfig(r=4, alpha=8, target_modules=["down_proj"], init=False))
    layer = model.model.layers[0].mlp.down_proj
    ad = layer.adapters["default"]
    x = torch.randn(3, 128, device=DEVICE, requires_grad=True)
    y = layer(x)
    w = dequantize(layer.base_layer).float()  # [64, 128]
    a, b = ad.lora_A.detach().clone().requires_grad_(), ad.lora_B.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    ref = F.linear(xr, w) + F.linear(F.linear(xr, a), b) * ad.scaling
    tol = 1e-5 if bits == 4 else 2e-2  # 8-bit: bitsandbytes multiplies int8-rounded inputs
    assert torch.allclose(y, ref, atol=tol * ref.abs().max().item(), rtol=0)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    assert torch.allclose(ad.lora_B.grad, b.grad, rtol=1e-4, atol=1e-5)
    assert torch.allclose(ad.lora_A.grad, a.grad, rtol=1e-4, atol=1e-5)
    assert torch.allclose(x.grad, xr.grad, rtol=0, atol=tol * xr.grad.abs().max().item())


def test_training_after_an_eval_pass_keeps_correct_gradients(float_dir):
    """bitsandbytes repacks a Linear4bit for inference on some CPUs in an eval forward, into a layout
    whose op has no backward; the wrapper restores the standard layout before a training forward."""
    grads = []
    for eval_first in (False, True):
        model = load(float_dir, 4)
        torch.manual_seed(0)  # the same random adapters in both models
        lorafit.inject(model, lorafit.LoraConfig(r=4, alpha=8, target_modules="all-linear", init=False))
        if eval_first:
            with torch.no_grad():
                model.eval()(ids(1))
        model.train()
        batch = ids()
        model(batch, labels=batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("bits, dtype", [(4, torch.float32), (4, torch.bfloat16), (8, torch.float32)])
def test_merge_and_unload_dequantizes_to_a_plain_model(float_dir, bits, dtype):
    from lorafit.layers.bnb import dequantize

    model = load(float_dir, bits).train()
    lorafit.inject(model, lorafit.LoraConfig(r=4, alpha=8, target_modules="all-linear", init=False))
    batch = ids()
    with torch.no_grad():
        y = model(batch).logits
    expected = {}
    for name, m in model.named_modules():
        if isinstance(m, BnbLora):
            ad = m.adapters["default"]
            expected[name] = dequantize(m.base_layer).float() + (ad.lora_B @ ad.lora_A).float() * ad.scaling
    merged = lorafit.merge_and_unload(model, dtype=dtype)
    assert not bnb_layers(merged) and not any(isinstance(m, BnbLora) for m in merged.modules())
    for name, w in expected.items():
        layer = merged.get_submodule(name)
        assert type(layer) is torch.nn.Linear and layer.weight.dtype == dtype, name
        assert torch.allclose(layer.weight.float(), w, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-2), name
    plain = transformers.LlamaForCausalLM(merged.config)  # the keys of a float model
    plain.load_state_dict({k: v.float() for k, v in merged.state_dict().items()}, strict=True)
    if dtype == torch.float32:
        with torch.no_grad():
            assert torch.allclose(plain.to(DEVICE)(batch).logits, y, atol=1e-4 if bits == 4 else 5e-2)


def test_in_place_merge_requantizes_and_reports_the_rounding(float_dir):
    from lorafit.layers.bnb import dequantize

    model = load(float_dir, 4).train()
    lorafit.inject(model, lorafit.LoraConfig(r=4, alpha=8, target_modules=["down_proj"], init=False))
    layer = model.model.layers[0].mlp.down_proj
    ad = layer.adapters["default"]
    want = dequantize(layer.base_layer).float() + (ad.lora_B @ ad.lora_A).detach() * ad.scaling
    lorafit.merge(model)
    assert layer.base_layer.weight.dtype == torch.uint8  # still 4-bit
    err = (dequantize(layer.base_layer).float() - want).abs().max().item()
    assert layer.merge_error == pytest.approx(err)
    assert 0 < err < 0.2 * want.abs().max().item()
    lorafit.unmerge(model)
    assert (dequantize(layer.base_layer).float() - (want - (ad.lora_B @ ad.lora_A).detach() * ad.scaling)).abs().max() \
        < 2 * err + 1e-6


@pytest.mark.parametrize("bits", [4, 8])
def test_adapter_from_a_bnb_base_loads_in_peft_onto_the_float_base(float_dir, bits, tmp_path):
    peft = pytest.importorskip("peft")
    model = load(float_dir, bits).train()
    lorafit.inject(model, lorafit.LoraConfig(r=4, alpha=8, target_modules="all-linear", init=False))
    batch = ids()
    with torch.no_grad():
        y_bnb = model(batch).logits
        with lorafit.disabled(model):
            base_bnb = model(batch).logits
    lorafit.save_adapter(model, tmp_path / "adapter")
    float_model = transformers.LlamaForCausalLM.from_pretrained(float_dir).to(DEVICE).eval()
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(float_model), str(tmp_path / "adapter")).eval()
    in_lorafit = copy.deepcopy(float_model)
    lorafit.load_adapter(in_lorafit, tmp_path / "adapter")
    with torch.no_grad():
        y_peft, y_lf, y_float = in_peft(batch).logits, in_lorafit(batch).logits, float_model(batch).logits
    assert torch.allclose(y_peft, y_lf, atol=1e-5)  # the file means the same to PEFT and lorafit
    on_bnb = peft.PeftModel.from_pretrained(load(float_dir, bits), str(tmp_path / "adapter")).train()
    with torch.no_grad():  # PEFT on the same bitsandbytes base: the same numbers as lorafit there
        assert torch.allclose(on_bnb(batch).logits, y_bnb, atol=1e-5 if bits == 4 else 1e-3)
    base_err = (base_bnb - y_float).abs().max().item()  # what quantizing the base costs alone
    assert (y_peft - y_bnb).abs().max().item() <= 2 * base_err
    assert (y_peft - y_float).abs().max().item() > 10 * base_err  # the adapter is not a no-op


@pytest.mark.parametrize("kw, expect", [({"use_dora": True}, "DoRA on a quantized base is not supported"),
                                        ({"init": "pissa"}, "init='pissa' is supported on Linear")])
def test_dora_and_pissa_refuse_a_bnb_base_and_leave_it_unchanged(kw, expect):
    base = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4").to(DEVICE)
    model = torch.nn.Sequential(base)
    with pytest.raises(ValueError, match=expect):
        lorafit.inject(model, lorafit.LoraConfig(r=4, target_modules=["0"], **kw))
    assert model[0] is base
