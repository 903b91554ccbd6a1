"""Integrations with third-party training stacks (each imported lazily, each an optional extra).

* :mod:`lorafit.integrations.ultralytics`: LoRA for Ultralytics YOLO detectors (``lorafit[yolo]``):
  target presets, offline settings, merge-before-fuse, adapter load with class-head rebuild.
* :mod:`lorafit.integrations.yolo_trainer`: the ``DetectionTrainer`` subclass that keeps a LoRA'd
  detector intact through Ultralytics' training machinery (EMA, checkpoints, validation, fusion).
"""
