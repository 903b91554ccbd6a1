"""Several active adapters on one layer: values against a dense reference, and the structure.

The README promises that N active adapters run as ONE concatenated GEMM pair (convs: one A
conv and one B conv), not a Python loop of N small pairs. Timing cannot test that on a shared
CPU; counting the aten ops that actually run can: the number of GEMMs / convolutions in
forward and in backward must not depend on N, and the A-GEMM's output must be [T, sum r_i].
The values are checked against ``base(x) + sum_i s_i * B_i A_i x`` built from dense weights in
float64, with adapters of different ranks and alphas (so each s_i differs: a dropped or shared
scaling shows), under the derived bound of lora_reference.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
from tests.api.lora_reference import (GEMMS, ROUNDINGS, OpCounter, abs_conv, assert_within, conv_with, grouped_delta,
                            one_thread, unit_roundoff)

import lorafit
from tests.helpers import Wrap

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

# (rank, alpha, rslora): scalings 1.5, 8.0 (rsLoRA: 16 / sqrt(4)) and 5/6 - all different, none 1
ADAPTERS = [(2, 3, False), (4, 16, True), (6, 5, False)]


def _with_adapters(base: nn.Module, n: int) -> nn.Module:
    """``base`` with the first n ADAPTERS injected (random non-zero B) and all of them active."""
    model = copy.deepcopy(base)
    names = []
    for i, (r, alpha, rs) in enumerate(ADAPTERS[:n]):
        name = "default" if i == 0 else f"extra{i}"
        lorafit.inject(model, lorafit.LoraConfig(r=r, alpha=alpha, use_rslora=rs, target_modules=["layer"],
                                                 init=False), adapter=name)
        names.append(name)
    lorafit.set_adapter(model, names)
    return model


def test_scalings_differ():
    """Guards the premise of the value tests: a shared or dropped scaling must change the output."""
    s = [alpha / (math.sqrt(r) if rs else r) for r, alpha, rs in ADAPTERS]
    assert len(set(s)) == len(s) and 1.0 not in s


@pytest.mark.parametrize("n", [2, 3])
def test_linear_several_adapters_match_dense_reference(n):
    torch.manual_seed(0)
    base = Wrap(nn.Linear(16, 12))
    model = _with_adapters(base, n)
    layer = model.layer
    x = torch.randn(3, 5, 16, requires_grad=True)
    y = model(x)
    w = base.layer.weight.double()
    delta = sum(ad.scaling * ad.lora_B.double() @ ad.lora_A.double() for ad in layer.adapters.values())
    ref = x.double() @ (w + delta).t() + base.layer.bias.double()
    absw = w.abs() + sum(ad.scaling * ad.lora_B.double().abs() @ ad.lora_A.double().abs()
                         for ad in layer.adapters.values())
    absref = x.double().abs() @ absw.t() + base.layer.bias.double().abs()
    n_add = 16 + sum(r for r, _, _ in ADAPTERS[:n])
    bound = (ROUNDINGS + n_add) * unit_roundoff(torch.float32) * absref
    assert_within(y, ref, bound, f"{n} adapters, forward")
    # sensitivity: dropping the smallest adapter's term moves the output far beyond the bound
    smallest = min(layer.adapters.values(), key=lambda ad: ad.scaling)
    term = (x.double() @ smallest.lora_A.double().t() @ smallest.lora_B.double().t()) * smallest.scaling
    assert (term.abs() > 100 * bound).any()
    # gradients: dA_i = s_i B_i^T dY^T x, dB_i = s_i dY^T x A_i^T
    g = torch.randn_like(y)
    y.backward(g)
    x2 = x.detach().double().reshape(-1, 16)
    g2 = g.double().reshape(-1, 12)
    for name, ad in layer.adapters.items():
        want_a = ad.scaling * ad.lora_B.double().t() @ g2.t() @ x2
        want_b = ad.scaling * g2.t() @ (x2 @ ad.lora_A.double().t())
        torch.testing.assert_close(ad.lora_A.grad.double(), want_a, rtol=1e-5, atol=1e-5, msg=f"dA of {name}")
        torch.testing.assert_close(ad.lora_B.grad.double(), want_b, rtol=1e-5, atol=1e-5, msg=f"dB of {name}")
    want_x = g2 @ (w + delta)
    torch.testing.assert_close(x.grad.double().reshape(-1, 16), want_x, rtol=1e-5, atol=1e-5)


def _count(model, x, names):
    """(forward op counts, backward op counts, forward output shapes) of one step."""
    with OpCounter(names) as fwd:
        y = model(x)
    with OpCounter(names) as bwd:
        y.backward(torch.ones_like(y))
    return fwd.calls, bwd.calls, fwd.shapes


def test_linear_several_adapters_are_one_gemm_pair():
    torch.manual_seed(0)
    base = Wrap(nn.Linear(16, 10))  # out (10) differs from every total rank (2, 6, 12)
    counts = {}
    for n in (1, 2, 3):
        model = _with_adapters(base, n).train()
        x = torch.randn(3, 5, 16, requires_grad=True)
        fwd, bwd, shapes = _count(model, x, GEMMS)
        counts[n] = (sum(fwd.values()), sum(bwd.values()))
        # one A-GEMM whose output holds every adapter's rank side by side
        total_r = sum(r for r, _, _ in ADAPTERS[:n])
        assert [s for _, s in shapes].count((15, total_r)) == 1, shapes
    # base GEMM + one A-GEMM + one B-GEMM forward, whatever N; backward likewise
    assert counts[1][0] == 3
    assert counts[2] == counts[1] and counts[3] == counts[1], counts


CONV_OPS = ("convolution", "convolution_backward")


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_conv_several_adapters_are_one_conv_pair(mode):
    torch.manual_seed(0)
    base = Wrap(nn.Conv2d(4, 6, 3, padding=1, padding_mode=mode))
    counts = {}
    for n in (1, 2, 3):
        model = _with_adapters(base, n).train()
        fwd, bwd, _ = _count(model, torch.randn(2, 4, 7, 7), CONV_OPS)
        counts[n] = (fwd["convolution"], bwd["convolution_backward"])
    assert counts[1] == (3, 2)  # base, A, B; backward: A and B (the base and x need no grad)
    assert counts[2] == counts[1] and counts[3] == counts[1], counts


CONVS = {
    "conv1d_reflect": lambda: nn.Conv1d(4, 6, 3, padding=2, dilation=2, padding_mode="reflect"),
    "conv2d_zeros_grouped": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
    "conv2d_circular_stride": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=(1, 2), padding_mode="circular"),
    "conv3d_replicate_grouped": lambda: nn.Conv3d(4, 6, 3, padding=1, groups=2, padding_mode="replicate"),
}


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("case", list(CONVS))
def test_conv_several_adapters_match_dense_reference(case, n):
    """sum_i s_i conv(B_i, conv(A_i, x)) = the base conv with W + sum_i s_i B_i A_i; merged too."""
    torch.manual_seed(0)
    base = Wrap(CONVS[case]()).eval()
    model = _with_adapters(base, n).eval()
    conv = base.layer
    x = torch.randn(2, 4, *([7] * (conv.weight.dim() - 2)))
    ads = list(model.layer.adapters.values())
    delta = sum(grouped_delta(ad.lora_A, ad.lora_B, ad.scaling, conv.groups, conv.weight.shape) for ad in ads)
    abs_delta = sum(grouped_delta(ad.lora_A.abs(), ad.lora_B.abs(), ad.scaling, conv.groups, conv.weight.shape)
                    for ad in ads)
    ref = conv_with(conv, conv.weight.double() + delta, x)
    n_add = conv.weight[0].numel() + sum(ad.r for ad in ads)
    bound = (ROUNDINGS + n_add) * unit_roundoff(torch.float32) * abs_conv(conv, conv.weight.abs() + abs_delta, x)
    with torch.no_grad():
        assert_within(model(x), ref, bound, f"{case}, {n} adapters, unmerged")
        smallest = min(ads, key=lambda ad: ad.scaling)
        one = grouped_delta(smallest.lora_A, smallest.lora_B, smallest.scaling, conv.groups, conv.weight.shape)
        assert (conv_with(conv, one, x, bias=False).abs() > 100 * bound).any()  # sensitivity
        lorafit.merge(model)
        assert_within(model(x), ref, bound, f"{case}, {n} adapters, merged")
