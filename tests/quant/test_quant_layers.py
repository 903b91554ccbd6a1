"""Quantized layers: matmul against a dequantized reference, gradients, what autograd saves."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorafit.quant import Int8Linear, NF4Linear

KINDS = [(NF4Linear, {}), (NF4Linear, {"double_quant": True, "block_size": 32}), (Int8Linear, {})]


def _layer(cls, kw, dtype=torch.float32, bias=True):
    torch.manual_seed(0)
    lin = nn.Linear(128, 96, bias=bias).to(dtype)
    return lin, cls.from_linear(lin, **kw)


@pytest.mark.parametrize("cls,kw", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_matches_dequantized_reference(cls, kw, dtype):
    lin, q = _layer(cls, kw, dtype)
    assert q.compute_dtype == dtype and q.bias.dtype == dtype
    x = torch.randn(2, 5, 128).to(dtype)
    y = q(x)
    ref = F.linear(x, q.dequantize(), lin.bias)
    assert y.dtype == dtype and y.shape == (2, 5, 96)
    torch.testing.assert_close(y, ref)
    # and the quantized layer stays close to the original one
    rel = (y.float() - lin(x).float()).norm() / lin(x).float().norm()
    assert rel < (0.15 if cls is NF4Linear else 0.02)


@pytest.mark.parametrize("cls,kw", KINDS)
def test_gradient_reaches_input_only(cls, kw):
    _, q = _layer(cls, kw)
    q.bias.requires_grad_(False)
    assert not any(p.requires_grad for p in q.parameters())
    assert all(not b.is_floating_point() or not b.requires_grad for b in q.buffers())
    x = torch.randn(4, 128, requires_grad=True)
    g = torch.randn(4, 96)
    q(x).backward(g)
    torch.testing.assert_close(x.grad, g @ q.dequantize())
    assert all(b.grad is None for b in q.buffers())


def test_bias_gradient_when_trainable():
    _, q = _layer(NF4Linear, {})
    x = torch.randn(3, 128)
    q(x).sum().backward()
    torch.testing.assert_close(q.bias.grad, torch.full((96,), 3.0))


@pytest.mark.parametrize("cls,kw", KINDS)
def test_no_full_precision_weight_saved_for_backward(cls, kw):
    lin, q = _layer(cls, kw)
    lin.requires_grad_(False)

    def saved_weight_like(layer):
        found = []

        def pack(t):
            if t.is_floating_point() and t.numel() == 96 * 128:
                found.append(t)
            return t

        x = torch.randn(4, 128, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x).sum().backward()
        return found

    assert saved_weight_like(lin), "control: a frozen nn.Linear saves its weight for dX"
    assert saved_weight_like(q) == []


def test_inplace_merge_between_forward_and_backward_is_caught():
    _, q = _layer(NF4Linear, {})
    x = torch.randn(2, 128, requires_grad=True)
    y = q(x)
    q.merge_delta_(torch.full((96, 128), 0.01))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("cls,kw", KINDS)
def test_merge_delta_reports_the_added_error(cls, kw):
    _, q = _layer(cls, kw)
    delta = torch.randn(96, 128) * 0.02
    target = q.dequantize(torch.float32) + delta
    err = q.merge_delta_(delta)
    actual = (q.dequantize(torch.float32) - target).abs().max().item()
    assert err == pytest.approx(actual) and 0 < err < 0.05
    with pytest.raises(ValueError, match="shape"):
        q.merge_delta_(torch.zeros(128, 96))


@pytest.mark.parametrize("cls,kw", KINDS)
def test_to_linear_and_dtype_moves(cls, kw):
    lin, q = _layer(cls, kw)
    out = q.to_linear()
    assert type(out) is nn.Linear and out.weight.dtype == torch.float32
    torch.testing.assert_close(out.weight, q.dequantize())
    torch.testing.assert_close(out.bias, lin.bias)
    assert q.to_linear(torch.bfloat16).weight.dtype == torch.bfloat16
    scales_before = [b.clone() for b in q.buffers()]
    q.to(torch.bfloat16)  # compute dtype follows, scales stay exact fp32
    assert q.compute_dtype == torch.bfloat16 and q.bias.dtype == torch.bfloat16
    for before, after in zip(scales_before, q.buffers()):
        assert after.dtype == before.dtype and torch.equal(after, before)
    assert q.dequantize().dtype == torch.bfloat16
    assert q(torch.randn(2, 128, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_inference_mode_and_no_bias():
    _, q = _layer(Int8Linear, {}, bias=False)
    assert q.bias is None
    with torch.inference_mode():
        y = q(torch.randn(3, 128))
    assert y.shape == (3, 96)
