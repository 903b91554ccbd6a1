"""PiSSA / OLoRA: function unchanged at init, factors as defined, PEFT's residual, conversion to LoRA."""

import copy
import json

import pytest
import torch
import torch.nn as nn
from tests.helpers import peft_load, same_state, state, tiny_gpt2

import lorafit

peft = pytest.importorskip("peft")


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.up = nn.Linear(12, 24)
        self.down = nn.Linear(24, 10)

    def forward(self, ids):
        return self.down(torch.relu(self.up(self.emb(ids))))


def train_steps(model, ids, steps=3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        model(ids).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
@pytest.mark.parametrize("rslora", [False, True])
def test_init_keeps_function_and_converts_to_lora(init, rslora, tmp_path):
    base = Mlp().eval()
    ids = torch.randint(0, 20, (4, 5))
    cfg = lorafit.LoraConfig(r=4, alpha=6, init=init, use_rslora=rslora, target_modules=["up", "down"],
                             rank_pattern={"down": 3}, alpha_pattern={"up": 5})
    model = lorafit.inject(copy.deepcopy(base), cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), base(ids), atol=1e-5, rtol=0)
    # the base holds the residual
    assert not torch.allclose(model.up.base_layer.weight, base.up.weight, atol=1e-3)
    ad = model.up.adapters["default"]
    top = ad.scaling * ad.lora_B @ ad.lora_A
    if init == "olora":
        torch.testing.assert_close(ad.lora_B.t() @ ad.lora_B, torch.eye(4), atol=1e-5, rtol=0)
    else:  # s B A is the best rank-r approximation of W (randomized SVD: close to it)
        u, s, vh = torch.linalg.svd(base.up.weight.detach())
        best = (u[:, :4] * s[:4]) @ vh[:4]
        torch.testing.assert_close(top, best, atol=1e-5 if init == "pissa" else 5e-2, rtol=0)
    model.train()
    train_steps(model, ids)
    model.eval()
    lorafit.save_adapter(model, tmp_path, convert_to_lora=True)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    mult = 2 ** 0.5 if rslora else 2
    assert saved["r"] == 8 and saved["rank_pattern"] == {"down": 6} and saved["init_lora_weights"] is True
    assert saved["lora_alpha"] == pytest.approx(6 * mult)
    assert saved["alpha_pattern"]["up"] == pytest.approx(5 * mult)
    with torch.no_grad():
        want = model(ids)
        assert not torch.allclose(want, base(ids), atol=1e-3)  # training moved the adapter
        plain = lorafit.load_adapter(copy.deepcopy(base), tmp_path).eval()
        torch.testing.assert_close(plain(ids), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(peft_load(base, tmp_path)(ids), want, atol=1e-5, rtol=0)
    assert plain.up.adapters["default"].r == 8


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_matches_peft(init):
    base = Mlp().eval()
    ours = lorafit.inject(copy.deepcopy(base), lorafit.LoraConfig(r=4, alpha=8, init=init,
                                                                  target_modules=["up", "down"]))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init, target_modules=["up", "down"])
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg).base_model.model
    for name in ("up", "down"):
        torch.testing.assert_close(getattr(ours, name).base_layer.weight,
                                   getattr(theirs, name).base_layer.weight, atol=1e-5, rtol=0)


def test_gpt2_conv1d_pissa_and_dora():
    base = tiny_gpt2()
    ids = torch.randint(0, 64, (2, 8))
    model = lorafit.inject(copy.deepcopy(base), lorafit.LoraConfig(r=4, alpha=8, init="pissa", use_dora=True,
                                                                   target_modules=["c_attn", "c_fc"]))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="DoRA"):
        lorafit.save_adapter(model, "/nonexistent", convert_to_lora=True)


def test_bad_input_leaves_base_unchanged(tmp_path):
    base = Mlp()
    model = copy.deepcopy(base)
    before = state(model)
    with pytest.raises(ValueError, match="emb: init='pissa' is supported on Linear"):
        lorafit.inject(model, lorafit.LoraConfig(r=2, init="pissa", target_modules=["up", "emb"]))
    # `up` was planned (residual computed) but never applied
    assert same_state(before, state(model)) and isinstance(model.up, nn.Linear)
    with pytest.raises(ValueError, match="r <= min"):
        lorafit.inject(model, lorafit.LoraConfig(r=16, init="olora", target_modules=["up"]))
    assert same_state(before, state(model))
    with pytest.raises(ValueError, match="pissa_niter_K"):
        lorafit.LoraConfig(init="pissa_niter_")
    plain = lorafit.inject(model, lorafit.LoraConfig(r=2, target_modules=["up"]))
    with pytest.raises(ValueError, match="no PiSSA/OLoRA initial weights"):
        lorafit.save_adapter(plain, tmp_path, convert_to_lora=True)
    assert not (tmp_path / "adapter_config.json").exists()


def test_gaussian_init_draws_a_with_std_one_over_r_and_leaves_embeddings_as_peft():
    """init="gaussian": A ~ N(0, 1/r), B = 0 on linear layers; embeddings keep PEFT's A = 0, B ~ N(0, 1)."""
    model = nn.Sequential(nn.Embedding(64, 512), nn.Linear(512, 512))
    lorafit.inject(model, lorafit.LoraConfig(r=4, init="gaussian", target_modules=["0", "1"]))
    lin, emb = model[1].adapters["default"], model[0].adapters["default"]
    assert abs(lin.lora_A.std().item() - 1 / 4) < 0.02 and not lin.lora_B.any()  # kaiming's std here: ~0.026
    assert not emb.lora_A.any() and abs(emb.lora_B.std().item() - 1.0) < 0.1
