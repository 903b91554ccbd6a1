"""causal-lm on tiny random Llama and GPT-2: loss masks, packing without cross-attention, CLI, merge."""

from __future__ import annotations

import json

import pytest
import torch

from lorafit.cli import main
from lorafit.tasks.causal_lm import IGNORE, Task, pack
from lorafit.jobs.options import all_options, resolve, task_defaults
from tests.train.train_helpers import write_jsonl

CHAT = [
    {"role": "user", "content": "what is two plus two?"},
    {"role": "assistant", "content": "four"},
    {"role": "user", "content": "and again?"},
    {"role": "assistant", "content": "the game was great"},
]


def make_task(model_dir, **kw):
    opts = resolve({"task": "causal-lm", "model": str(model_dir), **kw}, all_options(), task_defaults)
    return Task(opts)


def labelled_text(task, ids, labels):
    return task.tokenizer.decode([t for t in labels if t != IGNORE])


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_gpt2"])
def test_loss_masks(which, request):
    task = make_task(request.getfixturevalue(which))
    eos = task.tokenizer.eos_token
    ids, labels = task.encode(
        {"prompt": "question: what is two plus two? answer:", "completion": " four"}, "x"
    )
    n_prompt = len(task.tokenizer("question: what is two plus two? answer:")["input_ids"])
    assert labels[:n_prompt] == [IGNORE] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert labelled_text(task, ids, labels) == " four" + eos
    ids, labels = task.encode({"text": "the film was great"}, "x")
    assert labels == ids and ids[-1] == task.tokenizer.eos_token_id
    ids, labels = task.encode({"messages": CHAT}, "x")
    if (
        which == "tiny_llama"
    ):  # its tokenizer has a chat template: loss on the assistant turns, end marker included
        assert labelled_text(task, ids, labels) == "four<|end|>the game was great<|end|>"
    else:  # no template: "role: content" lines (a token may carry the space before the content)
        assert labelled_text(task, ids, labels).replace(" ", "") == "four\nthegamewasgreat\n" + eos
    assert task.tokenizer.decode(ids).count("what is two plus two?") == 1


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_gpt2"])
def test_packing_has_no_attention_across_examples(which, request):
    from transformers import AutoModelForCausalLM

    task = make_task(request.getfixturevalue(which))
    model = AutoModelForCausalLM.from_pretrained(task.model_path).eval()
    model.config.use_cache = False  # as the task builds it (a cache turns the packed detection off)
    examples = [
        task.encode({"text": t}, "x")
        for t in ["the film was great", "hello, how are you today?", "the trip was awful, really awful"]
    ]
    rows = pack(examples, 64)
    assert len(rows) == 1 and len(rows[0]) == 3
    batch = task.collate(rows)
    assert "attention_mask" not in batch  # no dense [B,1,L,L] mask: position ids restart per example
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        packed_loss = task.loss_sum(model, batch)
        at, alone_loss = 0, 0.0
        for ids, labels in examples:
            single = task.collate([(ids, labels)])
            alone = model(input_ids=single["input_ids"]).logits[0]
            torch.testing.assert_close(logits[at : at + len(ids)], alone, rtol=1e-4, atol=1e-5)
            alone_loss += float(task.loss_sum(model, single))
            at += len(ids)
    assert float(packed_loss) == pytest.approx(alone_loss, rel=1e-5)
    assert task.count(batch) == sum(task.count(task.collate([e])) for e in examples)
    # and with cross-attention the numbers would differ: the restarts (no mask given) keep them apart
    with torch.no_grad():
        full = torch.ones_like(batch["input_ids"])  # a plain padding mask turns the packed detection off
        leaky = model(input_ids=batch["input_ids"], attention_mask=full, position_ids=batch["position_ids"]).logits[0]
    n0 = len(examples[0][0])
    assert not torch.allclose(leaky[n0 : n0 + 3], logits[n0 : n0 + 3], atol=1e-4)


def test_cli_chat_with_packing_and_prompt_completion_then_merge(tiny_llama, tiny_gpt2, tmp_path, capsys):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 24)
    code = main(
        [
            "train",
            "--task",
            "causal-lm",
            "--model",
            str(tiny_llama),
            "--train",
            str(chat),
            "--eval",
            str(chat),
            "--packing",
            "--max-length",
            "128",
            "--batch-size",
            "2",
            "--lr",
            "1e-2",
            "--out",
            str(tmp_path / "llama"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    m = json.loads((tmp_path / "llama" / "metrics.json").read_text())
    assert m["eval_loss"] < m["before_eval_loss"] and m["eval_perplexity"] == pytest.approx(
        2.718281828 ** m["eval_loss"]
    )
    assert "packed into" in out and "sample: " in out

    pc = write_jsonl(
        tmp_path / "pc.jsonl",
        [{"prompt": f"the {w} was", "completion": " great"} for w in ["film", "meal", "book", "trip"] * 6],
    )
    run = tmp_path / "gpt2"
    assert (
        main(
            [
                "train",
                "--task",
                "causal-lm",
                "--model",
                str(tiny_gpt2),
                "--train",
                str(pc),
                "--eval",
                str(pc),
                "--batch-size",
                "4",
                "--lr",
                "1e-2",
                "--epochs",
                "2",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(run / "adapter"), "--out", str(merged)]) == 0
    capsys.readouterr()

    import lorafit
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    with_adapter = lorafit.load_adapter(
        AutoModelForCausalLM.from_pretrained(tiny_gpt2), run / "adapter"
    ).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    x = torch.tensor([[5, 17, 40, 2, 9]])
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, with_adapter(x).logits, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(plain(x).logits, base(x).logits, atol=1e-4)  # the adapter did something
    assert (
        main(
            ["eval", "--adapter", str(run / "adapter"), "--eval", str(pc), "--out", str(tmp_path / "e.json")]
        )
        == 0
    )
    e = json.loads((tmp_path / "e.json").read_text())
    final = json.loads((run / "metrics.json").read_text())
    assert e["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-5)


def test_causal_lm_bad_rows(tiny_gpt2, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"prompt": "only a prompt"}])
    assert main(["train", "--task", "causal-lm", "--model", str(tiny_gpt2), "--train", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lorafit: error: {bad} line 2: 'prompt' and 'completion' must both be present"
    assert main(["train", "--task", "causal-lm", "--model", str(tiny_gpt2)]) == 2
    assert "--train is required for causal-lm" in capsys.readouterr().err
