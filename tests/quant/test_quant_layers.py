"""Quantized layers: storage and matmul against an independent NF4 / int8 reference, gradients, what
autograd saves."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.quant.nf4_reference import (NF4_TABLE, double_quant_scales_ref, int8_dequantize_ref, nf4_dequantize_ref,
                           nf4_levels_from_normal_quantiles, nf4_quantize_ref, nf4_unpack_ref)

from lorafit.quant import Int8Linear, NF4Linear

KINDS = [(NF4Linear, {}), (NF4Linear, {"double_quant": True, "block_size": 32}), (Int8Linear, {})]


def _layer(cls, kw, dtype=torch.float32, bias=True):
    torch.manual_seed(0)
    lin = nn.Linear(128, 96, bias=bias).to(dtype)
    return lin, cls.from_linear(lin, **kw)


def test_reference_table_is_the_papers():
    """The reference's NF4 table is QLoRA's: N(0, 1) quantiles at the paper's offset, normalised.

    bitsandbytes computed the table from float32 probabilities: an error of 2^-24 in p moves the
    outermost quantile (slope 1 / pdf(1.85) ~ 14) by ~1e-6 at most, before normalising.
    """
    levels = nf4_levels_from_normal_quantiles()
    torch.testing.assert_close(torch.tensor(NF4_TABLE, dtype=torch.float64), levels, rtol=0, atol=1e-6)
    assert len(set(NF4_TABLE)) == 16 and NF4_TABLE[7] == 0.0 and NF4_TABLE[0] == -1.0 and NF4_TABLE[-1] == 1.0


def _reference_weight(cls, kw, lin, q):
    """The decoded weight [out, in] fp32 from the from-scratch reference (nf4_reference).

    NF4: absmax and codes are re-derived from the original weight (double quantization: the
    codes against the effective scales decoded from the stored 8-bit scales, which must cover
    every block's absmax and exceed it by less than one step); only where a value lies within
    1e-6 of the midpoint between two levels may the layer's code differ from the reference's.
    """
    if cls is Int8Linear:
        return int8_dequantize_ref(lin.weight)
    block = kw.get("block_size", 64)
    codes_ref, absmax, ambiguous = nf4_quantize_ref(lin.weight, block)
    if kw.get("double_quant"):
        scales = double_quant_scales_ref(q.weight_absmax_q, q.weight_absmax_lo, q.weight_absmax_step)
        step = q.weight_absmax_step.repeat_interleave(256)[: scales.numel()]
        assert (scales >= absmax).all() and (scales - absmax <= step * 1.001).all()
        codes_ref, _, ambiguous = nf4_quantize_ref(lin.weight, block, scales)
    else:
        scales = absmax
        assert torch.equal(q.weight_absmax, absmax)
    codes = nf4_unpack_ref(q.weight_packed)
    assert torch.equal(codes[~ambiguous], codes_ref[~ambiguous].to(codes.dtype)), "NF4 codes differ from the paper's"
    assert ambiguous.float().mean() < 0.01
    return nf4_dequantize_ref(codes, scales, lin.weight.shape)


@pytest.mark.parametrize("cls,kw", KINDS + [(NF4Linear, {"block_size": 6})])  # 2048 blocks of 6: odd half-block
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_matches_independent_reference(cls, kw, dtype):
    lin, q = _layer(cls, kw, dtype)
    assert q.compute_dtype == dtype and q.bias.dtype == dtype
    w_ref = _reference_weight(cls, kw, lin, q)
    torch.testing.assert_close(q.dequantize(torch.float32), w_ref, rtol=0, atol=0)
    x = torch.randn(2, 5, 128).to(dtype)
    y = q(x)
    ref = F.linear(x, w_ref.to(dtype), lin.bias)  # the same decoded weight: the same GEMM, bit for bit
    assert y.dtype == dtype and y.shape == (2, 5, 96)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
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
