"""Vision tests: run only in the vision environment (scripts/setup_vision_env.sh).

In the main environment (torch 2.13 CPU, no torchvision) the test modules here are not even
collected (``collect_ignore_glob``), except ``test_00_env.py``, which reports one skip saying why.
A skip raised from a conftest would abort pytest when this directory is named on the command line.

The expensive pieces are session fixtures shared by several test files: one tiny base detector
pretrained on synthetic domain A, and one LoRA run adapting it to domain B through
``lorafit.tasks.detect.Task`` (the same code path as ``lorafit train --task detect``).
"""

from __future__ import annotations

import os
from pathlib import Path

import importlib.util

import pytest
from tests.vision.vision_helpers import IMGSZ, VISION_MODULES, detect_opts

HAVE_VISION = all(importlib.util.find_spec(m) is not None for m in VISION_MODULES)
collect_ignore_glob = [] if HAVE_VISION else ["test_[a-z]*.py"]


@pytest.fixture(scope="session", autouse=True)
def _offline_ultralytics(tmp_path_factory):
    """Private YOLO_CONFIG_DIR, offline, quiet: set before anything imports ultralytics."""
    if not HAVE_VISION:
        yield
        return
    cfg = tmp_path_factory.mktemp("yolo-config")
    os.environ["YOLO_CONFIG_DIR"] = str(cfg)
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "false"
    os.environ.setdefault("YOLO_VERBOSE", "false")
    from lorafit.integrations.ultralytics import configure_offline

    configure_offline()
    yield


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """data.yaml paths: domain A (pretraining), B (adaptation), B4 (B with a 4th class)."""
    from lorafit.datasets.shapes import ShapesSpec, make_shapes_dataset

    root = tmp_path_factory.mktemp("shapes")
    return {
        "A": make_shapes_dataset(root / "A", ShapesSpec("A", 160, 32, IMGSZ, 0)),
        "B": make_shapes_dataset(root / "B", ShapesSpec("B", 96, 32, IMGSZ, 0)),
        "B4": make_shapes_dataset(root / "B4", ShapesSpec("B", 32, 16, IMGSZ, 1, classes=4)),
    }


@pytest.fixture(scope="session")
def base_pt(shapes, tmp_path_factory) -> Path:
    """A yolov8n pretrained briefly on domain A (stock Ultralytics trainer): a plain YOLO .pt."""
    from lorafit.demo import DemoConfig, pretrain_base

    out = tmp_path_factory.mktemp("base") / "run"
    return Path(pretrain_base(DemoConfig.small(), shapes["A"], out))


@pytest.fixture(scope="session")
def adapted(shapes, base_pt, tmp_path_factory) -> dict:
    """LoRA r=4 on every dense conv, trained on domain B via the detect task; returns paths + metrics."""
    from lorafit.tasks.detect import Task

    out = tmp_path_factory.mktemp("adapt") / "run"
    opts = detect_opts(model=base_pt, data=shapes["B"], imgsz=IMGSZ, rank=4, epochs=8, out=out, seed=0)
    task = Task(opts)
    metrics = task.run(say=lambda *_: None)
    return {"run": out, "metrics": metrics, "task": task}
