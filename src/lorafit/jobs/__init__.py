"""The commands behind the ``lorafit`` CLI: the training job, eval / merge / info, the run directory.

Programmatic use::

    from lorafit.jobs import run_train
    metrics = run_train({"max_samples": 500, "out": "runs/demo"})   # any `lorafit train` option

* :mod:`~lorafit.jobs.train`: ``lorafit train`` (options -> data -> model -> loop -> files);
* :mod:`~lorafit.jobs.options`: the option table with every task's flags, argparse, the layers;
* :mod:`~lorafit.jobs.rundir`: the run directory checks (never clobber, never half-resume);
* :mod:`~lorafit.jobs.reload`: ``lorafit eval`` / ``merge``; :mod:`~lorafit.jobs.commands`: the
  subcommand objects registered in :data:`lorafit.cli.COMMANDS`.
"""

from lorafit.jobs.train import run_train

__all__ = ["run_train"]
