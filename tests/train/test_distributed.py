"""torchrun with 2 gloo processes ends with the adapter of 1 process at the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file

from lorafit.train.job import run_train
from train_helpers import subprocess_env


def test_two_gloo_processes_match_one_process(tiny_bert, cls_data, tmp_path):
    train, ev = cls_data
    common = {
        "model": str(tiny_bert),
        "train": str(train),
        "eval": str(ev),
        "epochs": "1",
        "lr": "5e-3",
        "dropout": "0",
        "device": "cpu",
        "log_every": "1000",
    }  # tiny_bert has every dropout at 0
    one = run_train({**common, "batch_size": "8", "out": str(tmp_path / "one")})
    args = [
        f"--{k.replace('_', '-')}={v}"
        for k, v in {**common, "batch_size": "4", "out": str(tmp_path / "two")}.items()
    ]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "lorafit",
            "train",
            *args,
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("lorafit train:") == 1 and "on 2 processes" in proc.stdout  # rank 0 alone prints
    a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-4  # it trained (B starts at 0)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2 and two["steps"] == one["steps"] == 12
