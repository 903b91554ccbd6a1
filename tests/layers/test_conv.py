"""Conv LoRA honours every argument of the base conv: checked against a dense reference."""

import copy

import pytest
import torch
import torch.nn as nn

import lorafit
from tests.helpers import Wrap


def dense_delta(adapter, groups, weight_shape):
    """Independent reference: group j's update is B_j @ A_j, reshaped to the kernel."""
    out = weight_shape[0]
    parts = []
    rg = adapter.r // groups
    for j in range(groups):
        a = adapter.lora_A[j * rg:(j + 1) * rg].reshape(rg, -1)
        b = adapter.lora_B[j * out // groups:(j + 1) * out // groups].reshape(out // groups, rg)
        parts.append((b @ a).reshape(out // groups, *weight_shape[1:]))
    return torch.cat(parts) * adapter.scaling


CONVS = {
    "dilated": lambda: nn.Conv2d(4, 6, 3, dilation=2, padding=2),
    "reflect": lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
    "circular_stride": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="circular"),
    "grouped": lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1),
    "grouped_dilated_same": lambda: nn.Conv2d(6, 9, 3, groups=3, padding="same", dilation=2),
    "conv1d_replicate": lambda: nn.Conv1d(4, 6, 5, padding=2, padding_mode="replicate"),
    "conv3d_dilated": lambda: nn.Conv3d(2, 4, 3, dilation=(1, 2, 1), padding=(1, 2, 1)),
}


def _input(conv):
    return torch.randn(2, conv.in_channels, *([9] * (conv.weight.dim() - 2)))


@pytest.mark.parametrize("case", list(CONVS))
def test_conv_matches_dense_and_merges_exactly(case):
    base = Wrap(CONVS[case]()).eval()
    r = 6 if base.layer.groups == 3 else 4
    model = lorafit.inject(copy.deepcopy(base), lorafit.LoraConfig(r=r, alpha=8, target_modules=["layer"], init=False))
    x = _input(base.layer)
    ad = model.layer.adapters["default"]
    assert ad.a_groups == base.layer.groups  # lorafit's group-respecting form
    with torch.no_grad():
        ref = copy.deepcopy(base)
        ref.layer.weight += dense_delta(ad, base.layer.groups, base.layer.weight.shape)
        want = ref(x)
        got = model(x)
        assert not torch.allclose(got, base(x), atol=1e-3)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        lorafit.merge(model)
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=0)
        lorafit.unmerge(model)
        torch.testing.assert_close(model.layer.base_layer.weight, base.layer.weight, atol=1e-6, rtol=0)
        merged = lorafit.merge_and_unload(model)
        assert type(merged.layer) is type(base.layer)
        assert merged.state_dict().keys() == base.state_dict().keys()
        torch.testing.assert_close(merged(x), want, atol=1e-5, rtol=0)


def test_peft_form_on_grouped_conv_cannot_merge(tmp_path):
    from tests.helpers import peft_save
    base = Wrap(nn.Conv2d(4, 6, 3, groups=2, padding=1)).eval()
    peft_save(base, tmp_path, r=4, lora_alpha=8, target_modules=["layer"])
    model = lorafit.load_adapter(copy.deepcopy(base), tmp_path)
    assert model.layer.adapters["default"].a_groups == 1
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="cannot be merged"):
        lorafit.merge(model)
    with pytest.raises(ValueError, match="cannot be merged"):
        lorafit.merge_and_unload(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_depthwise_skipped_and_rank_must_divide_groups(caplog):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(4, 4, 3, groups=4)
            self.pw = nn.Conv2d(4, 8, 1)
            self.g = nn.Conv2d(8, 8, 3, groups=2)

    net = Net()
    with caplog.at_level("INFO", logger="lorafit"):
        lorafit.inject(net, lorafit.LoraConfig(r=4, target_modules=["dw", "pw", "g"]))
    assert isinstance(net.dw, nn.Conv2d) and "depthwise" in caplog.text
    with pytest.raises(ValueError, match="multiple of groups=2"):
        lorafit.inject(Net(), lorafit.LoraConfig(r=3, target_modules=["g"]))


def test_grouped_form_warns_on_save(tmp_path):
    base = Wrap(nn.Conv2d(4, 6, 3, groups=2))
    model = lorafit.inject(base, lorafit.LoraConfig(r=4, target_modules=["layer"]))
    with pytest.warns(UserWarning, match="PEFT cannot"):
        lorafit.save_adapter(model, tmp_path)
    again = lorafit.load_adapter(Wrap(copy.deepcopy(model.layer.base_layer)), tmp_path)
    assert again.layer.adapters["default"].a_groups == 2


def test_conv_gradients_flow_to_adapter_only():
    model = lorafit.inject(Wrap(nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect")),
                           lorafit.LoraConfig(r=2, target_modules=["layer"]))
    model(torch.randn(2, 3, 6, 6)).pow(2).sum().backward()
    ad = model.layer.adapters["default"]
    assert ad.lora_A.grad is not None and ad.lora_B.grad.abs().sum() > 0
    assert model.layer.base_layer.weight.grad is None
