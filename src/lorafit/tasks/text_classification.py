"""Text classification: a transformers encoder, mean-pooled over the attention mask, plus a Linear head.

Mean pooling rather than the [CLS]/pooler output: sentence-embedding models such as
all-MiniLM-L6-v2 were trained mean-pooled, and on SST-2 the mean-pooled head scored 84% where a
CLS-pooler head scored 83.5% (anchor runs). The head is new, so it is trained fully and saved
with the adapter (``modules_to_save=["head"]``); adapter keys stay relative to the classifier
(``base_model.model.encoder.…`` and ``base_model.model.head.weight``).

Inputs are tokenized once when loaded (truncated to ``--max-length``) and padded per batch,
which gives exactly the ids of tokenizing each batch with ``padding=True, truncation=True``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from lorafit.common.errors import LorafitError
from lorafit.data import DEFAULT_EVAL, DEFAULT_TRAIN
from lorafit.tasks import ATTN_OPTION, LabelFiles, LoopTask, TextModel, checkpoint_activations
from lorafit.train.data import Table, read_table, take_samples

DEFAULTS = {
    "model": "minilm",
    "text_column": "text",
    "label_column": "label",
    "max_length": 64,
    "batch_size": 32,
    "lr_lora": 1e-3,
    "lr_full": 5e-5,
}
NOT_APPLICABLE = {
    "packing": "packing joins causal-lm texts; classification keeps one example per row",
    "data": "--data is a detection data.yaml; give --train / --eval",
    "imgsz": "an image size; this task reads text",
}
HEAD_FILE = "head.safetensors"


class Classifier(nn.Module):
    """``encoder`` (any transformers AutoModel) -> masked mean over tokens -> ``head``.

    Args:
        encoder: returns ``last_hidden_state`` [batch, seq, hidden].
        num_labels: output classes.
    """

    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: [batch, seq] -> logits [batch, num_labels]."""
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if not torch.is_autocast_enabled(h.device.type):  # a bf16 encoder (--precision bf16) under the fp32 head
            h = h.float()
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1))


def label_key(value: Any) -> int | str:
    """Normalise a label cell: ``1``, ``"1"`` and ``1.0`` are the int 1; anything else its string."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    return text


def one_kind_of_label(table: Table, column: str, labels: list[tuple[int, int | str]]) -> None:
    """Refuse a label column mixing numbers and text (``1`` and ``pos``).

    Such a file is almost always a mistake (a shifted column, a header row repeated), and the
    two kinds cannot be ordered into one label set; the message names the first row of each.
    """
    first: dict[type, tuple[int, Any]] = {}
    for line, key in labels:
        first.setdefault(type(key), (line, key))
        if len(first) == 2:
            (n_line, n_key), (t_line, t_key) = first[int], first[str]
            raise LorafitError(
                f"{table.path} line {line}: column {column!r} mixes numeric labels ({n_key!r} on line "
                f"{n_line}) and text labels ({t_key!r} on line {t_line}); use one kind"
            )


def sort_labels(keys: set) -> list:
    """Ints in numeric order when every label is an int, else strings in text order."""
    if all(isinstance(k, int) for k in keys):
        return sorted(keys)
    return sorted(str(k) for k in keys)


class Task(TextModel, LabelFiles, LoopTask):
    """``--task text-classification`` (see :class:`lorafit.tasks.base.Task` for the contract)."""

    labels_needed_by = "a text-classification adapter or model"

    name = "text-classification"
    primary_metric = "eval_accuracy"
    greater_is_better = True
    DEFAULTS = DEFAULTS
    NOT_APPLICABLE = NOT_APPLICABLE
    OPTIONS = [ATTN_OPTION]
    streams_quantized = True
    shards = True

    def __init__(self, opts: dict[str, Any]):
        super().__init__(opts)
        self.labels: list | None = None
        self.file_counts: dict = {}  # label -> rows in the whole training file (before --max-samples)

    # ------------------------------------------------------------------ data
    def _texts_labels(self, table: Table) -> tuple[list[str], list[tuple[int, Any]]]:
        text_col, label_col = self.opts["text_column"], self.opts["label_column"]
        table.nonempty().require(text_col, label_col)
        texts, labels = [], []
        for line, rec in table.rows:
            text, label = rec[text_col], rec[label_col]
            if isinstance(text, (dict, list)):
                raise LorafitError(f"{table.path} line {line}: column {text_col!r} is not text")
            if isinstance(label, (dict, list)) or str(label).strip() == "":
                raise LorafitError(
                    f"{table.path} line {line}: empty or invalid label in column {label_col!r}"
                )
            texts.append(str(text))
            labels.append((line, label_key(label)))
        return texts, labels

    def _encode(self, texts: list[str], labels: list[int]) -> list[tuple[list[int], int]]:
        ids = self.tokenizer(texts, truncation=True, max_length=self.opts["max_length"])["input_ids"]
        return list(zip(ids, labels))

    def load_data(self) -> tuple[list, list]:
        train_path, eval_path = self.opts["train"], self.opts["eval"]
        if train_path is None:  # the embedded default, with its own eval split
            train_path, eval_path = DEFAULT_TRAIN, eval_path or DEFAULT_EVAL
        table = read_table(train_path)
        texts, labels = self._texts_labels(table)  # the whole file is checked, not only the sample
        one_kind_of_label(table, self.opts["label_column"], labels)
        self.file_counts = Counter(k for _, k in labels)
        # shuffling indices draws the same permutation as shuffling the rows (it depends on the length only)
        keep = take_samples(range(len(labels)), self.opts["max_samples"], self.opts["seed"])
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
        self.labels = sort_labels({k for _, k in labels})
        self._refuse_one_label(table, len(keep))
        evaluation_table = read_table(eval_path) if eval_path is not None else None
        index = {k: i for i, k in enumerate(self.labels)}
        evaluation = self._eval_rows(evaluation_table) if evaluation_table is not None else []
        train = self._encode(texts, [index[k] for _, k in labels])
        self.n_train, self.n_eval = len(train), len(evaluation)
        return train, evaluation

    def _refuse_one_label(self, table: Table, kept: int) -> None:
        """A single class trains a 1-output head: loss 0 and "100%" from the first step, and nothing learned."""
        if len(self.labels) > 1:
            return
        col, only = self.opts["label_column"], self.labels[0]
        if len(self.file_counts) > 1:
            raise LorafitError(
                f"{table.path}: --max-samples {self.opts['max_samples']} kept {kept} rows, all with label "
                f"{only!r} in column {col!r}, but the file has {len(self.file_counts)} labels; "
                "raise --max-samples or change --seed"
            )
        raise LorafitError(
            f"{table.path}: column {col!r} has one label ({only!r}) in all {kept} rows; "
            "a classifier needs at least 2 labels"
        )

    def read_eval(self, path) -> list:
        """Eval rows for the label set in ``self.labels``; an unseen label is an error."""
        return self._eval_rows(read_table(path))

    def _eval_rows(self, table: Table) -> list:
        texts, labels = self._texts_labels(table)
        index = {k: i for i, k in enumerate(self.labels)}
        for line, key in labels:
            if key not in index and str(key) not in index:
                shown = ", ".join(map(str, self.labels[:10])) + (", ..." if len(self.labels) > 10 else "")
                why = ""
                if self.file_counts.get(key):  # the training file has it: --max-samples left it out
                    why = (
                        f"; --max-samples {self.opts['max_samples']} kept none of the "
                        f"{self.file_counts[key]} training rows with this label"
                    )
                raise LorafitError(
                    f"{table.path} line {line}: label {key!r} in column "
                    f"{self.opts['label_column']!r} was never seen in training (labels: {shown}){why}"
                )
        return self._encode(texts, [index.get(k, index.get(str(k))) for _, k in labels])

    def describe(self) -> str:
        return (
            f"{self.n_train} train / {self.n_eval} eval rows, {len(self.labels)} labels "
            f"({', '.join(map(str, self.labels[:8]))}{', ...' if len(self.labels) > 8 else ''})"
        )

    # ----------------------------------------------------------------- model
    def build_model(self, quantize: str | None = None) -> nn.Module:
        """The encoder in the training dtype (quantized while loading with ``quantize``), plus an fp32 head."""
        from transformers import AutoModel  # lazy: seconds to import; `lorafit train --help` imports every task

        encoder = self.load_base(AutoModel, quantize)
        model = Classifier(encoder, len(self.labels))
        head = Path(self.model_path) / HEAD_FILE
        if head.is_file():  # a merged or fully fine-tuned classifier directory
            model.head.load_state_dict(load_file(head))
        return model

    def lora_kwargs(self) -> dict[str, Any]:
        return {"modules_to_save": ["head"], "exclude_modules": ["head"]}

    def enable_grad_checkpointing(self, model: nn.Module) -> None:
        checkpoint_activations(model.encoder)

    # ------------------------------------------------------------------ loop
    def collate(self, rows: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, _) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor([y for _, y in rows])}

    def count(self, batch) -> int:
        return int(batch["labels"].numel())

    def num_tokens(self, batch) -> int:
        return int(batch["attention_mask"].sum())

    def loss_sum(self, model: nn.Module, batch) -> torch.Tensor:
        logits = model(batch["input_ids"], batch["attention_mask"])
        return nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum")

    def evaluate(
        self, model: nn.Module, rows: list, batch_size: int, device: torch.device
    ) -> dict[str, float]:
        correct, loss = 0, 0.0
        for i in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in self.collate(rows[i : i + batch_size]).items()}
            logits = model(batch["input_ids"], batch["attention_mask"]).float()
            loss += float(nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
        return {"eval_accuracy": correct / len(rows), "eval_loss": loss / len(rows)}

    # --------------------------------------------------------------- files
    def job_info(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "model": self.opts["model"],
            "text_column": self.opts["text_column"],
            "label_column": self.opts["label_column"],
            "max_length": self.opts["max_length"],
            "pooling": "mean",
            "num_labels": len(self.labels),
        }

    def save_extras(self, directory) -> None:
        """``labels.json`` + ``lorafit_job.json`` (:class:`LabelFiles`), and the tokenizer."""
        LabelFiles.save_extras(self, directory)
        self.save_tokenizer(directory)

    def save_full(self, model: nn.Module, directory: Path) -> None:
        """A directory ``AutoModel.from_pretrained`` loads (the encoder), plus ``head.safetensors``."""
        directory = Path(directory)
        model.encoder.save_pretrained(directory)
        head = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
        save_file(head, directory / HEAD_FILE, metadata={"format": "pt"})
        self.save_extras(directory)

    export_merged = save_full
