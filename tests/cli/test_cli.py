"""The `lorafit` command line: help, flags, config files, bad input, eval / merge / info."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.train_helpers import make_tiny_bert, sentiment_rows, subprocess_env, write_csv

from lorafit.cli import main

CONTRACT_FLAGS = [
    "--model",
    "--task",
    "--train",
    "--eval",
    "--text-column",
    "--label-column",
    "--max-samples",
    "--max-length",
    "--rank",
    "--alpha",
    "--dropout",
    "--targets",
    "--epochs",
    "--batch-size",
    "--grad-accum",
    "--lr",
    "--weight-decay",
    "--warmup",
    "--lr-b-ratio",
    "--seed",
    "--precision",
    "--grad-checkpointing",
    "--compile",
    "--full-finetune",
    "--out",
    "--resume",
    "--config",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("cli")
    make_tiny_bert(d / "bert")
    write_csv(d / "train.csv", sentiment_rows(48, seed=1))
    write_csv(d / "eval.csv", sentiment_rows(16, seed=2))
    return d


def test_help_at_every_level(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    top = capsys.readouterr().out
    assert all(c in top for c in ("train", "eval", "merge", "info"))
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in CONTRACT_FLAGS + ["--packing"]:
        assert re.search(rf"{flag}\b", text), flag
    for cmd, flags in [
        ("eval", ["--adapter", "--eval", "--model"]),
        ("merge", ["--adapter", "--out", "--model"]),
        ("info", ["--json"]),
    ]:
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = capsys.readouterr().out
        assert all(f in text for f in flags) and "example" in text


def test_module_entry_point_and_version():
    proc = subprocess.run(
        [sys.executable, "-m", "lorafit", "--version"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("lorafit ")


def test_bad_input_in_a_real_process_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lorafit", "train", "--train", str(tmp_path / "missing.csv")],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"lorafit: error: {tmp_path / 'missing.csv'}: no such file"


def _bad_cases(d: Path):
    write_csv(d / "empty.csv", [])
    write_csv(d / "unseen.csv", [("fine", "pos"), ("meh", "neutral")])
    (d / "latin1.csv").write_bytes("text,label\nok,pos\ncaf\xe9 cr\xe8me,neg\n".encode("latin-1"))
    (d / "bad.yaml").write_text("rank: 4\nbogus: 1\n")
    (d / "badval.yaml").write_text("precision: fp8\n")
    (d / "notapplicable.yaml").write_text("imgsz: 224\n")
    write_csv(d / "one.csv", [("fine", "pos"), ("good", "pos")])
    write_csv(d / "mixed.csv", [("fine", "1"), ("bad", "0"), ("meh", "neutral")])
    write_csv(d / "tabs.csv", [("fine", "pos"), ("awful", "neg")], delimiter="\t")
    (d / "broken.yaml").write_text("rank: 4\nlr: : 3\nepochs: 1\n")
    (d / "fullft.yaml").write_text("full_finetune: true\ntargets: query\n")
    return [
        (["--train", "nope.csv"], "nope.csv: no such file"),
        (["--text-column", "sentence"], "train.csv: no column 'sentence' (columns: text, label)"),
        (["--train", str(d / "empty.csv")], "empty.csv: no data rows"),
        (
            ["--eval", str(d / "unseen.csv")],
            "unseen.csv line 3: label 'neutral' in column 'label' was never seen",
        ),
        (["--train", str(d / "latin1.csv")], "latin1.csv line 3: not valid UTF-8"),
        (["--precision", "fp8"], "--precision: invalid value 'fp8' (choose from fp32, bf16, fp16)"),
        (["--task", "segment"], "--task: invalid value 'segment'"),
        (["--lr", "abc"], "--lr: expected a number, got 'abc'"),
        (["--rank", "0"], "--rank: must be >= 1, got 0"),
        (["--warp", "9"], "unrecognized arguments: --warp 9"),
        (["--model", "/nonexistent/model"], "--model /nonexistent/model: no such directory"),
        (["--config", str(d / "bad.yaml")], "bad.yaml: unknown option 'bogus'"),
        (["--config", str(d / "badval.yaml")], "badval.yaml: precision: invalid value 'fp8'"),
        (["--targets", "(query"], "--targets: invalid regex"),
        (["--targets", "nothing_like_this"], "--targets nothing_like_this:"),
        (["--resume", str(d / "no-run")], "no checkpoint.pt to resume from"),
        (["--packing"], "--packing does not apply to --task text-classification"),
        (["--config", str(d / "notapplicable.yaml")], "--imgsz does not apply to --task text-classification"),
        (["--task", "causal-lm", "--label-column", "y"], "--label-column does not apply to --task causal-lm"),
        # issue 10: each of these trained silently or ended in a traceback
        (["--train", str(d / "one.csv")], "one.csv: column 'label' has one label ('pos') in all 2 rows"),
        (
            ["--train", str(d / "mixed.csv")],
            "mixed.csv line 4: column 'label' mixes numeric labels (1 on line 2) "
            "and text labels ('neutral' on line 4)",
        ),
        (["--max-length", "1024"], "--max-length 1024: model "),
        (["--dropout", "1"], "--dropout: must be < 1, got 1.0"),
        (["--dropout", "1.5"], "--dropout: must be < 1, got 1.5"),
        (["--lr", "-1e-3"], "--lr: must be > 0, got -0.001"),
        (["--full-finetune", "--rank", "16", "--targets", "query"], "--rank, --targets: adapter options cannot go"),
        (["--config", str(d / "fullft.yaml")], "--targets (in "),
        (["--train", str(d / "tabs.csv")], "tabs.csv: the header 'text\\tlabel' looks tab-separated; rename"),
        (["--config", str(d / "broken.yaml")], "broken.yaml line 2: invalid YAML (mapping values are not allowed"),
    ]


def test_bad_input_gives_one_line_and_exit_2(env, tmp_path, capsys):
    base = [
        "train",
        "--model",
        str(env / "bert"),
        "--train",
        str(env / "train.csv"),
        "--eval",
        str(env / "eval.csv"),
        "--out",
        str(tmp_path / "run"),
        "--epochs",
        "1",
        "--batch-size",
        "16",
    ]
    for args, expect in _bad_cases(tmp_path):
        code = main(base + args)
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert code == 2, (args, err)
        assert len(lines) == 1 and lines[0].startswith("lorafit: error: "), (args, err)
        assert expect in lines[0], (args, lines[0])
        assert "Traceback" not in err
        assert not (tmp_path / "run").exists(), args  # refused before anything was written


def test_config_file_with_flags_winning(env, tmp_path, capsys):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        f"model: {env / 'bert'}\ntrain: {env / 'train.csv'}\neval: {env / 'eval.csv'}\nrank: 4\n"
        "alpha: 8\nlr: 0.02\nbatch-size: 16\nmax_samples: 32\ntargets: query,value\n"
    )
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--rank", "2", "--out", str(out)]) == 0
    import yaml

    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert (resolved["rank"], resolved["alpha"], resolved["lr"], resolved["batch_size"]) == (2, 8.0, 0.02, 16)
    assert resolved["max_samples"] == 32 and resolved["targets"] == "query,value"
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 2 and adapter_cfg["lora_alpha"] == 8
    assert sorted({t.rsplit(".", 1)[-1] for t in adapter_cfg["target_modules"]}) == ["query", "value"]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2  # 32 rows / 16
    assert "32 train / 16 eval rows" in capsys.readouterr().out


def test_info_merge_and_eval(env, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model",
                str(env / "bert"),
                "--train",
                str(env / "train.csv"),
                "--eval",
                str(env / "eval.csv"),
                "--batch-size",
                "8",
                "--lr",
                "1e-2",
                "--lr-b-ratio",
                "4",
                "--out",
                str(run_dir),
            ]
        )
        == 0
    )
    adapter = run_dir / "adapter"
    capsys.readouterr()
    assert main(["info", str(adapter), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    from safetensors.torch import load_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    assert info["params"] == sum(t.numel() for t in tensors.values())
    assert info["rank"] == 8 and info["modules_to_save"] == ["head"] and info["labels"] == ["neg", "pos"]
    assert (
        info["target_layers"] == 2 * 6 + 1
        and info["weights_bytes"] == (adapter / "adapter_model.safetensors").stat().st_size
    )
    assert re.fullmatch(r"[0-9a-f]{32}", info["base_fingerprint"])
    assert main(["info", str(adapter)]) == 0
    text = capsys.readouterr().out
    assert (
        "rank 8" in text
        and "base fingerprint" in text
        and "encoder.encoder.layer.*.attention.self.query  (x2)" in text
    )

    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--out", str(merged)]) == 0
    from transformers import AutoModel

    AutoModel.from_pretrained(merged)  # a plain transformers directory
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--adapter",
                str(adapter),
                "--eval",
                str(env / "eval.csv"),
                "--out",
                str(tmp_path / "a.json"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "eval",
                "--model",
                str(merged),
                "--eval",
                str(env / "eval.csv"),
                "--out",
                str(tmp_path / "m.json"),
            ]
        )
        == 0
    )
    a, m = json.loads((tmp_path / "a.json").read_text()), json.loads((tmp_path / "m.json").read_text())
    final = json.loads((run_dir / "metrics.json").read_text())
    assert a["eval_accuracy"] == m["eval_accuracy"] == final["eval_accuracy"]
    assert a["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-5)
    assert m["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4)  # merged weights: same function
    assert main(["eval", "--adapter", str(tmp_path), "--eval", str(env / "eval.csv")]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err

    # a truncated weights file: eval and merge name it in one line, exit 2, and merge writes nothing
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["eval", "--adapter", str(broken), "--eval", str(env / "eval.csv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{weights}: not a valid safetensors file" in err, err
    assert main(["merge", "--adapter", str(broken), "--out", str(tmp_path / "m2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{weights}: not a valid safetensors file" in err, err
    assert not (tmp_path / "m2").exists()
