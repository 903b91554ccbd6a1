"""FSDP2 (`lorafit.distributed.shard`) on CPU with gloo, 2 processes, against one unsharded process.

One spawn of two ranks (tests/distributed/fsdp_worker.py) trains and saves a fp32-base and an
NF4-base adapter and records the facts each test below checks; the one-process references are
built here. (a) the adapter after K AdamW steps equals the one-process run with the same global
batch; (b) each rank holds <= 0.55x the base bytes; (c) the saved adapter is one ordinary PEFT
adapter, written by rank 0 only, that PEFT and lorafit load on an unsharded base with the
sharded model's outputs; (d) merge_and_unload refuses a sharded model with a one-line reason.
"""

from __future__ import annotations

import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp

import lorafit
from lorafit import distributed
from lorafit.io import adapter_state, read_adapter_tensors
from tests.distributed import fsdp_worker as W

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """{(kind, rank): facts} from one two-rank run."""
    out = tmp_path_factory.mktemp("fsdp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(W.worker, args=(WORLD, str(out), port), nprocs=WORLD, start_method="spawn")
    return {(k, r): torch.load(out / f"{k}_rank{r}.pt") for k in ("fp32", "nf4", "bf16", "mp") for r in range(WORLD)}


def reference(kind: str):
    """The same model trained in one process on the whole global batches."""
    model = W.add_adapter(W.build(kind))
    W.train(model, slice(None))
    return model


def assert_close_per_tensor(got: dict, want: dict, rtol: float = 1e-3):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        err = (got[k].float() - want[k].float()).norm() / want[k].float().norm().clamp_min(1e-12)
        assert err <= rtol, f"{k}: relative error {err:.2e}"


@pytest.mark.parametrize("kind", ["fp32", "nf4"])
def test_adapter_equals_one_process_run(ranks, kind):
    want = adapter_state(reference(kind))
    assert any(v.abs().sum() > 0 for k, v in want.items() if "lora_B" in k)  # it trained
    for r in range(WORLD):  # what each rank gathers
        assert_close_per_tensor(ranks[kind, r]["adapter"], want)
    tensors, _ = read_adapter_tensors(ranks[kind, 0]["path"])  # what rank 0 wrote
    assert_close_per_tensor(tensors, want)


@pytest.mark.parametrize("kind", ["fp32", "bf16", "nf4"])
def test_each_rank_holds_about_half_the_base(ranks, kind):
    for r in range(WORLD):
        before, after = ranks[kind, r]["bytes_before"], ranks[kind, r]["bytes_after"]
        assert after <= 0.55 * before, f"rank {r}: {after} of {before} bytes"


@pytest.mark.parametrize(("cls", "ints"), [
    (lorafit.quant.NF4Linear, {"weight_packed": torch.uint8, "weight_absmax": torch.int32}),
    (lorafit.quant.Int8Linear, {"weight_int8": torch.int8, "weight_scale": torch.int32}),
])  # fmt: skip
def test_quantized_storage_becomes_int_parameters_fsdp2_can_shard(cls, ints):
    layer = cls(64, 32, bias=False)
    with torch.no_grad():
        layer._set_storage(torch.randn(32, 64))
    w = layer.dequantize()
    layer.shardable_storage_()
    names = dict(layer.named_parameters())
    assert {n: p.dtype for n, p in names.items()} == ints
    assert not any(p.requires_grad for p in names.values()) and not dict(layer.named_buffers())
    layer.to(torch.bfloat16)  # a mixed precision cast must not touch the scales' bits
    assert torch.equal(layer.dequantize(torch.float32), w)


def test_only_rank0_writes_and_every_rank_returns_the_files(ranks):
    for kind in ("fp32", "nf4"):
        assert ranks[kind, 0]["writes"] == 3 and ranks[kind, 1]["writes"] == 0  # weights, config, model card
        for r in range(WORLD):
            files = ["README.md", "adapter_config.json", "adapter_model.safetensors"]
            assert ranks[kind, r]["files_on_return"] == files


def _fresh(kind):
    return W.build(kind).eval()


def test_saved_adapter_loads_in_peft_and_lorafit_with_the_sharded_outputs(ranks):
    from peft import PeftModel

    for kind in ("fp32", "nf4"):
        facts = ranks[kind, 0]
        want = facts["logits"]
        assert torch.equal(want, ranks[kind, 1]["logits"])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fingerprint mismatch warns: it must match the full base
            ours = lorafit.load_adapter(_fresh(kind), facts["path"]).eval()
        with torch.no_grad():
            torch.testing.assert_close(ours(input_ids=W.probe()).logits, want, rtol=1e-4, atol=1e-5)
        if kind == "fp32":  # PEFT has no lorafit NF4 base
            peft_model = PeftModel.from_pretrained(_fresh(kind), facts["path"]).eval()
            with torch.no_grad():
                torch.testing.assert_close(peft_model(input_ids=W.probe()).logits, want, rtol=1e-4, atol=1e-5)


def test_merge_and_unload_refuses_a_sharded_model(ranks):
    for kind in ("fp32", "nf4"):
        for r in range(WORLD):
            msg = ranks[kind, r]["merge"]
            assert "sharded" in msg and "save the adapter" in msg and "\n" not in msg


def test_inject_after_shard_is_refused(ranks):
    for kind in ("fp32", "bf16", "nf4"):
        for r in range(WORLD):
            assert "before lorafit.distributed.shard" in ranks[kind, r]["late_inject"]


def test_optimizer_state_round_trips_for_resume(ranks):
    n_lora = len(adapter_state(W.add_adapter(W.build("fp32"))))
    assert ranks["fp32", 0]["opt_state_sizes"] == (n_lora, n_lora) and ranks["fp32", 0]["opt_state_equal"]
    assert ranks["fp32", 1]["opt_state_sizes"] == (0, 0)  # full state on rank 0 only
    assert len(ranks["fp32", 0]["full_state_keys"]) == n_lora and ranks["fp32", 1]["full_state_keys"] == []


def test_mixed_precision_keeps_fp32_master_weights_and_optimizer_state(ranks):
    for r in range(WORLD):
        facts = ranks["mp", r]
        assert facts["param_dtypes"] == ["torch.float32"] and facts["moment_dtypes"] == ["torch.float32"]
        assert facts["n_moments"] == facts["n_lora"] > 0


def test_shard_needs_a_process_group_and_blocks():
    model = W.add_adapter(W.build("fp32"))
    assert len(distributed.find_blocks(model)) == 2
    assert not distributed.is_sharded(model) and distributed.rank() == 0 and distributed.world_size() == 1
    with pytest.raises(RuntimeError, match="not initialised"):
        distributed.shard(model)
