"""combine_adapters: every method checked against its definition on the dense updates."""

import copy

import pytest
import torch
import torch.nn as nn
from tests.helpers import Tiny, peft_load, same_state, state

import lorafit
from lorafit.tree import adapter_configs, lora_layers


class Net(nn.Module):
    """One layer of each kind combine_adapters handles."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.lin = nn.Linear(8, 10)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.gconv = nn.Conv2d(4, 6, 3, groups=2, padding=1)
        self.mha = nn.MultiheadAttention(8, 2)


TARGETS = ["emb", "lin", "conv", "gconv", "mha"]


def net_with_adapters(base=None):
    model = copy.deepcopy(base) if base is not None else Net()
    cfgs = {
        "a": lorafit.LoraConfig(r=4, alpha=8, target_modules=TARGETS, init=False),
        "b": lorafit.LoraConfig(r=2, alpha=3, target_modules=TARGETS, init=False, use_rslora=True,
                                rank_pattern={"lin": 6}, alpha_pattern={"conv": 5}),
        "c": lorafit.LoraConfig(r=4, alpha=2, target_modules=TARGETS, init=False, use_rslora=True),
    }
    for name, cfg in cfgs.items():
        lorafit.inject(model, cfg, adapter=name)
    return model


def deltas(model, name):
    """Dense updates per layer part (MHA: in and out), from the layers' own delta code."""
    out = {}
    for lname, layer in lora_layers(model):
        ad = layer.adapters[name]
        out[lname] = layer.delta_weight(ad).float()
        if len(ad.parts()) > 1:  # MHA: the out-proj part
            out[lname + ".out"] = layer._out_delta(name).float()
    return out


def flat(d, lname):
    """A layer's delta as [groups, out/g, K] (the unit the methods work on)."""
    if lname.startswith("emb"):
        return d.t()[None]
    if lname.startswith("gconv"):
        return d.reshape(2, 3, -1)
    return d.reshape(1, d.shape[0], -1)


W = [0.7, -0.4, 1.3]


def test_cat_is_exact_with_mixed_ranks_patterns_and_rslora(tmp_path):
    base = Net()
    model = net_with_adapters(base)
    per = [deltas(model, n) for n in "abc"]
    lorafit.combine_adapters(model, ["a", "b", "c"], W, "cat", method="cat")
    got = deltas(model, "cat")
    for k in got:
        ref = sum(w * p[k] for w, p in zip(W, per))
        torch.testing.assert_close(got[k], ref, atol=1e-5, rtol=1e-5)
    assert model.lin.adapters["cat"].r == 4 + 6 + 4 and model.emb.adapters["cat"].r == 10
    assert model.lin.adapters["cat"].scaling == 1.0
    # the saved adapter (rank_pattern for the odd layer) reloads to the same updates
    with pytest.warns(UserWarning, match="group-respecting"):
        lorafit.save_adapter(model, tmp_path, adapter="cat")
    fresh = lorafit.load_adapter(copy.deepcopy(base), tmp_path)
    for k, d in deltas(fresh, "default").items():
        torch.testing.assert_close(d, got[k])


def test_cat_output_matches_peft_load(tmp_path):
    base = Tiny().eval()
    model = copy.deepcopy(base)
    lorafit.inject(model, lorafit.LoraConfig(r=4, alpha=8, target_modules=["emb", "lin"], init=False), "x")
    lorafit.inject(model, lorafit.LoraConfig(r=2, alpha=4, target_modules=["emb", "lin"], init=False,
                                             use_rslora=True, rank_pattern={"lin": 3}), "y")
    ids = torch.randint(0, 20, (3, 6))
    lorafit.combine_adapters(model, ["x", "y"], [1.0, 1.0], "xy", method="cat")
    with torch.no_grad():
        lorafit.set_adapter(model, ["x", "y"])
        both = model(ids)
        lorafit.set_adapter(model, "xy")
        torch.testing.assert_close(model(ids), both, atol=1e-5, rtol=0)
    lorafit.save_adapter(model, tmp_path, adapter="xy")
    with torch.no_grad():
        torch.testing.assert_close(peft_load(base, tmp_path)(ids), both, atol=1e-5, rtol=0)


def test_linear_is_peft_weighted_factor_sum():
    model = Net()
    for n, (r, alpha, rs) in {"a": (4, 8, False), "b": (4, 3, True)}.items():
        lorafit.inject(model, lorafit.LoraConfig(r=r, alpha=alpha, use_rslora=rs, target_modules=TARGETS,
                                                 init=False), adapter=n)
    w = [0.5, -2.0]
    lorafit.combine_adapters(model, ["a", "b"], w, "lin", method="linear")
    for _, layer in lora_layers(model):
        parts = [layer.adapters[n] for n in ("a", "b", "lin")]
        for pa, pb, new in zip(*[p.parts() for p in parts]):
            ca, cb = w[0] * pa.scaling, w[1] * pb.scaling
            want_a = (abs(ca) ** 0.5) * pa.lora_A + (abs(cb) ** 0.5) * (-1 if cb < 0 else 1) * pb.lora_A
            want_b = (abs(ca) ** 0.5) * pa.lora_B + (abs(cb) ** 0.5) * pb.lora_B
            torch.testing.assert_close(new.lora_A, want_a)
            torch.testing.assert_close(new.lora_B, want_b)
    # one adapter: linear is exact
    lorafit.combine_adapters(model, ["a"], [-0.3], "one", method="linear")
    for k, d in deltas(model, "one").items():
        torch.testing.assert_close(d, -0.3 * deltas(model, "a")[k], atol=1e-6, rtol=1e-5)


def best_rank_k(d, k):
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    return (u[..., :k] * s[..., None, :k]) @ vh[..., :k, :]


def test_svd_is_best_rank_k_of_exact_sum():
    model = net_with_adapters()
    per = [deltas(model, n) for n in "abc"]
    lorafit.combine_adapters(model, ["a", "b", "c"], W, "svd", method="svd", svd_rank=4)
    for k, d in deltas(model, "svd").items():
        exact = flat(sum(w * p[k] for w, p in zip(W, per)), k)
        got = flat(d, k)
        g = exact.shape[0]
        torch.testing.assert_close(got, best_rank_k(exact, 4 // g), atol=1e-5, rtol=1e-4)
        sv = torch.linalg.svdvals(exact)[..., 4 // g:]  # Eckart-Young: the error is the tail
        torch.testing.assert_close((got - exact).norm(), sv.square().sum().sqrt(), atol=1e-4, rtol=1e-4)
    # default rank: the largest input rank of each layer (lin: 6)
    lorafit.combine_adapters(model, ["a", "b", "c"], W, "svd6", method="svd")
    assert model.lin.adapters["svd6"].r == 6 and model.conv.adapters["svd6"].r == 4


def ties_reference(taus, w, density):
    """TIES written out entry by entry (trim, elect, disjoint mean)."""
    trimmed = []
    for t in taus:
        k = int(density * t.numel())
        thresh = t.abs().flatten().sort(descending=True).values[k - 1]
        trimmed.append(torch.where(t.abs() >= thresh, t, torch.zeros_like(t)))
    weighted = [wi * t for wi, t in zip(w, trimmed)]
    total = sum(weighted)
    sign = torch.where(total >= 0, 1.0, -1.0)
    num = sum(torch.where(torch.sign(x) == sign, x, torch.zeros_like(x)) for x in weighted)
    cnt = sum((torch.sign(x) == sign).float() for x in weighted)
    return num / cnt.clamp_min(1)


def test_ties_matches_definition():
    model = net_with_adapters()
    per = [deltas(model, n) for n in "abc"]
    lorafit.combine_adapters(model, ["a", "b", "c"], W, "ties", method="ties", density=0.3, svd_rank=24)
    for k, d in deltas(model, "ties").items():
        want = ties_reference([flat(p[k], k) for p in per], W, 0.3)
        assert min(want.shape[-2:]) * want.shape[0] <= 24
        torch.testing.assert_close(flat(d, k), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_matches_definition_and_is_seeded(method):
    model = net_with_adapters()
    per = [deltas(model, n) for n in "abc"]
    lorafit.combine_adapters(model, ["a", "b", "c"], W, "d1", method=method, density=0.4, svd_rank=24, seed=7)
    gen = torch.Generator().manual_seed(7)
    got = deltas(model, "d1")
    for k in got:  # layers in model order; MHA: in-proj then out-proj (the keys' order)
        taus = [flat(p[k], k) for p in per]
        dropped = [t * (torch.rand(t.shape, generator=gen) < 0.4) / 0.4 for t in taus]
        if method == "dare_linear":
            want = sum(w * t for w, t in zip(W, dropped))
        else:
            want = ties_reference(dropped, W, 1.0)
        torch.testing.assert_close(flat(got[k], k), want, atol=1e-5, rtol=1e-4)
    lorafit.combine_adapters(model, ["a", "b", "c"], W, "d2", method=method, density=0.4, svd_rank=24, seed=7)
    lorafit.combine_adapters(model, ["a", "b", "c"], W, "d3", method=method, density=0.4, svd_rank=24, seed=8)
    assert torch.equal(model.lin.adapters["d1"].lora_B, model.lin.adapters["d2"].lora_B)
    assert not torch.allclose(deltas(model, "d1")["lin"], deltas(model, "d3")["lin"])


def test_bad_input_leaves_model_unchanged():
    model = net_with_adapters()
    lorafit.inject(model, lorafit.LoraConfig(r=4, target_modules=["lin"], init=False), adapter="lin_only")
    lorafit.inject(model, lorafit.LoraConfig(r=4, target_modules=["emb", "lin"], init=False, use_dora=True),
                   adapter="dora")
    before, names = state(model), lorafit.adapter_names(model)
    configs = adapter_configs(model)
    bad = [
        (dict(names=["a", "lin_only"], weights=[1, 1]), "different layers"),
        (dict(names=["a", "b"], weights=[1.0]), "1 weights for 2"),
        (dict(names=["a", "nope"], weights=[1, 1]), "unknown adapter"),
        (dict(names=["a", "b"], weights=[1, 1], new_name="a"), "new_name"),
        (dict(names=["a", "b"], weights=[1, 1], method="linear"), "equal ranks"),
        (dict(names=["a", "dora"], weights=[1, 1]), "DoRA"),
        (dict(names=["a", "b"], weights=[1, 1], method="ties"), "density"),
        (dict(names=["a", "b"], weights=[1, 1], method="ties", density=1.5), "density"),
        (dict(names=["a", "b"], weights=[1, 1], method="svd", svd_rank=3), "multiple of the conv"),
        (dict(names=["a", "b"], weights=[1, 1], method="mean"), "method must be"),
    ]
    for kw, msg in bad:
        kw.setdefault("new_name", "new")
        with pytest.raises(ValueError, match=msg):
            lorafit.combine_adapters(model, **kw)
        assert same_state(before, state(model)) and lorafit.adapter_names(model) == names
        assert adapter_configs(model) == configs
