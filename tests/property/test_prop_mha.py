"""Properties of LoRA on nn.MultiheadAttention (in-projection and out-projection updates).

The reference is the base MultiheadAttention itself, in float64, with in_proj_weight + sum s B A
and out_proj.weight + sum s B_out A_out: the function lorafit must compute (PEFT 0.21 adds the
out-projection update twice, README "Differences from PEFT", so PEFT is not the reference).

Tolerance: the layer and the reference both run in float64, where rounding is ~n u(fp64)
(1e-14 here) but a softmax makes a clean forward bound long to state. The comparison allows
sqrt(u(fp64)) ~ 1e-8 of the output's magnitude: a million times the rounding, a million times
below the effect of any dropped scaling, adapter or sign (which changes outputs by O(1)).
Merged weights are computed in fp32 by design, so merged outputs get sqrt(u(fp32)) ~ 2e-4.
"""

import copy
import math
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from hypothesis import assume, given
from hypothesis import strategies as st
from tests.property.prop_helpers import PROP, adapter_specs, randomize_, scaling_of, unit

import lorafit

TOL = math.sqrt(unit(torch.float64))
# merging computes the update in fp32 by design (delta_weight), so merged weights carry fp32
# rounding even on a float64 base: the same rule with u(fp32) (~2e-4, still far below O(1))
TOL_MERGED = math.sqrt(unit(torch.float32))


class Attn(nn.Module):
    """Self-attention as one named child ``layer`` (what lorafit targets); returns the output only."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.layer = mha

    def forward(self, x):
        return self.layer(x, x, x, need_weights=False)[0]


@st.composite
def mha_cases(draw):
    heads = draw(st.integers(1, 3))
    embed = heads * draw(st.integers(1, 4))
    specs, active = draw(adapter_specs(allow_dropout=False))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    base = Attn(nn.MultiheadAttention(embed, heads, bias=draw(st.booleans()), batch_first=True))
    randomize_(base, gen)
    base = base.double().eval()
    x = torch.randn(draw(st.integers(1, 3)), draw(st.integers(1, 5)), embed, generator=gen, dtype=torch.float64)
    return base, x, specs, active, gen


def add_mha_adapters(model, specs, active, gen):
    names = [f"a{i}" for i in range(len(specs))]
    for name, spec in zip(names, specs):
        lorafit.inject(model, lorafit.LoraConfig(target_modules=["layer"], init=False, **spec), adapter=name)
        ad = model.layer.adapters[name]
        with torch.no_grad():
            for p in (ad.lora_A, ad.lora_B, ad.out.lora_A, ad.out.lora_B):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(p[0].numel()))
    lorafit.set_adapter(model, [names[i] for i in active])
    model.eval()
    return names


def dense(base, model, names, specs, active, x):
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for i in active:
            ad, s = model.layer.adapters[names[i]], scaling_of(specs[i])
            ref.layer.in_proj_weight += s * ad.lora_B.double() @ ad.lora_A.double()
            ref.layer.out_proj.weight += s * ad.out.lora_B.double() @ ad.out.lora_A.double()
        return ref(x)


def check(got, want, base_out, what, tol=TOL):
    scale = want.abs().max().item() + 1e-300
    assume((want - base_out).abs().max().item() > 100 * TOL_MERGED * scale)  # the adapters matter here
    err = (got - want).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol * scale:.3g}"


@PROP
@given(mha_cases())
def test_mha_forward_merge_and_reload_match_dense(case):
    base, x, specs, active, gen = case
    model = copy.deepcopy(base)
    names = add_mha_adapters(model, specs, active, gen)
    with torch.no_grad():
        want, base_out = dense(base, model, names, specs, active, x), base(x)
        check(model(x), want, base_out, "MHA forward")
        fresh = copy.deepcopy(base)
        with tempfile.TemporaryDirectory() as d:
            for name in names:
                lorafit.save_adapter(model, Path(d) / name, adapter=name)
                lorafit.load_adapter(fresh, Path(d) / name, adapter=name)
        lorafit.set_adapter(fresh, [names[i] for i in active])
        assert torch.equal(fresh.eval()(x), model(x))
        w_in, w_out = base.layer.in_proj_weight.clone(), base.layer.out_proj.weight.clone()
        lorafit.merge(model)
        check(model(x), want, base_out, "MHA merged", TOL_MERGED)
        lorafit.unmerge(model)
        for got, w in ((model.layer.base_layer.in_proj_weight, w_in), (model.layer.base_layer.out_proj.weight, w_out)):
            assert (got - w).abs().max().item() <= TOL_MERGED * (w.abs().max().item() + 1)
        check(lorafit.merge_and_unload(model)(x), want, base_out, "MHA merge_and_unload", TOL_MERGED)
