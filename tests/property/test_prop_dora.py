"""Properties of DoRA on Linear and Conv1d/2d/3d (every conv argument, lorafit's grouped form).

Definition (Liu et al., 2024; PEFT): W' = m * (W + s B A) / ||W + s B A||, the norm per output
(a row of a Linear weight; an output channel's [in/g, *k] slice of a conv weight). The
reference builds W' densely in float64 and runs the base module with it. The magnitude m is
set to a random multiple of the true norm, so a norm over the wrong dimension, a wrong padding
mode in the base term, or a stale norm changes the output far beyond the bound.

Bound: the LoRA bound for z = W x + s B A x (prop_helpers), times g = m / norm, plus |z| g times
the relative error of the fp32 norm, which lorafit computes from ||W_i||^2 + 2 s <B_i, (W A^T)_i>
+ s^2 ||(B A)_i||^2 (dora.py): its error is <= (ROUNDINGS u(dtype) + n u(fp32)) * kappa_i with
kappa_i = || |W_i| + s (|B| |A|)_i ||^2 / ||W_i + s (B A)_i||^2 (the sum of the terms' magnitudes
over the result; W A^T is computed in the weight's dtype, hence u(dtype)).
"""

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st
from tests.property.prop_helpers import (
    DTYPES, PROP_EACH, ROUNDINGS, Wrap, adapter_specs, add_adapters, assert_sensitive, assert_within, bound,
    dtype_id, randomize_, scaling_of, unit,
)
from tests.property.test_prop_conv import CONV, group_delta

import lorafit

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


@st.composite
def dora_cases(draw, dtypes=DTYPES, kinds=("linear", "conv")):
    """(base model, x, spec, dtype, generator): one DoRA adapter on a random Linear or conv."""
    dtype = draw(st.sampled_from(dtypes))
    kind = draw(st.sampled_from(kinds))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    if kind == "linear":
        layer = nn.Linear(draw(st.integers(1, 16)), draw(st.integers(1, 16)), bias=draw(st.booleans()))
        groups = 1
        x_shape = (draw(st.integers(1, 3)), 4, layer.in_features)
    else:
        nd = draw(st.sampled_from((1, 2, 3)))
        groups = draw(st.sampled_from((1, 1, 2)))
        cin, cout = groups * draw(st.integers(2, 3)), groups * draw(st.integers(1, 3))
        ks = tuple(draw(st.integers(1, 3)) for _ in range(nd))
        dil = tuple(draw(st.integers(1, 2)) for _ in range(nd))
        mode = draw(st.sampled_from(("zeros", "reflect", "replicate", "circular")))
        if draw(st.booleans()):
            padding, stride = "same", 1
        else:
            padding = tuple(draw(st.integers(0, 2)) for _ in range(nd))
            stride = tuple(draw(st.integers(1, 2)) for _ in range(nd))
        layer = CONV[nd](cin, cout, ks, stride=stride, padding=padding, dilation=dil, groups=groups,
                         bias=draw(st.booleans()), padding_mode=mode)
        x_shape = (2, cin, *[d * (k - 1) + 3 + draw(st.integers(0, 2)) for d, k in zip(dil, ks)])
    (spec,), _ = draw(adapter_specs(groups=groups, max_adapters=1, max_rank=3, allow_dropout=False))
    base = Wrap(layer)
    randomize_(base, gen)
    base = base.to(dtype).eval()
    x = torch.randn(x_shape, generator=gen, dtype=torch.float64).to(dtype)
    return base, x, spec, dtype, gen


def delta_of(layer, a, b):
    if isinstance(layer, nn.Linear):
        return b @ a
    return group_delta(a, b, layer.groups, layer.weight.shape)


def run(layer, weight, bias, x):
    """The base module's own forward (padding mode and all) with another weight, in float64."""
    ref = copy.deepcopy(layer).double()
    with torch.no_grad():
        ref.weight.copy_(weight)
        if ref.bias is not None:
            ref.bias.copy_(bias)
        return ref(x)


def setup(case):
    """Inject DoRA, randomise A, B and the magnitude; return (model, pieces of the reference)."""
    base, x, spec, dtype, gen = case
    model = copy.deepcopy(base)
    add_adapters(model, [spec], [0], gen, use_dora=True)
    ad = model.layer.adapters["a0"]
    layer = base.layer
    w = layer.weight.detach().double()
    s = scaling_of(spec)
    delta = s * delta_of(layer, ad.lora_A.double(), ad.lora_B.double())
    dabs = s * delta_of(layer, ad.lora_A.double().abs(), ad.lora_B.double().abs())
    dims = tuple(range(1, w.dim()))
    norm = torch.linalg.vector_norm(w + delta, dim=dims)  # [out]: the definition, densely
    with torch.no_grad():  # m a random multiple of the norm: the factor g is far from 1
        factor = 0.5 + torch.rand(norm.shape, generator=gen, dtype=torch.float64)
        ad.lora_magnitude_vector.copy_((norm * factor).reshape(ad.lora_magnitude_vector.shape))
    m = ad.lora_magnitude_vector.detach().double().reshape(-1)
    view = (-1,) + (1,) * (w.dim() - 1)
    g = (m / norm).view(view)
    kappa = (torch.linalg.vector_norm(w.abs() + dabs, dim=dims) / norm) ** 2
    n_norm = w[0].numel() + 2 * spec["r"] + 2
    rel_g = (ROUNDINGS * unit(dtype) + n_norm * unit(torch.float32)) * kappa + 2 * unit(torch.float32)
    bias = layer.bias.detach().double() if layer.bias is not None else None
    babs = bias.abs() if bias is not None else None
    xd = x.double()
    ref = run(layer, g * (w + delta), bias, xd)
    base_ref = run(layer, w, bias, xd)
    absz = run(layer, w.abs() + dabs, None if bias is None else torch.zeros_like(bias), xd.abs())
    n = w[0].numel() + spec["r"] // getattr(layer, "groups", 1)
    ch = (1, -1) + (1,) * (w.dim() - 2) if w.dim() > 2 else (-1,)
    gv, rv = g.reshape(-1).view(ch), rel_g.view(ch)
    allowed = gv * (bound(absz, dtype, n) + absz * rv)
    if babs is not None:
        allowed = allowed + 2 * unit(dtype) * babs.view(ch)
    return model, ref, base_ref, allowed, (w, delta, dabs, n, gv, absz)


KINDS = pytest.mark.parametrize("kind", ["linear", "conv"])


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@KINDS
@PROP_EACH
@given(data=st.data())
def test_dora_forward_matches_definition(dtype, kind, data):
    case = data.draw(dora_cases(dtypes=(dtype,), kinds=(kind,)))
    model, ref, base_ref, allowed, _ = setup(case)
    x, dtype = case[1], case[3]
    with torch.no_grad():
        got = model(x)
    assert got.dtype == dtype
    assert_sensitive(ref, base_ref, allowed, "DoRA")
    assert_within(got, ref, allowed, f"DoRA {model.layer.base_layer} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@KINDS
@PROP_EACH
@given(data=st.data())
def test_dora_merge_unmerge_round_trip(dtype, kind, data):
    case = data.draw(dora_cases(dtypes=(dtype,), kinds=(kind,)))
    model, ref, _, allowed, (w, delta, dabs, n, gv, absz) = setup(case)
    x, spec, dtype = case[1], case[2], case[3]
    rg = spec["r"] // getattr(model.layer, "groups", 1)
    merge_u = (rg + 6) * unit(torch.float32) + 2 * unit(dtype)  # fp32: B@A, *s, +W, *g, (unmerge: /g, -delta)
    with torch.no_grad():
        lorafit.merge(model)
        assert_within(model(x), ref, allowed + merge_u * gv * absz, "merged DoRA")
        lorafit.unmerge(model)
        assert_within(model.layer.base_layer.weight, w, 2 * merge_u * (w.abs() + dabs), "weight after unmerge")
        assert_within(model(x), ref, allowed, "DoRA after unmerge")
