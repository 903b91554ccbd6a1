"""Deterministic synthetic detection dataset in YOLO format: coloured shapes on textured backgrounds.

Why synthetic: the detection demo and tests must run offline, in CPU minutes, with no dataset licence
and no download. Why shapes: the class is carried by the *form* (circle / square / triangle), so a
detector must learn geometry rather than colour, and a change of domain (backgrounds, colours, fill)
hurts a model trained on the other domain without making the task impossible. That gives LoRA a
measurable job: adapt a base pretrained on domain ``A`` to domain ``B``.

Domains:
    ``A``: light, low-contrast grey textures (smooth noise + faint diagonal stripes); shapes filled
        with solid warm colours.
    ``B``: dark, busy textures (colour blotches + a checker grid + clutter strokes); shapes in cool
        colours, filled with stripes, so edges and fill statistics differ from ``A``.

Layout written under ``root``::

    root/images/{train,val}/000000.png   RGB, imgsz x imgsz
    root/labels/{train,val}/000000.txt   one line per object: "cls cx cy w h" (normalised to [0, 1])
    root/data.yaml                       path / train / val / names (absolute path, so it can be moved)

The output is a pure function of ``(domain, n_train, n_val, imgsz, seed)``: numpy's PCG64 and PIL's
drawing are deterministic, and PNG encoding is lossless.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFilter

from lorafit.common.files import write_text

CLASS_NAMES = ("circle", "square", "triangle", "cross")  # the first `classes` are used (default 3)
DOMAINS = ("A", "B")

_WARM = [(220, 40, 30), (235, 120, 20), (210, 180, 20), (200, 50, 120)]
_COOL = [(30, 200, 220), (60, 90, 230), (150, 60, 220), (40, 210, 120)]


@dataclass(frozen=True)
class ShapesSpec:
    """What to generate.

    Attributes:
        domain: ``"A"`` or ``"B"`` (see the module docstring).
        n_train: number of training images.
        n_val: number of validation images.
        imgsz: side of the square images in pixels.
        seed: base seed; train and val use disjoint streams derived from it and the domain.
        max_objects: at most this many objects per image (at least one).
        classes: how many of :data:`CLASS_NAMES` to draw (3 by default; 4 adds "cross", a new
            class for a base trained on 3).
    """

    domain: str = "A"
    n_train: int = 64
    n_val: int = 32
    imgsz: int = 128
    seed: int = 0
    max_objects: int = 3
    classes: int = 3

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {self.domain!r}")
        if self.imgsz < 32 or self.n_train < 1 or self.n_val < 1 or self.max_objects < 1 \
                or not 1 <= self.classes <= len(CLASS_NAMES):
            raise ValueError(f"invalid ShapesSpec {self}")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bilinearly upsampled random grid in [0, 1]: float32 [size, size] (cheap 'value noise')."""
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    img = Image.fromarray((grid * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def _background(rng: np.random.Generator, domain: str, size: int) -> Image.Image:
    """Textured background, uint8 RGB [size, size, 3] as a PIL image."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if domain == "A":
        base = 170 + 50 * _smooth_noise(rng, size, 4)
        period = rng.uniform(6, 14)
        stripes = 8 * np.sin((xx + yy) * 2 * math.pi / period + rng.uniform(0, 6.3))
        grain = rng.normal(0, 4, (size, size)).astype(np.float32)
        grey = np.clip(base + stripes + grain, 0, 255)
        rgb = np.stack([grey, grey * rng.uniform(0.95, 1.0), grey * rng.uniform(0.9, 1.0)], axis=-1)
        return Image.fromarray(rgb.astype(np.uint8))
    # domain B: dark colour blotches, a checker grid and random clutter strokes.
    chans = [30 + 90 * _smooth_noise(rng, size, 6) for _ in range(3)]
    cell = int(rng.integers(8, 16))
    checker = (((xx // cell) + (yy // cell)) % 2) * 25
    rgb = np.stack([c + checker for c in chans], axis=-1)
    rgb += rng.normal(0, 10, rgb.shape).astype(np.float32)
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 7))):
        pts = [tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(2)]
        colour = tuple(int(v) for v in rng.integers(60, 200, 3))
        draw.line(pts, fill=colour, width=int(rng.integers(1, 4)))
    return img


def _shape_mask(cls: int, box: tuple[int, int, int, int], size: int, angle: float) -> Image.Image:
    """Binary mask ("L") of one shape whose tight bounding box is ``box`` (x0, y0, x1, y1)."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box
    if cls == 0:
        draw.ellipse(box, fill=255)
    elif cls == 1:
        draw.rectangle(box, fill=255)
    elif cls == 3:  # a plus sign whose arms reach the box edges
        tw, th = max(2, (x1 - x0) // 3), max(2, (y1 - y0) // 3)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle((cx - tw // 2, y0, cx + tw // 2, y1), fill=255)
        draw.rectangle((x0, cy - th // 2, x1, cy + th // 2), fill=255)
    else:
        # apex up or down (angle > 0): still a triangle, and its box stays tight.
        cx = (x0 + x1) / 2
        pts = [(cx, y0), (x1, y1), (x0, y1)] if angle > 0 else [(x0, y0), (x1, y0), (cx, y1)]
        draw.polygon(pts, fill=255)
    return mask


def _fill(rng: np.random.Generator, domain: str, size: int) -> Image.Image:
    """The texture painted inside shapes: solid warm colour (A) or cool stripes (B)."""
    if domain == "A":
        colour = _WARM[int(rng.integers(len(_WARM)))]
        return Image.new("RGB", (size, size), colour)
    c1 = np.array(_COOL[int(rng.integers(len(_COOL)))], np.float32)
    c2 = c1 * 0.45
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(4, 8)
    t = (np.sin((xx * math.cos(1.0) + yy * math.sin(1.0)) * 2 * math.pi / period) > 0)[..., None]
    return Image.fromarray(np.where(t, c1, c2).astype(np.uint8))


def _overlaps(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> bool:
    x0, y0, x1, y1 = box
    return any(not (x1 + 2 < a0 or a1 + 2 < x0 or y1 + 2 < b0 or b1 + 2 < y0) for a0, b0, a1, b1 in others)


def render_image(rng: np.random.Generator, domain: str, size: int, max_objects: int, classes: int = 3):
    """Draw one image.

    Returns:
        ``(image, labels)``: a PIL RGB image [size, size] and a list of ``(cls, cx, cy, w, h)`` with
        coordinates normalised to [0, 1] (YOLO's format).
    """
    img = _background(rng, domain, size)
    n = int(rng.integers(1, max_objects + 1))
    boxes: list[tuple[int, int, int, int]] = []
    labels = []
    for _ in range(n):
        for _attempt in range(20):
            side = int(rng.uniform(0.18, 0.38) * size)
            aspect = rng.uniform(0.8, 1.25)
            w, h = side, max(8, int(side * aspect))
            x0 = int(rng.integers(1, size - w - 1))
            y0 = int(rng.integers(1, size - h - 1))
            box = (x0, y0, x0 + w - 1, y0 + h - 1)
            if not _overlaps(box, boxes):
                break
        else:
            continue
        cls = int(rng.integers(classes))
        mask = _shape_mask(cls, box, size, rng.uniform(-1, 1))
        if domain == "B":  # an outline in a contrasting colour: new edge statistics
            edge = mask.filter(ImageFilter.MaxFilter(3))
            img.paste(Image.new("RGB", (size, size), (235, 235, 235)), (0, 0), edge)
        img.paste(_fill(rng, domain, size), (0, 0), mask)
        boxes.append(box)
        bx0, by0, bx1, by1 = box
        if domain == "B":  # the outline widens the visible object by one pixel on each side
            bx0, by0, bx1, by1 = max(bx0 - 1, 0), max(by0 - 1, 0), min(bx1 + 1, size - 1), min(by1 + 1, size - 1)
        labels.append((cls, (bx0 + bx1 + 1) / 2 / size, (by0 + by1 + 1) / 2 / size, (bx1 - bx0 + 1) / size,
                       (by1 - by0 + 1) / size))
    return img, labels


def _split_seed(spec: ShapesSpec, split: str) -> np.random.Generator:
    return np.random.default_rng([spec.seed, DOMAINS.index(spec.domain), 0 if split == "train" else 1])


def make_shapes_dataset(root: str | Path, spec: ShapesSpec | None = None, **kwargs) -> Path:
    """Write a YOLO-format dataset under ``root`` and return the path of its ``data.yaml``.

    Args:
        root: output directory (created; existing files with the same names are overwritten).
        spec: what to generate; keyword arguments build a :class:`ShapesSpec` when it is None.

    Returns:
        ``root / "data.yaml"``, with ``path`` set to the absolute root and ``names`` the class names.
    """
    spec = spec or ShapesSpec(**kwargs)
    root = Path(root).resolve()
    for split, count in (("train", spec.n_train), ("val", spec.n_val)):
        rng = _split_seed(spec, split)
        img_dir, lbl_dir = root / "images" / split, root / "labels" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        lbl_dir.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img, labels = render_image(rng, spec.domain, spec.imgsz, spec.max_objects, spec.classes)
            img.save(img_dir / f"{i:06d}.png", optimize=False)
            lines = [f"{c} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}" for c, cx, cy, w, h in labels]
            (lbl_dir / f"{i:06d}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    data = {"path": str(root), "train": "images/train", "val": "images/val",
            "names": dict(enumerate(CLASS_NAMES[: spec.classes]))}
    out = root / "data.yaml"
    write_text(out, yaml.safe_dump(data, sort_keys=False))
    return out


def make_shapes_classification(root: str | Path, n_per_class: int = 8, imgsz: int = 64, domain: str = "A",
                               seed: int = 0, classes: int = 3, splits=("train", "val")) -> Path:
    """An ImageFolder dataset (``root/<split>/<class>/<i>.png``): one shape per image.

    Returns:
        ``root``; ``root / "train"`` and ``root / "val"`` are the ImageFolder directories.
    """
    root = Path(root).resolve()
    for k, split in enumerate(splits):
        rng = np.random.default_rng([seed, DOMAINS.index(domain), 10 + k])
        for cls in range(classes):
            out = root / split / CLASS_NAMES[cls]
            out.mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                img = _background(rng, domain, imgsz)
                side = int(rng.uniform(0.4, 0.7) * imgsz)
                x0, y0 = (int(v) for v in rng.integers(1, imgsz - side - 1, 2))
                mask = _shape_mask(cls, (x0, y0, x0 + side - 1, y0 + side - 1), imgsz, rng.uniform(-1, 1))
                img.paste(_fill(rng, domain, imgsz), (0, 0), mask)
                img.save(out / f"{i:04d}.png")
    return root


def main(argv: list[str] | None = None) -> int:
    """``python -m lorafit.datasets.shapes OUT [--domain A|B] [--n-train N] [--n-val N] [--imgsz N] [--seed S]``."""
    p = argparse.ArgumentParser(prog="python -m lorafit.datasets.shapes", description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--domain", choices=DOMAINS, default="A")
    p.add_argument("--n-train", type=int, default=64)
    p.add_argument("--n-val", type=int, default=32)
    p.add_argument("--imgsz", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", type=int, default=3, choices=range(1, len(CLASS_NAMES) + 1))
    a = p.parse_args(argv)
    path = make_shapes_dataset(a.out, ShapesSpec(a.domain, a.n_train, a.n_val, a.imgsz, a.seed, classes=a.classes))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
