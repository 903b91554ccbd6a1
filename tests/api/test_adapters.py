"""Several adapters on one base: activation, deletion, disabling, mixed batches, merging."""

import copy

import pytest
import torch
import torch.nn as nn
from tests.helpers import Tiny, same_state, state, tiny_llama

import lorafit


def two_adapter_tiny():
    model = Tiny().eval()
    lorafit.inject(model, lorafit.LoraConfig(r=2, target_modules=["emb", "lin"], init=False, modules_to_save=["cls"]))
    lorafit.inject(model, lorafit.LoraConfig(r=4, alpha=3, target_modules=["lin"], init=False,
                                             modules_to_save=["cls"]), adapter="b")
    with torch.no_grad():
        for p in model.cls.modules_to_save["b"].parameters():
            p.add_(torch.randn_like(p))
    return model


def test_inject_freezes_base_and_reports_trainable():
    model = tiny_llama()
    total_before = sum(p.numel() for p in model.parameters())
    lorafit.inject(model, lorafit.LoraConfig(r=4, target_modules="all-linear"))
    trainable, total = lorafit.trainable_parameters(model)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert trainable == lora and total == total_before + lora
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert "lm_head" not in [n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "adapters")]
    assert type(model.lm_head) is nn.Linear


def test_second_adapter_inactive_until_set_and_switching():
    model = two_adapter_tiny()
    ids = torch.randint(0, 20, (3, 5))
    with torch.no_grad():
        out_a = model(ids)
        lorafit.set_adapter(model, "b")
        out_b = model(ids)
        with lorafit.disabled(model):
            out_base = model(ids)
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, out_base)
    plain = copy.deepcopy(model)
    lorafit.unload(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), out_base)
    # only the active adapter trains
    assert all(p.requires_grad for p in model.lin.adapters["b"].parameters())
    assert not any(p.requires_grad for p in model.lin.adapters["default"].parameters())


def test_adapter_batch_rows_equal_single_adapter_forwards():
    model = two_adapter_tiny()
    ids = torch.randint(0, 20, (5, 6))
    names = ["default", "b", None, "b", "default"]
    with torch.no_grad():
        singles = {}
        for n in ("default", "b"):
            lorafit.set_adapter(model, n)
            singles[n] = model(ids)
        with lorafit.disabled(model):
            singles[None] = model(ids)
        with lorafit.adapter_batch(model, names):
            mixed = model(ids)
    for i, n in enumerate(names):
        torch.testing.assert_close(mixed[i], singles[n][i], atol=1e-5, rtol=0)


def test_adapter_batch_llama_one_pass():
    model = tiny_llama()
    lorafit.inject(model, lorafit.LoraConfig(r=4, target_modules="all-linear", init=False))
    lorafit.inject(model, lorafit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init=False), adapter="x")
    ids = torch.randint(0, 64, (3, 8))
    names = ["x", None, "default"]
    calls = []
    layer = model.model.layers[0].self_attn.q_proj
    handle = layer.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        with lorafit.adapter_batch(model, names):
            mixed = model(ids).logits
        ref = {}
        for n in ("x", "default"):
            lorafit.set_adapter(model, n)
            ref[n] = model(ids).logits
        with lorafit.disabled(model):
            ref[None] = model(ids).logits
    handle.remove()
    assert calls[0] == 3  # the whole batch went through the layer at once
    for i, n in enumerate(names):
        torch.testing.assert_close(mixed[i], ref[n][i], atol=1e-5, rtol=0)


def test_adapter_batch_conv_rows():
    net = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, padding=1), nn.ReLU(), nn.Conv2d(6, 3, 1))
    lorafit.inject(net, lorafit.LoraConfig(r=2, target_modules=["0", "2"], init=False))
    lorafit.inject(net, lorafit.LoraConfig(r=4, target_modules=["0"], init=False), adapter="b")
    x = torch.randn(3, 4, 5, 5)
    names = ["b", "default", None]
    with torch.no_grad():
        with lorafit.adapter_batch(net, names):
            mixed = net(x)
        ref = {}
        for n in ("b", "default"):
            lorafit.set_adapter(net, n)
            ref[n] = net(x)
        with lorafit.disabled(net):
            ref[None] = net(x)
    for i, n in enumerate(names):
        torch.testing.assert_close(mixed[i], ref[n][i], atol=1e-5, rtol=0)


def test_adapter_batch_bad_input():
    model = two_adapter_tiny()
    with pytest.raises(ValueError, match="unknown adapter 'zzz'"):
        with lorafit.adapter_batch(model, ["zzz"]):
            pass
    with pytest.raises(ValueError, match="2 names but the input batch has 3 rows"):
        with lorafit.adapter_batch(model, ["b", None]):
            model(torch.randint(0, 20, (3, 4)))


def test_merge_unmerge_round_trip_and_merge_and_unload():
    model = two_adapter_tiny()
    lorafit.set_adapter(model, ["default", "b"])
    ids = torch.randint(0, 20, (4, 5))
    base_state = {k: v.clone() for k, v in Tiny().state_dict().items()}
    with torch.no_grad():
        want = model(ids)
        before = state(model)
        lorafit.merge(model, safe=True)
        torch.testing.assert_close(model(ids), want, atol=1e-5, rtol=1e-6)
        lorafit.unmerge(model)
        after = state(model)
        for k in before:
            torch.testing.assert_close(after[k], before[k], atol=1e-5, rtol=1e-6)
        merged = lorafit.merge_and_unload(model)
        torch.testing.assert_close(merged(ids), want, atol=1e-5, rtol=1e-6)
    assert merged.state_dict().keys() == base_state.keys()
    assert not any("lorafit" in type(m).__module__ for m in merged.modules())


def test_delete_adapter():
    model = two_adapter_tiny()
    lorafit.delete_adapter(model, "b")
    assert lorafit.adapter_names(model) == ["default"]
    assert "b" not in model.cls.modules_to_save
    with pytest.raises(ValueError, match="unknown adapter"):
        lorafit.delete_adapter(model, "b")


def test_inject_nothing_matched_lists_candidates_and_leaves_model():
    model = Tiny()
    before = state(model)
    with pytest.raises(ValueError, match=r"matched no supported layer; candidates: emb, lin, cls"):
        lorafit.inject(model, lorafit.LoraConfig(target_modules=["nope"]))
    assert same_state(before, state(model)) and type(model.lin) is nn.Linear


def test_regex_and_suffix_targets_and_exclude():
    model = tiny_llama()
    lorafit.inject(model, lorafit.LoraConfig(r=2, target_modules=r".*\.(q|v)_proj",
                                             exclude_modules=["layers.1.self_attn.v_proj"]))
    wrapped = sorted(n for n, m in model.named_modules() if hasattr(m, "adapters"))
    assert wrapped == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                       "model.layers.1.self_attn.q_proj"]


def test_mha_out_proj_is_not_wrapped_alone():
    """Targeting MHA's out_proj adapts the MHA itself (its forward bypasses out_proj.forward)."""
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    lorafit.inject(layer, lorafit.LoraConfig(r=2, target_modules=["out_proj"], init=False))
    assert type(layer.self_attn).__name__ == "MhaLora"
    assert type(layer.self_attn.base_layer.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        with lorafit.disabled(layer):
            base = layer(x)
        assert not torch.allclose(layer(x), base, atol=1e-4)


def test_merge_state_dict_matches_merge_and_unload(tmp_path):
    model = tiny_llama()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    lorafit.inject(model, lorafit.LoraConfig(r=4, alpha=6, target_modules="all-linear", init=False))
    lorafit.save_adapter(model, tmp_path)
    from lorafit.io import read_adapter_tensors
    tensors, _ = read_adapter_tensors(tmp_path)
    scalings = {n: m.adapters["default"].scaling for n, m in model.named_modules() if hasattr(m, "adapters")}
    offline = lorafit.merge_state_dict(base_state, tensors, scalings)
    merged = lorafit.merge_and_unload(model).state_dict()
    assert offline.keys() == merged.keys()
    for k in merged:
        torch.testing.assert_close(offline[k], merged[k], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="DoRA"):
        lorafit.merge_state_dict(base_state, {"x.lora_magnitude_vector": torch.ones(3)}, {})


def test_adapter_batch_cache_follows_weight_updates():
    """Stacks are cached across blocks, but a changed adapter weight must be seen."""
    model = two_adapter_tiny()
    ids = torch.randint(0, 20, (2, 4))
    names = ["b", "default"]
    with torch.no_grad():
        with lorafit.adapter_batch(model, names):
            first = model(ids)
        model.lin.adapters["b"].lora_B.add_(1.0)
        with lorafit.adapter_batch(model, names):
            second = model(ids)
        lorafit.set_adapter(model, "b")
        want = model(ids)
    assert not torch.allclose(first[0], second[0])
    torch.testing.assert_close(second[0], want[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("active, delete", [
    (["z"], "z"),  # the only active one: the first remaining (sorted, as PEFT) takes over, with a warning
    (["z", "b"], "z"),  # one of several active: the others stay active
    (["z"], "b"),  # an inactive one: nothing changes
])
def test_delete_adapter_active_set_matches_peft(active, delete):
    """Deleting the active adapter must not leave the model silently running as the bare base."""
    import warnings

    from peft import LoraConfig, get_peft_model
    pm = get_peft_model(Tiny(), LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False), adapter_name="z")
    model = Tiny()
    lorafit.inject(model, lorafit.LoraConfig(r=2, target_modules=["lin"], init=False), adapter="z")
    for name in ("c", "b"):  # added after "c", but "b" sorts first: PEFT picks by name, not by age
        pm.add_adapter(name, LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False))
        lorafit.inject(model, lorafit.LoraConfig(r=2, target_modules=["lin"], init=False), adapter=name)
    pm.base_model.set_adapter(active)
    lorafit.set_adapter(model, active)
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        lorafit.delete_adapter(model, delete)
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        pm.delete_adapter(delete)
    assert lorafit.active_adapters(model) == list(pm.active_adapters)
    assert (len(ours) == 1) == (len(theirs) == 1) and all("now" in str(w.message) for w in ours)
    trainable = {n.split(".")[2] for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}
    assert trainable == set(lorafit.active_adapters(model))
    ids = torch.randint(0, 20, (2, 5))
    with torch.no_grad():
        with lorafit.disabled(model):
            base = model(ids)
        assert not torch.allclose(model(ids), base)  # an adapter runs, as active_adapters() says


def test_delete_last_adapter_leaves_none_active():
    model = Tiny()
    lorafit.inject(model, lorafit.LoraConfig(r=2, target_modules=["lin"], init=False))
    lorafit.delete_adapter(model, "default")
    assert lorafit.active_adapters(model) == [] and lorafit.adapter_names(model) == []


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_inject_and_load_keep_the_models_train_or_eval_mode(tmp_path, mode):
    """New wrappers, adapters and saved copies follow the model's mode: an eval model must not run
    adapter dropout (or MultiheadAttention's attention dropout) at inference after an inject."""
    def fresh():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2, dropout=0.5), nn.Linear(8, 3))
        return model.eval() if mode == "eval" else model.train()

    model = fresh()
    cfg = dict(r=2, target_modules=["0", "1"], lora_dropout=0.5, init=False, modules_to_save=["2"])
    lorafit.inject(model, lorafit.LoraConfig(**cfg))
    lorafit.inject(model, lorafit.LoraConfig(**cfg), adapter="b")  # attach to existing wrappers
    lorafit.save_adapter(model, tmp_path / "a")
    other = fresh()
    lorafit.load_adapter(other, tmp_path / "a")
    for m in (model, other):
        modes = {n: mod.training for n, mod in m.named_modules()}
        assert set(modes.values()) == {mode == "train"}, modes
    if mode == "eval":
        x = torch.randn(5, 8)
        with torch.no_grad():
            first = model[0](x)
            attn = model[1](x, x, x)[0]
            assert torch.equal(first, model[0](x)) and torch.equal(attn, model[1](x, x, x)[0])
