"""QLoRA with the core: LoRA on a quantized tiny Llama trains, merges, and moves to full precision."""

import pytest
import torch
from tests.helpers import Wrap
from tests.quant.nf4_reference import NF4_TABLE, double_quant_scales_ref, nf4_dequantize_ref, nf4_unpack_ref
from tests.quant.quant_models import make_llama
from torch import nn

import lorafit
from lorafit.layers import QuantizedBase
from lorafit.quant import Int8Linear, NF4Linear, load_quantized, quantize, quantized_modules, save_quantized


def _qlora(fmt="nf4", steps=3):
    """A quantized tiny Llama with r=4 adapters on all linear layers, trained a few steps."""
    model = quantize(make_llama(), fmt)
    lorafit.inject(model, lorafit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_gradients_reach_adapters_only(ids, fmt):
    model = quantize(make_llama(), fmt)
    storage = {n: b.clone() for n, b in model.named_buffers()}
    lorafit.inject(model, lorafit.LoraConfig(r=4, alpha=8, target_modules="all-linear", init=False))
    wrapped = [m for m in model.modules() if isinstance(m, lorafit.layers.LoraLayer)]
    assert len(wrapped) == 14 and all(isinstance(m.base_layer, QuantizedBase) for m in wrapped)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable and len(with_grad) == 28
    assert all(n.endswith((".lora_A", ".lora_B")) for n in with_grad)
    for n, b in model.named_buffers():
        assert b.grad is None and not b.requires_grad
        key = n.replace(".base_layer", "")
        if key in storage:
            assert torch.equal(b, storage[key])


def test_training_changes_adapters_not_base():
    model = quantize(make_llama(), "nf4")
    before = {n: b.clone() for n, b in model.named_buffers()}
    trained = _qlora()
    after = {n.replace(".base_layer", ""): b for n, b in trained.named_buffers()}
    assert all(torch.equal(before[n], after[n]) for n in before)
    moved = [n for n, p in trained.named_parameters() if n.endswith(".lora_B") and p.abs().max() > 0]
    assert len(moved) == 14  # B starts at zero


def test_merge_and_unload_gives_an_ordinary_model(ids):
    model = _qlora()
    with torch.no_grad():
        unmerged = model(ids).logits
    plain = lorafit.merge_and_unload(model, dtype=torch.float32)
    assert not quantized_modules(plain)
    assert not any(isinstance(m, lorafit.layers.LoraLayer) for m in plain.modules())
    linears = [m for m in plain.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 15 and all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in linears)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, unmerged, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_merge_into_quantized_base_and_back(ids, fmt):
    with torch.no_grad():
        full_out = make_llama()(ids).logits
        quant_out = quantize(make_llama(), fmt)(ids).logits
    model = _qlora(fmt)
    with torch.no_grad():
        unmerged = model(ids).logits
        lorafit.merge(model)
        merged = model(ids).logits
        wrappers = [m for m in model.modules() if isinstance(m, lorafit.layers.LoraLayer)]
        errors = [m.merge_error for m in wrappers]  # what re-quantizing W + delta added, per layer
        lorafit.unmerge(model)
        back = model(ids).logits
    assert all(type(m).fmt == fmt for m in quantized_modules(model).values())
    # re-quantizing W + delta is one more rounding step: it moves the output about as much as
    # quantizing the base in the first place did
    one_rounding = (quant_out - full_out).norm() / full_out.norm()
    for out in (merged, back):
        assert (out - unmerged).norm() / unmerged.norm() < 1.5 * one_rounding
    assert len(errors) == 14 and all(0 < e < 0.05 for e in errors)


def test_adapter_from_quantized_run_loads_on_full_precision_base(tmp_path, ids):
    model = _qlora()
    lorafit.save_adapter(model, tmp_path / "adapter")
    full = make_llama()  # same seed: the weights the quantized base came from
    with torch.no_grad():
        base_out = full(ids).logits
    lorafit.load_adapter(full, tmp_path / "adapter")
    q_params = dict(model.named_parameters())
    loaded = {n: p for n, p in full.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
    assert len(loaded) == 28 and all(torch.equal(p, q_params[n]) for n, p in loaded.items())
    with torch.no_grad():
        out, q_out = full(ids).logits, model(ids).logits
    assert (out - base_out).norm() / base_out.norm() > 1e-3  # the adapter is live
    assert (out - q_out).norm() / q_out.norm() < 0.2  # only the base's quantization differs


def test_quantized_base_and_adapter_saved_separately_reload_exactly(tmp_path, ids):
    model = _qlora()
    save_quantized(model, tmp_path / "base.safetensors")
    lorafit.save_adapter(model, tmp_path / "adapter")
    fresh = make_llama(seed=7)
    load_quantized(fresh, tmp_path / "base.safetensors")
    lorafit.load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_gradients(ids):
    grads = []
    for ckpt in (False, True):
        model = quantize(make_llama(), "nf4")
        lorafit.inject(model, lorafit.LoraConfig(r=4, alpha=8, target_modules="all-linear", init=False))
        if ckpt:  # transformers >= 5.x renamed gradient_checkpointing_enable
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n])


def _decode_ref(q) -> torch.Tensor:
    """The stored weight [out, in] fp32, decoded by the independent reference (nf4_reference)."""
    if isinstance(q, Int8Linear):
        return q.weight_int8.float() * q.weight_scale[:, None]
    scales = (double_quant_scales_ref(q.weight_absmax_q, q.weight_absmax_lo, q.weight_absmax_step)
              if q.double_quant else q.weight_absmax)
    return nf4_dequantize_ref(nf4_unpack_ref(q.weight_packed), scales, (q.out_features, q.in_features))


def _max_rounding(q) -> float:
    """Largest error round-to-nearest can make: int8 scale / 2; NF4 (widest level gap / 2) * scale."""
    if isinstance(q, Int8Linear):
        return 0.5 * q.weight_scale.max().item()
    half_gap = max(b - a for a, b in zip(NF4_TABLE, NF4_TABLE[1:])) / 2
    scales = (double_quant_scales_ref(q.weight_absmax_q, q.weight_absmax_lo, q.weight_absmax_step)
              if q.double_quant else q.weight_absmax)
    return half_gap * scales.max().item()


@pytest.mark.parametrize("cls,kw", [(NF4Linear, {}), (NF4Linear, {"double_quant": True}), (Int8Linear, {})])
def test_merge_error_is_the_error_merging_added(cls, kw):
    """``merge_error`` = max |stored weight after merge - (stored weight before + s B A)|, the
    rounding that re-quantizing added, computed here from the storage with the reference decoder
    and a delta built from A and B; it is reported per merge, so it changes with the adapter."""
    errors = []
    for b_scale in (0.05, 0.5, 2.0):
        torch.manual_seed(4)
        model = Wrap(cls.from_linear(nn.Linear(128, 64), **kw))
        lorafit.inject(model, lorafit.LoraConfig(r=4, alpha=12, target_modules=["layer"], init=False))
        layer = model.layer
        ad = layer.adapters["default"]
        with torch.no_grad():
            ad.lora_B.mul_(b_scale)
        before = _decode_ref(layer.base_layer)
        delta = (ad.lora_B.detach().float() @ ad.lora_A.detach().float()) * ad.scaling
        lorafit.merge(model)
        after = _decode_ref(layer.base_layer)
        want = (after - (before + delta)).abs().max().item()
        assert layer.merge_error == pytest.approx(want, rel=1e-6, abs=1e-9)
        # and it is a rounding error: at most half the widest gap between levels times the block scale
        assert 0 < want <= _max_rounding(layer.base_layer) * (1 + 1e-6)
        errors.append(layer.merge_error)
    assert len(set(errors)) == len(errors), errors
