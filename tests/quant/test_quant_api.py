"""quantize(): target selection, in-place replacement, memory, and clear errors."""

import pytest
import torch
from tests.quant.quant_models import make_llama
from torch import nn

from lorafit.quant import Int8Linear, NF4Linear, quantize, quantized_modules, weight_bytes

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _linear_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("fmt,cls", [("nf4", NF4Linear), ("int8", Int8Linear)])
def test_default_targets_all_linear_but_output(llama, ids, fmt, cls):
    ref = llama(ids).logits
    names = _linear_names(llama)
    quantize(llama, fmt)
    q = quantized_modules(llama)
    assert set(q) == names - {"lm_head"} and all(type(m) is cls for m in q.values())
    assert type(llama.lm_head) is nn.Linear
    assert len(q) == 2 * len(PROJ)
    out = llama(ids).logits
    assert out.shape == ref.shape
    assert (out - ref).norm() / ref.norm() < (0.2 if fmt == "nf4" else 0.03)


def test_bf16_model_keeps_its_compute_dtype():
    model = make_llama(dtype=torch.bfloat16)
    quantize(model, "nf4", double_quant=True)
    assert {m.compute_dtype for m in quantized_modules(model).values()} == {torch.bfloat16}
    assert model(torch.zeros(1, 4, dtype=torch.long)).logits.dtype == torch.bfloat16


def test_nf4_weight_memory_ratio(llama):
    bf16 = sum(m.weight.numel() * 2 for n, m in llama.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    quantize(llama, "nf4")
    assert weight_bytes(llama)["quantized_storage"] / bf16 <= 0.30


def test_list_targets_exact_or_suffix_and_regex(llama):
    quantize(llama, "int8", targets=["q_proj", "model.layers.1.mlp.down_proj"])
    assert sorted(quantized_modules(llama)) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj",
    ]  # fmt: skip
    model = make_llama()
    quantize(model, "nf4", targets=r"model\.layers\.0\..*_proj")
    assert len(quantized_modules(model)) == len(PROJ)
    assert all(n.startswith("model.layers.0.") for n in quantized_modules(model))


def test_output_head_and_mha_out_proj_are_skipped_by_default():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(8, 16)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            h = self.body(x)
            return self.head(self.attn(h, h, h)[0])

    net = Net()
    quantize(net, "int8")
    assert set(quantized_modules(net)) == {"body"}
    assert net(torch.randn(2, 3, 8)).shape == (2, 3, 2)
    with pytest.raises(ValueError, match="out_proj of an nn.MultiheadAttention"):
        quantize(Net(), "int8", targets=["attn.out_proj"])


def test_shared_linear_stays_shared():
    lin = nn.Linear(16, 16)
    net = nn.ModuleDict({"a": lin, "b": nn.Sequential(lin)})
    quantize(net, "nf4", targets=["a", "b.0"])
    assert net["a"] is net["b"][0] and isinstance(net["a"], NF4Linear)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"fmt": "fp4"}, "unknown quantization format 'fp4'"),
        ({"targets": ["model.layers.0.mlp"]}, "'model.layers.0.mlp' is a LlamaMLP, not an nn.Linear"),
        ({"targets": ["embed_tokens"]}, "is a Embedding, not an nn.Linear"),
        ({"targets": ["nope"]}, "target 'nope' matches no module"),
        ({"targets": "x+"}, "regex 'x\\+' matches no module"),
        ({"targets": "("}, "invalid regex"),
        ({"targets": [3]}, "targets must be None"),
        (
            {"block_size": 48},
            "block_size 48 does not divide the .* values of 'model.layers.0.self_attn.q_proj'",
        ),
        ({"block_size": 7}, "block_size must be even"),
        ({"block_size": 0}, "positive int"),
        ({"fmt": "int8", "double_quant": True}, "double_quant applies to nf4 only"),
    ],
)
def test_bad_input_is_a_clear_error_and_changes_nothing(llama, kwargs, match):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        quantize(llama, **kwargs)
    assert not quantized_modules(llama)
    after = llama.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_already_quantized_target(llama):
    quantize(llama, "nf4", targets=["q_proj"])
    with pytest.raises(ValueError, match="already quantized"):
        quantize(llama, "int8", targets=["q_proj"])
    quantize(llama, "int8")  # default targets skip what is already quantized
    assert isinstance(llama.model.layers[0].self_attn.q_proj, NF4Linear)
    assert isinstance(llama.model.layers[0].self_attn.k_proj, Int8Linear)
