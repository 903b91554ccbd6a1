"""The training engine: the loop, its checkpoint, data readers, processes, option values, progress.

:class:`Trainer` trains any :class:`~lorafit.train.trainable.Trainable` (see ``benchmarks/sst2.py``).
The job around it (``lorafit train``: options, run directory, summary) is :mod:`lorafit.jobs`::

    from lorafit.jobs import run_train
    metrics = run_train({"max_samples": 500, "out": "runs/demo"})   # any `lorafit train` option

Nothing here knows a task by name: the engine imports no task, job or export module.
"""

from lorafit.common.errors import Interrupted, LorafitError, TrainingDiverged
from lorafit.train.loop import Trainer
from lorafit.train.trainable import Trainable

__all__ = ["Interrupted", "LorafitError", "Trainable", "Trainer", "TrainingDiverged"]
