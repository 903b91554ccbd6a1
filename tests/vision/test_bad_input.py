"""Bad input: each problem is one line naming the file at fault, exit status 2 from the CLI."""

from __future__ import annotations

import shutil

import pytest
import yaml

from lorafit.datasets.yolo_format import check_detect_data
from lorafit.common.errors import LorafitError


@pytest.fixture()
def dataset(tmp_path):
    from lorafit.datasets.shapes import ShapesSpec, make_shapes_dataset

    return make_shapes_dataset(tmp_path / "d", ShapesSpec("A", 4, 2, 64, 0))


def edit_yaml(yaml_file, **changes):
    data = yaml.safe_load(yaml_file.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    yaml_file.write_text(yaml.safe_dump(data))
    return yaml_file


def test_vision_tasks_and_export_are_registered():
    """The real registries route --task detect / image-classification and `lorafit export` (nothing patched in)."""
    import lorafit.cli as cli_mod
    from lorafit.tasks import TASKS, task_class

    assert TASKS["detect"] == "lorafit.tasks.detect" and task_class("detect")
    assert TASKS["image-classification"] == "lorafit.tasks.image_classification"
    assert task_class("image-classification")
    assert cli_mod.COMMANDS["export"][0] == "lorafit.export.cli:EXPORT"


def cli(argv, capsys):
    """`lorafit ...` in-process through the real registries (a missing entry fails every test here)."""
    import lorafit.cli as cli_mod

    code = cli_mod.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def one_line_error(code, err, *needles):
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("lorafit: error: "), err
    for n in needles:
        assert n in err[0], err[0]


def test_valid_dataset_passes(dataset):
    checked = check_detect_data(dataset)
    assert checked["nc"] == 3 and checked["counts"]["train"][0] == 4


@pytest.mark.parametrize("change,needle", [
    ({"val": None}, "'val' is missing"),
    ({"names": None}, "no 'names'"),
    ({"train": "images/nowhere"}, "does not exist"),
    ({"path": "/nonexistent/root"}, "does not exist"),
    ({"names": ["a"], "nc": 3}, "does not match"),
])
def test_data_yaml_problems(capsys, dataset, tmp_path, change, needle):
    edit_yaml(dataset, **change)
    code, err = cli(["train", "--task", "detect", "--data", str(dataset), "--out", str(tmp_path / "r")],
                    capsys)
    one_line_error(code, err, str(dataset), needle)


def test_missing_data_yaml(capsys, tmp_path):
    code, err = cli(["train", "--task", "detect", "--data", str(tmp_path / "no.yaml")], capsys)
    one_line_error(code, err, "no.yaml", "no such data file")


def test_image_without_label(capsys, dataset):
    label = dataset.parent / "labels" / "train" / "000002.txt"
    label.unlink()
    code, err = cli(["train", "--task", "detect", "--data", str(dataset)], capsys)
    one_line_error(code, err, "000002.png", "has no label file")


@pytest.mark.parametrize("line,needle", [
    ("7 0.5 0.5 0.2 0.2", "class 7 out of range"),
    ("0 1.5 0.5 0.2 0.2", "normalised to [0, 1]"),
    ("0 0.5 0.5", "expected 'class cx cy w h'"),
    ("x 0.5 0.5 0.2 0.2", "non-numeric"),
])
def test_bad_label_line(capsys, dataset, line, needle):
    label = dataset.parent / "labels" / "val" / "000001.txt"
    label.write_text("0 0.5 0.5 0.1 0.1\n" + line + "\n")
    code, err = cli(["train", "--task", "detect", "--data", str(dataset)], capsys)
    one_line_error(code, err, "000001.txt line 2", needle)


def test_empty_label_file_is_a_background_image(dataset):
    (dataset.parent / "labels" / "train" / "000000.txt").write_text("")
    assert check_detect_data(dataset)["counts"]["train"][0] == 4


def test_pt_model_is_never_downloaded(capsys, dataset):
    code, err = cli(["train", "--task", "detect", "--model", "yolov8n.pt", "--data", str(dataset)],
                    capsys)
    one_line_error(code, err, "yolov8n.pt", "never downloaded")


def test_adapter_for_another_architecture_cli(capsys, adapted, tmp_path):
    code, err = cli(["export", "--model", "yolo11n.yaml", "--adapter", str(adapted["run"] / "adapter"),
                     "--out", str(tmp_path / "x.onnx")], capsys)
    one_line_error(code, err, "adapter_model.safetensors")


def test_bad_image_folder_cli(capsys, tmp_path):
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    (tmp_path / "imgs" / "dog").mkdir()
    shutil.copyfile(__file__, tmp_path / "imgs" / "dog" / "not_an_image.png")
    (tmp_path / "imgs" / "cat" / "x.png").write_bytes(b"\x89PNG broken")
    code, err = cli(["train", "--task", "image-classification", "--model", "timm:resnet18",
                     "--train", str(tmp_path / "imgs"), "--imgsz", "32", "--out", str(tmp_path / "r"),
                     "--eval-before"], capsys)
    one_line_error(code, err, "x.png", "cannot read image")


def test_loader_raises_lorafit_error_directly(dataset):
    edit_yaml(dataset, train=None)
    with pytest.raises(LorafitError, match="'train' is missing"):
        check_detect_data(dataset)
