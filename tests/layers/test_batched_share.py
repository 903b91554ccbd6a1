"""`adapter_batch(..., share_weights=True)`: the stacks become the adapters' storage (one copy).

Checked on Linear (a transformers Llama), Embedding and Conv2d (groups 1 and 2): the rows equal
each adapter run alone; every adapter's A and B live inside the layer's stacks afterwards, with
their values unchanged; the bytes held are the stacks' alone; an in-place write to a shared
parameter re-stacks; a new slot set frees the old storage; saved files are unchanged; fp32
master adapters batched in bf16 keep their own copy.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn as nn
from tests.helpers import tiny_llama

import lorafit
from lorafit.tree import lora_layers


def llama():
    model = tiny_llama()
    lorafit.inject(model, lorafit.LoraConfig(r=4, target_modules="all-linear", init=False))
    lorafit.inject(model, lorafit.LoraConfig(r=2, alpha=5, target_modules=["q_proj", "v_proj", "down_proj"],
                                             init=False), adapter="x")
    lorafit.inject(model, lorafit.LoraConfig(r=8, target_modules=["embed_tokens", "o_proj"], init=False),
                   adapter="y")
    return model


def convnet(groups: int):
    net = nn.Sequential(nn.Conv2d(4, 6, 3, groups=groups, padding=1), nn.ReLU(), nn.Conv2d(6, 3, 1)).eval()
    lorafit.inject(net, lorafit.LoraConfig(r=2, target_modules=["0", "2"], init=False))
    lorafit.inject(net, lorafit.LoraConfig(r=4, alpha=3, target_modules=["0"], init=False), adapter="b")
    return net


def out(model, x):
    y = model(x)
    return y.logits if hasattr(y, "logits") else y


def singles(model, x, names):
    ref = {}
    with torch.no_grad():
        for n in {n for n in names if n is not None}:
            lorafit.set_adapter(model, n)
            ref[n] = out(model, x)
        with lorafit.disabled(model):
            ref[None] = out(model, x)
    return ref


def values(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def stack_storages(model):
    """data_ptr -> bytes of every tensor in the layers' stack caches."""
    found = {}
    for _, layer in lora_layers(model):
        for _, _, stacks in layer.stack_cache.values():
            for t in stacks or ():
                if isinstance(t, torch.Tensor):
                    found[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return found


def adapter_params(model):
    return [p for _, layer in lora_layers(model) for ad in layer.adapters.values() for p in ad.parameters()]


CASES = {
    "llama": (llama, lambda: torch.randint(0, 64, (4, 6)), ["x", None, "default", "y"]),
    "conv": (lambda: convnet(1), lambda: torch.randn(3, 4, 5, 5), ["b", "default", None]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_shared_rows_equal_single_adapters_and_params_live_in_the_stacks(case):
    make, inputs, names = CASES[case]
    torch.manual_seed(0)
    model, x = make(), inputs()
    ref, before = singles(model, x, names), values(model)
    with torch.inference_mode(), lorafit.adapter_batch(model, names, share_weights=True):
        mixed = out(model, x)
    for i, n in enumerate(names):
        torch.testing.assert_close(mixed[i], ref[n][i], atol=1e-5, rtol=0)
    after = values(model)
    assert after.keys() == before.keys()
    for k in before:  # the same numbers, now read from the stacks
        torch.testing.assert_close(after[k], before[k], atol=0, rtol=0)
    storages = stack_storages(model)
    params = adapter_params(model)
    assert params and all(p.untyped_storage().data_ptr() in storages for p in params)
    assert all(not p.is_inference() and isinstance(p, nn.Parameter) and p.is_leaf for p in params)  # still parameters
    held = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in params}
    assert sum(held.values()) <= sum(storages.values())  # one copy: nothing outside the stacks
    one = names[0]  # the plain (non-batched) forward reads the shared views too
    torch.testing.assert_close(singles(model, x, [one])[one], ref[one], atol=1e-5, rtol=0)


def test_grouped_conv_shares_b_and_keeps_a():
    torch.manual_seed(0)
    net, x = convnet(2), torch.randn(2, 4, 5, 5)
    ref = singles(net, x, ["b", "default"])
    with torch.no_grad(), lorafit.adapter_batch(net, ["b", "default"], share_weights=True):
        mixed = net(x)
    for i, n in enumerate(["b", "default"]):
        torch.testing.assert_close(mixed[i], ref[n][i], atol=1e-5, rtol=0)
    storages = stack_storages(net)
    ad = net[0].adapters["b"]
    assert ad.lora_B.untyped_storage().data_ptr() in storages
    assert ad.lora_A.untyped_storage().data_ptr() not in storages  # a grouped A is not one block of the stack


def test_second_block_reuses_the_stacks_and_a_write_restacks():
    torch.manual_seed(0)
    model, ids = llama(), torch.randint(0, 64, (3, 5))
    names, slots = ["x", "default", None], ("default", "x", "y")
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        with lorafit.adapter_batch(model, names, slots=slots, share_weights=True):
            first = out(model, ids)
        stacks = next(iter(layer.stack_cache.values()))[2]
        with lorafit.adapter_batch(model, ["y", None, "x"], slots=slots, share_weights=True):
            out(model, ids)
        assert next(iter(layer.stack_cache.values()))[2] is stacks  # re-pointing did not invalidate the cache
        layer.adapters["x"].lora_B.add_(0.5)  # writes into the shared stack, bumps the parameter's version
        with lorafit.adapter_batch(model, names, slots=slots, share_weights=True):
            second = out(model, ids)
        assert next(iter(layer.stack_cache.values()))[2] is not stacks
        want = singles(model, ids, names)
    assert not torch.allclose(first[0], second[0])
    for i, n in enumerate(names):
        torch.testing.assert_close(second[i], want[n][i], atol=1e-5, rtol=0)


def test_a_new_slot_set_frees_the_old_storage_and_keeps_values():
    torch.manual_seed(0)
    model, ids = llama(), torch.randint(0, 64, (2, 5))
    layer = model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        with lorafit.adapter_batch(model, ["x", "default"], slots=("default", "x", "y"), share_weights=True):
            out(model, ids)
        old = weakref.ref(next(iter(layer.stack_cache.values()))[2][0])
        before = values(model)
        lorafit.delete_adapter(model, "y")
        with lorafit.adapter_batch(model, ["x", "default"], slots=("x", "default"), share_weights=True):
            out(model, ids)
    gc.collect()
    assert old() is None  # no parameter holds a view of the old stack any more
    after = values(model)
    for k in after:
        torch.testing.assert_close(after[k], before[k], atol=0, rtol=0)


def test_saved_files_do_not_change(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model, ids = llama(), torch.randint(0, 64, (2, 5))
    for n in ("x", "default"):
        lorafit.save_adapter(model, tmp_path / f"plain-{n}", adapter=n)
    with torch.no_grad(), lorafit.adapter_batch(model, ["x", "default"], share_weights=True):
        out(model, ids)
    for n in ("x", "default"):
        lorafit.save_adapter(model, tmp_path / f"shared-{n}", adapter=n)
        a = load_file(tmp_path / f"plain-{n}" / "adapter_model.safetensors")
        b = load_file(tmp_path / f"shared-{n}" / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_fp32_masters_on_a_bf16_forward_keep_their_own_copy():
    torch.manual_seed(0)
    model = tiny_llama().to(torch.bfloat16)
    lorafit.inject(model, lorafit.LoraConfig(r=4, target_modules=["q_proj"], init=False))
    lorafit.inject(model, lorafit.LoraConfig(r=4, target_modules=["q_proj"], init=False), adapter="x")
    with torch.no_grad(), lorafit.adapter_batch(model, ["x", "default"], share_weights=True):
        model(torch.randint(0, 64, (2, 4)))
    storages = stack_storages(model)
    params = adapter_params(model)
    assert params and all(p.dtype == torch.float32 for p in params)
    assert not any(p.untyped_storage().data_ptr() in storages for p in params)


def test_training_shared_parameters_matches_plain_training():
    """A plain training step on shared parameters writes into the stack; the next batch re-stacks and agrees."""
    torch.manual_seed(0)
    shared = llama()
    plain = llama()
    plain.load_state_dict(shared.state_dict())
    ids = torch.randint(0, 64, (2, 5))
    names = ["x", "default"]
    start, got = values(plain), {}
    for tag, model in (("shared", shared), ("plain", plain)):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        for _ in range(2):
            with torch.no_grad(), lorafit.adapter_batch(model, names, share_weights=tag == "shared"):
                out(model, ids)
            lorafit.set_adapter(model, "x")
            out(model, ids).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad(), lorafit.adapter_batch(model, names, share_weights=tag == "shared"):
            got[tag] = out(model, ids)
    moved = values(plain)
    for k, v in moved.items():
        torch.testing.assert_close(values(shared)[k], v, atol=1e-6, rtol=0)
    assert not all(torch.equal(v, start[k]) for k, v in moved.items())  # the steps did train
    torch.testing.assert_close(got["shared"], got["plain"], atol=1e-5, rtol=0)
