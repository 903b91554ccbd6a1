"""Properties of LoRA on nn.Conv1d / Conv2d / Conv3d with every argument of the base conv.

Random kernel, stride, padding (ints or 'same'), dilation, groups (lorafit's group-respecting
form) and padding_mode, random dtypes and adapter sets. The reference is the base conv module
itself, in float64, with the weight W + sum_i s_i (B_i A_i per group): the merged conv by
definition, so "forward == dense" also means "merging is exact". PEFT parity is checked where it
is defined (groups=1, dilation=1, zeros padding: README "Differences from PEFT").
"""

import copy
import math
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st
from tests.property.prop_helpers import (
    DTYPES, PROP, PROP_EACH, PROP_PEFT, Wrap, adapter_specs, add_adapters, assert_sensitive, assert_within, bound,
    dtype_id, randomize_, reload_into_copy, scaling_of, unit,
)

import lorafit

# torch's note that 'same' with an even kernel may copy the input: expected, not a lorafit warning
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@st.composite
def conv_cases(draw, dtypes=DTYPES, peft_parity=False):
    """(base model, x, specs, active, dtype, generator) for a random conv layer."""
    nd = draw(st.sampled_from((1, 2, 3)))
    groups = 1 if peft_parity else draw(st.sampled_from((1, 1, 2, 3)))
    # groups > 1 with >= 2 input channels per group: depthwise convs are skipped on purpose
    cin = groups * draw(st.integers(2 if groups > 1 else 1, 3))
    cout = groups * draw(st.integers(1, 3))
    ks = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dil = (1,) * nd if peft_parity else tuple(draw(st.integers(1, 2)) for _ in range(nd))
    mode = "zeros" if peft_parity else draw(st.sampled_from(("zeros", "reflect", "replicate", "circular")))
    if draw(st.booleans()):
        padding, stride = "same", 1
    else:
        padding = tuple(draw(st.integers(0, 2)) for _ in range(nd))
        stride = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    dtype = draw(st.sampled_from(dtypes))
    specs, active = draw(adapter_specs(groups=groups, max_rank=3 if groups == 1 else 2))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    conv = CONV[nd](cin, cout, ks, stride=stride, padding=padding, dilation=dil, groups=groups,
                    bias=draw(st.booleans()), padding_mode=mode)
    base = Wrap(conv)
    randomize_(base, gen)
    base = base.to(dtype).eval()
    # every spatial size fits the dilated kernel and the padding (reflect needs padding < size)
    size = [d * (k - 1) + 3 + draw(st.integers(0, 2)) for d, k in zip(dil, ks)]
    x = torch.randn(2, cin, *size, generator=gen, dtype=torch.float64).to(dtype)
    return base, x, specs, active, dtype, gen


def group_delta(a: torch.Tensor, b: torch.Tensor, groups: int, shape) -> torch.Tensor:
    """Group j's update is B_j [out/g, r/g] @ A_j [r/g, in/g * k], laid out as the conv weight."""
    rg = a.shape[0] // groups
    return torch.bmm(b.reshape(groups, shape[0] // groups, rg), a.reshape(groups, rg, -1)).reshape(shape)


def conv_reference(conv: nn.Module, terms, x):
    """(ref, |.| ref, base-only ref) in float64: the base conv run with W + sum s B A (and on |.|)."""
    ref_conv = copy.deepcopy(conv).double()
    w = conv.weight.detach().double()
    shape, g = w.shape, conv.groups
    delta = sum((s * group_delta(a.double(), b.double(), g, shape) for a, b, s in terms), torch.zeros_like(w))
    dabs = sum((s * group_delta(a.double().abs(), b.double().abs(), g, shape) for a, b, s in terms),
               torch.zeros_like(w))
    xd = x.double()
    out = []
    with torch.no_grad():
        for weight, bias, inp in ((w + delta, None, xd), (w.abs() + dabs, "abs", xd.abs()), (w, None, xd)):
            ref_conv.weight.copy_(weight)
            if ref_conv.bias is not None:
                ref_conv.bias.copy_(conv.bias.double().abs() if bias else conv.bias.double())
            out.append(ref_conv(inp))
    return tuple(out)


def live_terms(model, names, specs, active):
    ads = model.layer.adapters
    return [(ads[names[i]].lora_A, ads[names[i]].lora_B, scaling_of(specs[i])) for i in active]


def inner(conv, specs, active) -> int:
    """Longest sum in one output: (in / groups) * kernel taps, plus the concatenated rank."""
    return conv.weight[0].numel() + sum(specs[i]["r"] for i in active) // conv.groups


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@PROP_EACH
@given(data=st.data())
def test_conv_forward_matches_dense(dtype, data):
    base, x, specs, active, dtype, gen = data.draw(conv_cases(dtypes=(dtype,)))
    model = copy.deepcopy(base)
    names = add_adapters(model, specs, active, gen)
    assert all(ad.a_groups == base.layer.groups for ad in model.layer.adapters.values())
    ref, absref, base_ref = conv_reference(base.layer, live_terms(model, names, specs, active), x)
    allowed = bound(absref, dtype, inner(base.layer, specs, active))
    with torch.no_grad():
        got = model(x)
    assert got.dtype == dtype
    assert_sensitive(ref, base_ref, allowed, "conv")
    assert_within(got, ref, allowed, f"conv {base.layer} {dtype} active={active}")


@PROP
@given(conv_cases(dtypes=(torch.float32, torch.float64)))
def test_conv_adapter_gradients_match_dense(case):
    """dL/dA_i and dL/dB_i of sum(y * g) equal autograd through the float64 reference conv."""
    base, x, specs, active, dtype, gen = case
    model = copy.deepcopy(base)
    names = add_adapters(model, specs, active, gen)
    y = model(x)
    g = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype)
    (y * g).sum().backward()
    grads = []
    for absolute in (False, True):
        f = (lambda t: t.detach().double().abs()) if absolute else (lambda t: t.detach().double())
        terms = [(f(a).requires_grad_(True), f(b).requires_grad_(True), s)
                 for a, b, s in live_terms(model, names, specs, active)]
        conv = base.layer
        if absolute:
            conv = copy.deepcopy(conv).double()
            with torch.no_grad():
                conv.weight.abs_()
        w = conv.weight.detach().double()
        delta = sum(s * group_delta(a, b, conv.groups, w.shape) for a, b, s in terms)
        ref = conv._conv_forward(f(x), w + delta, None)
        (ref * (g.double().abs() if absolute else g.double())).sum().backward()
        grads.append([(a.grad, b.grad) for a, b, _ in terms])
    n = y[:, 0].numel() + inner(base.layer, specs, active) + base.layer.out_channels
    for (want, absg), i in zip(zip(*grads), active):
        ad = model.layer.adapters[names[i]]
        assert_within(ad.lora_A.grad, want[0], bound(absg[0], dtype, n), f"dA of {names[i]}")
        assert_within(ad.lora_B.grad, want[1], bound(absg[1], dtype, n), f"dB of {names[i]}")
    assert model.layer.base_layer.weight.grad is None


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@PROP_EACH
@given(data=st.data())
def test_conv_merge_unmerge_round_trip(dtype, data):
    base, x, specs, active, dtype, gen = data.draw(conv_cases(dtypes=(dtype,)))
    model = copy.deepcopy(base)
    names = add_adapters(model, specs, active, gen)
    terms = live_terms(model, names, specs, active)
    ref, absref, _ = conv_reference(base.layer, terms, x)
    rg_all = sum(specs[i]["r"] for i in active) // base.layer.groups
    merge_u = (rg_all + 3 + len(active)) * unit(torch.float32) + 2 * unit(dtype)  # fp32 merge arithmetic
    allowed = bound(absref, dtype, inner(base.layer, specs, active)) + merge_u * absref
    w0 = base.layer.weight.detach().double()
    with torch.no_grad():
        lorafit.merge(model)
        assert_within(model(x), ref, allowed, f"merged conv {base.layer} {dtype}")
        lorafit.unmerge(model)
        dabs = sum(s * group_delta(a.double().abs(), b.double().abs(), base.layer.groups, w0.shape)
                   for a, b, s in terms)
        assert_within(model.layer.base_layer.weight, w0, 2 * merge_u * (w0.abs() + dabs), "weight after unmerge")
        assert_within(model(x), ref, allowed, "forward after unmerge")
        plain = lorafit.merge_and_unload(model)
        assert type(plain.layer) is type(base.layer)
        assert_within(plain(x), ref, allowed, "merge_and_unload")


@PROP
@given(conv_cases())
def test_conv_save_load_round_trip(case):
    base, x, specs, active, dtype, gen = case
    model = copy.deepcopy(base)
    names = add_adapters(model, specs, active, gen)
    fresh = reload_into_copy(model, base, names, active)
    for name in names:
        a, b = model.layer.adapters[name], fresh.layer.adapters[name]
        assert a.a_groups == b.a_groups and a.scaling == b.scaling
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@PROP_PEFT
@given(conv_cases(dtypes=(torch.float32,), peft_parity=True))
def test_conv_peft_parity_both_ways(case):
    """Our file in PEFT and PEFT's file in lorafit: same outputs (groups=1, dilation=1, zeros)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    base, x, specs, active, dtype, gen = case
    model = copy.deepcopy(base)
    names = add_adapters(model, specs, active, gen)
    ref, absref, base_ref = conv_reference(base.layer, live_terms(model, names, specs, active), x)
    allowed = 2 * bound(absref, dtype, inner(base.layer, specs, active))
    assert_sensitive(ref, base_ref, allowed, "conv vs PEFT")
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            lorafit.save_adapter(model, Path(d) / name, adapter=name)
        pm = PeftModel.from_pretrained(copy.deepcopy(base), str(Path(d) / names[0]), adapter_name=names[0])
        for name in names[1:]:
            pm.load_adapter(str(Path(d) / name), adapter_name=name)
        act = [names[i] for i in active]
        pm.base_model.set_adapter(act if len(act) > 1 else act[0])
        with torch.no_grad():
            assert_within(model(x), pm.eval()(x).double(), allowed, "lorafit vs PEFT (our file)")
        # the other direction: PEFT writes adapter a0's weights, lorafit reads them
        spec = specs[0]
        pm2 = get_peft_model(copy.deepcopy(base), LoraConfig(r=spec["r"], lora_alpha=spec["alpha"],
                                                             use_rslora=spec["use_rslora"],
                                                             target_modules=["layer"], init_lora_weights=False))
        with torch.no_grad():
            for n, p in pm2.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(p[0].numel()))
        pm2.save_pretrained(str(Path(d) / "peft"))
        ours = lorafit.load_adapter(copy.deepcopy(base), Path(d) / "peft").eval()
    ad = ours.layer.adapters["default"]
    ref2, absref2, _ = conv_reference(base.layer, [(ad.lora_A, ad.lora_B, scaling_of(spec))], x)
    allowed2 = 2 * bound(absref2, dtype, inner(base.layer, [spec], [0]))
    with torch.no_grad():
        assert_within(ours(x), pm2.eval()(x).double(), allowed2, "lorafit vs PEFT (PEFT's file)")
        assert_within(ours(x), ref2, allowed2, "lorafit on PEFT's file vs dense")
