"""``torchrun ... tests/vision/detect_rank_probe.py train --task detect ...``: ``lorafit`` plus a test hook.

Each rank saves the trainable tensors of its live and EMA model at the end of training to
``$LORAFIT_PROBE_DIR/rank<R>.pt``, so a test can check that the processes ended identical. With
``LORAFIT_PROBE_STOP_EPOCH=E`` (0-based) every rank acts as if Ctrl-C came during epoch E. The hooks
are added here, through ``Task.callbacks``, so the product code carries nothing for tests.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch


def _dump(trainer) -> None:
    names = trainer._trainable
    live = {n: p.detach().cpu().clone() for n, p in trainer.unwrapped().named_parameters() if n in names}
    ema = {n: p.detach().cpu().clone() for n, p in trainer.ema.ema.named_parameters() if n in names}
    out = Path(os.environ["LORAFIT_PROBE_DIR"]) / f"rank{trainer.dist.rank}.pt"
    torch.save({"live": live, "ema": ema, "world": trainer.dist.world,
                "train_images": len(trainer.train_loader.sampler)}, out)


def main() -> int:
    from lorafit import cli
    from lorafit.tasks import detect

    init = detect.Task.__init__

    def patched(self, opts):
        init(self, opts)
        self.callbacks.setdefault("teardown", []).append(_dump)  # teardown runs on every rank
        stop = os.environ.get("LORAFIT_PROBE_STOP_EPOCH")
        if stop is not None:
            self.callbacks.setdefault("on_train_epoch_start", []).append(
                lambda trainer: trainer.request_stop(2) if trainer.epoch == int(stop) else None)

    detect.Task.__init__ = patched
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
