"""`lorafit serve --task text-classification`: /v1/classify, built from the adapters' job files like `lorafit eval`."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil

import httpx
import pytest
import torch
from transformers import AutoModel

import lorafit
from lorafit.jobs.reload import build, resolve_job
from lorafit.serve import Background
from lorafit.serve.cli import build_server
from lorafit.tasks.text_classification import Classifier
from tests.serve.helpers import randomize

TEXTS = ["the film was great", "the hotel was awful, really awful", "ok",
         "the concert was " + "really " * 60 + "dull"]  # longer than max_length 16: truncated as in training


def classification_adapter(model_dir, out, labels, seed):
    torch.manual_seed(seed)
    model = Classifier(AutoModel.from_pretrained(model_dir), len(labels))
    lorafit.inject(model, lorafit.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["head"],
                                             exclude_modules=["head"]))
    randomize(model, seed, std=0.5)
    lorafit.save_adapter(model, out)
    (out / "labels.json").write_text(json.dumps(labels))
    (out / "lorafit_job.json").write_text(json.dumps({"task": "text-classification", "model": str(model_dir),
                                                      "max_length": 16}))
    return out


def args(directory, **kw):
    base = {"model": None, "adapters": str(directory), "task": None, "served_model_name": None, "max_resident": 4,
            "max_batch": 16, "batch_window_ms": 300.0, "max_tokens": 256, "max_queue": 64,
            "max_request_bytes": 1 << 20, "device": "cpu", "host": "127.0.0.1", "port": 0}
    return argparse.Namespace(**{**base, **kw})


def reference(adapter_dir, texts):
    """(labels, probabilities [n, labels]) from `lorafit eval`'s rebuild of base + adapter."""
    cls, opts, adapter = resolve_job(argparse.Namespace(adapter=str(adapter_dir), model=None, task=None), {})
    task, model = build(cls, opts, adapter)
    enc = task.tokenizer(texts, truncation=True, max_length=opts["max_length"], padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(model.eval()(enc["input_ids"], enc["attention_mask"]), -1)
    return task.labels, probs


def test_classify_mixed_adapters_equal_each_alone(tiny_bert, tmp_path):
    d = tmp_path / "adapters"
    classification_adapter(tiny_bert, d / "sentiment", ["neg", "pos"], seed=1)
    classification_adapter(tiny_bert, d / "quality", ["bad", "good"], seed=2)
    classification_adapter(tiny_bert, tmp_path / "three", ["a", "b", "c"], seed=3)
    expected = {name: reference(d / name, TEXTS) for name in ("sentiment", "quality")}
    server = build_server(args(d))
    assert server.task == "text-classification" and server.base_name == tiny_bert.name

    async def ask(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            reqs = [{"model": "sentiment", "input": TEXTS[:2]}, {"model": "quality", "input": TEXTS},
                    {"model": "sentiment", "input": TEXTS[2:]}]
            return reqs, [r.json() for r in await asyncio.gather(*(client.post("/v1/classify", json=q)
                                                                    for q in reqs))]

    with Background(server.app()) as bg, httpx.Client(base_url=bg.url, timeout=60) as client:
        reqs, answers = asyncio.run(ask(bg.url))
        assert server.metrics.batch.n == 1 and server.metrics.batch_adapters.total == 2  # one mixed batch
        for req, ans in zip(reqs, answers):
            labels, probs = expected[req["model"]]
            offset = 2 if req["input"] == TEXTS[2:] else 0
            for row in ans["data"]:
                p = probs[offset + row["index"]]
                assert row["label"] == labels[int(p.argmax())]
                assert row["scores"] == pytest.approx({lab: float(v) for lab, v in zip(labels, p)}, abs=1e-5)
        r = client.post("/v1/classify", json={"model": tiny_bert.name, "input": "x"})
        assert r.status_code == 400 and "no trained classification head" in r.json()["error"]["message"]
        r = client.post("/v1/classify", json={"model": "sentiment", "input": ""})
        assert r.status_code == 400 and "'input'" in r.json()["error"]["message"]
        shutil.copytree(tmp_path / "three", d / "three")  # hot-added, but its head has 3 outputs, not 2
        r = client.post("/v1/classify", json={"model": "three", "input": "x"})
        assert r.status_code == 422 and "modules_to_save 'head' does not fit" in r.json()["error"]["message"]
        ok = client.post("/v1/classify", json={"model": "quality", "input": TEXTS[0]}).json()
        assert ok["data"][0]["scores"] == pytest.approx(answers[1]["data"][0]["scores"], abs=1e-5)
        assert client.post("/v1/completions", json={"model": "quality", "prompt": "x"}).status_code == 404


def test_serve_refuses_what_it_cannot_serve(tiny_bert, tmp_path):
    from lorafit.common.errors import LorafitError

    (tmp_path / "empty").mkdir()
    with pytest.raises(LorafitError, match="no adapter directory"):
        build_server(args(tmp_path / "empty"))
    with pytest.raises(LorafitError, match="needs one adapter"):
        build_server(args(tmp_path / "empty", model=str(tiny_bert), task="text-classification"))
    with pytest.raises(LorafitError, match="--max-resident must be >= 1"):
        build_server(args(tmp_path / "empty", max_resident=0))
    with pytest.raises(LorafitError, match="no such directory"):
        build_server(args(tmp_path / "missing"))
