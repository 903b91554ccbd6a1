"""``torchrun --nproc_per_node=2 -m lorafit train --fsdp``: FSDP2 through the CLI, 2 gloo processes.

The reference is one process with ``--grad-accum 2`` (the same global batch, cut into the same
two chunks; see test_distributed.py). Under ``--fsdp`` each rank runs its chunk through the sharded
model and FSDP2 reduce-scatters the gradients as a plain SUM (the loop divides every summed loss by
the global item count already), so the adapters agree within issue 12's bound (per-tensor relative
1e-3). For the fp32 bases the test asks for more, bit-equality, for the reason test_distributed.py
gives: each rank computes its chunk's gradient with the same operations on the same (all-gathered)
weights as the one process does, and the gloo SUM of two fp32 buffers is the one rounded addition
that autograd's accumulation does. That matters: AdamW is nearly scale-invariant, so FSDP2's
default *mean* reduction (halved gradients, planted) moves the adapter by only ~1e-3 relative, at
the edge of the tolerance, while bit-equality catches it for sure. Other faults planted and seen
red: the optimizer state not restored on --resume (both resume tests: --stop-at-step and a real
SIGTERM through torchrun), the trainable tensors not restored on --resume.

What the library's FSDP2 tests cover (tests/distributed) is not repeated: here the job, its files
and its resume.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import lorafit
from lorafit.common.errors import LorafitError
from lorafit.jobs.train import run_train
from tests.train.train_helpers import sentiment_rows, subprocess_env, write_jsonl


def torchrun(flags: dict, *extra: str) -> subprocess.CompletedProcess:
    def arg(key: str, value: str) -> str:  # booleans are --flag / --no-flag on the command line
        name = key.replace("_", "-")
        return {"true": f"--{name}", "false": f"--no-{name}"}.get(value, f"--{name}={value}")

    args = [arg(k, v) for k, v in flags.items()]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "lorafit", "train", *args, *extra],
        env={**subprocess_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def adapter(run, sub: str = "adapter") -> dict[str, torch.Tensor]:
    return load_file(run / sub / "adapter_model.safetensors")


def assert_adapters_close(got: dict, want: dict, rel: float = 1e-3) -> None:
    """Per-tensor relative max difference <= ``rel`` (issue 12's bound); ``rel=0``: bit-equal."""
    assert got.keys() == want.keys() and want
    for key in want:
        err = (got[key] - want[key]).abs().max().item() / max(want[key].abs().max().item(), 1e-12)
        assert err <= rel, (key, err)
    assert max(want[k].abs().max().item() for k in want if "lora_B" in k) > 1e-4  # it trained (B starts at 0)


def train_losses(run) -> list[float]:
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in records if r["kind"] == "train"]


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp-lm")
    rows = [{"text": f"{t}. {t}"} for t, _ in sentiment_rows(20, seed=3)]
    return write_jsonl(d / "train.jsonl", rows[:16]), write_jsonl(d / "eval.jsonl", rows[16:])


def lm_flags(model, files, out, **kw) -> dict:
    train, ev = files
    base = {"task": "causal-lm", "model": str(model), "train": str(train), "eval": str(ev), "out": str(out),
            "batch_size": "2", "max_length": "16", "lr": "5e-3", "epochs": "2", "eval_every": "2",
            "device": "cpu", "log_every": "1000"}
    return {**base, **{k: str(v) for k, v in kw.items()}}


def test_fsdp_causal_lm_equals_one_process_loads_in_peft_and_resumes_exactly(tiny_llama, lm_files, tmp_path):
    one = run_train(lm_flags(tiny_llama, lm_files, tmp_path / "one", grad_accum=2))
    proc = torchrun(lm_flags(tiny_llama, lm_files, tmp_path / "fsdp", fsdp="true"))
    assert proc.stdout.count("lorafit train:") == 1 and "sharded base:" in proc.stdout  # rank 0 alone prints
    full = adapter(tmp_path / "fsdp")
    assert_adapters_close(full, adapter(tmp_path / "one"), rel=0)
    metrics = json.loads((tmp_path / "fsdp" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == one["steps"] == 8
    torch.testing.assert_close(torch.tensor(train_losses(tmp_path / "fsdp")),
                               torch.tensor(train_losses(tmp_path / "one")), rtol=1e-5, atol=0)
    assert (tmp_path / "fsdp" / "best" / "adapter_model.safetensors").is_file()  # the collective best/ save
    assert not (tmp_path / "fsdp" / "checkpoint.pt").exists()

    # (c) the adapter is an ordinary PEFT adapter of the unsharded base
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama),
                                           str(tmp_path / "fsdp" / "adapter")).eval()
    ours = lorafit.load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "fsdp" / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(input_ids=ids).logits, peft_model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)

    # (d) stopped after step 3 (a checkpoint, every rank stops), then --resume: the same run exactly
    part = tmp_path / "part"
    proc = torchrun(lm_flags(tiny_llama, lm_files, part, fsdp="true", stop_at_step=3))
    assert "stopped at step 3" in proc.stdout and (part / "checkpoint.pt").is_file()
    assert not (part / "adapter").exists()
    torchrun({"resume": str(part)})
    resumed = adapter(part)
    assert resumed.keys() == full.keys()
    for key in full:
        assert torch.equal(resumed[key], full[key]), (key, (resumed[key] - full[key]).abs().max().item())
    assert train_losses(part) == train_losses(tmp_path / "fsdp")


def test_qlora_nf4_fsdp_halves_the_base_per_rank(tiny_llama, lm_files, tmp_path):
    flags = lm_flags(tiny_llama, lm_files, tmp_path / "one", quantize="nf4", epochs=1, eval_every=0)
    run_train({**flags, "grad_accum": "2"})
    torchrun({**flags, "out": str(tmp_path / "fsdp"), "fsdp": "true"})
    metrics = json.loads((tmp_path / "fsdp" / "metrics.json").read_text())
    assert metrics["base_param_bytes_per_rank"] <= 0.55 * metrics["base_param_bytes"], metrics
    assert_adapters_close(adapter(tmp_path / "fsdp"), adapter(tmp_path / "one"))


def test_fsdp_text_classification_equals_one_process(tiny_bert, cls_data, tmp_path):
    train, ev = cls_data
    flags = {"model": str(tiny_bert), "train": str(train), "eval": str(ev), "epochs": "1", "batch_size": "4",
             "max_samples": "32", "lr": "5e-3", "dropout": "0", "device": "cpu", "log_every": "1000"}
    run_train({**flags, "grad_accum": "2", "out": str(tmp_path / "one")})
    torchrun({**flags, "out": str(tmp_path / "fsdp"), "fsdp": "true"})
    assert_adapters_close(adapter(tmp_path / "fsdp"), adapter(tmp_path / "one"), rel=0)  # the head too
    assert (tmp_path / "fsdp" / "adapter" / "labels.json").is_file()


@pytest.mark.parametrize(
    ("extra", "world", "reason"),
    [
        ({}, "1", "run it under torchrun"),
        ({"full_finetune": "true"}, "2", "cannot go with --full-finetune"),
        ({"precision": "fp16"}, "2", "use --precision bf16"),
        ({"task": "image-classification", "model": "timm:resnet18"}, "2", "not --task image-classification"),
    ],
)
def test_fsdp_refusals_are_one_line_before_loading(extra, world, reason, tiny_llama, lm_files, tmp_path,
                                                   monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", world)
    flags = {**lm_flags(tiny_llama, lm_files, tmp_path / "run", fsdp="true"), **extra}
    if extra.get("task"):
        flags = {k: v for k, v in flags.items() if k not in ("max_length", "train", "eval")}
    with pytest.raises(LorafitError, match=reason) as info:
        run_train(flags)
    assert "\n" not in str(info.value) and not (tmp_path / "run").exists()


def test_sigterm_under_fsdp_checkpoints_and_resumes_exactly(tiny_llama, lm_files, tmp_path):
    """torchrun forwards SIGTERM to both ranks: every rank stops after the same step and rank 0 writes the
    gathered checkpoint (the Interrupted path). Resumed up to two steps later, it equals a run stopped there."""
    flags = lm_flags(tiny_llama, lm_files, tmp_path / "killed", fsdp="true", epochs=500, eval_every=0,
                     save_every=10_000, log_every=1)
    flags.pop("eval")
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lorafit",
            "train", *(f"--{k.replace('_', '-')}={v}" for k, v in flags.items() if k != "fsdp"), "--fsdp"]
    proc = subprocess.Popen(argv, env={**subprocess_env(), "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert "SIGTERM at step" in out and "checkpoint saved" in out, out[-3000:]
    stopped = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)["step"]
    assert 3 <= stopped < 1000
    torchrun({"resume": str(tmp_path / "killed"), "stop_at_step": str(stopped + 2)})
    torchrun({**flags, "out": str(tmp_path / "straight"), "stop_at_step": str(stopped + 2)})
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("killed", "straight"))
    assert a["step"] == b["step"] == stopped + 2 and a["trainable"].keys() == b["trainable"].keys()
    for key in b["trainable"]:
        assert torch.equal(a["trainable"][key], b["trainable"][key]), key
    for key, state in b["optimizer"]["state"].items():
        assert torch.equal(a["optimizer"]["state"][key]["exp_avg_sq"], state["exp_avg_sq"]), key
