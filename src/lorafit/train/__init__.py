"""The fine-tuning job behind ``lorafit train``: options, data, loop, checkpoints, processes.

Programmatic use::

    from lorafit.train import run_train
    metrics = run_train({"max_samples": 500, "out": "runs/demo"})   # any `lorafit train` option

or build the pieces yourself with :class:`Trainer` (see ``benchmarks/sst2.py``).
"""

from lorafit.common.errors import Interrupted, LorafitError, TrainingDiverged

__all__ = ["Interrupted", "LorafitError", "Trainer", "TrainingDiverged", "run_train"]


def __getattr__(name):
    # the loop and the job import torch/transformers; keep `lorafit.common.errors` importable cheaply
    if name == "Trainer":
        from lorafit.train.loop import Trainer

        return Trainer
    if name == "run_train":
        from lorafit.train.job import run_train

        return run_train
    raise AttributeError(f"module 'lorafit.train' has no attribute {name!r}")
