"""DoRA: PEFT parity both ways, PEFT's key shapes, merge/unmerge, gradients against a dense reference."""

import copy

import pytest
import torch
import torch.nn as nn
from tests.helpers import Wrap, peft_load, tiny_gpt2

import lorafit
from lorafit.variants import dora_norm

peft = pytest.importorskip("peft")
ATOL = 1e-5


CASES = {
    "linear": (lambda: Wrap(nn.Linear(8, 6)), lambda: torch.randn(3, 5, 8), (6,)),
    "linear_nobias": (lambda: Wrap(nn.Linear(8, 6, bias=False)), lambda: torch.randn(4, 8), (6,)),
    "conv1d": (lambda: Wrap(nn.Conv1d(4, 6, 3, padding=1)), lambda: torch.randn(2, 4, 9), (1, 6, 1)),
    "conv2d": (lambda: Wrap(nn.Conv2d(4, 6, 3, stride=2, padding=1)), lambda: torch.randn(2, 4, 9, 9),
               (1, 6, 1, 1)),
    "conv3d": (lambda: Wrap(nn.Conv3d(2, 4, 3, padding=1)), lambda: torch.randn(1, 2, 4, 4, 4),
               (1, 4, 1, 1, 1)),
    "embedding": (lambda: Wrap(nn.Embedding(20, 8)), lambda: torch.randint(0, 20, (3, 7)), (8,)),
}


def _perturb(module, names=("lora_magnitude_vector",)):
    """Trained-looking magnitudes: a fresh DoRA adapter has m = ||W + sBA||, i.e. g = 1."""
    with torch.no_grad():
        for n, p in module.named_parameters():
            if any(k in n for k in names):
                p.mul_(1 + 0.3 * torch.rand_like(p))


def _dora(base, **kw):
    cfg = dict(r=4, alpha=12, target_modules=["layer"], init=False, use_dora=True)
    cfg.update(kw)
    model = lorafit.inject(copy.deepcopy(base), lorafit.LoraConfig(**cfg)).eval()
    _perturb(model)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_peft_dora_file_loads_in_lorafit(case, tmp_path):
    make, inputs, mshape = CASES[case]
    base, x = make().eval(), inputs()
    cfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["layer"], init_lora_weights=False,
                          use_dora=True)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    _perturb(pm)
    pm.save_pretrained(str(tmp_path))
    from safetensors.torch import load_file
    keys = {k: v.shape for k, v in load_file(str(tmp_path / "adapter_model.safetensors")).items()}
    assert keys["base_model.model.layer.lora_magnitude_vector"] == mshape
    with torch.no_grad():
        want = pm.eval()(x)
        model = lorafit.load_adapter(copy.deepcopy(base), tmp_path).eval()
        got = model(x)
    assert not torch.allclose(want, base(x), atol=1e-3)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    lorafit.save_adapter(model, tmp_path / "back")
    from safetensors.torch import load_file
    ours = load_file(str(tmp_path / "back" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in ours.items()} == keys


@pytest.mark.parametrize("case", list(CASES))
def test_lorafit_dora_file_loads_in_peft(case, tmp_path):
    make, inputs, _ = CASES[case]
    base, x = make().eval(), inputs()
    model = _dora(base)
    lorafit.save_adapter(model, tmp_path)
    with torch.no_grad():
        got = model(x)
        want = peft_load(base, tmp_path)(x)
    assert not torch.allclose(got, base(x), atol=1e-3)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_gpt2_conv1d_dora_both_ways(tmp_path):
    base = tiny_gpt2()
    ids = torch.randint(0, 64, (2, 10))
    cfg = lorafit.LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_fc"], init=False, use_dora=True,
                             use_rslora=True)
    model = lorafit.inject(copy.deepcopy(base), cfg)
    _perturb(model)
    lorafit.save_adapter(model, tmp_path)
    with torch.no_grad():
        want = peft_load(base, tmp_path)(ids).logits
        torch.testing.assert_close(model(ids).logits, want, atol=ATOL, rtol=0)
    # merge / unmerge on Conv1D weights ([in, out] layout)
    w0 = model.transformer.h[0].attn.c_attn.base_layer.weight.detach().clone()
    lorafit.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, atol=ATOL, rtol=0)
    lorafit.unmerge(model)
    torch.testing.assert_close(model.transformer.h[0].attn.c_attn.base_layer.weight, w0, atol=1e-6, rtol=0)


def _dense(layer_model, x):
    """Reference: the DoRA definition with an explicitly built weight."""
    lay = layer_model.layer
    ad = lay.adapters["default"]
    w = lay.base_layer.weight.detach()
    delta = lay.delta_weight(ad)
    if isinstance(lay.base_layer, nn.Embedding):
        v = w + delta
        norm = v.norm(dim=0)
        return nn.functional.embedding(x, v * (ad.lora_magnitude_vector / norm)[None])
    v = w + delta
    norm = v.flatten(1).norm(dim=1)
    v = v * (ad.lora_magnitude_vector.reshape(-1) / norm).view(-1, *([1] * (w.dim() - 1)))
    if isinstance(lay.base_layer, nn.Linear):
        return nn.functional.linear(x, v, lay.base_layer.bias)
    b = lay.base_layer
    return b._conv_forward(x, v, b.bias)


@pytest.mark.parametrize("case", [c for c in CASES])
def test_merge_unmerge_exact_and_gradients(case):
    make, inputs, _ = CASES[case]
    base, x = make().eval(), inputs()
    model = _dora(base)
    with torch.no_grad():
        ref = _dense(model, x)
        out = model(x)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    w0 = model.layer.base_layer.weight.detach().clone()
    lorafit.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=ATOL, rtol=0)
    lorafit.unmerge(model)
    torch.testing.assert_close(model.layer.base_layer.weight, w0, atol=1e-6, rtol=0)
    # gradients: m gets the full gradient, A/B get it through W + sBA but not through the (detached) norm
    ad = model.layer.adapters["default"]
    if x.is_floating_point():
        x.requires_grad_(True)
    model.train()
    out = model(x)
    gout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [ad.lora_A, ad.lora_B, ad.lora_magnitude_vector]
                                + ([x] if x.is_floating_point() else []), gout)
    ref_in = x.detach().clone().requires_grad_(x.is_floating_point())
    a_ref, b_ref = ad.lora_A.detach().clone().requires_grad_(), ad.lora_B.detach().clone().requires_grad_()
    m_ref = ad.lora_magnitude_vector.detach().clone().requires_grad_()
    lay = model.layer
    with torch.no_grad():
        norm = (lay.base_layer.weight + lay.delta_weight(ad)).detach()
        norm = norm.norm(dim=0) if isinstance(lay.base_layer, nn.Embedding) else norm.flatten(1).norm(dim=1)
    if isinstance(lay.base_layer, nn.Embedding):
        v = lay.base_layer.weight + ad.scaling * (b_ref @ a_ref).t()
        ref = nn.functional.embedding(ref_in, v * (m_ref.reshape(-1) / norm)[None])
    else:
        d = (b_ref.flatten(1) @ a_ref.flatten(1)).view(lay.base_layer.weight.shape) * ad.scaling
        v = (lay.base_layer.weight + d) * (m_ref.reshape(-1) / norm).view(-1, *([1] * (d.dim() - 1)))
        ref = (nn.functional.linear(ref_in, v, lay.base_layer.bias) if isinstance(lay.base_layer, nn.Linear)
               else lay.base_layer._conv_forward(ref_in, v, lay.base_layer.bias))
    want = torch.autograd.grad(ref, [a_ref, b_ref, m_ref] + ([ref_in] if x.is_floating_point() else []), gout)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_norm_formula_matches_dense():
    w, a, b = torch.randn(1, 12, 30), torch.randn(1, 4, 30), torch.randn(1, 12, 4)
    s = 0.7
    wa = w @ a.transpose(1, 2)
    got = dora_norm(wa, w.square().sum(-1), a, b, s)
    torch.testing.assert_close(got, (w + s * b @ a).norm(dim=-1).reshape(-1))


def test_grouped_conv_dora_matches_definition():
    """lorafit's grouped conv form: the update has the weight's layout, so DoRA is well defined."""
    base = Wrap(nn.Conv2d(4, 6, 3, groups=2, padding=1)).eval()
    x = torch.randn(2, 4, 5, 5)
    model = _dora(base)
    with torch.no_grad():
        ref = _dense(model, x)
        torch.testing.assert_close(model(x), ref, atol=ATOL, rtol=0)
        lorafit.merge(model)
        torch.testing.assert_close(model(x), ref, atol=ATOL, rtol=0)


def test_grouped_conv_peft_form_refused():
    """PEFT's conv form on a grouped conv: the update mixes groups, DoRA's norm is undefined."""
    from lorafit.variants import DORA
    layer = lorafit.layers.ConvLora(nn.Conv2d(4, 6, 3, groups=2))
    ad = layer.make_adapter("x", 4, 8, False, 0.0, a_groups=1)
    with pytest.raises(ValueError, match="PEFT's form"):
        DORA.plan("conv", layer, ad, lorafit.LoraConfig(use_dora=True), None)


def test_dora_norm_not_recomputed_until_weights_change():
    base = Wrap(nn.Linear(8, 6)).eval()
    model = _dora(base)
    lay, ad = model.layer, model.layer.adapters["default"]
    n1 = ad.variant.weight_norm(lay, ad)
    assert ad.variant.weight_norm(lay, ad) is n1  # cached
    with torch.no_grad():
        ad.lora_B.add_(1.0)
    n2 = ad.variant.weight_norm(lay, ad)
    assert n2 is not n1 and not torch.allclose(n1, n2)


@pytest.mark.parametrize("changed", ["A", "B", "W"])
def test_dora_norm_cache_follows_in_place_changes(changed):
    """The cached ||W + s B A|| (and the cached ||W||^2 inside it) is recomputed after an in-place change of
    any of W, A or B (an optimizer step, a loaded state dict) and equals the dense norm again."""
    model = _dora(Wrap(nn.Linear(8, 6)))
    lay, ad = model.layer, model.layer.adapters["default"]
    tensor = {"A": ad.lora_A, "B": ad.lora_B, "W": lay.base_layer.weight}[changed]
    n1 = ad.variant.weight_norm(lay, ad)
    with torch.no_grad():
        tensor.mul_(1.5).add_(0.25)
    dense = (lay.base_layer.weight.double() + lay.delta_weight(ad).double()).norm(dim=1)
    assert not torch.allclose(n1.double(), dense, rtol=1e-3)  # the change moved the norm
    torch.testing.assert_close(ad.variant.weight_norm(lay, ad).double(), dense, rtol=1e-5, atol=1e-6)


def test_bad_input_dora(tmp_path):
    mha = Wrap(nn.MultiheadAttention(8, 2))
    before = copy.deepcopy(mha.state_dict())
    with pytest.raises(ValueError, match="DoRA is not supported"):
        lorafit.inject(mha, lorafit.LoraConfig(r=2, target_modules=["layer"], use_dora=True))
    assert not any("lora" in n for n, _ in mha.named_modules())
    assert all(torch.equal(before[k], v) for k, v in mha.state_dict().items())
    # two live adapters on one layer, one of them DoRA
    model = _dora(Wrap(nn.Linear(8, 6)))
    lorafit.inject(model, lorafit.LoraConfig(r=2, target_modules=["layer"]), adapter="plain")
    lorafit.set_adapter(model, ["default", "plain"])
    with pytest.raises(ValueError, match="DoRA"):
        model(torch.randn(2, 8))
    lorafit.set_adapter(model, "default")
    with pytest.raises(ValueError, match="DoRA"), lorafit.adapter_batch(model, ["default", None]):
        model(torch.randn(2, 8))
    # a DoRA file into a config without use_dora
    lorafit.save_adapter(model, tmp_path)
    import json
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    cfg["use_dora"] = False
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    fresh = Wrap(nn.Linear(8, 6))
    with pytest.raises(ValueError, match="use_dora=false"):
        lorafit.load_adapter(fresh, tmp_path)
    assert isinstance(fresh.layer, nn.Linear)
