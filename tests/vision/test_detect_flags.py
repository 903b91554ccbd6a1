"""``lorafit train --task detect``: every flag applies or is refused, --resume continues exactly, torchrun.

Tiny runs (32 images at 64 px, yolov8n.yaml, 1-2 epochs): each takes a few seconds on 2 cores.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafit.common.errors import Interrupted, LorafitError
from tests.vision.vision_helpers import detect_opts, subprocess_env

HERE = Path(__file__).resolve().parent

# The options the detect task reads (mapped onto Ultralytics' args or JobControls) or that the job reads
# (``overwrite``: run_train clears the old run before the detect task starts).
MAPPED = {"config", "task", "model", "resume", "out", "overwrite", "data", "imgsz", "max_samples", "rank", "alpha",
          "dropout",
          "targets", "full_finetune", "epochs", "batch_size", "grad_accum", "lr", "weight_decay", "warmup",
          "lr_b_ratio", "max_grad_norm", "seed", "precision", "device", "eval_every", "eval_before",
          "eval_batch_size", "save_every", "log_every"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from lorafit.datasets.shapes import ShapesSpec, make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("tiny") / "B", ShapesSpec("B", 32, 16, 64, 0))


def _opts(data, out, **flags):
    base = dict(model="yolov8n.yaml", data=data, imgsz=64, rank=4, epochs=2, batch_size=8, out=out)
    return detect_opts(**{**base, **flags})


def _run(data, out, callbacks=None, **flags):
    from lorafit.tasks.detect import Task

    task = Task(_opts(data, out, **flags))
    task.callbacks.update(callbacks or {})
    return task, task.run(say=lambda *_: None)


def test_every_train_flag_is_mapped_or_refused():
    """A new `lorafit train` flag must be given a meaning for detect, or a reason it has none."""
    from lorafit.tasks import detect
    from lorafit.jobs.options import all_options

    keys = {o.key for o in all_options()}
    assert set(detect.NOT_APPLICABLE) <= keys
    assert not MAPPED & set(detect.NOT_APPLICABLE)
    assert keys == MAPPED | set(detect.NOT_APPLICABLE), keys ^ (MAPPED | set(detect.NOT_APPLICABLE))
    assert detect.DEFAULTS["max_grad_norm"] == 10.0  # Ultralytics' own clipping stays the default


def test_precision_on_cpu_is_refused(tiny, tmp_path):
    for prec in ("bf16", "fp16"):
        with pytest.raises(LorafitError, match=f"--precision {prec}"):
            _run(tiny, tmp_path / prec, precision=prec)


def test_flags_reach_the_trainer(tiny, tmp_path, monkeypatch):
    """LoRA+, clipping, accumulation, warmup steps, eval cadence and batch, --max-samples, --log-every."""
    norms = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *args, **kwargs):
        norms.append((len(list(params)) if isinstance(params, list) else -1, max_norm))
        return clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    lines = []
    from lorafit.tasks.detect import Task

    task = Task(_opts(tiny, tmp_path / "r", epochs=3, lr_b_ratio=4, max_grad_norm=0.5, grad_accum=2, warmup=1,
                      eval_every=2, eval_batch_size=5, max_samples=20, log_every=2, weight_decay=0.01, lr=0.02))
    task.run(say=lines.append)
    tr = task.trainer
    groups = tr.optimizer.param_groups
    b_groups = [g for g in groups if g.get("lora_b")]
    assert b_groups and all(g["initial_lr"] == pytest.approx(0.02 * 4) for g in b_groups)
    assert all(g["initial_lr"] == pytest.approx(0.02) for g in groups if not g.get("lora_b"))
    names = {id(p): n for n, p in tr.unwrapped().named_parameters()}
    assert all(".lora_B" in names[id(p)] for g in b_groups for p in g["params"])
    decay = [g for g in groups if g.get("param_group") == "weight"]
    assert decay and all(g["weight_decay"] == pytest.approx(0.01) for g in decay)  # nbs = batch x accum: unscaled
    assert tr.accum == 2 and tr.accumulate == 1 and tr.args.nbs == 16
    n_steps = 3 * len(tr.train_loader) // 2  # optimizer steps of the run (carry-over across epochs)
    assert len(norms) == n_steps and {m for _, m in norms} == {0.5}
    assert all(n == len(tr._trainable) for n, _ in norms)
    assert tr._get_warmup_iterations(len(tr.train_loader)) == 2  # 1 step x 2 micro-batches
    assert tr.test_loader.batch_size == 5
    assert len(tr.train_loader.dataset) == 20
    subset = (tmp_path / "r" / "train_subset.txt").read_text().split()
    assert len(subset) == 20 == len(set(subset))
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("train", 1), ("train", 2), ("eval", 2), ("train", 3),
                                                         ("eval", 3)]
    assert [x.split(":")[0] for x in lines if x.startswith("epoch")] == ["epoch 2/3", "epoch 3/3"]
    assert tr.best_epoch in (2, 3)  # chosen among validated epochs only
    # the same seed picks the same images; another seed others
    from lorafit.tasks.detect import Task as T

    again = T(_opts(tiny, tmp_path / "x", max_samples=20))
    again.load_data()
    assert [str(p) for p in again._train_subset(tmp_path / "x")] == subset
    other = T(_opts(tiny, tmp_path / "y", max_samples=20, seed=1))
    other.load_data()
    assert [str(p) for p in other._train_subset(tmp_path / "y")] != subset


def test_no_clipping_with_zero(tiny, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: calls.append(a))
    _run(tiny, tmp_path / "r", epochs=1, max_grad_norm=0, eval_before="false")
    assert calls == []


def _stop_at(epoch: int):
    """As a Ctrl-C during epoch ``epoch`` (0-based): the trainer stops after that batch."""

    def hook(trainer):
        if trainer.epoch == epoch:
            trainer.request_stop(2)

    return {"on_train_epoch_start": [hook]}


def test_resume_continues_bit_exact(tiny, tmp_path):
    """Interrupted after epoch 1 of 2, resumed with run_train --resume: the same adapter as one run, bit for bit.

    --grad-accum 3 over 4 batches per epoch makes an accumulation straddle the epoch boundary, so the
    checkpoint's pending gradients are exercised too.
    """
    from lorafit.train.checkpoint import CHECKPOINT, load_checkpoint
    from lorafit.jobs.train import find_run, run_train

    flags = dict(grad_accum=3, lr_b_ratio=2)
    _, whole = _run(tiny, tmp_path / "whole", **flags)
    with pytest.raises(Interrupted, match=r"SIGINT during epoch 2/2: resume with: .*after epoch 1\)"):
        _run(tiny, tmp_path / "cut", callbacks=_stop_at(1), **flags)
    state = load_checkpoint(tmp_path / "cut")  # weights_only=True
    assert state["epoch"] == 0 and state["micro"] == 1 and state["ranks"][0]["pending"]
    assert state["model"] and all(".lora_" in k for k in state["model"])  # the frozen base is not in it
    assert not (tmp_path / "cut" / "metrics.json").exists()
    resumed = run_train({"resume": str(tmp_path / "cut")}, say=lambda *_: None)
    a = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 0  # it trained
    assert resumed["eval_mAP50-95"] == whole["eval_mAP50-95"] and resumed["best_epoch"] == whole["best_epoch"]
    lines = [(tmp_path / r / "metrics.jsonl").read_text().splitlines() for r in ("whole", "cut")]
    assert lines[0] == lines[1] and len(lines[1]) == 4  # one train + eval pair per epoch, no duplicates
    csv = (tmp_path / "cut" / "ultralytics" / "results.csv").read_text().splitlines()
    assert len(csv) == 3  # header + 2 epochs
    assert not (tmp_path / "cut" / CHECKPOINT).exists() and (tmp_path / "cut" / "metrics.json").is_file()
    with pytest.raises(LorafitError, match="the run finished"):
        find_run(str(tmp_path / "cut"), None, "detect")


def test_interrupt_in_first_epoch_says_there_is_no_checkpoint(tiny, tmp_path):
    with pytest.raises(Interrupted, match="no checkpoint yet") as err:
        _run(tiny, tmp_path / "r", callbacks={"on_train_batch_end": [lambda tr: tr.request_stop(15)]})
    assert err.value.exit_code == 128 + 15 and "SIGTERM during epoch 1/2" in str(err.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes(tiny, tmp_path):
    """2 gloo processes: one run directory, world_size 2, half the images each, identical adapters on both."""
    env = subprocess_env(LORAFIT_PROBE_DIR=str(tmp_path))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master-port={_free_port()}",
           str(HERE / "detect_rank_probe.py"), "train", "--task", "detect", "--model", "yolov8n.yaml", "--data",
           str(tiny), "--imgsz", "64", "--epochs", "1", "--batch-size", "4", "--rank", "4", "--device", "cpu",
           "--out", str(run)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("lorafit train: detect") == 1 and "on 2 processes" in proc.stdout
    for name in ("config.yaml", "data.yaml", "metrics.json", "metrics.jsonl", "loss.png", "adapter/lorafit_job.json",
                 "adapter/adapter_model.safetensors", "ultralytics/weights/best.pt"):
        assert (run / name).is_file(), name
    assert not (run / "checkpoint.pt").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and "eval_mAP50-95" in metrics
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == 2 and r0["train_images"] == r1["train_images"] == 16  # a shard of 32 each
    for part in ("live", "ema"):
        assert r0[part].keys() == r1[part].keys()
        assert all(torch.equal(r0[part][k], r1[part][k]) for k in r0[part]), part
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    assert max(v.abs().max().item() for k, v in saved.items() if "lora_B" in k) > 0


def test_torchrun_resume_is_bit_exact(tiny, tmp_path):
    """2 processes, interrupted during epoch 2 and resumed: the adapter of the uninterrupted 2-process run."""
    env = subprocess_env(LORAFIT_PROBE_DIR=str(tmp_path))
    common = ["--task", "detect", "--model", "yolov8n.yaml", "--data", str(tiny), "--imgsz", "64", "--epochs", "2",
              "--batch-size", "4", "--grad-accum", "3", "--rank", "4", "--device", "cpu"]

    def torchrun(*args, **extra_env):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master-port={_free_port()}",
               str(HERE / "detect_rank_probe.py"), "train", *args]
        return subprocess.run(cmd, env={**env, **extra_env}, capture_output=True, text=True, timeout=400)

    whole = torchrun(*common, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    cut = torchrun(*common, "--out", str(tmp_path / "cut"), LORAFIT_PROBE_STOP_EPOCH="1")
    assert cut.returncode != 0 and "SIGINT during epoch 2/2: resume with" in cut.stderr
    assert (tmp_path / "cut" / "checkpoint.pt").is_file()
    resumed = torchrun("--resume", str(tmp_path / "cut"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    a = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["world_size"] == 2
