"""``lorafit train``: options -> data -> model + adapter -> Trainer -> files and a printed summary.

Run directory layout (rank 0 writes, everything atomically)::

    config.yaml      the resolved options (what --resume reads back)
    adapter/         PEFT-format adapter + labels.json / lorafit_job.json (model/ with --full-finetune)
    best/            the best adapter by the task's metric, when there were several evaluations
    metrics.jsonl    one line per step (loss, lr, tokens/s) and per evaluation
    metrics.json     final numbers (eval metric, train_time_s, trainable_params, adapter_bytes, ...)
    loss.png         training (and eval) loss
    tensorboard/     event files, with --report-to tensorboard (lorafit.train.tracking)
    checkpoint.pt    while running or after an interruption (removed when the run completes)

A new run's ``--out`` must be absent or empty (``--overwrite`` replaces an old run), and
``--resume`` refuses changed options; both are checked before a model is loaded
(:mod:`lorafit.jobs.rundir`).
"""

from __future__ import annotations

import contextlib
import glob
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

import lorafit
from lorafit.common import files
from lorafit.common.errors import LorafitError
from lorafit.common.modules import count_parameters
from lorafit.jobs import options, rundir
from lorafit.tasks import LoopTask, Task, task_class
from lorafit.train import checkpoint as ckpt
from lorafit.train import distributed, sharded
from lorafit.train.loop import Trainer
from lorafit.train.options import parse_targets
from lorafit.train.tracking import parse_report_to
from lorafit.train.progress import fmt_bytes, fmt_duration, peak_memory


def quiet_transformers() -> None:
    """No download bars, no warnings about unused weights (the pooler).

    ``HF_HUB_OFFLINE`` is the user's: the bundled models are local directories and load without
    the network either way, and forcing it would stop an ``hf:`` dataset (``--train hf:NAME``).
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers  # lazy: seconds to import; only jobs that build a model need it

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def find_run(resume: Any, out: str | None, task: str | None) -> Path:
    """The run to resume: ``--resume DIR``, else ``--out``, else the newest run with a checkpoint."""
    if resume is not True:
        run = Path(resume)
    elif out:
        run = Path(out)
    else:
        found = [Path(p).parent for p in glob.glob(f"runs/{task or '*'}-*/{ckpt.CHECKPOINT}")]
        if not found:
            raise LorafitError("--resume: no run with a checkpoint under ./runs (give the run directory)")
        run = max(found, key=lambda p: (p / ckpt.CHECKPOINT).stat().st_mtime)
    if not (run / ckpt.CHECKPOINT).is_file():
        done = " (the run finished: metrics.json exists)" if (run / "metrics.json").is_file() else ""
        raise LorafitError(f"--resume {run}: no {ckpt.CHECKPOINT} to resume from{done}")
    return run


def prepare(flags: dict[str, Any]) -> tuple[dict[str, Any], Path | None]:
    """Resolve the options and check everything that can be checked before a model is loaded.

    Returns (opts, run directory to resume or None). ``opts["overwrite"]`` is still there for
    :func:`run_train`, which pops it before anything is recorded. Three phases, in this order:

    1. resolve: defaults < the resumed run's config.yaml < --config < flags;
    2. validate the option values and combinations (only option values and config files are read);
    3. the run directory (rank 0): ``--out`` absent, empty or ``--overwrite``; ``--resume`` with
       unchanged options and a readable checkpoint; a killed save's leftovers cleaned.

    Raises:
        LorafitError: one line naming the flag, file or value (exit code 2 from the CLI).
    """
    table = options.all_options()
    run = None
    base = None
    if flags.get("resume") is not None:
        run = find_run(flags["resume"], flags.get("out"), flags.get("task"))
        base = options.load_yaml(run / "config.yaml", table)
        base.pop("overwrite", None)  # never recorded; a hand-edited config.yaml must not carry it
    opts = options.resolve(flags, table, options.task_defaults, base)

    # 2. validate: nothing but option values and config files is read
    options.refuse_not_applicable(opts["task"], options.user_keys(flags, table))
    parse_targets(opts["targets"])
    parse_report_to(opts["report_to"])  # a missing tracker package: one line with the pip command
    sharded.refuse_unsupported(opts, task_class(opts["task"]).shards, int(os.environ.get("WORLD_SIZE", "1")))
    opts.pop("config", None)
    opts.pop("resume", None)

    # 3. the run directory: refused before anything is loaded or written
    main = rundir.is_main_process()
    if run is not None:
        if opts["overwrite"]:
            raise LorafitError("--overwrite cannot go with --resume (one starts the run over, the other continues it)")
        given_out = flags.get("out")
        if flags.get("resume") is not True and given_out and os.path.abspath(given_out) != os.path.abspath(run):
            raise LorafitError(f"--resume {run} and --out {given_out} name different runs; give one of them")
        recorded = options.resolve({}, table, options.task_defaults, base)
        rundir.refuse_changes(run, opts, recorded, table)
        opts["out"] = str(run)
        if main:
            rundir.check_resume(run)
    elif opts["out"] and main:
        rundir.check_new_run(opts["out"], opts["overwrite"])
    return opts, run


def base_model_bytes(model_path: str, model: torch.nn.Module) -> int:
    """Size of the base weights on disk (safetensors/bin files), else their size in memory."""
    files = [
        p
        for pat in ("*.safetensors", "*.bin")
        for p in Path(model_path).glob(pat)
        if p.name != "head.safetensors"
    ]
    if files:
        return sum(p.stat().st_size for p in files)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def build(opts: dict[str, Any], task: LoopTask, say: Callable[[str], None] = print) -> torch.nn.Module:
    """Seeded model construction, then injection (or everything trainable with --full-finetune).

    ``--quantize`` quantizes while the base loads where the task can (text tasks, safetensors),
    else after loading it (with a note); both give the same quantized model.
    """
    if opts["full_finetune"] and opts.get("quantize"):
        raise LorafitError("--quantize trains adapters on a frozen quantized base; it cannot go with --full-finetune")
    random.seed(opts["seed"])
    torch.manual_seed(opts["seed"])
    fmt = opts.get("quantize")
    model = task.build_model(quantize=fmt) if fmt and task.streams_quantized else task.build_model()
    if getattr(task, "load_note", None):
        say(task.load_note)
    if opts["full_finetune"]:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        if fmt and not lorafit.quant.quantized_modules(model):
            try:  # targets=None: every linear but the output layer / the classification head
                lorafit.quantize(model, opts["quantize"])
            except ValueError as exc:
                raise LorafitError(f"--quantize {opts['quantize']}: {exc}") from None
        cfg = lorafit.LoraConfig(
            r=opts["rank"],
            alpha=opts["alpha"],
            dropout=opts["dropout"],
            target_modules=parse_targets(opts["targets"]),
            **task.lora_kwargs(),
        )
        try:
            lorafit.inject(model, cfg)
        except ValueError as exc:
            raise LorafitError(f"--targets {opts['targets']}: {exc}") from None
    if opts["grad_checkpointing"]:
        task.enable_grad_checkpointing(model)
    return model


def compiled(model: torch.nn.Module, task: LoopTask, opts: dict[str, Any], say) -> torch.nn.Module | None:
    """``--compile``: ``torch.compile(model)`` (fullgraph where the task's models allow it), else None.

    Only the training forward and backward run compiled; evaluation, generation, checkpoints and
    the saved adapter use ``model`` itself, so no ``_orig_mod.`` prefix reaches a file. With
    ``--fsdp`` not fullgraph: FSDP2's gather/free hooks run outside the graphs (between blocks).
    """
    if not opts.get("compile"):
        return None
    full = task.compile_fullgraph and not opts.get("fsdp")
    say(f"compiling the model (torch.compile, fullgraph={full}); the first steps are slow")
    return torch.compile(model, fullgraph=full)


def save_trained(model, task: LoopTask, opts: dict[str, Any], directory: Path, metrics: dict | None = None) -> None:
    """The adapter (PEFT format, a model card with ``metrics``, the task's extras), or the whole model
    with --full-finetune."""
    if opts["full_finetune"]:
        task.save_full(model, directory)
        return
    lorafit.save_adapter(model, directory, base_model_name_or_path=task.model_path,  # --fsdp: collective
                         metrics=metrics)
    if lorafit.distributed.is_main_process():
        task.save_extras(directory)


def fmt_metrics(metrics: dict[str, float] | None) -> str:
    if not metrics:
        return "(no eval data)"
    parts = []
    for k, v in metrics.items():
        if k == "step":
            continue
        parts.append(f"{k} {100 * v:.2f}%" if k.endswith("accuracy") else f"{k} {v:.4f}")
    return "  ".join(parts)


def run_train(
    flags: dict[str, Any],
    on_step: Callable[[int], None] | None = None,
    tty: bool | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run one training job from raw option values; returns metrics.json's content (every rank).

    Raises:
        LorafitError (and subclasses Interrupted, TrainingDiverged): reported by the CLI.
    """
    wall0 = time.perf_counter()
    opts, resume_dir = prepare(flags)
    overwrite = opts.pop("overwrite")  # an action, not a setting of the run: never in config.yaml
    quiet_transformers()
    task: Task = task_class(opts["task"])(opts)
    reserved: list[str] = []  # a default run directory this process created (removed if left empty)
    try:
        if task.owns_loop:  # e.g. detection through ultralytics' own trainer
            if rundir.is_main_process():
                if opts["out"] is None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
                    reserved.append(rundir.reserve_default(opts["task"]))
                    opts["out"] = reserved[0]
                if overwrite:
                    rundir.clear_old_run(opts["out"])
            return task.run(say=say, resume=resume_dir)  # it joins the process group itself (torchrun)
        return _run_loop(opts, task, resume_dir, overwrite, reserved, on_step, tty, say, wall0)
    except BaseException:
        for path in reserved:  # nothing was written there: leave no empty run directory behind
            with contextlib.suppress(OSError):
                os.rmdir(path)
        raise


def _run_loop(opts, task, resume_dir, overwrite, reserved, on_step, tty, say, wall0) -> dict[str, Any]:
    """:func:`run_train` for the tasks that use lorafit's own loop (:class:`~lorafit.train.loop.Trainer`)."""
    dist = distributed.setup(opts["device"])
    try:
        if not dist.is_main:
            say = lambda *_: None  # noqa: E731
        if opts["out"] is None:  # rank 0 creates a fresh directory and every rank uses its name
            if dist.is_main:
                reserved.append(rundir.reserve_default(opts["task"]))
            opts["out"] = dist.gather_objects(reserved[0] if reserved else None)[0]
        run_dir = Path(opts["out"])
        train_rows, eval_rows = task.load_data()
        opts["title"] = f"{opts['task']} on {opts['model']}"
        model = build(opts, task, say)
        # the untouched original of a modules_to_save head is not counted
        trainable, total = count_parameters(model, originals=False)
        model.to(dist.device)
        params = [p for p in model.parameters() if p.requires_grad]
        dist.broadcast_params(params)
        base_bytes = sharded.shard_for_training(model, opts["precision"], dist.device) if opts["fsdp"] else None
        state = ckpt.load_checkpoint(run_dir) if resume_dir is not None else None
        if resume_dir is not None and state is None:
            raise LorafitError(f"--resume {run_dir}: {ckpt.CHECKPOINT} disappeared while the model was loading")
        if dist.is_main:
            if overwrite:  # only now, once the model is built: a failure before keeps the old run
                rundir.clear_old_run(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            saved = {k: v for k, v in opts.items() if k != "title"}
            files.write_text(run_dir / "config.yaml", yaml.safe_dump(saved, sort_keys=False))
        what = (
            "full fine-tuning" if opts["full_finetune"] else f"LoRA r={opts['rank']} alpha={opts['alpha']:g}"
        )
        say(f"lorafit train: {opts['task']} on {opts['model']} ({what}), {task.describe()}")
        say(
            f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
            + (f" on {dist.world} processes" if dist.enabled else "")
        )
        if state is not None:
            say(f"resuming {run_dir} at step {state['step']}")
        trainer = Trainer(
            model,
            task,
            train_rows,
            eval_rows,
            opts,
            dist,
            run_dir,
            save_model=lambda m, d: save_trained(m, task, opts, d),
            on_step=on_step,
            tty=tty,
            compiled=compiled(model, task, opts, say),
        )
        result = trainer.fit(resume=state)
        if result["stopped"]:
            say(f"stopped at step {result['steps']} (--stop-at-step): checkpoint saved; "
                f"continue with: lorafit train --resume {run_dir}")
            return {"steps": result["steps"], "stopped": True}
        result["base_bytes"] = base_bytes
        return finish(model, task, opts, dist, run_dir, trainer, result, trainable, total, wall0, say)
    finally:
        dist.close()


def finish(
    model, task, opts, dist, run_dir: Path, trainer, result, trainable, total, wall0, say
) -> dict[str, Any]:
    """Save the adapter, metrics.json, print the summary (rank 0), and remove the checkpoint."""
    out_name = "model" if opts["full_finetune"] else "adapter"
    final = {k: v for k, v in result["final"].items() if k != "step"}
    sample = None
    if dist.is_main:
        files.replace_dir(run_dir / out_name, lambda d: save_trained(model, task, opts, d, final))
    elif trainer.sharded:  # save_adapter is collective on a sharded model: rank 0 writes
        save_trained(model, task, opts, run_dir / out_name, final)
    if trainer.eval_rows and (dist.is_main or trainer.sharded):  # sharded: every rank runs the forward
        sample = task.sample(model, trainer.eval_rows, dist.device)
    dist.barrier()
    weights = list((run_dir / out_name).glob("*.safetensors")) if dist.is_main else []
    adapter_bytes = sum(p.stat().st_size for p in weights)
    base_bytes = base_model_bytes(task.model_path, model)
    peak, peak_kind = peak_memory(dist.device)
    metrics = {
        **final,
        "train_time_s": round(result["train_time_s"], 3),
        "trainable_params": trainable,
        "total_params": total,
        "adapter_bytes": adapter_bytes,
        "base_model_bytes": base_bytes,
        "peak_memory_bytes": peak,
        "wall_time_s": round(time.perf_counter() - wall0, 3),
        "steps": result["steps"],
        "world_size": dist.world,
        "full_finetune": opts["full_finetune"],
    }
    if result.get("base_bytes"):  # --fsdp: the frozen base before sharding, and rank 0's shard of it
        metrics.update(base_param_bytes=result["base_bytes"][0], base_param_bytes_per_rank=result["base_bytes"][1])
    if result["before"]:
        metrics.update({f"before_{k}": v for k, v in result["before"].items()})
    if result["best"]:
        metrics["best_step"] = result["best"]["step"]
        metrics[f"best_{task.primary_metric}"] = result["best"][task.primary_metric]
    if not dist.is_main:
        return metrics
    files.write_json(run_dir / "metrics.json", metrics)
    (run_dir / ckpt.CHECKPOINT).unlink(missing_ok=True)
    if result["before"]:
        say(f"before: {fmt_metrics(result['before'])}")
    best, key = "", task.primary_metric
    if result["best"] and result["best"]["step"] != result["steps"]:
        best = (
            f"  (best at step {result['best']['step']}: {fmt_metrics({key: result['best'][key]})} -> best/)"
        )
    say(f"after:  {fmt_metrics(final)}{best}")
    if sample:
        say(f"sample: {sample}")
    say(f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    say(
        f"{out_name} size: {fmt_bytes(adapter_bytes)} vs base model {fmt_bytes(base_bytes)} "
        f"({100 * adapter_bytes / max(base_bytes, 1):.2f}%)"
    )
    say(f"peak memory: {fmt_bytes(peak)} ({peak_kind})")
    if result.get("base_bytes"):
        say(f"sharded base: {fmt_bytes(result['base_bytes'][1])} per rank of {fmt_bytes(result['base_bytes'][0])}")
    say(
        f"wall time: {fmt_duration(metrics['wall_time_s'])} "
        # a resumed run's training time counts every part of the run, its wall time this process only
        f"({'this process; training, all parts: ' if result.get('resumed') else 'training '}"
        f"{fmt_duration(result['train_time_s'])}, "
        f"{result['steps']} steps)"
    )
    say(f"run directory: {run_dir}")
    return metrics
