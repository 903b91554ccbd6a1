"""The train job on a tiny BERT: interruption and exact resume, NaN stop, full fine-tuning, run files."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lorafit.cli import main
from lorafit.common.errors import Interrupted
from lorafit.jobs.train import run_train
from tests.train.train_helpers import subprocess_env


def flags(tiny_bert, cls_data, out, **kw):
    train, ev = cls_data
    base = {
        "model": str(tiny_bert),
        "train": str(train),
        "eval": str(ev),
        "out": str(out),
        "batch_size": "8",
        "epochs": "2",
        "lr": "5e-3",
        "dropout": "0.1",
        "log_every": "1000",
    }
    base.update({k: str(v) for k, v in kw.items()})
    return base


def adapter(run):
    return load_file(run / "adapter" / "adapter_model.safetensors")


def test_resume_after_sigterm_equals_uninterrupted(tiny_bert, cls_data, tmp_path, capsys):
    ref = run_train(flags(tiny_bert, cls_data, tmp_path / "ref"))
    run = tmp_path / "run"

    def kill(step):
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted):
        run_train(flags(tiny_bert, cls_data, run), on_step=kill)
    assert (run / "checkpoint.pt").exists() and not (run / "adapter").exists()
    resumed = run_train({"resume": str(run)})  # everything else comes from the run's config.yaml
    assert not (run / "checkpoint.pt").exists()
    a, b = adapter(tmp_path / "ref"), adapter(run)
    assert a.keys() == b.keys() and any("head" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["eval_accuracy"] == ref["eval_accuracy"] and resumed["steps"] == ref["steps"] == 24
    out = capsys.readouterr().out
    assert "resuming" in out and "at step 7" in out
    # the resumed summary says its training time spans both parts (it can exceed this process's wall time)
    assert re.search(r"^wall time: \S+ \(this process; training, all parts: \S+, 24 steps\)", out, re.M), out
    assert len(re.findall(r"^wall time: \S+ \(training \S+, 24 steps\)", out, re.M)) == 1  # the reference run


def test_real_sigterm_in_a_subprocess_then_resume(tiny_bert, cls_data, tmp_path):
    run = tmp_path / "run"
    args = [
        f"--{k.replace('_', '-')}={v}"
        for k, v in flags(tiny_bert, cls_data, run, batch_size=2, epochs=6).items()
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorafit", "train", *args],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count('"kind": "train"') >= 2:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, err
    lines = err.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("lorafit: error: SIGTERM at step") and "--resume" in lines[0]
    )
    assert "Traceback" not in err
    assert (run / "checkpoint.pt").exists() and not (run / "adapter").exists()
    stopped = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert 2 <= stopped < 288
    assert main(["train", "--resume", str(run)]) == 0
    ref = tmp_path / "ref"
    run_train(flags(tiny_bert, cls_data, ref, batch_size=2, epochs=6))
    a, b = adapter(ref), adapter(run)
    for key in a:  # another process: same ops on one thread, so equal up to float noise at most
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_nan_loss_stops_with_clear_message(tiny_bert, cls_data, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(
        [
            "train",
            *[
                f"--{k.replace('_', '-')}={v}"
                for k, v in flags(tiny_bert, cls_data, run, lr="1e30", save_every=1).items()
            ],
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    bad = re.search(r"loss became (nan|inf|-inf) at step (\d+)/24, stopped before applying it", err[0])
    assert bad, err[0]
    last_good = int(bad.group(2)) - 1  # with --save-every 1 the checkpoint is the step before
    assert f"checkpoint.pt (step {last_good})" in err[0]
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["step"] == last_good and all(torch.isfinite(v).all() for v in state["trainable"].values())
    assert not (run / "adapter").exists() and not (run / "metrics.json").exists()


def test_run_directory_and_full_finetune(tiny_bert, cls_data, tmp_path, capsys):
    run = tmp_path / "lora"
    m = run_train(flags(tiny_bert, cls_data, run, eval_every=6, epochs=1))
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "metrics.json",
        "loss.png",
        "adapter/adapter_config.json",
        "adapter/labels.json",
        "best/adapter_model.safetensors",
    ):
        assert (run / name).exists(), name
    saved = json.loads((run / "metrics.json").read_text())
    for key in (
        "eval_accuracy",
        "eval_loss",
        "train_time_s",
        "trainable_params",
        "total_params",
        "adapter_bytes",
        "peak_memory_bytes",
    ):
        assert key in saved, key
    assert saved == json.loads(json.dumps(m))
    assert 0 < saved["trainable_params"] < saved["total_params"]
    assert saved["adapter_bytes"] == (run / "adapter" / "adapter_model.safetensors").stat().st_size
    assert json.loads((run / "adapter" / "labels.json").read_text()) == ["neg", "pos"]
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [s for s in steps if s["kind"] == "train"]
    assert len(train) == 12 and all({"loss", "lr", "tokens_per_s"} <= s.keys() for s in train)
    assert [s["step"] for s in steps if s["kind"] == "eval"] == [0, 6, 12]

    full = tmp_path / "full"
    full_flags = flags(tiny_bert, cls_data, full, full_finetune="true", epochs=1)
    del full_flags["dropout"]  # an adapter option: refused with --full-finetune
    fm = run_train(full_flags)
    assert fm["trainable_params"] == fm["total_params"] > saved["trainable_params"]
    from transformers import AutoModel

    AutoModel.from_pretrained(full / "model")  # the encoder loads as a transformers model
    assert (full / "model" / "head.safetensors").exists() and not (full / "adapter").exists()
    out = capsys.readouterr().out
    assert "full fine-tuning" in out and "model size:" in out


def test_grad_checkpointing_same_result_and_bf16_runs(tiny_bert, cls_data, tmp_path):
    from transformers import AutoModel

    from lorafit.tasks import checkpoint_activations

    enc = AutoModel.from_pretrained(tiny_bert)
    checkpoint_activations(enc)
    on = enc.is_activation_checkpointing if hasattr(enc, "is_activation_checkpointing") else None
    assert on if on is not None else enc.is_gradient_checkpointing  # really switched on
    plain = tmp_path / "plain"
    run_train(flags(tiny_bert, cls_data, plain, epochs=1, dropout=0))
    ckpt_run = tmp_path / "ckpt"
    run_train(flags(tiny_bert, cls_data, ckpt_run, epochs=1, dropout=0, grad_checkpointing="true"))
    a, b = adapter(plain), adapter(ckpt_run)
    for key in a:  # recomputing activations in backward changes memory, not the numbers
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    m = run_train(flags(tiny_bert, cls_data, tmp_path / "bf16", epochs=1, precision="bf16"))
    assert m["steps"] == 12 and 0 < m["eval_loss"] < 10
    bf = adapter(tmp_path / "bf16")
    assert all(t.dtype == torch.float32 for t in bf.values())  # fp32 master weights under autocast
    assert any(not torch.equal(bf[k], a[k]) for k in a)
