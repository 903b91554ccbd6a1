"""``lorafit eval`` / ``lorafit merge`` for --task detect and --task image-classification, through the CLI.

The detect tests reuse the session's adapted run (conftest ``adapted``): no detector is trained here.
"""

from __future__ import annotations

import json
import pickle
import shutil
import types

import pytest
import torch

from lorafit.cli import main
from lorafit.layers import LoraLayer
from tests.vision.vision_helpers import eval_logits, record_eval_logits


def one_line_error(capsys, argv) -> str:
    """Run the CLI expecting bad input: exit code 2, one line on stderr, no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, (argv, err)
    assert len(lines) == 1 and lines[0].startswith("lorafit: error: ") and "Traceback" not in err, err
    return lines[0]


def unpickled_modules(path) -> set[str]:
    """Top-level packages a torch checkpoint needs to unpickle (recorded while loading it)."""
    seen: set[str] = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add(module.split(".")[0])
            return super().find_class(module, name)

    recorder = types.SimpleNamespace(Unpickler=Recorder, load=pickle.load, __name__="pickle")
    torch.load(path, map_location="cpu", weights_only=False, pickle_module=recorder)
    return seen


def lora_detector(adapted):
    """The run's base checkpoint + its adapter, unmerged (what the run validated)."""
    from lorafit.integrations.ultralytics import load_detector, load_detector_adapter

    job = json.loads((adapted["run"] / "adapter" / "lorafit_job.json").read_text())
    return load_detector_adapter(load_detector(job["model"]), adapted["run"] / "adapter").eval()


# ------------------------------------------------------------------ detect
def test_detect_eval_reproduces_the_run_metrics(adapted, tmp_path, capsys):
    adapter = adapted["run"] / "adapter"
    out = tmp_path / "eval.json"
    # no --model, no --data, no --imgsz: all from the adapter's lorafit_job.json
    assert main(["eval", "--adapter", str(adapter), "--device", "cpu", "--batch-size", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    got = json.loads(out.read_text())
    assert {"eval_mAP50", "eval_mAP50-95", "eval_precision", "eval_recall"} <= set(got)
    assert "eval_mAP50 " in printed and "images from" in printed
    # Same val split, same rectangular val batches, same weights (base checkpoint + the best epoch's adapter,
    # merged). They differ only by float rounding: the run validated in batches of 32 (this: 8), so the convs
    # run with other GEMM blockings. Measured: equal to the 6 digits of metrics.json, or off by 2e-6
    # (mAP50-95). A real fault (square letterbox instead of rect batches moved mAP50 0.342 -> 0.362; no
    # adapter: ~0) is far off.
    for key in ("eval_mAP50", "eval_mAP50-95", "eval_precision", "eval_recall"):
        assert got[key] == pytest.approx(adapted["metrics"][key], abs=1e-3), key
    assert got["eval_mAP50"] > 0.05  # not a degenerate zero-vs-zero match
    assert got["adapter"] == str(adapter) and got["eval_rows"] == 32


def test_detect_merge_writes_a_plain_yolo_checkpoint(adapted, tmp_path, capsys):
    from ultralytics import YOLO

    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapted["run"] / "adapter"), "--out", str(merged)]) == 0
    assert (merged / "model.pt").is_file() and (merged / "lorafit_job.json").is_file()
    assert "lorafit" not in unpickled_modules(merged / "model.pt")  # loads without lorafit installed
    torch.manual_seed(0)
    x = torch.rand(2, 3, 96, 96)
    yolo = YOLO(str(merged / "model.pt"))
    assert yolo.task == "detect" and yolo.names == dict(adapted["task"].data["names"])
    with torch.no_grad():
        want = lora_detector(adapted)(x)[0]
        got = yolo.model.eval()(x)[0]
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())
    job = json.loads((merged / "lorafit_job.json").read_text())
    assert job["task"] == "detect" and job["dtype"] == "float32" and job["nc"] == 3

    # the merged checkpoint evaluates like the adapter (its job info beside it supplies data and imgsz)
    capsys.readouterr()
    out = tmp_path / "merged-eval.json"
    assert main(["eval", "--model", str(merged / "model.pt"), "--device", "cpu", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["eval_mAP50"] == pytest.approx(adapted["metrics"]["eval_mAP50"], abs=1e-3)

    # --dtype fp16: Ultralytics' own checkpoint dtype; YOLO() still loads it (as fp32)
    assert main(["merge", "--adapter", str(adapted["run"] / "adapter"), "--out", str(tmp_path / "m16"),
                 "--dtype", "fp16"]) == 0
    ckpt = torch.load(tmp_path / "m16" / "model.pt", map_location="cpu", weights_only=False)
    assert {p.dtype for p in ckpt["model"].parameters()} == {torch.float16}
    with torch.no_grad():
        half = YOLO(str(tmp_path / "m16" / "model.pt")).model.eval()(x)[0]
    assert (half - want).abs().max() <= 1e-2 * max(1.0, want.abs().max().item())


def test_detect_bad_input_is_one_line(adapted, shapes, tmp_path, capsys):
    adapter = adapted["run"] / "adapter"
    # an adapter of another architecture: yolov8n's adapter on a yolo11n base (other layer names) and on a
    # yolov8s base (same names, other widths)
    line = one_line_error(capsys, ["eval", "--adapter", str(adapter), "--model", "yolo11n.yaml", "--device", "cpu"])
    assert "adapter_model.safetensors" in line and "the model has no module 'model." in line
    line = one_line_error(capsys, ["merge", "--adapter", str(adapter), "--model", "yolov8s.yaml", "--out",
                                   str(tmp_path / "m8s")])
    assert "adapter_model.safetensors" in line and "shape" in line
    # a data.yaml that does not exist
    missing = tmp_path / "nope.yaml"
    line = one_line_error(capsys, ["eval", "--adapter", str(adapter), "--data", str(missing)])
    assert str(missing) in line and "no such data file" in line
    # a data.yaml with other classes (B4: 4 classes)
    line = one_line_error(capsys, ["eval", "--adapter", str(adapter), "--data", str(shapes["B4"])])
    assert "4 classes" in line and "differ from the model's 3 classes" in line
    # --eval is the text / image flag
    line = one_line_error(capsys, ["eval", "--adapter", str(adapter), "--eval", str(shapes["B"])])
    assert "--eval does not apply" in line and "--data" in line
    # a detect adapter without lorafit_job.json: the base is unknown unless --model says it
    bare = tmp_path / "bare"
    shutil.copytree(adapter, bare)
    (bare / "lorafit_job.json").unlink()
    line = one_line_error(capsys, ["merge", "--adapter", str(bare), "--task", "detect", "--out", str(tmp_path / "m")])
    assert str(bare / "lorafit_job.json") in line and "--model" in line
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------ image classification
@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    """A tiny ViT run (32 px, 18 images, 1 epoch), trained through the CLI with a non-default seed."""
    from lorafit.datasets.shapes import make_shapes_classification

    root = tmp_path_factory.mktemp("cls-reload")
    folder = make_shapes_classification(root / "data", n_per_class=6, imgsz=32)
    run = root / "run"
    argv = ["train", "--task", "image-classification", "--model", "timm:vit_tiny_patch16_224", "--train",
            str(folder / "train"), "--eval", str(folder / "val"), "--imgsz", "32", "--epochs", "1", "--batch-size",
            "6", "--lr", "5e-3", "--seed", "3", "--no-eval-before", "--device", "cpu", "--out", str(run)]
    with pytest.MonkeyPatch.context() as patch:
        evals = record_eval_logits(patch)
        assert main(argv) == 0
    return {"run": run, "folder": folder, "metrics": json.loads((run / "metrics.json").read_text()),
            "trained": evals[-1]}  # the final evaluation's logits, on the model in memory after training


def test_image_classification_eval_and_merge_round_trip(cls_run, tmp_path, capsys):
    from lorafit.tasks.image_classification import Task, scan_image_folder

    adapter, val = cls_run["run"] / "adapter", str(cls_run["folder"] / "val")
    # --model, --imgsz, the seed of the random-weight base, labels and head all come from the adapter
    assert main(["eval", "--adapter", str(adapter), "--eval", val, "--out", str(tmp_path / "a.json")]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["eval_accuracy"] == cls_run["metrics"]["eval_accuracy"]
    assert a["eval_loss"] == pytest.approx(cls_run["metrics"]["eval_loss"], rel=1e-5)  # same logits, same labels

    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--out", str(merged)]) == 0
    assert {p.name for p in merged.iterdir()} == {"model.safetensors", "labels.json", "lorafit_job.json"}
    assert json.loads((merged / "labels.json").read_text()) == ["circle", "square", "triangle"]
    assert main(["eval", "--model", str(merged), "--eval", val, "--out", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["eval_accuracy"] == a["eval_accuracy"] and m["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4)

    # logits on every val image: the model `lorafit eval --adapter` builds vs the trained model in memory,
    # then the merged directory vs that
    from lorafit.jobs.reload import build, resolve_job

    def model_of(**kw):
        module, opts, where = resolve_job(types.SimpleNamespace(task=None, **kw), {})
        return build(module, opts, where)[1].eval()

    task = Task({"model": str(merged), "imgsz": 32, "targets": "auto", "seed": 0})
    task.restore(merged)
    _, rows = scan_image_folder(val, task.labels)
    trained = cls_run["trained"]
    assert trained["rows"] == rows and len(rows) == 18
    reloaded = eval_logits(task, model_of(adapter=str(adapter), model=None), rows, trained["batch_size"])
    # the seeded base, the adapter's exact fp32 tensors, the same modules, batches and threads: the same float
    # operations as the trained model, so equal bit for bit (no tolerance; a wrong seed, key or scaling is not)
    assert torch.equal(reloaded, trained["logits"]), (reloaded - trained["logits"]).abs().max().item()
    merged_logits = eval_logits(task, model_of(adapter=None, model=str(merged)), rows, trained["batch_size"])
    # Merged vs unmerged is not the same arithmetic: W + s*B@A is rounded to fp32 once per weight (relative
    # 2**-24 = 6e-8), then every GEMM sums other products: measured 5e-7 (~9 roundings) through 12 blocks. The
    # bound, 1e-4 of the logits' scale (~1700 roundings), leaves room for other CPUs' GEMMs; a merge whose LoRA
    # scaling is off by 1% moves them by 1.2e-2. It means something only if the LoRA terms move the logits by
    # far more, so that is asserted too (a merge that drops them, trained head kept, lands at ``no_lora``).
    plain = model_of(adapter=str(adapter), model=None)
    for m in plain.modules():
        if isinstance(m, LoraLayer):
            m.disabled = True
    no_lora = eval_logits(task, plain, rows, trained["batch_size"])
    scale = max(1.0, reloaded.abs().max().item())
    assert (merged_logits - reloaded).abs().max() <= 1e-4 * scale
    assert (no_lora - reloaded).abs().max() > 100 * 1e-4 * scale, (no_lora - reloaded).abs().max()


def test_image_classification_eval_needs_eval_dir(cls_run, capsys):
    adapter = str(cls_run["run"] / "adapter")
    assert "--eval is required" in one_line_error(capsys, ["eval", "--adapter", adapter])
    line = one_line_error(capsys, ["eval", "--adapter", adapter, "--eval", str(cls_run["folder"] / "nope")])
    assert "nope: not a directory" in line
