"""`--packing` by position ids: the packed loss equals the unpacked one whichever way the batch is laid out."""

from __future__ import annotations

import pytest
import torch

from lorafit.jobs.options import all_options, resolve, task_defaults
from lorafit.tasks import causal_lm
from lorafit.tasks.causal_lm import Task, pack

TEXTS = ["the film was great", "hello, how are you today?", "the trip was awful, really awful",
         "the meal was lovely", "question: what is two plus two? answer: four", "the game was dull"]


def setup(model_dir):
    opts = resolve({"task": "causal-lm", "model": str(model_dir)}, all_options(), task_defaults)
    task = Task(opts)
    torch.manual_seed(0)
    model = task.build_model().eval()  # fp32, no KV cache (as the job builds it)
    examples = [task.encode({"text": t}, "x") for t in TEXTS]
    rows = pack(examples, 24)  # several rows of different widths: the batch has padding
    assert len(rows) >= 2 and len({sum(len(i) for i, _ in r) for r in rows}) > 1
    return task, model, examples, rows


def unpacked_loss(task, model, examples):
    with torch.no_grad():
        return sum(float(task.loss_sum(model, task.collate([e]))) for e in examples)


@pytest.mark.parametrize("mode", ["position_ids", "flatten", "dense_mask"])
def test_packed_loss_equals_unpacked(mode, tiny_llama, monkeypatch):
    task, model, examples, rows = setup(tiny_llama)
    if mode == "flatten":  # what flash-attention models get (their varlen kernels read one row)
        task.attn_implementation = "flash_attention_2"
    if mode == "dense_mask":  # a transformers without packed-sequence detection
        monkeypatch.setattr(causal_lm, "packed_positions_supported", lambda: False)
    assert task.packing_mode == mode
    batch = task.collate(rows)
    if mode == "dense_mask":
        assert batch["attention_mask"].shape == (len(rows), 1, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
    else:
        assert "attention_mask" not in batch
    if mode == "flatten":
        n = sum(len(ids) for ids, _ in examples)
        assert batch["input_ids"].shape == (1, n) and int(batch["real"].sum()) == n  # no padding left
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
        assert starts == [sum(len(i) for i, _ in examples[:k]) for k in range(len(examples))]
    assert task.count(batch) == sum(task.count(task.collate([e])) for e in examples)
    with torch.no_grad():
        packed = float(task.loss_sum(model, batch))
    assert packed == pytest.approx(unpacked_loss(task, model, examples), rel=1e-5)


def test_sdpa_gets_a_bool_mask_built_by_transformers(tiny_llama, monkeypatch):
    """What reaches SDPA on CPU: transformers' own block-diagonal causal mask, bool (1 byte an entry)."""
    task, model, examples, rows = setup(tiny_llama)
    assert task.attn_implementation == "sdpa"
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("attn_mask"))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    batch = task.collate(rows)
    with torch.no_grad():
        task.loss_sum(model, batch)
    width = batch["input_ids"].shape[1]
    assert seen and all(m is not None and m.dtype == torch.bool for m in seen)
    assert seen[0].shape == (len(rows), 1, width, width)
    # block diagonal: the first token of the second example sees itself only
    k = len(rows[0][0][0])
    assert seen[0][0, 0, k, : k + 1].tolist() == [False] * k + [True]


def test_flex_attention_keeps_packed_examples_apart_too(tiny_llama):
    """--attn-implementation flex_attention: transformers builds a block mask from the position ids."""
    opts = resolve({"task": "causal-lm", "model": str(tiny_llama), "attn_implementation": "flex_attention"},
                   all_options(), task_defaults)
    task = Task(opts)
    model = task.build_model().eval()
    assert task.attn_implementation == "flex_attention" and task.packing_mode == "position_ids"
    examples = [task.encode({"text": t}, "x") for t in TEXTS]
    batch = task.collate(pack(examples, 24))
    with torch.no_grad():
        packed = float(task.loss_sum(model, batch))
    assert packed == pytest.approx(unpacked_loss(task, model, examples), rel=1e-5)


def test_unknown_attn_implementation_is_one_line(tiny_llama):
    from lorafit.common.errors import LorafitError

    opts = resolve({"task": "causal-lm", "model": str(tiny_llama), "attn_implementation": "nope"},
                   all_options(), task_defaults)
    with pytest.raises(LorafitError, match="^--attn-implementation nope: ") as info:
        Task(opts).build_model()
    assert "\n" not in str(info.value)
