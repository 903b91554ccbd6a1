"""Issue 12 in the application: `lorafit train --compile`, loading in the training dtype, quantizing
while loading, and packing by position ids (no dense mask)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import lorafit
from lorafit.cli import main
from lorafit.jobs import rundir
from lorafit.jobs.options import all_options, resolve, task_defaults
from lorafit.jobs.train import build, run_train
from lorafit.tasks import task_class
from tests.jobs.test_job import flags
from tests.train.train_helpers import sentiment_rows, write_jsonl


def train_losses(run):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm-data")
    return write_jsonl(d / "train.jsonl", [{"text": f"{t}. {t}"} for t, _ in sentiment_rows(16, seed=3)])


def lm_flags(model, data, out, **kw):
    base = {"task": "causal-lm", "model": str(model), "train": str(data), "out": str(out), "batch_size": "4",
            "max_length": "16", "lr": "5e-3", "eval_before": "false", "log_every": "1000"}
    return {**base, **{k: str(v) for k, v in kw.items()}}


def test_compile_gives_the_same_losses_and_a_plain_adapter(tiny_bert, cls_data, tiny_llama, lm_data, tmp_path):
    # every row truncated to --max-length: one shape, so one compilation (each takes a while on 2 cores)
    cases = [
        ("bert", tiny_bert, lambda out, **kw: flags(tiny_bert, cls_data, out, epochs=1, dropout=0, max_length=8,
                                                    max_samples=32, **kw)),
        # with activation checkpointing too (transformers' requires_grad_() hook is off: not compilable)
        ("llama", tiny_llama, lambda out, **kw: lm_flags(tiny_llama, lm_data, out, grad_checkpointing="true", **kw)),
    ]
    for name, base, make in cases:
        eager, comp = tmp_path / f"{name}-eager", tmp_path / f"{name}-compiled"
        run_train(make(eager))
        run_train(make(comp, compile="true"))
        a, b = train_losses(eager), train_losses(comp)
        assert len(a) == len(b) >= 4
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-6)
        assert "compile: true" in (comp / "config.yaml").read_text()
        saved = load_file(comp / "adapter" / "adapter_model.safetensors")
        assert saved and not any("_orig_mod" in k for k in saved)
        ref = load_file(eager / "adapter" / "adapter_model.safetensors")
        assert saved.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(saved[k], ref[k], rtol=1e-3, atol=1e-5)
        if name == "llama":
            from transformers import AutoModelForCausalLM

            model = lorafit.load_adapter(AutoModelForCausalLM.from_pretrained(base), comp / "adapter")
            assert any("lora" in n for n, _ in model.named_parameters())


def test_compile_may_change_on_resume_and_is_refused_for_detect(tmp_path, capsys):
    assert "compile" in rundir.RESUMABLE_CHANGES  # it changes how the step runs, not its numbers
    code = main(["train", "--task", "detect", "--compile", "--data", str(tmp_path / "data.yaml")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--compile does not apply to --task detect" in err[0]


def opts_for(model, **kw):
    return resolve({"model": str(model), **{k: str(v) for k, v in kw.items()}}, all_options(), task_defaults)


@pytest.mark.parametrize("task_name", ["causal-lm", "text-classification"])
def test_bf16_precision_loads_a_bf16_base_with_fp32_adapters(task_name, tiny_llama, tiny_bert):
    model_dir = tiny_llama if task_name == "causal-lm" else tiny_bert
    opts = opts_for(model_dir, task=task_name, precision="bf16")
    task = task_class(task_name)(opts)
    task.labels = ["neg", "pos"]  # text-classification: normally set by load_data
    model = build(opts, task)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in model.named_parameters()  # the base (not the head's untouched original copy)
              if not p.requires_grad and p.is_floating_point() and ".head." not in f".{n}"}
    assert lora and frozen
    assert all(p.dtype == torch.float32 for p in lora.values())  # fp32 master weights (and the new head)
    assert all(p.dtype == torch.bfloat16 for p in frozen.values()), {p.dtype for p in frozen.values()}
    # fp32 stays the default, and full fine-tuning keeps fp32 weights
    for extra in ({}, {"precision": "bf16", "full_finetune": "true"}):
        opts = opts_for(model_dir, task=task_name, **extra)
        task = task_class(task_name)(opts)
        task.labels = ["neg", "pos"]
        assert {p.dtype for p in build(opts, task).parameters()} == {torch.float32}


def bin_copy(model_dir, dest):
    """The same model directory with pytorch_model.bin instead of safetensors."""
    shutil.copytree(model_dir, dest)
    for f in dest.glob("*.safetensors"):
        torch.save(load_file(f), dest / "pytorch_model.bin")
        f.unlink()
    return dest


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_quantize_while_loading_builds_the_same_model(fmt, precision, tiny_llama, tmp_path):
    opts = opts_for(tiny_llama, task="causal-lm", quantize=fmt, precision=precision)
    # the base alone: streamed from safetensors == loaded whole, then quantized (today's path)
    torch.manual_seed(0)
    streamed = task_class("causal-lm")(opts).build_model(quantize=fmt)
    whole = lorafit.quant.quantize(task_class("causal-lm")(opts).build_model(), fmt)
    a, b = streamed.state_dict(), whole.state_dict()
    assert lorafit.quant.quantized_modules(streamed).keys() == lorafit.quant.quantized_modules(whole).keys()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # the whole job build, adapter included: a pytorch_model.bin falls back to load-then-quantize, with
    # a note; seeded the same, both give the same model, hence the same first step
    notes = []
    streamed = build(opts, task_class("causal-lm")(opts), say=notes.append)
    assert notes == []
    bin_opts = opts_for(bin_copy(tiny_llama, tmp_path / "bin"), task="causal-lm", quantize=fmt, precision=precision)
    fallback = build(bin_opts, task_class("causal-lm")(bin_opts), say=notes.append)
    assert len(notes) == 1 and "no .safetensors checkpoint" in notes[0]
    a, b = streamed.state_dict(), fallback.state_dict()
    assert a.keys() == b.keys() and any("lora" in k for k in a)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
