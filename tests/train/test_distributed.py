"""torchrun with 2 gloo processes: the same float operations as 1 process accumulating 2 micro-batches.

What is compared, and why exactly (``torch.equal``), not within a tolerance:

Two processes with ``--batch-size 4`` split each global batch of 8 rows into chunks c0 (rank 0) and
c1 (rank 1) (``Trainer._step_chunks``). One process with ``--batch-size 4 --grad-accum 2`` cuts the
same 8 rows into the same c0 and c1 and runs them one after the other. Each chunk's backward is the
same computation on the same shapes (one OpenMP thread in both), so each yields the same gradient
g0, g1 bit for bit, already divided by the same global count. One process then holds fl(g0 + g1)
(autograd accumulates into ``.grad``); two processes hold the gloo SUM of two fp32 buffers, which
is the one rounded addition fl(g0 + g1) as well (IEEE addition is commutative). Same gradient,
same AdamW step, so the adapters are equal bit for bit after every step. Any tolerance would be
a guess tuned to a CPU; this needs none, and it fails on any fault of the distributed path:
no all-reduce (planted: max diff 3e-2), a wrong average (planted ``flat /= world``: AdamW is nearly
scale-invariant, still off by 7e-6), the wrong chunks per rank.

That one process with batch 8 ends where one with batch 4 x grad-accum 2 ends (up to summation
order) is a single-process property, tested in ``test_loop.py``
(``test_grad_accumulation_matches_one_big_batch``).
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file

from lorafit.jobs.train import run_train
from tests.train.train_helpers import subprocess_env


def test_two_gloo_processes_equal_one_process_accumulating(tiny_bert, cls_data, tmp_path):
    train, ev = cls_data
    common = {
        "model": str(tiny_bert),
        "train": str(train),
        "eval": str(ev),
        "epochs": "1",
        "batch_size": "4",
        "lr": "5e-3",
        "dropout": "0",
        "device": "cpu",
        "log_every": "1000",
    }  # tiny_bert has every dropout at 0; the conftest runs this process on one thread, like the children
    assert torch.get_num_threads() == 1
    one = run_train({**common, "grad_accum": "2", "out": str(tmp_path / "one")})
    args = [f"--{k.replace('_', '-')}={v}" for k, v in {**common, "out": str(tmp_path / "two")}.items()]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "lorafit", "train", *args],
        env={**subprocess_env(), "OMP_NUM_THREADS": "1"},
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
        assert torch.equal(b[key], a[key]), (key, (b[key] - a[key]).abs().max().item())
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-4  # it trained (B starts at 0)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2 and two["steps"] == one["steps"] == 12
    # the logged losses are the global mean of the same per-chunk sums, reduced in float64
    losses = [[r["loss"] for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())
               if r["kind"] == "train"] for d in ("one", "two")]
    assert len(losses[0]) == 12 and losses[0] == losses[1]
