"""Hot-swap: in-place replacement matches a fresh load, and a compiled model does not recompile."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from tests.helpers import same_state, state

import lorafit


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.l1 = nn.Linear(8, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1, groups=2)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.l2 = nn.Linear(16, 4)

    def forward(self, ids):
        h = self.l1(self.emb(ids))
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = self.mha(h, h, h, need_weights=False)[0]
        return self.l2(torch.relu(h))


TARGETS = ["emb", "l1", "conv", "mha", "l2"]
SPECS = [dict(r=4, alpha=8), dict(r=2, alpha=3, use_rslora=True, rank_pattern={"l2": 6}), dict(r=8, alpha=5)]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    torch.manual_seed(0)
    base = Net().eval()
    root = tmp_path_factory.mktemp("adapters")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # grouped conv form: lorafit-only files
        for i, spec in enumerate(SPECS + [dict(r=16, alpha=16)]):
            cfg = lorafit.LoraConfig(init=False, target_modules=TARGETS, **spec)
            m = lorafit.inject(copy.deepcopy(base), cfg)
            lorafit.save_adapter(m, root / f"a{i}")
        cfg = lorafit.LoraConfig(r=4, init=False, target_modules=["l1", "l2"])
        m = lorafit.inject(copy.deepcopy(base), cfg)
        lorafit.save_adapter(m, root / "fewer")
    return base, root


def fresh(base, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lorafit.load_adapter(copy.deepcopy(base), path).eval()


def test_swaps_match_fresh_loads_without_recompiling(adapters):
    base, root = adapters
    ids = torch.randint(0, 20, (2, 6))
    with torch.no_grad():
        refs = [fresh(base, root / f"a{i}")(ids) for i in range(3)]
    model = fresh(base, root / "a0")
    lorafit.prepare_hotswap(model, max_rank=8)
    compiles = []

    def backend(gm, example_inputs):  # counts every graph dynamo hands over
        compiles.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), refs[0], atol=1e-5, rtol=0)
        first = len(compiles)
        assert first >= 1
        for i in (1, 2, 0, 2):
            lorafit.hotswap(model, root / f"a{i}")
            torch.testing.assert_close(compiled(ids), refs[i], atol=1e-5, rtol=0)
    assert len(compiles) == first  # no recompilation across ranks 4 -> 2/6 -> 8 and new alphas


def test_control_unprepared_model_recompiles(adapters):
    """The counter is sensitive: a python-float scaling change does recompile an unprepared model."""
    base, root = adapters
    ids = torch.randint(0, 20, (2, 6))
    model = fresh(base, root / "a0")
    compiles = []
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=lambda gm, ex: compiles.append(gm) or gm.forward)
    with torch.no_grad():
        compiled(ids)
        first = len(compiles)
        model.l1.adapters["default"].scaling = 0.25
        compiled(ids)
    assert len(compiles) > first


def test_prepare_keeps_function_and_trains(adapters):
    base, root = adapters
    ids = torch.randint(0, 20, (2, 6))
    model = fresh(base, root / "a1")
    with torch.no_grad():
        want = model(ids)
    lorafit.prepare_hotswap(model, max_rank=8)
    assert model.l1.adapters["default"].lora_A.shape[0] == 8
    assert torch.is_tensor(model.l1.adapters["default"].scaling)
    assert not any(k.endswith("scaling") for k in model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(ids), want, atol=1e-6, rtol=0)
    model.train()
    lorafit.set_adapter(model, "default")
    model(ids).sum().backward()
    assert model.l1.adapters["default"].lora_B.grad is not None
    lorafit.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), want, atol=1e-5, rtol=0)


def test_bad_swaps_leave_model_unchanged(adapters):
    base, root = adapters
    model = fresh(base, root / "a0")
    with pytest.raises(ValueError, match="prepare_hotswap"):
        lorafit.hotswap(model, root / "a1")
    with pytest.raises(ValueError, match="max_rank"):
        lorafit.prepare_hotswap(model, max_rank=3)  # rank 4 adapter present
    lorafit.prepare_hotswap(model, max_rank=8)
    before = state(model)
    scalings = [m.scaling.clone() for m in model.modules() if isinstance(m, lorafit.layers.LoraAdapter)]
    for path, msg in ((root / "a3", "rank 16 > max_rank=8"), (root / "fewer", "other layers")):
        with pytest.raises(ValueError, match=msg):
            lorafit.hotswap(model, path)
        assert same_state(before, state(model))
        now = [m.scaling for m in model.modules() if isinstance(m, lorafit.layers.LoraAdapter)]
        assert all(torch.equal(a, b) for a, b in zip(scalings, now))
    with pytest.raises(ValueError, match="no adapter 'other'"):
        lorafit.hotswap(model, root / "a1", adapter="other")
    with pytest.raises(ValueError, match="already prepared"):
        lorafit.prepare_hotswap(model, max_rank=16)
    cfg = lorafit.LoraConfig(r=2, target_modules=["0"], use_dora=True)
    dora = lorafit.inject(nn.Sequential(nn.Linear(4, 4)), cfg)
    with pytest.raises(ValueError, match="DoRA"):
        lorafit.prepare_hotswap(dora, 4)
