"""``--report-to``: send the loop's metrics to TensorBoard, Weights & Biases and / or MLflow.

The loop logs every record to ``metrics.jsonl`` (:class:`lorafit.train.progress.MetricsLog`);
:class:`TrackedLog` wraps that log and hands each record to the chosen trackers as well, so the
trackers see exactly what the file holds. A ``train`` record becomes the scalars
``train/loss``, ``train/learning_rate``, ``train/tokens_per_s`` and ``train/epoch``; an ``eval``
record ``eval/<metric>`` (``eval_accuracy`` -> ``eval/accuracy``), at the record's optimizer step:
the names transformers' Trainer uses, so runs of both compare in one dashboard.

The trackers are optional packages (tensorboard is the ``tracking`` extra; wandb and mlflow are
installed by the user) imported only when chosen; :func:`parse_report_to` checks that they are
installed before a run starts, with the pip command in the one-line error. Only the process that
writes the run directory (rank 0) reports.

TensorBoard events go to ``RUN/tensorboard/`` through tensorboard's own event-file writer (the one
``torch.utils.tensorboard`` uses, without importing it). A resumed run appends a new event file
that starts with a ``SessionLog.START`` just after the checkpoint's step, so TensorBoard drops the
points of the steps that were redone, as ``metrics.jsonl`` does.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Any

from lorafit.common.errors import LorafitError

TRACKERS = ("tensorboard", "wandb", "mlflow")
INSTALL = {"tensorboard": "pip install 'lorafit[tracking]' (or pip install tensorboard)",
           "wandb": "pip install wandb", "mlflow": "pip install mlflow"}
TENSORBOARD_DIR = "tensorboard"
TRAIN_SCALARS = {"loss": "train/loss", "lr": "train/learning_rate", "tokens_per_s": "train/tokens_per_s",
                 "epoch": "train/epoch"}


def parse_report_to(value: str | None, check_installed: bool = True) -> list[str]:
    """``--report-to`` text -> tracker names, in the given order (``none`` or empty -> ``[]``).

    Raises:
        LorafitError: an unknown name, ``none`` mixed with trackers, or (``check_installed``) a
            chosen tracker whose package is missing: one line with the pip command.
    """
    names = [n.strip().lower() for n in str(value or "none").split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    for name in names:
        if name == "none":
            raise LorafitError(f"--report-to {value}: 'none' cannot go with a tracker")
        if name not in TRACKERS:
            raise LorafitError(f"--report-to: unknown tracker {name!r} (choose from {', '.join(TRACKERS)}, "
                               "or none)")
    names = list(dict.fromkeys(names))
    if check_installed:
        for name in names:
            if not installed(name):
                raise LorafitError(f"--report-to {name}: the package {name} is not installed ({INSTALL[name]})")
    return names


def installed(name: str) -> bool:
    """Whether the package ``name`` can be imported (without importing it)."""
    return importlib.util.find_spec(name) is not None


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The tracker scalars of one ``metrics.jsonl`` record (see the module doc); {} for other kinds."""
    kind = record.get("kind")
    if kind == "train":
        return {tag: float(record[k]) for k, tag in TRAIN_SCALARS.items() if isinstance(record.get(k), (int, float))}
    if kind == "eval":
        return {f"eval/{k.removeprefix('eval_')}": float(v) for k, v in record.items()
                if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {}


class _TensorBoard:
    def __init__(self, run_dir: Path, opts: dict[str, Any], resume_step: int | None):
        # lazy: optional extra (tracking); these are the modules torch.utils.tensorboard writes with
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event, self._summary = Event, Summary
        self.writer = EventFileWriter(str(run_dir / TENSORBOARD_DIR))
        if resume_step is not None:  # TensorBoard discards the points from this step on (the redone steps)
            self.writer.add_event(Event(wall_time=time.time(), step=resume_step + 1,
                                        session_log=SessionLog(status=SessionLog.START)))

    def log(self, values: dict[str, float], step: int) -> None:
        summary = self._summary(value=[self._summary.Value(tag=t, simple_value=v) for t, v in values.items()])
        self.writer.add_event(self._event(wall_time=time.time(), step=step, summary=summary))
        self.writer.flush()  # a killed run keeps its curve, as metrics.jsonl does

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, run_dir: Path, opts: dict[str, Any], resume_step: int | None):
        import wandb  # lazy: optional, installed by the user

        self.wandb = wandb
        # the run directory's name is the run's id, so --resume continues the same W&B run
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lorafit"), name=run_dir.name,
                              id=run_dir.name, resume="allow", dir=str(run_dir), config=dict(opts))  # RUN/wandb/

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, run_dir: Path, opts: dict[str, Any], resume_step: int | None):
        import mlflow  # lazy: optional, installed by the user

        self.mlflow = mlflow
        # inside a run the caller started (a notebook, a pipeline step), ours is its child
        mlflow.start_run(run_name=run_dir.name, nested=mlflow.active_run() is not None)
        if resume_step is None:  # params are write-once in MLflow
            mlflow.log_params({k: v for k, v in opts.items() if v is not None})

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(values, step=step)  # MLflow allows "/" in metric names

    def close(self) -> None:
        self.mlflow.end_run()


OPENERS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _MLflow}


class TrackedLog:
    """A :class:`~lorafit.train.progress.MetricsLog` that also reports each record to the trackers.

    Args:
        log: the run's metrics log (its ``records`` stay the source of ``loss.png`` and the results).
        names: the trackers (:func:`parse_report_to`); none when ``run_dir`` is None (not rank 0).
        run_dir: the run directory (TensorBoard writes ``run_dir/tensorboard/``).
        opts: the resolved options (W&B config, MLflow params).
        resume_step: the checkpoint's step when the run resumes, else None.
    """

    def __init__(self, log, names: list[str], run_dir: Path | None, opts: dict[str, Any],
                 resume_step: int | None = None):
        self.inner = log
        self.trackers = []
        for name in names if run_dir is not None else []:
            try:
                self.trackers.append(OPENERS[name](run_dir, opts, resume_step))
            except Exception as exc:  # noqa: BLE001 - a tracker's login / server / network error
                self.close()  # nothing is left open; no step has run yet
                text = (str(exc).strip().splitlines() or [""])[0]
                raise LorafitError(f"--report-to {name}: could not start ({type(exc).__name__}: {text})") from None

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.inner.records

    def log(self, record: dict[str, Any]) -> None:
        self.inner.log(record)
        values = scalars(record)
        if values:
            for tracker in self.trackers:
                tracker.log(values, int(record.get("step", 0)))

    def close(self) -> None:
        self.inner.close()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
