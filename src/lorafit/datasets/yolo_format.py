"""Checks for a YOLO-format detection dataset (``data.yaml`` + images/ + labels/), before training.

Ultralytics is lenient where a user is better served by a stop: an image with no label file is
silently a "background" image, a class id past ``nc`` is dropped with a warning, a missing split
turns into an exception deep in the trainer. Here each problem is one line naming the file (and
line) that is wrong, raised as :class:`~lorafit.common.errors.LorafitError` (exit code 2). An
*empty* label file is accepted: that is how YOLO marks a deliberate background image.

Paths resolve as in Ultralytics, except that a relative ``path`` is taken relative to the yaml's
own directory (never a global datasets dir). :func:`check_detect_data` returns the normalised
content (absolute paths) that the trainer then receives, so both see the same files.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import yaml

from lorafit.common.errors import LorafitError
from lorafit.common.files import write_text

IMG_SUFFIXES = {".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp"}


def label_path(image: Path) -> Path:
    """Ultralytics' rule: the last ``/images/`` of the path becomes ``/labels/``, suffix ``.txt``."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    text = str(image)
    if sa in text:
        text = sb.join(text.rsplit(sa, 1))
    return Path(text).with_suffix(".txt")


def _names(data: dict, file: Path) -> dict[int, str]:
    names, nc = data.get("names"), data.get("nc")
    if names is None and nc is None:
        raise LorafitError(f"{file}: no 'names' (or 'nc'): the list of classes is required")
    if names is None:
        if not isinstance(nc, int) or isinstance(nc, bool) or nc < 1:
            raise LorafitError(f"{file}: 'nc' must be a positive integer, got {nc!r}")
        return {i: f"class_{i}" for i in range(nc)}
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names:
        raise LorafitError(f"{file}: 'names' must be a non-empty list or a mapping id -> name")
    try:
        out = {int(k): str(v) for k, v in names.items()}
    except (TypeError, ValueError):
        raise LorafitError(f"{file}: 'names' keys must be class ids 0..n-1") from None
    if sorted(out) != list(range(len(out))):
        raise LorafitError(f"{file}: 'names' ids must be 0..{len(out) - 1} without gaps")
    if nc is not None and nc != len(out):
        raise LorafitError(f"{file}: 'nc: {nc}' does not match the {len(out)} entries of 'names'")
    return out


def _images(entry, root: Path, key: str, file: Path) -> list[Path]:
    """Image files of one split: a directory, a .txt list of images, or a list of those."""
    entries = entry if isinstance(entry, list) else [entry]
    found: list[Path] = []
    for item in entries:
        if not isinstance(item, str) or not item.strip():
            raise LorafitError(f"{file}: '{key}' must be a path (or a list of paths), got {item!r}")
        p = Path(item) if Path(item).is_absolute() else root / item
        if p.is_dir():
            found += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMG_SUFFIXES)
        elif p.is_file() and p.suffix == ".txt":
            for line in p.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    q = Path(line.strip())
                    found.append(q if q.is_absolute() else (p.parent / q).resolve())
        else:
            raise LorafitError(f"{file}: '{key}' path {p} does not exist")
    if not found:
        raise LorafitError(f"{file}: '{key}' path {entries[0]} holds no images ({', '.join(sorted(IMG_SUFFIXES))})")
    return found


def check_label_file(path: Path, nc: int) -> int:
    """Validate one label file; returns its number of objects.

    Lines are ``cls cx cy w h`` (box) or ``cls x1 y1 x2 y2 ...`` (polygon, >= 3 points), all
    coordinates normalised to [0, 1].
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LorafitError(f"{path}: cannot read label file ({type(exc).__name__})") from None
    count = 0
    for no, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 5 and (len(parts) < 7 or len(parts) % 2 == 0):
            raise LorafitError(f"{path} line {no}: expected 'class cx cy w h' (5 values), got {len(parts)} values")
        try:
            cls = float(parts[0])
            coords = [float(v) for v in parts[1:]]
        except ValueError:
            raise LorafitError(f"{path} line {no}: non-numeric value in {line.strip()!r}") from None
        if not cls.is_integer() or not 0 <= cls < nc:
            raise LorafitError(f"{path} line {no}: class {parts[0]} out of range (data has {nc} classes: 0..{nc - 1})")
        if any(not math.isfinite(v) or v < -1e-6 or v > 1 + 1e-6 for v in coords):
            raise LorafitError(f"{path} line {no}: coordinates must be normalised to [0, 1], got {line.strip()!r}")
        if len(parts) == 5 and (coords[2] <= 0 or coords[3] <= 0):
            raise LorafitError(f"{path} line {no}: box width and height must be > 0")
        count += 1
    return count


def check_detect_data(data_yaml: str | Path, splits=("train", "val")) -> dict:
    """Validate a YOLO detection data.yaml and every label of its splits.

    Returns:
        ``{"path": root, "train": [abs image dirs/lists], "val": [...], "names": {id: name},
        "nc": int, "counts": {split: (images, objects)}}``; ``train``/``val`` keep the yaml's
        entries, made absolute.

    Raises:
        LorafitError: one line naming the yaml, image or label file at fault.
    """
    file = Path(data_yaml)
    if not file.is_file():
        raise LorafitError(f"{file}: no such data file (a YOLO data.yaml with path/train/val/names)")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise LorafitError(f"{file}{f' line {mark.line + 1}' if mark else ''}: invalid YAML") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LorafitError(f"{file}: cannot read ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise LorafitError(f"{file}: expected a mapping with path / train / val / names")
    for key in splits:
        if not data.get(key):
            raise LorafitError(f"{file}: '{key}' is missing (the {key} images are required)")
    names = _names(data, file)
    root = Path(data.get("path") or ".")
    root = (root if root.is_absolute() else file.parent / root).resolve()
    if not root.is_dir():
        raise LorafitError(f"{file}: dataset root 'path: {data.get('path')}' ({root}) does not exist")
    out = {"path": str(root), "names": names, "nc": len(names), "counts": {}}
    for key in splits:
        images = _images(data[key], root, key, file)
        objects = 0
        for img in images:
            lbl = label_path(img)
            if not img.is_file():
                raise LorafitError(f"{img}: image listed in '{key}' does not exist")
            if not lbl.is_file():
                raise LorafitError(f"{img}: image has no label file (expected {lbl}; an empty file marks a "
                                   "background image)")
            objects += check_label_file(lbl, len(names))
        entries = data[key] if isinstance(data[key], list) else [data[key]]
        out[key] = [str(Path(e) if Path(e).is_absolute() else (root / e).resolve()) for e in entries]
        out["counts"][key] = (len(images), objects)
    return out


def write_normalised_yaml(checked: dict, path: str | Path) -> Path:
    """Write the checked data (absolute paths) as the data.yaml Ultralytics receives (atomically)."""
    path = Path(path)
    data = {"path": checked["path"], "train": checked["train"], "val": checked["val"], "names": checked["names"]}
    write_text(path, yaml.safe_dump(data, sort_keys=False))
    return path
