"""Image classification through the generic job: exact --resume and torchrun, like the text tasks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafit.common.errors import Interrupted
from lorafit.jobs.train import run_train
from tests.vision.vision_helpers import subprocess_env



@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from lorafit.datasets.shapes import make_shapes_classification

    return make_shapes_classification(tmp_path_factory.mktemp("cls"), n_per_class=4, imgsz=32)


def flags(folder, out, **extra):
    base = {"task": "image-classification", "model": "timm:vit_tiny_patch16_224", "train": str(folder / "train"),
            "eval": str(folder / "val"), "imgsz": 32, "epochs": 2, "batch_size": 4, "lr": 5e-3, "device": "cpu",
            "eval_before": False, "log_every": 1000, "out": str(out), **extra}
    return {k: v if isinstance(v, bool) else str(v) for k, v in base.items()}


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def test_resume_after_sigterm_equals_uninterrupted(folder, tmp_path):
    ref = run_train(flags(folder, tmp_path / "ref"), say=lambda *_: None)
    run = tmp_path / "run"

    def kill(step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted):
        run_train(flags(folder, run), on_step=kill, say=lambda *_: None)
    assert (run / "checkpoint.pt").is_file() and not (run / "adapter").exists()
    resumed = run_train({"resume": str(run)}, say=lambda *_: None)
    assert not (run / "checkpoint.pt").exists()
    a, b = adapter(tmp_path / "ref"), adapter(run)
    assert a.keys() == b.keys() and any(".head." in k for k in a)  # the new classifier travels with the adapter
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["steps"] == ref["steps"] == 6 and resumed["eval_accuracy"] == ref["eval_accuracy"]


def test_two_gloo_processes_equal_one_process_accumulating(folder, tmp_path):
    """2 processes x batch 2 == 1 process x batch 2 x grad-accum 2, bit for bit, after every step.

    Not "== 1 process x batch 4 within a tolerance": AdamW's first steps are nearly lr * sign(g), and
    lora_A's gradient starts at ~0 (B = 0), so where an entry is rounding-sized the summation order
    flips its sign; the size of the move then depends on the CPU's GEMM blocking (a 1e-3 bound
    failed on a 2-core machine). Instead the reference does the very same float operations: both
    cut each global batch of 4 into the same two chunks of 2 (``Trainer._step_chunks``), each chunk's
    forward/backward runs on the same shapes with one thread, and the two chunk gradients are added
    once in fp32: by autograd's accumulation in one process, by gloo's SUM of two buffers in two
    (IEEE addition is commutative). Same gradients, same AdamW steps: no tolerance to derive. A fault
    in the distributed path (no all-reduce, a wrong average, other chunks per rank) breaks equality.
    Batch 4 vs batch 2 x grad-accum 2 is the single-process property of tests/train/test_loop.py.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like each torchrun child (OMP_NUM_THREADS=1): same kernels, same blocking
    try:
        one = run_train(flags(folder, tmp_path / "one", epochs=1, batch_size=2, grad_accum=2), say=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in flags(folder, tmp_path / "two", epochs=1, batch_size=2).items()
            if k != "eval_before"] + ["--no-eval-before"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "lorafit", "train", *args], env=subprocess_env(), capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("lorafit train:") == 1 and "on 2 processes" in proc.stdout
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert a.keys() == b.keys() and any(".head." in k for k in a)
    for key in a:
        assert torch.equal(b[key], a[key]), (key, (b[key] - a[key]).abs().max().item())
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-3  # it trained (B starts at 0)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2 and two["steps"] == one["steps"] == 3
    assert two["eval_accuracy"] == one["eval_accuracy"] and two["eval_loss"] == one["eval_loss"]
