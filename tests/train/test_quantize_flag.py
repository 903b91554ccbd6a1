"""`lorafit train --quantize`: QLoRA through the job; the adapter then serves the full-precision base."""

from __future__ import annotations

import json

import pytest
from tests.jobs.test_job import flags

from lorafit.cli import main
from lorafit.jobs.train import run_train


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_quantized_run_trains_and_its_adapter_evaluates_on_the_plain_base(fmt, tiny_bert, cls_data, tmp_path, capsys):
    run = tmp_path / fmt
    m = run_train(flags(tiny_bert, cls_data, run, epochs=2, quantize=fmt))
    assert "quantize: " + fmt in (run / "config.yaml").read_text()
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    assert losses[-1] < losses[0]
    # the adapter is not quantized: `lorafit eval` loads it on the full-precision base
    _, ev = cls_data
    assert main(["eval", "--model", str(tiny_bert), "--adapter", str(run / "adapter"), "--eval", str(ev)]) == 0
    out = capsys.readouterr().out
    acc = float(out.split("eval_accuracy")[1].split()[0].strip(":= %"))
    acc = acc / 100 if acc > 1 else acc
    assert abs(acc - m["eval_accuracy"]) <= 0.1  # same adapter, base differs only by quantization error


def test_quantize_with_full_finetune_is_refused(tiny_bert, cls_data, tmp_path, capsys):
    code = main(["train", "--model", str(tiny_bert), "--train", str(cls_data[0]), "--quantize", "nf4",
                 "--full-finetune", "--out", str(tmp_path / "x")])
    assert code == 2
    assert "cannot go with --full-finetune" in capsys.readouterr().err
