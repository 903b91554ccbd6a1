"""A new layer kind from this file alone: LoRA for ``nn.Bilinear`` through the public registration API.

``y = x1^T W x2 + b`` with W [out, in1, in2]. The update is ``s * B A`` with A [r, in1, in2] (r
bilinear forms: ``x1^T A_k x2``) and B [out, r], so ``delta W = s * einsum("or,rij->oij", B, A)``.
Nothing in src/ knows this kind: inject, save / load (PEFT keys), merge_and_unload, adapter_batch
and DoRA all go through the protocol the class implements here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

import lorafit
from lorafit.layers import LoraAdapter, LoraLayer, check_shareable, master_dtype, register_kind, unregister_kind
from lorafit.layers.batched import zero_slots

IN1, IN2, OUT = 5, 4, 3


class BilinearLora(LoraLayer):
    """x1 [N, in1], x2 [N, in2] -> [N, out]; A [r, in1, in2], B [out, r]."""

    def __init__(self, base_layer: nn.Bilinear):
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in1_features, base_layer.out_features

    @classmethod
    def handles(cls, module):
        return isinstance(module, nn.Bilinear)

    def make_adapter(self, name, r, alpha, use_rslora, dropout, **form):
        w = self.base_layer.weight
        return LoraAdapter((r, *w.shape[1:]), (w.shape[0], r), r, alpha, use_rslora, dropout,
                           master_dtype(w.dtype), w.device)

    def delta_weight(self, ad):
        delta = torch.einsum("or,rij->oij", ad.lora_B.float(), ad.lora_A.float()) * ad.scaling
        return delta.to(self.base_layer.weight.dtype)

    def build_stacks(self, adapters, dtype, device):
        w = self.base_layer.weight  # A [n + 1, r_max, in1, in2], B [n + 1, out, r_max], scale [n + 1]
        a_stack, b_stack, scale = zero_slots(adapters, w.shape[1:], w.shape[:1], dtype, device)
        for i, ad in enumerate(adapters):
            if ad is not None:
                a_stack[i, : ad.r] = ad.lora_A.to(dtype)
                b_stack[i, :, : ad.r] = ad.lora_B.to(dtype)
                scale[i] = ad.scaling
        return a_stack, b_stack, scale

    def batched_delta(self, y, x1, rows, stacks, x2):
        a_stack, b_stack, scale = stacks
        xa = torch.einsum("ni,nrij,nj->nr", x1.to(y.dtype), a_stack[rows], x2.to(y.dtype)) * scale[rows, None]
        return y.add_(torch.einsum("nr,nor->no", xa, b_stack[rows]))

    def dora_layout(self, ad, weight):
        return weight.reshape(1, weight.shape[0], -1), ad.lora_A.reshape(1, ad.r, -1), ad.lora_B[None]

    def dora_factor_view(self):
        return (-1, 1, 1)

    def dora_forward(self, ad, factor, x1, x2):
        z = F.bilinear(x1, x2, self.base_layer.weight) + self._delta(ad, x1, x2)
        bias = self.base_layer.bias
        return z * factor.to(z.dtype) + (0 if bias is None else bias)

    def _delta(self, ad, x1, x2):
        xa = F.bilinear(x1, x2, ad.lora_A.to(x1.dtype))  # [N, r]
        return xa @ (ad.lora_B * ad.scaling).t().to(x1.dtype)

    def forward(self, x1, x2):
        if self._batch is not None and not self.disabled:
            return self.batched(self.base_layer(x1, x2), x1, x2)
        live = self._live
        if self.disabled or not live:
            return self._base_only(x1, x2)
        if len(live) == 1 and live[0].variant is not None:
            return live[0].variant.forward(self, live[0], x1, x2)
        check_shareable(live)
        y = self.base_layer(x1, x2)
        for ad in live:
            y = y + self._delta(ad, x1, x2)
        return y


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.bil = nn.Bilinear(IN1, IN2, OUT)
        self.lin = nn.Linear(OUT, 2)

    def forward(self, x1, x2):
        return self.lin(self.bil(x1, x2))


def reference(net: Net, ad: LoraAdapter, x1, x2):
    """The adapted function computed densely, without the wrapper: W + s * B A in a fresh Bilinear."""
    base = net.bil.base_layer if isinstance(net.bil, LoraLayer) else net.bil
    w = base.weight + torch.einsum("or,rij->oij", ad.lora_B, ad.lora_A) * ad.scaling
    return net.lin(F.bilinear(x1, x2, w, base.bias))


@pytest.fixture
def bilinear_kind():
    register_kind(BilinearLora)
    yield BilinearLora
    unregister_kind(BilinearLora)


def _inputs(n=6):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, IN1, generator=g), torch.randn(n, IN2, generator=g)


def test_unregistered_kind_is_not_supported():
    with pytest.raises(ValueError, match="matched no supported layer"):
        lorafit.inject(Net(), lorafit.LoraConfig(r=2, target_modules=["bil"]))


def test_new_kind_inject_save_load_merge(bilinear_kind, tmp_path):
    torch.manual_seed(0)
    net = Net()
    x1, x2 = _inputs()
    base_out = net(x1, x2)
    lorafit.inject(net, lorafit.LoraConfig(r=2, alpha=4, target_modules=["bil"], init=False))
    assert isinstance(net.bil, BilinearLora) and not net.bil.base_layer.weight.requires_grad
    ad = net.bil.adapters["default"]
    assert tuple(ad.lora_A.shape) == (2, IN1, IN2) and ad.lora_A.requires_grad
    out = net(x1, x2)
    torch.testing.assert_close(out, reference(net, ad, x1, x2))
    assert not torch.allclose(out, base_out)  # init=False: a non-identity adapter
    out.sum().backward()
    assert ad.lora_A.grad is not None and ad.lora_B.grad is not None

    lorafit.save_adapter(net, tmp_path / "ad")
    with safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == {"base_model.model.bil.lora_A.weight": (2, IN1, IN2),
                      "base_model.model.bil.lora_B.weight": (OUT, 2)}
    fresh = Net()
    fresh.load_state_dict({k.replace("bil.base_layer.", "bil."): v for k, v in net.state_dict().items()
                           if "adapters" not in k})
    lorafit.load_adapter(fresh, tmp_path / "ad")
    torch.testing.assert_close(fresh(x1, x2), out)

    merged = lorafit.merge_and_unload(fresh)
    assert type(merged.bil) is nn.Bilinear
    torch.testing.assert_close(merged(x1, x2), out, atol=1e-5, rtol=1e-5)


def test_new_kind_adapter_batch_rows_match_single_adapters(bilinear_kind):
    torch.manual_seed(1)
    net = Net().eval()
    for name, r in (("a", 2), ("b", 3)):
        lorafit.inject(net, lorafit.LoraConfig(r=r, alpha=2 * r, target_modules=["bil"], init=False), adapter=name)
    x1, x2 = _inputs(5)
    names = ["a", "b", None, "b", "a"]
    with lorafit.adapter_batch(net, names):
        mixed = net(x1, x2)
    for i, name in enumerate(names):
        if name is None:
            with lorafit.disabled(net):
                want = net(x1[i:i + 1], x2[i:i + 1])
        else:
            lorafit.set_adapter(net, name)
            want = net(x1[i:i + 1], x2[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], want, atol=1e-5, rtol=1e-5)


def test_new_kind_dora_through_the_variant_protocol(bilinear_kind, tmp_path):
    torch.manual_seed(2)
    net = Net()
    x1, x2 = _inputs()
    before = net(x1, x2)
    lorafit.inject(net, lorafit.LoraConfig(r=2, target_modules=["bil"], use_dora=True))
    ad = net.bil.adapters["default"]
    assert ad.variant is not None and ad.variant.name == "DoRA"
    torch.testing.assert_close(net(x1, x2), before, atol=1e-5, rtol=1e-5)  # m = ||W||: starts as the base
    with torch.no_grad():
        ad.lora_B.normal_()
        ad.lora_magnitude_vector.mul_(1.5)
    out = net(x1, x2)
    w = net.bil.base_layer.weight + torch.einsum("or,rij->oij", ad.lora_B, ad.lora_A) * ad.scaling
    w = w * (ad.lora_magnitude_vector / w.reshape(OUT, -1).norm(dim=1)).view(-1, 1, 1)
    torch.testing.assert_close(out, net.lin(F.bilinear(x1, x2, w, net.bil.base_layer.bias)), atol=1e-5, rtol=1e-5)
    lorafit.save_adapter(net, tmp_path / "dora")
    fresh = Net()
    fresh.load_state_dict({k.replace("bil.base_layer.", "bil."): v for k, v in net.state_dict().items()
                           if "adapters" not in k})
    lorafit.load_adapter(fresh, tmp_path / "dora")
    torch.testing.assert_close(lorafit.merge_and_unload(fresh)(x1, x2), out, atol=1e-5, rtol=1e-5)
