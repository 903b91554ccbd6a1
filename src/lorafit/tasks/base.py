"""The task contract: what ``lorafit train``, ``eval``, ``merge`` and ``export`` call on a task.

A task is a class registered by name in :data:`lorafit.tasks.TASKS`, constructed as
``Task(opts)`` with the resolved options dict. It subclasses :class:`LoopTask` when lorafit's own
loop trains it (text, causal LM, image classification), or :class:`Task` directly with
``owns_loop = True`` and its own :meth:`Task.run` (detection, through Ultralytics' trainer).
Abstract methods must be implemented; every other method or attribute is an optional hook and
its default is the behaviour. A task module keeps its top-level imports light (torch at most):
``lorafit train --help`` imports every task for its options.

Bad input raises :class:`lorafit.common.errors.LorafitError`, one line naming the file / line /
column. ``lorafit eval`` / ``merge`` (:mod:`lorafit.jobs.reload`) rebuild the job from the
adapter's ``lorafit_job.json`` (task defaults < that file < flags), then call :meth:`Task.restore`,
:meth:`Task.build_model`, :meth:`Task.load_adapter`, and :meth:`Task.read_eval` +
:meth:`Task.evaluate` or :meth:`Task.merge_model` + :meth:`Task.export_merged`. ``lorafit
export`` (:mod:`lorafit.export`) asks the task classes whose ``exports`` is True.
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn
import yaml

import lorafit
from lorafit.common.errors import LorafitError
from lorafit.train.options import Option
from lorafit.train.trainable import Trainable


@dataclass
class ExportPair:
    """What the exporter needs (built by :meth:`Task.load_for_export`).

    Attributes:
        task: the task name.
        base: the base model (eval mode; detectors Conv+BN fused), plain modules.
        lora: the base with the adapter loaded, unmerged (eval mode).
        merged: a merged copy of ``lora`` (plain modules; detectors fused), what gets exported.
        imgsz: input side; inputs are [N, 3, imgsz, imgsz].
        metadata: strings embedded in the ONNX file (Ultralytics' keys for detectors).
        info: the job info (classes, head, ...).
        same_ops: the merged ONNX graph must have exactly the base's ops (else an error).
    """

    task: str
    base: nn.Module
    lora: nn.Module
    merged: nn.Module
    imgsz: int
    metadata: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    same_ops: bool = False


def run_seed(adapter_dir: Path) -> int:
    """The seed of the run that wrote ``adapter_dir`` (its ``config.yaml``), else 0.

    A random-weight base (a YOLO yaml, a timm model without a checkpoint) is rebuilt with it.
    """
    cfg = Path(adapter_dir).parent / "config.yaml"
    if cfg.is_file():
        try:
            return int((yaml.safe_load(cfg.read_text()) or {}).get("seed") or 0)
        except (yaml.YAMLError, ValueError, TypeError, AttributeError):
            return 0
    return 0


def load_checked(load: Callable[[], nn.Module], adapter_dir: Path) -> nn.Module:
    """Run an adapter loader; core ValueErrors and a base-fingerprint mismatch become one-line errors."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = load()
        except ValueError as exc:
            raise LorafitError(str(exc).splitlines()[0]) from None
    for w in caught:
        if "fingerprint" in str(w.message):
            raise LorafitError(f"{adapter_dir}: the base weights differ from the ones this adapter was trained on "
                               "(wrong --model, or another seed for a random-weight base)")
    return out


class Task(abc.ABC):
    """One kind of job: its options, data, base model, evaluation, reload and merged output."""

    name: ClassVar[str]
    primary_metric: ClassVar[str]  # the metric that picks best/
    greater_is_better: ClassVar[bool]
    # option defaults overriding lorafit.train.options.OPTIONS; lr_lora / lr_full are required
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    # the embedded default job: option values applied over DEFAULTS when no model and no data is given
    EMBEDDED: ClassVar[dict[str, Any]] = {}
    # extra flags only this task reads, listed under its name in `lorafit train --help`
    OPTIONS: ClassVar[list[Option]] = []
    # option keys this task does not use, each with the reason: setting one is refused
    NOT_APPLICABLE: ClassVar[dict[str, str]] = {}
    owns_loop: ClassVar[bool] = False  # True: run() replaces lorafit's loop
    shards: ClassVar[bool] = False  # `lorafit train --fsdp` supports it (FSDP2 over transformer blocks)
    needs_job_info: ClassVar[bool] = False  # eval/merge refuse an adapter without lorafit_job.json and --model
    eval_data_option: ClassVar[str] = "eval"  # the option naming the eval data of `lorafit eval`
    exports: ClassVar[bool] = False  # `lorafit export` supports it (the export hooks below)

    opts: dict[str, Any]
    model_path: str  # the base model as given (what adapters record as their base)

    # ------------------------------------------------------------------ training
    @abc.abstractmethod
    def load_data(self) -> Any:
        """Read and check the training data (``--max-samples`` applied here); the loop's tasks return
        ``(train_rows, eval_rows)``, rows being whatever ``collate`` takes."""

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """The base model (plus any new head), fp32, on CPU; deterministic under ``torch.manual_seed``."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for the run header (data sizes, labels...)."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, rows: list, batch_size: int, device: torch.device) -> dict[str, float]:
        """Metrics on ``rows``; keys start with ``eval_``."""

    def run(self, say: Callable[[str], None] = print, resume: str | Path | None = None) -> dict[str, Any]:
        """With ``owns_loop``: train and write the run directory; returns metrics.json's content."""
        raise LorafitError(f"--task {self.name} is trained by lorafit's loop, not by its own run()")

    def sample(self, model: nn.Module, rows: list, device: torch.device) -> str | None:
        """A generated example to print after training or evaluation (None: nothing to show)."""
        return None

    # ------------------------------------------------------------------ eval / merge
    @abc.abstractmethod
    def restore(self, directory: Path) -> None:
        """Read back what was saved beside the adapter (labels, classes), before :meth:`build_model`."""

    @abc.abstractmethod
    def read_eval(self, path: Any) -> list:
        """The eval data of ``lorafit eval``, checked against the restored labels / classes."""

    def load_adapter(self, model: nn.Module, directory: Path) -> nn.Module:
        """Load the adapter into the built base (a ValueError becomes a one-line error)."""
        return lorafit.load_adapter(model, directory)

    def merge_model(self, model: nn.Module) -> nn.Module:
        """A plain model with the adapter merged in (``lorafit merge``)."""
        return lorafit.merge_and_unload(model)

    @abc.abstractmethod
    def export_merged(self, model: nn.Module, directory: Path) -> None:
        """Write the ``lorafit merge`` output for a merged (plain) model."""

    # ------------------------------------------------------------------ export (when `exports`)
    @classmethod
    def recognizes_model(cls, spec: str) -> bool:
        """Is ``spec`` a base model of this task (export without ``lorafit_job.json``)?"""
        return False

    @classmethod
    def load_for_export(cls, model_spec: str, adapter_dir: Path, imgsz: int | None) -> ExportPair:
        """Rebuild base, LoRA model and merged copy; the adapter on disk is only read."""
        raise LorafitError(f"{adapter_dir}: --task {cls.name} has no export")

    @classmethod
    def calibration_inputs(cls, data: Any, imgsz: int, limit: int = 32) -> list[np.ndarray]:
        """Up to ``limit`` eval inputs of ``data`` as float32 [1, 3, imgsz, imgsz] arrays, preprocessed
        like training (int8 calibration and the parity batch); [] when there are none."""
        return []

    @classmethod
    def evaluate_export(cls, path: Path, predict: Callable[[torch.Tensor], np.ndarray], data: Any, imgsz: int,
                        labels: list | None = None) -> dict[str, float]:
        """The metric of an exported file on ``data`` (``predict`` runs the file on a batch)."""
        raise LorafitError(f"{path}: --task {cls.name} has no export metric")


class LoopTask(Task, Trainable):
    """A task that lorafit's loop (:class:`lorafit.train.loop.Trainer`) trains.

    Besides :class:`~lorafit.train.trainable.Trainable` (``collate``, ``count``, ``num_tokens``,
    ``loss_sum``, ``evaluate``) it says how to inject and what to save.
    """

    # True: build_model(quantize=fmt) quantizes while loading where it can (--quantize)
    streams_quantized: ClassVar[bool] = False
    # --compile: torch.compile(model, fullgraph=this); False where the model may hold a graph break
    compile_fullgraph: ClassVar[bool] = True

    @abc.abstractmethod
    def lora_kwargs(self) -> dict[str, Any]:
        """Extra ``LoraConfig`` fields the task needs (``modules_to_save``, ``exclude_modules``)."""

    @abc.abstractmethod
    def enable_grad_checkpointing(self, model: nn.Module) -> None:
        """``--grad-checkpointing``: recompute activations in backward (LorafitError if unsupported)."""

    @abc.abstractmethod
    def save_extras(self, directory: Path) -> None:
        """Files saved next to the adapter (``labels.json``, ``lorafit_job.json``...)."""

    @abc.abstractmethod
    def save_full(self, model: nn.Module, directory: Path) -> None:
        """The ``--full-finetune`` output."""
