"""The fused op's values and gradients equal a plain autograd reference (fp32 and bf16)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lorafit
from lorafit.functional import lora_add_, lora_linear


def reference(x, w, b, a, bb, s):
    dtype = x.dtype
    return F.linear(x, w, b) + F.linear(F.linear(x, a.to(dtype)), bb.to(dtype)) * s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [True, False])
def test_gradients_match_reference(dtype, fused):
    torch.manual_seed(1)
    x0 = torch.randn(3, 7, 16, dtype=dtype)
    w = torch.randn(12, 16, dtype=dtype)
    bias = torch.randn(12, dtype=dtype)
    a0 = torch.randn(4, 16) * 0.1  # fp32 master weights
    b0 = torch.randn(12, 4) * 0.1
    s = 2.5
    g = torch.randn(3, 7, 12).to(dtype)
    grads = []
    for impl in ("fast", "ref"):
        x = x0.clone().requires_grad_(True)
        a = a0.clone().requires_grad_(True)
        b = b0.clone().requires_grad_(True)
        if impl == "ref":
            y = reference(x, w, bias, a, b, s)
        elif fused:
            y = lora_linear(x, w, bias, a, b, s)
        else:
            y = lora_add_(F.linear(x, w, bias), x, a, b, s)
        (y.float() * g.float()).sum().backward()
        grads.append((y.detach().float(), x.grad.float(), a.grad, b.grad))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.15, rtol=0.05)
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, **tol)
    assert grads[0][2].dtype == torch.float32 and grads[0][3].dtype == torch.float32  # fp32 master grads


def test_saves_only_input_and_xa():
    """Saved for backward: x (shared) and x@A^T - not an fp32 copy, not a dropout copy."""
    lin = nn.Sequential(nn.Linear(64, 64))
    lorafit.inject(lin, lorafit.LoraConfig(r=4, target_modules=["0"]))
    x = torch.randn(8, 64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lin(x).sum()
    activation = [t for t in saved if t.shape[0] == 8]
    assert {tuple(t.shape) for t in activation} == {(8, 64), (8, 4)}
    assert any(t.data_ptr() == x.data_ptr() for t in activation)


def test_dropout_and_several_adapters_match_reference():
    base = nn.Sequential(nn.Linear(10, 6))
    model = lorafit.inject(base, lorafit.LoraConfig(r=2, target_modules=["0"], init=False))
    lorafit.inject(model, lorafit.LoraConfig(r=3, alpha=5, target_modules=["0"], init=False), adapter="b")
    lorafit.set_adapter(model, ["default", "b"])
    x = torch.randn(4, 10)
    layer = model[0]
    want = layer.base_layer(x)
    for ad in layer.adapters.values():
        want = want + (x @ ad.lora_A.t() @ ad.lora_B.t()) * ad.scaling
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=0)


def test_autocast_bf16_runs_and_grads_fp32():
    model = lorafit.inject(nn.Sequential(nn.Linear(16, 8)), lorafit.LoraConfig(r=2, target_modules=["0"]))
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert model[0].adapters["default"].lora_A.grad.dtype == torch.float32


def test_bf16_model_keeps_fp32_master_weights():
    model = lorafit.inject(nn.Sequential(nn.Linear(16, 8)).to(torch.bfloat16), lorafit.LoraConfig(r=2))
    ad = model[0].adapters["default"]
    assert ad.lora_A.dtype == torch.float32
    y = model(torch.randn(3, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
