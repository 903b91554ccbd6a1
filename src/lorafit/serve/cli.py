"""``lorafit serve``: build the base from the adapters' job files (as ``lorafit eval`` does), then serve.

The task and base come in the layers ``lorafit eval`` uses (:func:`lorafit.jobs.reload.resolve_job`):
task defaults < the ``lorafit_job.json`` of the first adapter in DIR (sorted by name) < flags. That
adapter also gives what the base is rebuilt with (``restore``: a classifier's label count; the
seed of a random-weight base); it is not loaded - every adapter is loaded on first use.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lorafit.common.errors import LorafitError
from lorafit.integrations.ultralytics import detect_head, rebuild_class_convs
from lorafit.io import CONFIG_NAME
from lorafit.jobs.commands import Command
from lorafit.jobs.reload import resolve_job
from lorafit.jobs.train import quiet_transformers
from lorafit.serve.server import SERVED_TASKS, Limits, Server
from lorafit.train.distributed import pick_device


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="base model directory (default: the one the adapters were trained on)")
    parser.add_argument("--adapters", metavar="DIR", required=True,
                        help="directory of adapter directories (PEFT format); each is served under its name, "
                             "loaded on first use; new ones are picked up without a restart")
    parser.add_argument("--task", choices=SERVED_TASKS, help="default: from the adapters' lorafit_job.json")
    parser.add_argument("--served-model-name", metavar="NAME",
                        help="the `model` value that selects the base itself (default: the model directory's name)")
    parser.add_argument("--max-resident", type=int, default=8, metavar="N", help="adapters kept in memory [8]")
    parser.add_argument("--max-batch", type=int, default=16, metavar="N", help="rows per forward batch [16]")
    parser.add_argument("--batch-window-ms", type=float, default=5.0, metavar="MS",
                        help="how long a batch waits for more requests [5]")
    parser.add_argument("--max-tokens", type=int, default=256, metavar="N",
                        help="largest max_tokens a request may ask for (and the chat default) [256]")
    parser.add_argument("--max-queue", type=int, default=1024, metavar="N",
                        help="rows waiting at most; beyond it requests get 503 [1024]")
    parser.add_argument("--max-request-bytes", type=int, default=1 << 20, metavar="N", help="[1048576]")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="[auto]")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="auto",
                        help="the base's dtype while serving; adapters are cast to it when loaded "
                             "[auto: bfloat16 on a GPU, float32 on the CPU]")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on [127.0.0.1: this machine only]")
    parser.add_argument("--port", type=int, default=8000, help="[8000]")


DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def serve_dtype(name: str, device) -> torch.dtype:
    """``--dtype``: auto is bf16 on CUDA (half the memory and bandwidth), fp32 on the CPU (bf16 matmuls
    are slow on many CPUs)."""
    if DTYPES[name] is not None:
        return DTYPES[name]
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def first_adapter(directory: Path) -> Path | None:
    if not directory.is_dir():
        raise LorafitError(f"--adapters {directory}: no such directory")
    found = sorted(p for p in directory.iterdir() if (p / CONFIG_NAME).is_file())
    return found[0] if found else None


def build_server(args: argparse.Namespace) -> Server:
    """The base rebuilt as ``lorafit eval`` would, wrapped in a :class:`Server` (nothing listens yet)."""
    for flag in ("max_resident", "max_batch", "max_tokens", "max_queue", "max_request_bytes"):
        if getattr(args, flag) < 1:
            raise LorafitError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.batch_window_ms < 0:
        raise LorafitError(f"--batch-window-ms must be >= 0, got {args.batch_window_ms}")
    directory = Path(args.adapters)
    ref = first_adapter(directory)
    if ref is None and not (args.model and args.task):
        raise LorafitError(f"--adapters {directory}: no adapter directory (with {CONFIG_NAME}) in it yet; give "
                           "--model and --task to serve the base until adapters arrive")
    cls, opts, _ = resolve_job(argparse.Namespace(adapter=str(ref) if ref else None, model=args.model,
                                                  task=args.task), {"device": args.device})
    if opts["task"] not in SERVED_TASKS:
        raise LorafitError(f"--task {opts['task']}: lorafit serve has endpoints for {', '.join(SERVED_TASKS)}")
    if ref is None and opts["task"] != "causal-lm":
        raise LorafitError(f"--adapters {directory}: a {opts['task']} server needs one adapter in it (its "
                           "labels.json sizes the head)")
    quiet_transformers()
    task = cls(opts)
    task.restore(ref or Path(task.model_path))
    torch.manual_seed(opts["seed"])
    model = task.build_model()
    if opts["task"] == "detect" and getattr(task, "nc", None) and detect_head(model).nc != task.nc:
        rebuild_class_convs(model, task.nc, task.names)  # a .pt base: the adapters' class count, as eval does
    device = pick_device(opts["device"])
    model = model.to(device=device, dtype=serve_dtype(getattr(args, "dtype", "auto"), device)).eval()
    name = args.served_model_name or Path(str(opts["model"])).name
    limits = Limits(args.max_tokens, max_inputs=32, max_request_bytes=args.max_request_bytes)
    return Server(model, getattr(task, "tokenizer", None), directory, opts["task"], name, args.max_resident,
                  args.max_batch, args.batch_window_ms, args.max_queue, limits,
                  max_length=opts.get("max_length") or 512,
                  imgsz=int(getattr(task, "imgsz", None) or opts.get("imgsz") or 640))


def _run(args: argparse.Namespace) -> int:
    import uvicorn

    server = build_server(args)
    names = server.store.names()
    dtype = str(server.store.dtype).removeprefix("torch.")
    print(f"lorafit serve: {server.task} base {server.base_name!r} in {dtype}, {len(names)} adapter(s) in "
          f"{args.adapters} (at most {args.max_resident} resident) on http://{args.host}:{args.port}")
    uvicorn.run(server.app(), host=args.host, port=args.port, log_level="info")
    return 0


SERVE = Command(
    description="Serve one base model and every adapter of a directory over HTTP: OpenAI-compatible "
    "/v1/completions, /v1/chat/completions and /v1/models for causal-lm (`model` names the adapter), "
    "/v1/classify for text-classification, /v1/classify-image for image-classification, /v1/detect for detect, "
    "/health, /metrics. "
    "Requests for different adapters that arrive "
    "within --batch-window-ms run as one forward with per-row adapters.",
    add_arguments=_args,
    run=_run,
    epilog="examples:\n"
    "  lorafit serve --adapters adapters/ --max-resident 16\n"
    "  lorafit serve --model ./llama --task causal-lm --adapters adapters/ --port 8080\n"
    "  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\\n"
    "      -d '{\"model\": \"customer-a\", \"prompt\": \"Hello\", \"max_tokens\": 32}'",
)
