"""NF4 / int8 storage formats: error bounds per block, packing, double quantization."""

import itertools

import pytest
import torch

from lorafit.quant import NF4_CODE, NF4_MAX_HALF_GAP, Int8Linear, NF4Linear, formats


def _weight(out_f, in_f, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    w[3, 5] = 1.7  # an outlier block
    w[7, :64] = 0  # an all-zero block
    return w.to(dtype)


def test_max_half_gap_matches_table():
    gaps = [b - a for a, b in itertools.pairwise(NF4_CODE)]
    assert len(NF4_CODE) == 16 and all(g > 0 for g in gaps)
    assert NF4_MAX_HALF_GAP == pytest.approx((1.0 - 0.6961928009986877) / 2)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nf4_error_bound_per_block(double_quant, dtype):
    w = _weight(48, 256, dtype)
    q = NF4Linear.from_linear(_linear(w), block_size=64, double_quant=double_quant)
    scales = q.block_scales()  # effective scale per block, [n_blocks]
    err = (q.dequantize(torch.float32) - w.float()).reshape(-1, 64).abs()
    bound = scales[:, None] * NF4_MAX_HALF_GAP
    assert torch.all(err <= bound * (1 + 1e-6) + 1e-12)
    # the scale never clips: it is >= the block's absmax (== without double quantization)
    absmax = w.float().reshape(-1, 64).abs().amax(1)
    if double_quant:
        assert torch.all(scales >= absmax) and torch.all(scales - absmax <= absmax.amax() / 255 * 1.01)
    else:
        assert torch.equal(scales, absmax)
    assert torch.all(q.dequantize(torch.float32)[7, :64] == 0)


def test_nf4_packs_two_codes_per_byte():
    w = _weight(32, 128)
    for dq, expect in (
        (False, 32 * 128 // 2 + 4 * 32 * 128 // 64),
        (True, 32 * 128 // 2 + 32 * 128 // 64 + 8),
    ):
        q = NF4Linear.from_linear(_linear(w), double_quant=dq)
        assert q.weight_packed.dtype == torch.uint8 and q.weight_packed.numel() == w.numel() // 2
        assert q.storage_bytes() == expect
    bf16_bytes = w.numel() * 2
    assert NF4Linear.from_linear(_linear(w)).storage_bytes() / bf16_bytes <= 0.30


def test_nf4_nibble_order_and_exact_codes():
    # values exactly on the code table decode exactly; the first value sits in the high nibble
    code = torch.tensor(NF4_CODE)
    idx = torch.tensor([15, 0] + list(range(16)) * 3 + [7] * 14)  # 64 values, absmax 1
    w = (code[idx] * 0.5).view(1, 64)
    s = formats.nf4_quantize(w, 64)
    assert s["packed"][0].item() == (15 << 4) | 0
    assert torch.equal(formats.nf4_dequantize(s["packed"], s["absmax"], (1, 64), torch.float32), w)


def test_requantizing_a_decoded_weight_is_lossless():
    w = _weight(16, 128)
    q = NF4Linear.from_linear(_linear(w))
    packed = q.weight_packed.clone()
    assert q.merge_delta_(torch.zeros(16, 128)) == 0.0
    assert torch.equal(q.weight_packed, packed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_error_bound_per_row(dtype):
    w = _weight(40, 96, dtype)
    q = Int8Linear.from_linear(_linear(w))
    assert q.weight_int8.dtype == torch.int8 and q.weight_scale.shape == (40,)
    err = (q.dequantize(torch.float32) - w.float()).abs()
    assert torch.all(err <= q.weight_scale[:, None] / 2 * (1 + 1e-6) + 1e-12)
    assert torch.equal(q.weight_scale, w.float().abs().amax(1) / 127)
    assert q.storage_bytes() == 40 * 96 + 4 * 40


def test_scale_double_quant_rounds_up():
    a = torch.rand(1000) * 3
    qs, lo, step = formats.quantize_scales(a)
    eff = formats.dequantize_scales(qs, lo, step)
    assert qs.dtype == torch.uint8 and lo.numel() == 4
    assert torch.all(eff >= a) and torch.all(eff - a <= step.repeat_interleave(256)[:1000] * 1.0001)


def _linear(w):
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin
