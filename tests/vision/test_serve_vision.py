"""`lorafit serve --task image-classification`: /v1/classify-image on a real server, mixed adapters in one batch."""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import shutil
from pathlib import Path

import httpx
import pytest
import torch

import lorafit
from lorafit.jobs.options import all_options, resolve, task_defaults
from lorafit.jobs.reload import build, resolve_job
from lorafit.serve import Background
from lorafit.serve.cli import build_server
from lorafit.tasks.image_classification import Task, load_image, preset_targets
from lorafit.tree import lora_layers

IMGSZ = 32


def image_adapter(out, labels, seed):
    """An image-classification adapter as `lorafit train` leaves it (random weights, labels.json, job file)."""
    opts = resolve({"task": "image-classification", "model": "timm:vit_tiny_patch16_224", "imgsz": str(IMGSZ)},
                   all_options(), task_defaults)
    task = Task(opts)
    task.labels = labels
    torch.manual_seed(opts["seed"])  # the base is random: `lorafit serve` rebuilds it with the job's seed
    model = task.build_model()
    lorafit.inject(model, lorafit.LoraConfig(r=4, target_modules=preset_targets(model, "auto", task.head),
                                             modules_to_save=[task.head], exclude_modules=[task.head]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for ad in layer.adapters.values():
                ad.lora_B.copy_(torch.randn(ad.lora_B.shape, generator=g) * 0.5)
    lorafit.save_adapter(model, out)
    task.save_extras(out)
    return out


def reference(adapter_dir, paths):
    cls, opts, adapter = resolve_job(argparse.Namespace(adapter=str(adapter_dir), model=None, task=None), {})
    task, model = build(cls, opts, adapter)
    with torch.no_grad():
        probs = torch.softmax(model.eval()(torch.stack([load_image(str(p), IMGSZ) for p in paths])), -1)
    return task.labels, probs


def test_classify_image_mixed_adapters_equal_each_alone(tmp_path):
    from lorafit.datasets.shapes import make_shapes_classification

    shapes = make_shapes_classification(tmp_path / "shapes", n_per_class=1, imgsz=IMGSZ)
    images = sorted((shapes / "val").rglob("*.png"))
    d = tmp_path / "adapters"
    image_adapter(d / "shapes", ["circle", "square", "triangle"], seed=1)
    image_adapter(d / "colours", ["red", "green", "blue"], seed=2)
    image_adapter(tmp_path / "two", ["a", "b"], seed=3)
    expected = {name: reference(d / name, images) for name in ("shapes", "colours")}
    args = argparse.Namespace(model=None, adapters=str(d), task=None, served_model_name=None, max_resident=4,
                              max_batch=16, batch_window_ms=300.0, max_tokens=16, max_queue=64,
                              max_request_bytes=1 << 20, device="cpu", host="127.0.0.1", port=0)
    server = build_server(args)
    assert server.task == "image-classification"
    b64 = [base64.b64encode(p.read_bytes()).decode() for p in images]

    async def ask(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(
                client.post("/v1/classify-image", json={"model": "shapes", "image": b64}),
                client.post("/v1/classify-image?model=colours", content=images[1].read_bytes(),
                            headers={"content-type": "image/png"}))

    with Background(server.app()) as bg, httpx.Client(base_url=bg.url, timeout=60) as client:
        as_json, raw = asyncio.run(ask(bg.url))
        assert server.metrics.batch.n == 1 and server.metrics.batch_adapters.total == 2  # one mixed batch
        labels, probs = expected["shapes"]
        for row in as_json.json()["data"]:
            p = probs[row["index"]]
            assert row["label"] == labels[int(p.argmax())]
            assert row["scores"] == pytest.approx({k: float(v) for k, v in zip(labels, p)}, abs=1e-5)
        labels, probs = expected["colours"]
        assert raw.json()["data"][0]["scores"] == pytest.approx({k: float(v) for k, v in zip(labels, probs[1])},
                                                                abs=1e-5)
        for body, words in [({"model": "shapes", "image": base64.b64encode(b"not an image").decode()},
                             "not an image PIL can read"),
                            ({"model": "shapes", "image": "%%%"}, "not valid base64"),
                            ({"model": "shapes", "image": b64[0], "size": 3}, "unknown field 'size'"),
                            ({"model": server.base_name, "image": b64[0]}, "no trained classification head")]:
            r = client.post("/v1/classify-image", json=body)
            assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
        r = client.post("/v1/classify-image", content=b"\x89PNG broken", headers={"content-type": "image/png"})
        assert r.status_code == 400 and "'model' is required" in r.json()["error"]["message"]
        assert client.post("/v1/classify-image?model=nope", content=b"x",
                           headers={"content-type": "image/png"}).status_code == 404
        # multipart (curl -F model=shapes -F image=@a.png -F image=@b.png): the same numbers as base64 JSON
        files = [("image", (p.name, p.read_bytes(), "image/png")) for p in images]
        r = client.post("/v1/classify-image", data={"model": "shapes"}, files=files)
        assert r.status_code == 200, r.text
        assert [row["scores"] for row in r.json()["data"]] == [
            pytest.approx(row["scores"], abs=1e-5) for row in as_json.json()["data"]]
        for data, parts, status, words in [
                ({}, files[:1], 400, "field 'model' is required"),
                ({"model": "shapes"}, [("photo", files[0][1])], 400, "images go in parts named 'image'"),
                ({"model": "shapes", "size": "3"}, files[:1], 400, "unknown field 'size'"),
                ({"model": "shapes"}, [("image", ("x.png", b"\x89PNG broken", "image/png"))], 400,
                 "not an image PIL can read"),
                ({"model": "shapes"}, files * 20, 400, "multipart body"),  # over max_inputs (32) files
                ({"model": "nope"}, files[:1], 404, "'nope' not found")]:
            r = client.post("/v1/classify-image", data=data, files=parts)
            assert r.status_code == status and words in r.json()["error"]["message"], r.text
        r = client.post("/v1/classify-image", data={"model": "shapes", "image": "abc"}, files=[("x", files[0][1])])
        assert r.status_code == 400 and "'image': given twice or not as a file" in r.text, r.text
        r = client.post("/v1/classify-image", content=b"--zz\r\nnot a part",
                        headers={"content-type": "multipart/form-data; boundary=zz"})
        assert r.status_code == 400, r.text
        shutil.copytree(tmp_path / "two", d / "two")  # a 2-class head on a 3-class base: refused, the rest serves
        r = client.post("/v1/classify-image", json={"model": "two", "image": b64[0]})
        assert r.status_code == 422 and "two" in r.json()["error"]["message"]
        again = client.post("/v1/classify-image", json={"model": "shapes", "image": b64[:1]}).json()
        assert again["data"][0]["scores"] == pytest.approx(as_json.json()["data"][0]["scores"], abs=1e-5)


def detect_adapter(base_pt, out, seed, names):
    """A detect adapter on the session's pretrained yolov8n, as `lorafit train --task detect` leaves one."""
    import json

    from lorafit.integrations.ultralytics import detector_config, inject_detector, load_detector, save_detector_adapter

    model = load_detector(base_pt)
    inject_detector(model, detector_config(model, rank=4))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for ad in layer.adapters.values():
                ad.lora_B.copy_(torch.randn(ad.lora_B.shape, generator=g) * 0.02)
    model.names = dict(enumerate(names))
    save_detector_adapter(model, out, base=str(base_pt), imgsz=96)
    (out / "lorafit_job.json").write_text(json.dumps({"task": "detect", "model": str(base_pt), "imgsz": 96,
                                                      "seed": 0, "data": "unused.yaml", "nc": len(names),
                                                      "names": dict(enumerate(names))}))
    return out


def test_detect_mixed_adapters_equal_each_alone(base_pt, shapes, tmp_path):
    from PIL import Image

    d = tmp_path / "adapters"
    detect_adapter(base_pt, d / "shapes", 1, ["circle", "square", "triangle"])
    detect_adapter(base_pt, d / "parts", 2, ["bolt", "nut", "gear"])
    pngs = []
    for i, path in enumerate(sorted(Path(shapes["B"]).parent.rglob("*.png"))[:2]):
        im = Image.open(path).convert("RGB")
        if i == 1:  # another size: letterboxed into the same batch
            im = im.resize((120, 80))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        pngs.append(buf.getvalue())
    b64 = [base64.b64encode(p).decode() for p in pngs]
    args = argparse.Namespace(model=None, adapters=str(d), task=None, served_model_name=None, max_resident=4,
                              max_batch=16, batch_window_ms=300.0, max_tokens=16, max_queue=64,
                              max_request_bytes=1 << 20, device="cpu", host="127.0.0.1", port=0)
    server = build_server(args)
    assert server.task == "detect"
    nms = {"conf": 0.001, "max_det": 50}

    async def ask(url, reqs):
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return [r.json() for r in await asyncio.gather(*(client.post("/v1/detect", json=q) for q in reqs))]

    with Background(server.app()) as bg, httpx.Client(base_url=bg.url, timeout=120) as client:
        mixed = asyncio.run(ask(bg.url, [{"model": "shapes", "image": b64, **nms},
                                         {"model": "parts", "image": b64[1], **nms}]))
        assert server.metrics.batch.n == 1 and server.metrics.batch_adapters.total == 2  # one mixed batch
        alone = [client.post("/v1/detect", json={"model": m, "image": b, **nms}).json()["data"][0]
                 for m, b in [("shapes", b64[0]), ("shapes", b64[1]), ("parts", b64[1])]]
        got = [mixed[0]["data"][0], mixed[0]["data"][1], mixed[1]["data"][0]]
        for g_, a in zip(got, alone):
            assert len(g_["boxes"]) == len(a["boxes"]) > 0
            for x, y in zip(g_["boxes"], a["boxes"]):
                assert x["label"] == y["label"] and x["confidence"] == pytest.approx(y["confidence"], abs=1e-4)
                assert x["box"] == pytest.approx(y["box"], abs=0.05)
        assert {b["label"] for b in got[2]["boxes"]} <= {"bolt", "nut", "gear"}
        # the adapter loaded the way `lorafit eval` loads it, the same letterbox, Ultralytics' NMS directly
        from ultralytics.utils import ops
        from ultralytics.utils.nms import non_max_suppression

        from lorafit.serve.detect import letterbox

        cls, opts, adapter = resolve_job(argparse.Namespace(adapter=str(d / "parts"), model=None, task=None), {})
        _, ref_model = build(cls, opts, adapter)
        x, shape = letterbox(pngs[1], 96, "image")
        with torch.no_grad():
            det = non_max_suppression(ref_model.eval()(x[None])[0], 0.001, 0.7, max_det=50)[0]
        ref_boxes = ops.scale_boxes((96, 96), det[:, :4].clone(), shape)
        flat = [v for b in got[2]["boxes"] for v in b["box"]]
        assert flat == pytest.approx(ref_boxes.flatten().tolist(), abs=0.05)
        assert len({tuple(b["box"]) for b in got[2]["boxes"]}) > 2  # boxes of different places and sizes
        assert [b["confidence"] for b in got[2]["boxes"]] == pytest.approx(det[:, 4].tolist(), abs=1e-4)
        assert all(0 <= v <= 120 for b in got[1]["boxes"] for v in b["box"])  # in the 120 x 80 image's pixels
        raw = client.post("/v1/detect?model=parts&conf=0.001&max_det=50", content=pngs[1],
                          headers={"content-type": "image/png"}).json()["data"][0]
        assert [b["box"] for b in raw["boxes"]] == [b["box"] for b in alone[2]["boxes"]]
        form = client.post("/v1/detect", data={"model": "parts", "conf": "0.001", "max_det": "50"},
                           files=[("image", ("b.png", pngs[1], "image/png"))])
        assert [b["box"] for b in form.json()["data"][0]["boxes"]] == [b["box"] for b in alone[2]["boxes"]]
        form = client.post("/v1/detect", data={"model": "parts", "conf": "2"}, files=[("image", ("b.png", pngs[1]))])
        assert form.status_code == 400 and "conf" in form.json()["error"]["message"]
        for body, status in [({"model": "parts", "image": b64[0], "conf": 2}, 400),
                             ({"model": "parts", "image": base64.b64encode(b"GIF89a junk").decode()}, 400),
                             ({"model": "nope", "image": b64[0]}, 404)]:
            assert client.post("/v1/detect", json=body).status_code == status
