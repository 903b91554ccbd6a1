"""`lorafit serve` as a command: a real subprocess on a loopback port, and its one-line errors."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import openai
import torch

from lorafit.cli import main
from tests.serve.helpers import causal_adapter
from tests.train.train_helpers import subprocess_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lorafit_serve_subprocess(tiny_llama, tmp_path):
    causal_adapter(tiny_llama, tmp_path / "adapters" / "support-bot", seed=1)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lorafit", "serve", "--adapters", str(tmp_path / "adapters"),
                             "--port", str(port), "--max-tokens", "32", "--dtype", "bfloat16"], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).json()["status"] == "ok":
                    break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        # the base is served under its directory's name, taken from the adapter's lorafit_job.json
        assert [m.id for m in client.models.list().data] == [tiny_llama.name, "support-bot"]
        out = client.completions.create(model="support-bot", prompt="the film was", max_tokens=5, temperature=0)
        assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens <= 5
        assert httpx.post(url + "/v1/completions", json={"model": "support-bot", "prompt": "x",
                                                         "max_tokens": 33}).status_code == 400
    finally:
        proc.terminate()
        log = proc.communicate(timeout=30)[0]
    assert f"lorafit serve: causal-lm base '{tiny_llama.name}' in bfloat16, 1 adapter(s)" in log, log
    assert "Traceback" not in log, log


def test_serve_command_errors_are_one_line(tmp_path, capsys):
    assert main(["serve", "--adapters", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--adapters" in err[0] and "no such directory" in err[0]
    assert main(["serve", "--adapters", str(tmp_path), "--task", "token-classification"]) == 2
    err = capsys.readouterr().err
    assert "--task" in err and "invalid choice" in err
    assert main(["serve", "--adapters", str(tmp_path), "--max-batch", "0"]) == 2
    assert "--max-batch must be >= 1" in capsys.readouterr().err


def test_serve_dtype_flag():
    from lorafit.serve.cli import serve_dtype

    assert serve_dtype("auto", "cpu") == torch.float32 and serve_dtype("auto", "cuda") == torch.bfloat16
    assert serve_dtype("float16", "cpu") == torch.float16 and serve_dtype("float32", "cuda") == torch.float32
