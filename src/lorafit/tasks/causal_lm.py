"""Causal language modelling: next-token loss on text, on completions, or on assistant turns.

Each jsonl (or csv) row is one of:

- ``{"text": ...}`` (the column named by ``--text-column``): loss on every token;
- ``{"prompt": ..., "completion": ...}``: loss on the completion (and EOS) only;
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat
  template when it has one (else ``role: content`` lines), loss on the assistant turns only.

Assistant spans are found in characters (the template rendered up to and including each
assistant turn, against the rendering without it) and mapped to tokens through the offsets of
one tokenization of the whole conversation, so token boundaries are those the model sees.

``--packing`` concatenates consecutive examples into rows of ``--max-length`` tokens. Packed
examples must not see each other. A packed batch carries ``position_ids`` restarting at 0 for
each example and no attention mask (the convention of transformers' ``DataCollatorWithFlattening``);
transformers (>= 4.53, its ``masking_utils``) finds the examples from the restarts: with SDPA /
eager attention it builds the block-diagonal causal mask itself (a bool ``[B,1,L,L]`` for SDPA,
4x smaller than a float one), with flex attention a sparse block mask, and with
flash-attention 2/3 (GPU) it calls the varlen kernel with ``cu_seqlens`` and no mask at all -
which it does for one row only, so for those the micro-batch is flattened into one row. A
transformers without that detection gets the dense float mask (:func:`block_causal_mask`).
The first token of each example is not a target (it would be predicted from the previous
example). A packed row therefore gives exactly the loss of its examples run one by one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lorafit.common.errors import LorafitError
from lorafit.common.files import write_json
from lorafit.data import DEFAULT_CHAT_EVAL, DEFAULT_CHAT_TRAIN
from lorafit.tasks import ATTN_OPTION, LoopTask, TextModel, checkpoint_activations
from lorafit.tasks.generation import exact_match, turn_end
from lorafit.tasks.lm_loss import IGNORE, next_token_loss_sum
from lorafit.train.data import read_table, take_samples
from lorafit.train.options import Option

DEFAULTS = {
    "model": None,
    "text_column": "text",
    "max_length": 256,
    "batch_size": 8,
    "lr_lora": 2e-4,
    "lr_full": 2e-5,
}
# `lorafit train --task causal-lm` with no model and no data: SmolLM2 learns to answer the bundled support
# tickets in a fixed JSON shape (a few minutes on 2 CPU cores)
EMBEDDED = {"model": "smollm2", "max_length": 128, "batch_size": 8, "max_samples": 320, "rank": 8,
            "lr_lora": 1e-3, "eval_every": 0}
NOT_APPLICABLE = {
    "label_column": "a language model's target is its own text (--text-column)",
    "data": "--data is a detection data.yaml; give --train / --eval",
    "imgsz": "an image size; this task reads text",
}
OPTIONS = [
    Option(
        "packing",
        "bool",
        False,
        "pack short examples into full --max-length rows (no attention across examples).",
        group="causal-lm",
    ),
    ATTN_OPTION,
]
EVAL_LOGITS_BYTES = 256 * 2**20  # fp32 logits of one evaluation forward, at most (a single row may exceed it)


def render_plain(messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Fallback chat format without a template: ``role: content`` lines; returns text and assistant spans."""
    text, spans = "", []
    for msg in messages:
        head = f"{msg['role']}: "
        start = len(text) + len(head)
        text += head + str(msg["content"]) + "\n"
        if msg["role"] == "assistant":
            spans.append((start, len(text)))
    return text, spans


class Task(TextModel, LoopTask):
    """``--task causal-lm`` (see :class:`lorafit.tasks.base.Task` for the contract)."""

    name = "causal-lm"
    primary_metric = "eval_loss"
    greater_is_better = False
    DEFAULTS = DEFAULTS
    EMBEDDED = EMBEDDED
    OPTIONS = OPTIONS
    NOT_APPLICABLE = NOT_APPLICABLE
    streams_quantized = True
    shards = True

    def __init__(self, opts: dict[str, Any]):
        super().__init__(opts)
        self.kinds: set[str] = set()
        self.n_packed = 0
        self.attn_implementation = "sdpa"  # set by build_model

    @property
    def packing_mode(self) -> str:
        """How a packed batch keeps examples apart: "flatten" (one row, varlen flash kernels),
        "position_ids" (rows; transformers builds the mask) or "dense_mask" (an old transformers)."""
        if not packed_positions_supported():
            return "dense_mask"
        return "flatten" if "flash" in self.attn_implementation else "position_ids"

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return next((i for i in (tok.pad_token_id, tok.eos_token_id) if i is not None), 0)

    # ------------------------------------------------------------------ data
    def _eos(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [] if eos is None else [eos]

    def _chat(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, tokenize=False)
            spans = []
            for i, msg in enumerate(messages):
                if msg["role"] == "assistant":
                    before = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
                    upto = tok.apply_chat_template(messages[: i + 1], tokenize=False)
                    spans.append((len(before), len(upto)))
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            eos = []
        else:
            text, spans = render_plain(messages)
            enc = tok(text, return_offsets_mapping=True)
            eos = self._eos()
        ids = list(enc["input_ids"])
        # a token is a target when its characters overlap an assistant span (" four" starts on the space)
        labels = [
            t if any(a < e and b > s for s, e in spans) else IGNORE
            for t, (a, b) in zip(ids, enc["offset_mapping"])
        ]
        return ids + eos, labels + eos

    def encode(self, rec: dict[str, Any], where: str) -> tuple[list[int], list[int]]:
        """One row -> (input ids, labels with -100 where there is no loss), truncated."""
        tok, text_col = self.tokenizer, self.opts["text_column"]
        if "messages" in rec:
            msgs = rec["messages"]
            if not (
                isinstance(msgs, list)
                and msgs
                and all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs)
            ):
                raise LorafitError(f"{where}: 'messages' must be a list of {{role, content}} objects")
            self.kinds.add("chat")
            ids, labels = self._chat(msgs)
        elif "prompt" in rec or "completion" in rec:
            if rec.get("prompt") is None or rec.get("completion") is None:
                raise LorafitError(f"{where}: 'prompt' and 'completion' must both be present")
            self.kinds.add("prompt+completion")
            prompt = tok(str(rec["prompt"]))["input_ids"]
            completion = tok(str(rec["completion"]), add_special_tokens=False)["input_ids"] + self._eos()
            ids, labels = prompt + completion, [IGNORE] * len(prompt) + completion
        elif rec.get(text_col) is not None:
            if isinstance(rec[text_col], (dict, list)) or not str(rec[text_col]).strip():
                raise LorafitError(f"{where}: empty or non-text value in column {text_col!r}")
            self.kinds.add("text")
            ids = tok(str(rec[text_col]))["input_ids"] + self._eos()
            labels = list(ids)
        else:
            raise LorafitError(
                f"{where}: expected a {text_col!r} field, 'prompt' + 'completion', or 'messages'"
            )
        n = self.opts["max_length"]
        return ids[:n], labels[:n]

    def _read(self, path, cap: int | None) -> list:
        table = read_table(path).nonempty()
        rows = take_samples(table.rows, cap, self.opts["seed"])
        out = [self.encode(rec, f"{table.path} line {line}") for line, rec in rows]
        if not any(t != IGNORE for _, labels in out for t in labels[1:]):
            # the loss would be 0 over 0 tokens: a "trained" model that learned nothing
            raise LorafitError(
                f"{table.path}: no example has a target token within --max-length {self.opts['max_length']} "
                "(prompts fill the whole length, or completions / assistant turns are empty)"
            )
        return out

    def load_data(self) -> tuple[list, list]:
        train_path, eval_path = self.opts["train"], self.opts["eval"]
        if train_path is None and self.opts["model"] == EMBEDDED["model"]:
            # the embedded default: support tickets answered in JSON, with its eval split
            train_path, eval_path = DEFAULT_CHAT_TRAIN, eval_path or DEFAULT_CHAT_EVAL
        if train_path is None:
            raise LorafitError(
                "--train is required for causal-lm (a .jsonl of text, prompt+completion or messages)"
            )
        train = self._read(train_path, self.opts["max_samples"])
        evaluation = self.read_eval(eval_path) if eval_path else []
        self.n_train, self.n_eval = len(train), len(evaluation)
        if self.opts.get("packing"):
            train = pack(train, self.opts["max_length"])
            self.n_packed = len(train)
        return train, evaluation

    def read_eval(self, path) -> list:
        """Eval examples (never packed, never capped)."""
        return self._read(path, None)

    def describe(self) -> str:
        packed = f", packed into {self.n_packed} rows" if self.opts.get("packing") else ""
        return f"{self.n_train} train / {self.n_eval} eval examples ({', '.join(sorted(self.kinds))}){packed}"

    # ----------------------------------------------------------------- model
    def build_model(self, quantize: str | None = None) -> nn.Module:
        """The base in the training dtype (quantized while loading with ``quantize``), no KV cache."""
        from transformers import AutoModelForCausalLM  # lazy: seconds; `lorafit train --help` imports the tasks

        model = self.load_base(AutoModelForCausalLM, quantize)
        model.config.use_cache = False  # a cache also turns off transformers' packed-sequence detection
        self.attn_implementation = str(getattr(model.config, "_attn_implementation", None))
        return model

    def lora_kwargs(self) -> dict[str, Any]:
        return {}  # "all-linear" already leaves the output layer (lm_head) alone

    def enable_grad_checkpointing(self, model: nn.Module) -> None:
        checkpoint_activations(model)

    # ------------------------------------------------------------------ loop
    def collate(self, rows: list) -> dict[str, torch.Tensor]:
        """Rows are (ids, labels) pairs, or packed rows: lists of such pairs (see :func:`pack`)."""
        packed = bool(rows) and isinstance(rows[0], list)
        seqs = rows if packed else [[r] for r in rows]
        width = max(sum(len(ids) for ids, _ in segs) for segs in seqs)
        n = len(seqs)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE, dtype=torch.long)
        position_ids = torch.zeros((n, width), dtype=torch.long)
        segment = torch.full((n, width), -1, dtype=torch.long)
        for i, segs in enumerate(seqs):
            at = 0
            for j, (ids, lab) in enumerate(segs):
                k = len(ids)
                input_ids[i, at : at + k] = torch.tensor(ids)
                labels[i, at : at + k] = torch.tensor(lab)
                if packed:
                    labels[i, at] = IGNORE  # would be predicted from the previous example
                position_ids[i, at : at + k] = torch.arange(k)
                segment[i, at : at + k] = j
                at += k
        batch = {"input_ids": input_ids, "labels": labels, "real": (segment >= 0).long()}
        if not packed:
            batch["attention_mask"] = batch["real"]
            return batch
        batch["position_ids"] = position_ids  # padding: position 0, each pad token an example of its own
        mode = self.packing_mode
        if mode == "dense_mask":
            batch["attention_mask"] = block_causal_mask(segment)
        elif mode == "flatten" and n > 1:  # varlen flash kernels read packed position_ids of one row only
            keep = batch["real"].flatten().bool()
            batch = {k: v.flatten()[keep][None] for k, v in batch.items()}
        return batch

    def count(self, batch) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def num_tokens(self, batch) -> int:
        return int(batch["real"].sum())

    def loss_sum(self, model: nn.Module, batch) -> torch.Tensor:
        kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 4 and torch.is_autocast_enabled(batch["input_ids"].device.type):
            kwargs["attention_mask"] = kwargs["attention_mask"].to(
                torch.get_autocast_dtype(batch["input_ids"].device.type)
            )
        return next_token_loss_sum(model, batch["input_ids"], batch["labels"], **kwargs)  # the head on labels only

    def evaluate(self, model: nn.Module, rows: list, batch_size: int, device: torch.device) -> dict[str, float]:
        """Loss (forwards of <= batch_size rows and EVAL_LOGITS_BYTES of logits: 64x128x49k is 1.6 GB), exact match."""
        total, count = 0.0, 0
        out_layer = getattr(model, "_orig_mod", model).get_output_embeddings()
        vocab = getattr(out_layer, "out_features", None) or getattr(model.config, "vocab_size", 1)
        i = 0
        while i < len(rows):
            width = max(len(ids) for ids, _ in rows[i : i + batch_size])
            n = max(1, min(batch_size, EVAL_LOGITS_BYTES // (4 * vocab * width)))
            batch = {k: v.to(device) for k, v in self.collate(rows[i : i + n]).items()}
            total += float(self.loss_sum(model, batch))
            count += self.count(batch)
            i += n
        loss = total / max(count, 1)
        out = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}
        # prompt/completion and chat rows: greedy answers against the references (lorafit.tasks.generation)
        return out | exact_match(model, self.tokenizer, rows, batch_size, device, self.pad_id, self.answer_ends())

    def answer_ends(self) -> list[str]:
        """Texts that end an answer: EOS, the chat template's end of turn (without one: a line's end)."""
        tok = self.tokenizer
        ends = [tok.eos_token] if tok.eos_token else []
        end = turn_end(tok)
        return ends + ([end] if end else ["\n"] if "chat" in self.kinds else [])

    def sample(
        self, model: nn.Module, rows: list, device: torch.device, max_new_tokens: int = 24
    ) -> str | None:
        """Greedy continuation of the first eval example's prompt (or the first half of its text)."""
        if not rows:
            return None
        ids, labels = rows[0]
        cut = next((i for i, t in enumerate(labels) if t != IGNORE), 0) or max(1, min(len(ids) // 2, 16))
        prompt = torch.tensor([ids[:cut]], device=device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.pad_id,
            )
        model.train(was_training)
        tok = self.tokenizer
        return f"{tok.decode(ids[:cut])!r} -> {tok.decode(out[0, cut:].tolist(), skip_special_tokens=True)!r}"

    # --------------------------------------------------------------- files
    def job_info(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "model": self.opts["model"],
            "text_column": self.opts["text_column"],
            "max_length": self.opts["max_length"],
            "packing": bool(self.opts.get("packing")),
        }

    def save_extras(self, directory: Path) -> None:
        write_json(Path(directory) / "lorafit_job.json", self.job_info())
        self.save_tokenizer(directory)

    def restore(self, directory: Path) -> None:
        """Nothing to restore: the tokenizer comes with the base model."""

    def save_full(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)
        self.save_extras(directory)  # the job info and the tokenizer

    export_merged = save_full


def packed_positions_supported() -> bool:
    """Does the installed transformers keep packed examples apart from their ``position_ids`` alone?"""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return False
    return True


def block_causal_mask(segment: torch.Tensor) -> torch.Tensor:
    """segment [batch, seq] (example index per token, -1 = padding) -> additive mask [batch, 1, seq, seq].

    Token q may attend to token k iff k <= q and both belong to the same example. A padding
    token attends to itself only, so no row of the softmax is empty (an all -inf row is NaN).
    """
    n = segment.shape[1]
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    same = segment[:, :, None] == segment[:, None, :]
    allowed = (causal & same) | torch.eye(n, dtype=torch.bool)
    return torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(
        ~allowed, torch.finfo(torch.float32).min
    )[:, None]


def pack(rows: list[tuple[list[int], list[int]]], length: int) -> list[list[tuple[list[int], list[int]]]]:
    """Greedily put consecutive examples into rows of at most ``length`` tokens (order kept)."""
    out: list[list] = []
    current, used = [], 0
    for ids, labels in rows:
        if current and used + len(ids) > length:
            out.append(current)
            current, used = [], 0
        current.append((ids, labels))
        used += len(ids)
    if current:
        out.append(current)
    return out
