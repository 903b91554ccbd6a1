"""The fused op's values and gradients equal a plain autograd reference (fp32 and bf16), and it saves
only what the module docstring promises."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lorafit
from lorafit.functional import lora_add_, lora_linear
from tests.api.lora_reference import ROUNDINGS, assert_within, unit_roundoff


def reference(x, w, b, a, bb, s):
    dtype = x.dtype
    return F.linear(x, w, b) + F.linear(F.linear(x, a.to(dtype)), bb.to(dtype)) * s


def _run(impl, x0, w, bias, a0, b0, s, g, fused):
    """(y, dX, dA, dB) of one implementation; ``impl`` "fast" is lorafit's, "ref" the plain graph."""
    x = x0.clone().requires_grad_(True)
    a = a0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    if impl == "ref":
        y = reference(x, w, bias, a, b, s)
    elif fused:
        y = lora_linear(x, w, bias, a, b, s)
    else:
        y = lora_add_(F.linear(x, w, bias), x, a, b, s)
    (y.to(g.dtype) * g).sum().backward()
    return y.detach(), x.grad, a.grad, b.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [True, False])
def test_gradients_match_reference(dtype, fused):
    """Random values against a float64 reference, under the derived bound (lora_reference).

    The bound is computed from the reference's own graph on absolute values (every op here is
    bilinear, so the gradients at |x|, |W|, |A|, |B|, |g| are exactly the absref of dX, dA, dB).
    """
    torch.manual_seed(1)
    x0 = torch.randn(3, 7, 16, dtype=dtype)
    w = torch.randn(12, 16, dtype=dtype)
    bias = torch.randn(12, dtype=dtype)
    a0 = torch.randn(4, 16)  # fp32 master weights
    b0 = torch.randn(12, 4)
    s = 2.5
    g = torch.randn(3, 7, 12).to(dtype)
    got = _run("fast", x0, w, bias, a0, b0, s, g, fused)
    f64 = [t.double() for t in (x0, w, bias, a0.to(dtype), b0.to(dtype))]  # the op casts A, B to x's dtype
    want = _run("ref", *f64, s, g.double(), True)
    absref = _run("ref", *[t.abs() for t in f64], s, g.double().abs(), True)
    n = 16 + 12 + 21 + 4  # in + out + tokens + rank: longer than any inner product here
    for what, got_t, want_t, abs_t in zip(("y", "dX", "dA", "dB"), got, want, absref):
        assert_within(got_t, want_t, (ROUNDINGS + n) * unit_roundoff(dtype) * abs_t, f"{dtype} {what}")
    assert got[2].dtype == torch.float32 and got[3].dtype == torch.float32  # fp32 master grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [True, False])
def test_exact_on_integer_values(dtype, fused):
    """Deterministic, zero tolerance: small integers and s = 2 make every product and partial sum
    exactly representable even in bf16 (all magnitudes below 256, computed below), so the op
    must equal the float64 reference bit for bit, in any summation order. A LoRA term off by
    even 5% (a wrong scaling, a lost rounding-free factor) cannot pass, whatever the dtype.

    Bounds (sums of |terms|, which also bound every partial sum): xA^T <= 16; y <= 16 + 2 +
    2*4*16 = 146; dY B <= 12; dX <= 12 + 2*4*12 = 108; dA: 10 tokens * 12 = 120 before the
    factor 2; dB: 10 * 16 = 160 before the factor 2 (even products stay exact up to 512).
    """
    gen = torch.Generator().manual_seed(3)

    def ints(*shape, hi=1, dt=dtype):
        return torch.randint(-hi, hi + 1, shape, generator=gen).to(dt)

    x0, w, bias = ints(2, 5, 16), ints(12, 16), ints(12, hi=2)
    a0, b0 = ints(4, 16, dt=torch.float32), ints(12, 4, dt=torch.float32)
    g = ints(2, 5, 12)
    s = 2.0
    got = _run("fast", x0, w, bias, a0, b0, s, g, fused)
    want = _run("ref", *(t.double() for t in (x0, w, bias, a0, b0)), s, g.double(), True)
    assert want[0].abs().max() < 256 and want[1].abs().max() < 256
    for what, got_t, want_t in zip(("y", "dX", "dA", "dB"), got, want):
        assert_within(got_t, want_t, torch.zeros_like(want_t), f"{dtype} {what} (exact)")
    lora = s * (x0.double() @ a0.double().t() @ b0.double().t())
    assert (0.05 * lora).abs().max() >= 1  # a 5%-off LoRA term would change some output by >= 1


class _OwnForward(nn.Linear):
    """A base whose forward is not nn.Linear's: lorafit runs it, then adds the LoRA term in place."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


@pytest.mark.parametrize("base", [nn.Linear, _OwnForward], ids=["fused", "added"])
def test_saves_only_input_and_xa_bf16(base):
    """Saved for backward, every tensor (bf16 activations, fp32 adapters, three sibling layers
    reading one x): per layer exactly x itself (same storage, same dtype: not a copy, not an
    upcast) and x @ A^T [T, r] in bf16; everything else saved is a parameter, not a copy of one.
    Both paths: the fused op (nn.Linear) and base-then-add (any other base, e.g. quantized).
    """

    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = base(64, 64), base(64, 32), base(64, 32)

        def forward(self, x):
            return self.q(x), self.k(x), self.v(x)

    model = lorafit.inject(QKV().to(torch.bfloat16), lorafit.LoraConfig(r=4, target_modules=["q", "k", "v"]))
    assert model.q.adapters["default"].lora_A.dtype == torch.float32
    model.train()
    x = torch.randn(2, 8, 64, dtype=torch.bfloat16, requires_grad=True)
    # a parameter may be saved as a view (F.linear saves W^T): same storage, dtype and size
    params = {(p.untyped_storage().data_ptr(), p.dtype, p.numel()) for p in model.parameters()}
    saved = []

    def pack(t):
        saved.append((t.data_ptr(), t.dtype, tuple(t.shape), t.untyped_storage().data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = model(x)
    x_key = (x.data_ptr(), x.dtype, tuple(x.shape), x.untyped_storage().data_ptr())
    as_x = [t for t in saved if t == x_key]
    xa = [t for t in saved if t[1:3] == (torch.bfloat16, (16, 4))]
    rest = [t for t in saved if t not in as_x and t not in xa]
    assert len(as_x) == 3, f"x must be saved once per layer, shared by the siblings: {[t[1:3] for t in saved]}"
    assert len(xa) == 3 and len({t[0] for t in xa}) == 3, xa
    odd = [t[1:3] for t in rest if (t[3], t[1], math.prod(t[2])) not in params]
    assert not odd, f"saved tensors that are neither x, xA^T nor a parameter: {odd}"
    x_storage = x.untyped_storage().data_ptr()
    assert not [t for t in rest + xa if t[3] == x_storage]  # nothing else aliases or copies x
    sum(o.float().sum() for o in outs).backward()  # and what was saved is enough for backward
    assert model.v.adapters["default"].lora_A.grad is not None and x.grad is not None


@pytest.mark.parametrize("train_w", [False, True], ids=["frozen_w", "trained_w"])
def test_dropout_saves_x_only_when_w_trains(train_w):
    """With adapter dropout the LoRA term reads x_l = dropout(x): the fused op saves x_l and x A^T, and x
    itself (not a copy) only when W needs a gradient; a frozen base adds no activation-sized tensor."""
    lin = nn.Linear(64, 32).requires_grad_(train_w)
    x = torch.randn(2, 8, 64, requires_grad=True)
    a, b = torch.randn(4, 64, requires_grad=True), torch.randn(32, 4, requires_grad=True)

    def saved_like_x(fn):  # the saved tensors with x's shape and dtype (activation-sized)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = fn()
        return out, [t for t in saved if t.shape == x.shape and t.dtype == x.dtype]

    _, by_dropout = saved_like_x(lambda: F.dropout(x, 0.5, True))  # what torch's dropout itself keeps
    y, saved = saved_like_x(lambda: lora_linear(x, lin.weight, lin.bias, a, b, 2.0, dropout=0.5, training=True))
    assert len(saved) == len(by_dropout) + 1 + train_w, [t.shape for t in saved]
    as_x = [t for t in saved if t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()]
    assert len(as_x) == train_w
    y.sum().backward()
    assert a.grad is not None and x.grad is not None and (lin.weight.grad is not None) == train_w

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
