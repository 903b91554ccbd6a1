"""Properties of the NF4 / int8 frozen bases against the ORIGINAL weight, not their own decoder.

NF4's documented guarantee (quant/formats.py): value i lies in block i // block_size of the
flattened weight, is decoded as level * scale with scale >= that block's absmax (double
quantization rounds scales up), so |decoded - w| <= scale * NF4_MAX_HALF_GAP. The blocks are
given very different magnitudes here, so decoding with a neighbouring block's scale, or the
wrong half of a byte, breaks the bound. The layer's forward and a LoRA on top are checked
against x @ W^T with the original W plus that per-weight error, and ``merge_error`` against
the error actually added.
"""

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st
from tests.property.prop_helpers import (
    PROP, PROP_EACH, Wrap, add_adapters, adapter_specs, assert_within, bound, scaling_of, unit,
)

import lorafit
from lorafit.quant import Int8Linear, NF4Linear
from lorafit.quant.formats import NF4_MAX_HALF_GAP, SCALE_GROUP

U32 = unit(torch.float32)


@st.composite
def nf4_cases(draw):
    """(weight [out, in] fp32 with per-block magnitudes 1e-3..1e2, block_size, double_quant, gen)."""
    block = draw(st.sampled_from((2, 4, 8, 16, 30, 64)))
    out_f = draw(st.integers(1, 12))
    # in_features a multiple of block / gcd(block, out) so that block divides out * in
    in_f = draw(st.integers(1, 6)) * (block // math.gcd(block, out_f))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    n_blocks = out_f * in_f // block
    mags = 10.0 ** (torch.rand(n_blocks, generator=gen, dtype=torch.float64) * 5 - 3)
    w = (torch.randn(n_blocks, block, generator=gen, dtype=torch.float64) * mags[:, None]).float()
    return w.reshape(out_f, in_f), block, draw(st.booleans()), gen


def per_weight_error(w: torch.Tensor, block: int, scales: torch.Tensor) -> torch.Tensor:
    """[out, in] allowed |decoded - w|: the weight's own block scale (by flat index) * half gap."""
    blk = torch.arange(w.numel()) // block
    return (scales.double()[blk] * NF4_MAX_HALF_GAP * (1 + 4 * U32)).reshape(w.shape)


def effective_scales(layer: NF4Linear, w: torch.Tensor, block: int) -> torch.Tensor:
    """The layer's block scales, checked independently: absmax <= scale <= absmax + 2 steps."""
    absmax = w.detach().reshape(-1, block).abs().amax(1).double()
    scales = layer.block_scales().double()
    assert scales.shape == absmax.shape
    if not layer.double_quant:
        assert torch.equal(scales, absmax)
        return scales
    pad = (-absmax.numel()) % SCALE_GROUP
    grouped = torch.cat([absmax, absmax[-1:].expand(pad)]).view(-1, SCALE_GROUP)
    step = ((grouped.amax(1) - grouped.amin(1)) / 255).repeat_interleave(SCALE_GROUP)[: absmax.numel()]
    assert bool((scales >= absmax).all()), "a double-quantized scale below its block's absmax clips values"
    assert bool((scales <= absmax + 2 * step + 4 * U32 * absmax).all())
    return scales


@PROP
@given(nf4_cases())
def test_nf4_decode_within_block_bound_of_original(case):
    w, block, dq, _ = case
    layer = NF4Linear.from_linear(_linear(w), block_size=block, double_quant=dq)
    scales = effective_scales(layer, w, block)
    assert_within(layer.dequantize(torch.float32), w.double(), per_weight_error(w, block, scales),
                  f"NF4 decode (block {block}, double_quant={dq})")


def _linear(w: torch.Tensor, bias: bool = False) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
@PROP_EACH
@given(nf4_cases(), adapter_specs(max_adapters=1, allow_dropout=False))
def test_quantized_lora_forward_within_bound_of_original_weight(fmt, case, spec_active):
    """y = x W^T + s x A^T B^T with the ORIGINAL W, up to the format's per-weight error."""
    w, block, dq, gen = case
    (spec,), _ = spec_active
    base = Wrap(_linear(w))
    if fmt == "nf4":
        q = NF4Linear.from_linear(base.layer, block_size=block, double_quant=dq)
        err_w = per_weight_error(w, block, effective_scales(q, w, block))
    else:
        q = Int8Linear.from_linear(base.layer)
        # round to nearest of absmax(row) / 127 steps: half a step per weight
        err_w = (w.abs().amax(1, keepdim=True).double() / 127 / 2 * (1 + 4 * U32)).expand(w.shape)
    model = Wrap(q)
    add_adapters(model, [spec], [0], gen)
    ad = model.layer.adapters["a0"]
    x = torch.randn(3, w.shape[1], generator=gen, dtype=torch.float64).float()
    s = scaling_of(spec)
    xd = x.double()
    lora = s * (xd @ ad.lora_A.double().t()) @ ad.lora_B.double().t()
    ref = xd @ w.double().t() + lora
    absref = xd.abs() @ (w.double().abs() + err_w).t() + s * (xd.abs() @ ad.lora_A.double().abs().t()) @ \
        ad.lora_B.double().abs().t()
    allowed = xd.abs() @ err_w.t() + bound(absref, torch.float32, w.shape[1] + spec["r"])
    with torch.no_grad():
        got = model(x)
    assert_within(got, ref, allowed, f"{fmt} LoRA forward")


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
@PROP_EACH
@given(nf4_cases(), adapter_specs(max_adapters=1, allow_dropout=False))
def test_merge_error_is_the_error_actually_added(fmt, case, spec_active):
    """merge_error == max |stored weight after merge - (stored weight before + s B A)|, recomputed here."""
    w, block, dq, gen = case
    (spec,), _ = spec_active
    q = (NF4Linear.from_linear(_linear(w), block_size=block, double_quant=dq) if fmt == "nf4"
         else Int8Linear.from_linear(_linear(w)))
    model = Wrap(q)
    add_adapters(model, [spec], [0], gen)
    ad = model.layer.adapters["a0"]
    before = q.dequantize(torch.float32).double()
    delta = scaling_of(spec) * ad.lora_B.double() @ ad.lora_A.double()
    lorafit.merge(model)
    after = q.dequantize(torch.float32).double()
    want = (after - (before + delta)).abs().max().item()
    # merge_delta_ forms the target in fp32 (before + delta rounded: u32 per element)
    slack = 4 * U32 * (before.abs() + delta.abs()).max().item() + (spec["r"] + 2) * U32 * delta.abs().max().item()
    got = model.layer.merge_error
    assert abs(got - want) <= slack, f"merge_error {got!r} but the merge added {want!r} (slack {slack:.3g})"
