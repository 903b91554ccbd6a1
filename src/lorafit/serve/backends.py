"""What each task serves: turning request fields into rows (event loop) and running a batch (worker).

A backend has ``endpoints`` (the routes the app mounts for it), encoders called by the HTTP
handlers (tokenizing is cheap and lets a too-long prompt be refused before it queues), and
``run(kind, jobs, keys)`` called by the :class:`~lorafit.serve.engine.Engine` worker with the
internal adapter key of each row. The causal LM's encoders pass no ``truncation=`` / ``padding=``
arguments: those change the fast tokenizer's settings, which the worker thread reads while it
decodes ("Already borrowed" when both happen at once). The classifier's tokenizer is used by the
event loop alone, so it truncates as training did.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

import lorafit
from lorafit.serve.adapters import AdapterStore, ServeError
from lorafit.serve.engine import Job
from lorafit.serve.generate import Generator, Row
from lorafit.serve.metrics import Metrics
from lorafit.tasks.causal_lm import render_plain


class CausalLM:
    """``--task causal-lm``: ``/v1/completions`` and ``/v1/chat/completions`` (OpenAI's shapes).

    Args:
        model: the base causal LM (eval mode, on its device).
        tokenizer: its tokenizer (a chat template is used when it has one, else ``role: content``
            lines, as ``lorafit train`` rendered chats).
        store: the adapters (every resident one is a stacking slot of each decode step).
        max_positions: prompt + max_tokens must fit (the model's position table).
    """

    endpoints = ("completions", "chat")

    def __init__(self, model: nn.Module, tokenizer, metrics: Metrics, store: AdapterStore,
                 max_positions: int | None = None):
        self.model, self.tok = model, tokenizer
        pad = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
        eos = getattr(model, "generation_config", None)
        eos_ids = getattr(eos, "eos_token_id", None) if eos is not None else None
        eos_ids = set(eos_ids if isinstance(eos_ids, list) else [eos_ids] if eos_ids is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.max_positions = max_positions or getattr(model.config, "max_position_embeddings", None)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.gen = Generator(model, tokenizer, pad, eos_ids, on_tokens=lambda n: metrics.count("tokens_generated", n),
                             slots=store.slots)

    # ---------------------------------------------------------------- event loop
    def encode_prompt(self, text: str) -> list[int]:
        """A completion prompt, tokenized as ``lorafit train`` tokenized prompts (special tokens added)."""
        return list(self.tok(text)["input_ids"])

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Messages rendered as in training, ending with the assistant's turn to speak."""
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return list(self.tok(text, add_special_tokens=False)["input_ids"])
        text, _ = render_plain(messages)
        return list(self.tok(text + "assistant: ")["input_ids"])

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        """A token-id prompt: every id must be in the model's vocabulary (400 naming the first that is not)."""
        bad = next((t for t in ids if t >= self.vocab_size), None)
        if bad is not None:
            raise ServeError(400, f"{param}: token id {bad} is outside the vocabulary (0 to {self.vocab_size - 1})",
                             param=param)
        return ids

    def check_length(self, ids: list[int], max_tokens: int, param: str) -> None:
        if not ids:
            raise ServeError(400, f"{param}: the prompt is empty (0 tokens)", param=param)
        if self.max_positions and len(ids) + max_tokens > self.max_positions:
            raise ServeError(400, f"{param}: {len(ids)} prompt tokens + max_tokens {max_tokens} exceed the model's "
                                  f"{self.max_positions} positions", param=param, code="context_length_exceeded")

    # ---------------------------------------------------------------- worker
    def run(self, kind: str, jobs: list[Job], keys: list[str | None], admit=None) -> None:
        """Decode the batch; rows that ``admit`` hands over between steps join it."""
        def join(n_live: int, live_keys: set):
            new, new_keys = admit(n_live, live_keys)
            return self._rows(new), new_keys
        self.gen.run(self._rows(jobs), keys, join if admit is not None else None)

    @staticmethod
    def _rows(jobs: list[Job]) -> list[Row]:
        rows = []
        for job in jobs:
            row: Row = job.work
            row.cancelled = job.cancelled.is_set
            row.done = (lambda text, reason, n, job=job: job.finish(
                {"text": text, "finish_reason": reason, "completion_tokens": n,
                 "prompt_tokens": len(job.work.ids),
                 "scores": job.work.scores if job.work.logprobs is not None else None,
                 "echo": (job.work.prompt_text, job.work.prompt_scores) if job.work.echo else None}))
            rows.append(row)
        return rows


class TextClassifier:
    """``--task text-classification``: ``/v1/classify`` (texts -> label, score, every label's score).

    Args:
        model: the task's ``Classifier`` (encoder + head; each adapter brings its own head as a
            ``modules_to_save`` copy, so heads must all have the same number of labels).
        tokenizer: the encoder's tokenizer.
        max_length: texts are cut to this many tokens, special tokens included (as in training).
        store: where each adapter's ``labels.json`` (read at load time) is found.
    """

    endpoints = ("classify",)

    def __init__(self, model: nn.Module, tokenizer, max_length: int, store: AdapterStore):
        self.model, self.tok, self.max_length, self.store = model, tokenizer, max_length, store
        self.pad = tokenizer.pad_token_id or 0
        self.device = next(model.parameters()).device

    def encode(self, text: str) -> list[int]:
        """Token ids cut to ``max_length`` exactly as training tokenized (only the event loop uses this tokenizer)."""
        return list(self.tok(text, truncation=True, max_length=self.max_length)["input_ids"])

    @torch.inference_mode()
    def run(self, kind: str, jobs: list[Job], keys: list[str | None], admit=None) -> None:
        """One forward for the batch (a classification is one step: nothing joins it)."""
        ids_list = [job.work for job in jobs]
        width = max(len(ids) for ids in ids_list)
        ids = torch.full((len(jobs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, row in enumerate(ids_list):  # right padding: the classifier mean-pools over the mask
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        with lorafit.adapter_batch(self.model, keys, slots=self.store.slots(), share_weights=True):
            probs = torch.softmax(self.model(ids.to(self.device), mask.to(self.device)).float(), -1).cpu()
        for job, p in zip(jobs, probs):
            job.finish(self._result(job.adapter, p))

    def _result(self, adapter: str, p: torch.Tensor) -> dict[str, Any]:
        labels = self.store.info(adapter).get("labels") or list(range(p.numel()))
        best = int(p.argmax())
        return {"label": labels[best], "score": float(p[best]),
                "scores": {str(lab): float(v) for lab, v in zip(labels, p.tolist())}}
