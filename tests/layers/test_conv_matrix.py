"""Conv LoRA and DoRA over the base conv's argument space: unmerged == dense reference == merged.

Every padding_mode x dilation x stride x groups on Conv1d/2d/3d, plain LoRA and DoRA. The
reference is torch's own conv forward (``_conv_forward``: it applies the padding mode) run in
float64 with the dense weight ``W + s B A`` (DoRA: ``m (W + s B A) / ||W + s B A||``), that
weight built group by group from the stored A and B - no lorafit code in it. A layer that
ignores the base's padding_mode, dilation, stride or groups anywhere (the A conv, DoRA's base
conv, the merge) differs from it by O(1); the allowed error is the derived bound of
lora_reference (here ~1e-5 of the output's magnitude).
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn as nn
from tests.api.lora_reference import (
    ROUNDINGS, abs_conv, assert_within, conv_with, dora_weight, grouped_delta, one_thread, unit_roundoff,
)

import lorafit
from tests.helpers import Wrap

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

MODES = ("zeros", "reflect", "replicate", "circular")
GEOMETRY = list(itertools.product((1, 2), (1, 2), (1, 2)))  # (dilation, stride, groups)
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SIZE = {1: 11, 2: 7, 3: 5}  # input extent per spatial dim: > padding (reflect needs it), small for 3d


def _base(nd, mode, dilation, stride, groups):
    """in 4, out 6, kernel 3; padding = dilation on the first dim and 1 on the others, so for
    dilation 2 it is asymmetric across dims (a mixed-up padding order shows)."""
    padding = (dilation,) + (1,) * (nd - 1)
    torch.manual_seed(nd * 100 + dilation * 10 + stride + groups)
    conv = CONV[nd](4, 6, 3, stride=stride, padding=padding, dilation=dilation, groups=groups,
                    padding_mode=mode)
    return Wrap(conv).eval()


def _dense(model, base, x, dora):
    """(reference output, absref) in float64 from the adapter's stored tensors."""
    conv = base.layer
    ad = model.layer.adapters["default"]
    delta = grouped_delta(ad.lora_A, ad.lora_B, ad.scaling, conv.groups, conv.weight.shape)
    abs_w = conv.weight.double().abs() + grouped_delta(ad.lora_A.abs(), ad.lora_B.abs(), ad.scaling, conv.groups,
                                                       conv.weight.shape)
    if dora:
        m = ad.lora_magnitude_vector.detach()
        weight = dora_weight(conv.weight, delta, m)
        g = (m.double().reshape(-1) / (conv.weight.double() + delta).flatten(1).norm(dim=1)).abs()
        abs_w = abs_w * g.view(-1, *([1] * (abs_w.dim() - 1)))
    else:
        weight = conv.weight.double() + delta
    return conv_with(conv, weight, x), abs_conv(conv, abs_w, x)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dilation,stride,groups", GEOMETRY)
def test_conv_unmerged_dense_merged_agree(mode, nd, dilation, stride, groups, dora):
    base = _base(nd, mode, dilation, stride, groups)
    cfg = lorafit.LoraConfig(r=4, alpha=12, target_modules=["layer"], init=False, use_dora=dora)
    model = lorafit.inject(copy.deepcopy(base), cfg).eval()
    ad = model.layer.adapters["default"]
    assert ad.a_groups == groups  # lorafit's group-respecting form: mergeable
    if dora:  # a fresh DoRA adapter has m = ||W + sBA||; trained magnitudes differ per channel
        with torch.no_grad():
            ad.lora_magnitude_vector.mul_(1 + 0.5 * torch.rand_like(ad.lora_magnitude_vector))
    x = torch.randn(2, 4, *([SIZE[nd]] * nd))
    ref, absref = _dense(model, base, x, dora)
    conv = base.layer
    # longest addition chain: the kernel's fan-in, then the rank; DoRA's fp32 norm (an expanded
    # formula over the same fan-in and rank) adds as many again
    n_add = conv.weight[0].numel() + ad.r
    bound = (ROUNDINGS + n_add * (2 if dora else 1)) * unit_roundoff(torch.float32) * absref
    what = f"{'DoRA' if dora else 'LoRA'} Conv{nd}d {mode} dilation={dilation} stride={stride} groups={groups}"
    with torch.no_grad():
        plain = conv_with(conv, conv.weight, x)
        assert ((plain - ref).abs() > 100 * bound).any(), "the adapter must change the output well above the bound"
        assert_within(model(x), ref, bound, what + ", unmerged")
        w0 = conv.weight.detach().clone()
        lorafit.merge(model)
        assert_within(model(x), ref, bound, what + ", merged")
        lorafit.unmerge(model)
        # unmerge restores W up to the roundings of W' = g (W + dW) and back (a few ulps of |W| + |dW|)
        w_back = model.layer.base_layer.weight
        d_abs = grouped_delta(ad.lora_A.abs(), ad.lora_B.abs(), ad.scaling, groups, w0.shape)
        assert_within(w_back, w0.double(), 8 * unit_roundoff(torch.float32) * (w0.double().abs() + 2 * d_abs),
                      what + ", unmerge")
        merged = lorafit.merge_and_unload(model)
        assert type(merged.layer) is type(conv) and merged.layer.padding_mode == mode
        assert_within(merged(x), ref, bound, what + ", merge_and_unload")
