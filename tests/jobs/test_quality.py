"""Real model, real data: the embedded default job (made small) and the issue's SST-2 command."""

from __future__ import annotations

import json
import re

import pytest
import torch

from lorafit.cli import main
from tests.train.train_helpers import REPO, SST2


@pytest.fixture
def two_threads():
    """The real-size runs use both cores, as a user's run would."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_default_job_small(tmp_path, capsys, two_threads):
    out = tmp_path / "run"
    assert main(["train", "--max-samples", "96", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "on minilm" in text and "96 train / 500 eval rows, 5 labels" in text
    before = re.search(r"^before: eval_accuracy ([\d.]+)%  eval_loss ([\d.]+)", text, re.M)
    after = re.search(r"^after:  eval_accuracy ([\d.]+)%  eval_loss ([\d.]+)", text, re.M)
    assert before and after
    # Three steps on 96 rows must already teach something. Measured here: accuracy 13.2% -> 42.6%
    # (chance 20%), eval loss 1.614 -> 1.527, on 500 eval rows. The margins are half of that: a
    # different CPU's summation order flips a few near-tied predictions (1 row = 0.2 points),
    # not 15 points; a run that does not train (no gradient reaching the adapters, lr ignored,
    # the head not saved) stays at the "before" numbers and fails.
    acc_before, acc_after = float(before.group(1)), float(after.group(1))
    loss_before, loss_after = float(before.group(2)), float(after.group(2))
    assert acc_after >= acc_before + 15, (acc_before, acc_after)
    assert loss_after <= loss_before - 0.04, (loss_before, loss_after)
    trainable = re.search(r"^trainable params: ([\d,]+) of ([\d,]+) \(([\d.]+)%\)", text, re.M)
    assert trainable and 0 < float(trainable.group(3)) < 5
    assert re.search(r"^adapter size: [\d.]+ [KM]B vs base model [\d.]+ MB \([\d.]+%\)", text, re.M)
    assert re.search(r"^peak memory: [\d.]+ [MG]B \(peak RSS\)", text, re.M)
    assert re.search(r"^wall time: \S+ \(training \S+, 3 steps\)", text, re.M)
    m = json.loads((out / "metrics.json").read_text())
    assert m["trainable_params"] == int(trainable.group(1).replace(",", ""))
    assert m["eval_accuracy"] == pytest.approx(float(after.group(1)) / 100, abs=1e-4)
    assert m["base_model_bytes"] > 50 * m["adapter_bytes"] > 0 and m["peak_memory_bytes"] > 100 * 2**20


@pytest.mark.slow
@pytest.mark.skipif(not (SST2 / "train.tsv").is_file(), reason="SST-2 not found at ../shared/data/sst2")
def test_sst2_issue_command_reaches_anchor_quality(tmp_path, monkeypatch, capsys, two_threads):
    monkeypatch.chdir(REPO)  # the issue's command reads ../shared/data/sst2 relative to the repository root
    cmd = (
        "train --model minilm --train ../shared/data/sst2/train.tsv --eval ../shared/data/sst2/test.tsv "
        "--text-column sentence --label-column label --max-samples 8000 --epochs 1 --rank 8 --alpha 16 "
        "--targets query,key,value,dense --lr 1e-3 --batch-size 32 --seed 0"
    ).split()
    assert main(cmd + ["--out", str(tmp_path / "sst2")]) == 0
    m = json.loads((tmp_path / "sst2" / "metrics.json").read_text())
    print(
        f"SST-2 accuracy {m['eval_accuracy']:.4f}, train {m['train_time_s']:.0f} s, "
        f"wall {m['wall_time_s']:.0f} s"
    )
    assert m["steps"] == 250
    assert m["eval_accuracy"] >= 0.835
