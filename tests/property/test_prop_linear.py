"""Properties of LoRA on nn.Linear (fused path and the add-after-base path) and nn.Embedding.

For random shapes, dtypes and adapter sets (1-3 adapters, own r / alpha / rsLoRA, some active):
forward == W x + b + sum_active s_i B_i A_i x (float64 reference, derived bound, see
prop_helpers), merge then unmerge restores the weights, merged forward == unmerged, a saved
adapter reloads into a fresh model with bit-identical outputs, and PEFT reads our files (and we
read PEFT's) with the same outputs.
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


class CustomLinear(nn.Linear):
    """A Linear whose forward is not nn.Linear.forward: lorafit adds the LoRA term after it (lora_add_)."""

    def forward(self, x):
        return super().forward(x)


def gpt2_conv1d(in_f: int, out_f: int, bias: bool = True) -> nn.Module:
    """transformers' GPT-2 Conv1D: weight [in, out] (fan_in_fan_out), always with a bias."""
    from transformers.pytorch_utils import Conv1D
    return Conv1D(out_f, in_f)


# the three linear code paths: the fused op, base-then-add (lora_add_), and fan_in_fan_out
BASES = {"fused": nn.Linear, "add_after_base": CustomLinear, "gpt2_conv1d": gpt2_conv1d}


def weight_of(layer: nn.Module) -> torch.Tensor:
    """The weight as [out, in] (a transposed view for GPT-2's Conv1D)."""
    return layer.weight.t() if type(layer).__name__ == "Conv1D" else layer.weight


@st.composite
def linear_cases(draw, dtypes=DTYPES, path=None, allow_dropout=True):
    """(base model, x, specs, active, dtype, generator) for a random linear layer of kind ``path``."""
    in_f, out_f = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    lead = draw(st.lists(st.integers(1, 4), min_size=1, max_size=2))
    dtype = draw(st.sampled_from(dtypes))
    make = BASES[path if path is not None else draw(st.sampled_from(sorted(BASES)))]
    specs, active = draw(adapter_specs(allow_dropout=allow_dropout))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    base = Wrap(make(in_f, out_f, bias=draw(st.booleans())))
    randomize_(base, gen)
    base = base.to(dtype).eval()
    x = torch.randn(*lead, in_f, generator=gen, dtype=torch.float64).to(dtype)
    return base, x, specs, active, dtype, gen


def linear_reference(base_layer: nn.Linear, terms, x):
    """(ref, |.| ref, base-only ref) in float64; terms = [(A [r, in], B [out, r], s)]."""
    w = weight_of(base_layer).double()
    delta = sum((s * b.double() @ a.double() for a, b, s in terms), torch.zeros_like(w))
    wabs = w.abs() + sum((s * b.double().abs() @ a.double().abs() for a, b, s in terms), torch.zeros_like(w))
    bias = base_layer.bias.double() if base_layer.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    xd = x.double()
    return xd @ (w + delta).t() + bias, xd.abs() @ wabs.t() + bias.abs(), xd @ w.t() + bias


def live_terms(model, names, specs, active):
    ads = model.layer.adapters
    return [(ads[names[i]].lora_A, ads[names[i]].lora_B, scaling_of(specs[i])) for i in active]


PATHS = pytest.mark.parametrize("path", list(BASES))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@PATHS
@PROP_EACH
@given(data=st.data())
def test_linear_forward_matches_dense(dtype, path, data):
    base, x, specs, active, dtype, gen = data.draw(linear_cases(dtypes=(dtype,), path=path))
    model = copy.deepcopy(base)
    names = add_adapters(model, specs, active, gen)
    ref, absref, base_ref = linear_reference(base.layer, live_terms(model, names, specs, active), x)
    allowed = bound(absref, dtype, x.shape[-1] + sum(specs[i]["r"] for i in active))
    assert_sensitive(ref, base_ref, allowed, "linear")
    with torch.no_grad():
        got = model(x)  # inference: lora_add_ has its own no-grad branch
    train_mode = model(x).detach()  # with autograd: the custom Functions' forward (adapters require grad)
    for out, how in ((got, "no_grad"), (train_mode, "autograd")):
        assert out.dtype == dtype
        assert_within(out, ref, allowed, f"linear {dtype} {type(base.layer).__name__} active={active} ({how})")
    with torch.no_grad(), lorafit.disabled(model):
        assert torch.equal(model(x), base(x))  # disabled: the base layer itself, bit for bit


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=dtype_id)
@PATHS
@PROP_EACH
@given(data=st.data())
def test_linear_gradients_match_dense(dtype, path, data):
    """dL/dA_i, dL/dB_i and dL/dx of sum(y * g) equal autograd through the dense float64 reference.

    The bound's magnitude is the same gradient taken through the absolute-value graph
    (|x|, |W|, |A|, |B|, |g|): every product in the true gradient is bounded by it.
    """
    base, x, specs, active, dtype, gen = data.draw(linear_cases(dtypes=(dtype,), path=path))
    model = copy.deepcopy(base)
    names = add_adapters(model, specs, active, gen)
    x = x.clone().requires_grad_(True)
    out_f = weight_of(base.layer).shape[0]
    g = torch.randn(*x.shape[:-1], out_f, generator=gen, dtype=torch.float64).to(dtype)
    (model(x) * g).sum().backward()

    def leaves(absolute):
        f = (lambda t: t.detach().double().abs()) if absolute else (lambda t: t.detach().double())
        return [(f(a).requires_grad_(True), f(b).requires_grad_(True), s)
                for a, b, s in live_terms(model, names, specs, active)], f(x).requires_grad_(True)

    grads = []
    for absolute in (False, True):
        terms, xd = leaves(absolute)
        layer = base.layer if not absolute else copy.deepcopy(base.layer).double()
        if absolute:
            with torch.no_grad():
                layer.weight.abs_()
        ref = linear_reference(layer, terms, xd)[0]
        (ref * (g.double().abs() if absolute else g.double())).sum().backward()
        grads.append(([(a.grad, b.grad) for a, b, _ in terms], xd.grad))
    n = x.numel() // x.shape[-1] + x.shape[-1] + out_f + sum(specs[i]["r"] for i in active)
    for (want, absg), i in zip(zip(grads[0][0], grads[1][0]), active):
        ad = model.layer.adapters[names[i]]
        for got, w, m, what in ((ad.lora_A.grad, want[0], absg[0], "dA"), (ad.lora_B.grad, want[1], absg[1], "dB")):
            assert got is not None and got.dtype == ad.lora_A.dtype
            assert_within(got, w, bound(m, dtype, n), f"{what} of {names[i]}")
    for i, name in enumerate(names):
        if i not in active:
            assert model.layer.adapters[name].lora_A.grad is None  # inactive adapters do not train
    assert_within(x.grad, grads[0][1], bound(grads[1][1], dtype, n), "dx")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@PROP_EACH
@given(data=st.data())
def test_linear_merge_unmerge_round_trip(dtype, data):
    base, x, specs, active, dtype, gen = data.draw(linear_cases(dtypes=(dtype,)))
    model = copy.deepcopy(base)
    names = add_adapters(model, specs, active, gen)
    terms = live_terms(model, names, specs, active)
    ref, absref, _ = linear_reference(base.layer, terms, x)
    r_all, k = sum(specs[i]["r"] for i in active), len(active)
    # merge arithmetic is fp32 by design (delta_weight): B@A (r terms), * s, W + delta, per adapter
    merge_u = (r_all + 3 + k) * unit(torch.float32) + 2 * unit(dtype)
    allowed = bound(absref, dtype, x.shape[-1] + r_all) + merge_u * absref
    w0 = weight_of(base.layer).detach().clone()
    with torch.no_grad():
        unmerged = model(x)
        lorafit.merge(model)
        assert sorted(model.layer.merged) == sorted(names[i] for i in active)
        merged = model(x)
        assert_within(merged, ref, allowed, f"merged linear {dtype}")
        assert_within(unmerged, ref, allowed, f"unmerged linear {dtype}")
        lorafit.unmerge(model)
        assert model.layer.merged == []
        w = w0.double()
        wabs = w.abs() + sum(s * b.double().abs() @ a.double().abs() for a, b, s in terms)
        assert_within(weight_of(model.layer.base_layer), w, 2 * merge_u * wabs, "weight after merge + unmerge")
        again = model(x)
        assert_within(again, ref, allowed, "forward after unmerge")
        plain = lorafit.merge_and_unload(model)
        assert type(plain.layer) is type(base.layer)
        assert_within(plain(x), ref, allowed, "merge_and_unload")


@PROP
@given(linear_cases())
def test_linear_save_load_round_trip(case):
    base, x, specs, active, dtype, gen = case
    model = copy.deepcopy(base)
    names = add_adapters(model, specs, active, gen)
    fresh = reload_into_copy(model, base, names, active)
    for name in names:
        a, b = model.layer.adapters[name], fresh.layer.adapters[name]
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B) and a.scaling == b.scaling
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def _peft_set(pm, names):
    pm.base_model.set_adapter(names if len(names) > 1 else names[0])


@PROP_PEFT
@given(linear_cases(dtypes=(torch.float32,), path="fused"))
def test_linear_peft_reads_our_files(case):
    from peft import PeftModel
    base, x, specs, active, dtype, gen = case
    model = copy.deepcopy(base)
    names = add_adapters(model, specs, active, gen)
    with tempfile.TemporaryDirectory() as d:
        for name in names:
            lorafit.save_adapter(model, Path(d) / name, adapter=name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = PeftModel.from_pretrained(copy.deepcopy(base), str(Path(d) / names[0]), adapter_name=names[0])
            for name in names[1:]:
                pm.load_adapter(str(Path(d) / name), adapter_name=name)
    _peft_set(pm, [names[i] for i in active])
    ref, absref, base_ref = linear_reference(base.layer, live_terms(model, names, specs, active), x)
    allowed = 2 * bound(absref, dtype, x.shape[-1] + sum(specs[i]["r"] for i in active))
    with torch.no_grad():
        ours, theirs = model(x), pm.eval()(x)
    assert_sensitive(ref, base_ref, allowed, "linear vs PEFT")
    assert_within(ours, theirs.double(), allowed, "lorafit vs PEFT (our file)")


@PROP_PEFT
@given(linear_cases(dtypes=(torch.float32,), path="fused"), st.data())
def test_linear_reads_peft_files(case, data):
    from peft import LoraConfig, get_peft_model
    base, x, specs, active, dtype, gen = case
    spec = specs[active[0]]
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=spec["r"], lora_alpha=spec["alpha"],
                                                        use_rslora=spec["use_rslora"], target_modules=["layer"],
                                                        init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(p[0].numel()))
    with tempfile.TemporaryDirectory() as d:
        pm.save_pretrained(d)
        model = lorafit.load_adapter(copy.deepcopy(base), d).eval()
    ad = model.layer.adapters["default"]
    ref, absref, base_ref = linear_reference(base.layer, [(ad.lora_A, ad.lora_B, scaling_of(spec))], x)
    allowed = 2 * bound(absref, dtype, x.shape[-1] + spec["r"])
    with torch.no_grad():
        ours, theirs = model(x), pm.eval()(x)
    assert_sensitive(ref, base_ref, allowed, "PEFT file")
    assert_within(ours, theirs.double(), allowed, "lorafit vs PEFT (PEFT's file)")
    assert_within(ours, ref, allowed, "lorafit on PEFT's file vs dense")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@PROP_EACH
@given(st.integers(2, 30), st.integers(1, 16), adapter_specs(), st.integers(0, 2**16), st.booleans())
def test_embedding_forward_matches_dense(dtype, vocab, dim, spec_active, seed, padded):
    specs, active = spec_active
    gen = torch.Generator().manual_seed(seed)
    base = Wrap(nn.Embedding(vocab, dim, padding_idx=0 if padded else None))
    randomize_(base, gen)
    base = base.to(dtype).eval()
    model = copy.deepcopy(base)
    names = add_adapters(model, specs, active, gen)
    ids = torch.randint(0, vocab, (3, 5), generator=gen)
    w = base.layer.weight.double()
    ads = model.layer.adapters
    terms = [(ads[names[i]].lora_A.double(), ads[names[i]].lora_B.double(), scaling_of(specs[i])) for i in active]
    table = w + sum(s * (b @ a).t() for a, b, s in terms)  # [vocab, dim]
    abs_table = w.abs() + sum(s * (b.abs() @ a.abs()).t() for a, b, s in terms)
    allowed = bound(abs_table[ids], dtype, sum(specs[i]["r"] for i in active))
    with torch.no_grad():
        got = model(ids)
    assert_sensitive(table[ids], w[ids], allowed, "embedding")
    assert_within(got, table[ids], allowed, f"embedding {dtype}")
