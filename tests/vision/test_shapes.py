"""The synthetic shapes dataset: deterministic, valid YOLO format, two distinct domains."""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

from lorafit.datasets.shapes import ShapesSpec, make_shapes_dataset
from lorafit.datasets.yolo_format import check_detect_data


def digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix in (".png", ".txt", ".yaml"):
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes() if p.suffix != ".yaml" else b"")
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    spec = ShapesSpec("B", 6, 3, 64, seed=3)
    a = make_shapes_dataset(tmp_path / "a", spec).parent
    b = make_shapes_dataset(tmp_path / "b", spec).parent
    c = make_shapes_dataset(tmp_path / "c", ShapesSpec("B", 6, 3, 64, seed=4)).parent
    assert digest(a) == digest(b) != digest(c)


def test_valid_yolo_format_and_domains_differ(tmp_path):
    ya = make_shapes_dataset(tmp_path / "A", ShapesSpec("A", 8, 4, 64))
    yb = make_shapes_dataset(tmp_path / "B", ShapesSpec("B", 8, 4, 64, classes=4))
    ca, cb = check_detect_data(ya), check_detect_data(yb)
    assert ca["nc"] == 3 and cb["nc"] == 4 and cb["names"][3] == "cross"
    assert ca["counts"]["train"][1] >= 8  # at least one object per image
    mean = {d: np.mean([np.asarray(Image.open(p)).mean() for p in (tmp_path / d / "images" / "train").glob("*.png")])
            for d in ("A", "B")}
    assert mean["A"] > mean["B"] + 40  # light vs dark backgrounds


def test_boxes_are_tight_for_domain_a(tmp_path):
    """Domain A shapes are solid colours on grey: the label box is the bounding box of coloured pixels."""
    y = make_shapes_dataset(tmp_path / "A", ShapesSpec("A", 4, 1, 64, max_objects=1))
    for img_path in sorted((y.parent / "images" / "train").glob("*.png")):
        img = np.asarray(Image.open(img_path)).astype(int)
        colour = (img.max(-1) - img.min(-1)) > 60  # saturated pixels = the shape
        ys, xs = np.nonzero(colour)
        cls, cx, cy, w, h = map(float, (y.parent / "labels" / "train" / f"{img_path.stem}.txt").read_text().split())
        assert abs((xs.min() + xs.max() + 1) / 128 - cx) < 2 / 64
        assert abs((xs.max() - xs.min() + 1) / 64 - w) < 3 / 64
        assert abs((ys.min() + ys.max() + 1) / 128 - cy) < 2 / 64
        assert abs((ys.max() - ys.min() + 1) / 64 - h) < 3 / 64
