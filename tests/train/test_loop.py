"""The Trainer on a toy regression task: exact resume, NaN stop, accumulation, schedule, logging."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import torch.nn as nn

import lorafit
from lorafit.train import checkpoint as ckpt
from lorafit.train.distributed import Dist
from lorafit.common.errors import Interrupted, TrainingDiverged
from lorafit.train.loop import Trainer, lr_lambda, split_batch
from lorafit.jobs.options import resolve
from lorafit.train.options import OPTIONS
from lorafit.train.trainable import Trainable


class ToyTask(Trainable):
    """y = sum(x) regression; ``nan_at`` makes the loss of that optimizer step NaN."""

    primary_metric, greater_is_better = "eval_loss", False

    def __init__(self, nan_at: int | None = None, grad_accum: int = 1):
        self.calls, self.nan_at, self.grad_accum = 0, nan_at, grad_accum

    def collate(self, rows):
        return {"x": torch.stack([r[0] for r in rows]), "y": torch.stack([r[1] for r in rows])}

    def count(self, batch):
        return len(batch["y"])

    def loss_sum(self, model, batch):
        self.calls += 1
        loss = ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).sum()
        if self.nan_at is not None and (self.calls - 1) // self.grad_accum + 1 == self.nan_at:
            loss = loss * float("nan")
        return loss

    def evaluate(self, model, rows, batch_size, device):
        b = self.collate(rows)
        return {"eval_loss": float(((model(b["x"]).squeeze(-1) - b["y"]) ** 2).mean())}


def toy_rows(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return [(x[i], x[i].sum()) for i in range(n)]


def toy_model(seed=0, dropout=0.2, lora_dropout=0.1):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(dropout), nn.ReLU(), nn.Linear(16, 1))
    lorafit.inject(model, lorafit.LoraConfig(r=2, alpha=4, dropout=lora_dropout, target_modules=["0", "3"]))
    return model


def toy_opts(**kw):
    opts = resolve(
        {}, OPTIONS, lambda t: {"lr_lora": 1e-2, "lr_full": 1e-3, "batch_size": 8, "max_length": 8}
    )
    opts.update({"epochs": 2, "eval_every": 4, "log_every": 1000, **kw})
    return opts


def trained(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_lr_schedule_and_split():
    f = lr_lambda(100, 0.06)
    assert f(0) == pytest.approx(1 / 6) and f(5) == pytest.approx(0.95) and f(99) == pytest.approx(0.01)
    assert max(f(s) for s in range(100)) <= 1.0
    assert lr_lambda(10, 2)(0) == pytest.approx(0.5) and lr_lambda(10, 0)(0) == 1.0
    assert split_batch(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_resume_after_signal_is_exact(tmp_path, signum):
    rows, ev = toy_rows(), toy_rows(16, seed=1)
    ref_model = toy_model()
    ref = Trainer(ref_model, ToyTask(), rows, ev, toy_opts(), Dist(), tmp_path / "ref").fit()

    def interrupt(step):
        if step == 5:  # the real handler path: Ctrl-C / SIGTERM delivered to this process
            os.kill(os.getpid(), signum)

    run = tmp_path / "run"
    model = toy_model()
    with pytest.raises(Interrupted) as info:
        Trainer(model, ToyTask(), rows, ev, toy_opts(), Dist(), run, on_step=interrupt).fit()
    assert info.value.exit_code == 128 + signum and "step 5/12" in str(info.value)
    state = ckpt.load_checkpoint(run)
    assert state["step"] == 5 and not (run / "adapter").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    resumed_model = toy_model()  # same frozen base (it stands for pretrained weights) ...
    with torch.no_grad():  # ... but scrambled trainable weights: they must come from the checkpoint
        for p in resumed_model.parameters():
            if p.requires_grad:
                p.normal_()
    out = Trainer(resumed_model, ToyTask(), rows, ev, toy_opts(), Dist(), run).fit(resume=state)
    for name, value in trained(ref_model).items():
        assert torch.equal(value, trained(resumed_model)[name]), name
    assert out["evals"] == ref["evals"] and out["best"] == ref["best"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 13))


def test_nan_stops_before_the_step_and_keeps_last_checkpoint(tmp_path):
    model = toy_model()
    trainer = Trainer(model, ToyTask(nan_at=8), toy_rows(), [], toy_opts(save_every=3), Dist(), tmp_path)
    with pytest.raises(
        TrainingDiverged, match=r"loss became nan at step 8/12.*checkpoint\.pt \(step 6\)"
    ) as info:
        trainer.fit()
    assert info.value.exit_code == 1
    state = ckpt.load_checkpoint(tmp_path)
    assert state["step"] == 6
    now = trained(model)
    assert all(torch.isfinite(v).all() for v in now.values())
    # the NaN step was not applied: the model holds step 7's weights, finite and different from step 6
    assert any(not torch.equal(now[n], state["trainable"][n]) for n in now)
    assert trainer.step == 7


@pytest.mark.parametrize("batch, accum", [(4, 2), (2, 4)])
def test_grad_accumulation_matches_one_big_batch(tmp_path, batch, accum):
    rows = toy_rows()
    big = toy_model(dropout=0.0, lora_dropout=0.0)
    Trainer(big, ToyTask(), rows, [], toy_opts(batch_size=8, eval_before=False), Dist()).fit()
    small = toy_model(dropout=0.0, lora_dropout=0.0)
    Trainer(
        small, ToyTask(), rows, [], toy_opts(batch_size=batch, grad_accum=accum, eval_before=False), Dist()
    ).fit()
    for name, value in trained(big).items():
        torch.testing.assert_close(trained(small)[name], value, rtol=1e-5, atol=1e-6)


def test_best_checkpoint_and_plain_progress(tmp_path, capsys):
    saved = []

    def save(model, directory):
        saved.append(directory.name)
        (directory / "marker").write_text("x")

    trainer = Trainer(
        toy_model(),
        ToyTask(),
        toy_rows(),
        toy_rows(16, 1),
        toy_opts(log_every=0),
        Dist(),
        tmp_path,
        save_model=save,
        tty=False,
    )
    result = trainer.fit()
    evals = [e["eval_loss"] for e in result["evals"]]
    assert len(evals) == 3 and result["best"]["eval_loss"] == min(evals)
    assert (tmp_path / "best" / "marker").exists() and saved
    out = capsys.readouterr().out.splitlines()
    steps = [line for line in out if line.startswith("step ")]
    assert 1 <= len(steps) <= 13 and "tok/s" in steps[-1] and "eta" in steps[-1]
    assert sum(line.startswith("eval @ step") for line in out) == 3
    png = (tmp_path / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="VmHWM is Linux's")
def test_peak_memory_is_this_process_not_its_parent():
    """A child started by a big process reports its own peak (ru_maxrss would carry the parent's over exec)."""
    import subprocess
    import sys

    from lorafit.train.progress import peak_memory

    big = torch.ones(400 * 2**20 // 4)  # 400 MiB resident in this process
    assert peak_memory(torch.device("cpu"))[0] > 400 * 2**20
    code = "import torch; from lorafit.train.progress import peak_memory; print(peak_memory(torch.device('cpu'))[0])"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 50 * 2**20 < child < peak_memory(torch.device("cpu"))[0] - 300 * 2**20
    del big
