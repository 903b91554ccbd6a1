"""CLI conventions (issue 13 point 6): bare `lorafit` is help, one error prefix, the user's
HF_HUB_OFFLINE, every default in `--help`."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.train.train_helpers import subprocess_env

from lorafit.cli import main


def test_bare_lorafit_prints_help_and_exits_0():
    proc = subprocess.run([sys.executable, "-m", "lorafit"], env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: lorafit")
    text = " ".join(proc.stdout.split())
    assert all(c in text for c in ("train", "eval", "merge", "info")) and "Start with `lorafit train`" in text
    assert proc.stderr == ""  # no run started: nothing logged, nothing written


@pytest.mark.parametrize("argv, expect", [
    (["train", "--warp", "9"], "lorafit: error: unrecognized arguments: --warp 9 (see lorafit train --help)"),
    (["bogus"], "lorafit: error: argument COMMAND: invalid choice: 'bogus'"),
    (["train", "--rank"], "lorafit: error: argument --rank: expected one argument (see lorafit train --help)"),
    (["--warp"], "lorafit: error: unrecognized arguments: --warp (see lorafit --help)"),
])
def test_argparse_errors_have_one_prefix(argv, expect, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expect), err
    assert lines[0].count("lorafit:") == 1, lines[0]  # was "lorafit: error: lorafit train: ..."


def test_a_command_missing_its_package_is_one_prefixed_line(monkeypatch, capsys):
    import lorafit.cli as cli

    monkeypatch.setitem(cli.COMMANDS, "fake", ("lorafit_no_such_module:CMD", "a command whose package is missing"))
    assert main(["fake"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("lorafit: error: `lorafit fake` needs a package that is not installed "
                   "(No module named 'lorafit_no_such_module')")


def test_hf_hub_offline_is_the_users(monkeypatch):
    pytest.importorskip("transformers")
    from lorafit.jobs.train import quiet_transformers

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    quiet_transformers()
    assert "HF_HUB_OFFLINE" not in os.environ and "TRANSFORMERS_OFFLINE" not in os.environ
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    quiet_transformers()
    assert os.environ["HF_HUB_OFFLINE"] == "0"


def _help_entries(text: str) -> dict[str, str]:
    """``--flag`` -> its help text (wrapped lines joined), from argparse's option listing."""
    entries: dict[str, str] = {}
    flag = None
    for line in text.splitlines():
        m = re.match(r"^  (--[a-z0-9-]+)", line)
        if m:
            flag = m.group(1)
            entries[flag] = line
        elif flag and line.startswith("    "):  # a wrapped line; argparse may break after a hyphen
            entries[flag] += ("" if entries[flag].endswith("-") else " ") + line.strip()
        else:
            flag = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


def test_every_train_default_is_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    entries = _help_entries(capsys.readouterr().out)
    assert len(entries) > 30
    # task-dependent defaults: each task's value
    assert re.search(r"text-classification 32\b", entries["--batch-size"]), entries["--batch-size"]
    assert re.search(r"causal-lm 8\b", entries["--batch-size"]), entries["--batch-size"]
    assert re.search(r"causal-lm 256\b", entries["--max-length"]), entries["--max-length"]
    assert re.search(r"causal-lm 0.0002\b", entries["--lr"]), entries["--lr"]
    assert "[off]" in entries["--compile"] and "[on]" in entries["--eval-before"]
    assert "[none]" in entries["--report-to"]
    for flag, text in entries.items():
        if flag in ("--help", "--config", "--resume"):
            continue  # a flag that is not a setting: nothing to default
        assert re.search(r"\[[^\]]+\]$", text) or "default" in text, f"{flag}: no default shown: {text}"
