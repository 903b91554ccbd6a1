"""Quantize while loading: a base from safetensors files straight into NF4 / int8, one tensor at a time.

Loading a 8B base in bf16 and then quantizing it holds 16 GB before the 4-bit copy exists.
Here the model is first built with its parameters on the meta device (no memory; buffers such
as rotary tables stay real, since they are computed, not loaded), the target Linear layers are
replaced by empty quantized layers, and the checkpoint is then read tensor by tensor with
``safe_open``: a target weight is quantized into its layer's storage as soon as it is read,
every other tensor is materialised in the requested dtype. Peak memory is the quantized base,
the full-precision parameters that stay (embeddings, norms, the output layer) and one tensor.

    with lorafit.quant.empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    lorafit.quant.load_streamed(model, "path/to/model_dir", fmt="nf4", dtype=torch.bfloat16)
"""

from __future__ import annotations

import contextlib
import ctypes
import json
from pathlib import Path

import torch
from torch import nn

from .api import _set_module, select_targets
from .formats import check_nf4_shape
from .layers import LAYER_TYPES


@contextlib.contextmanager
def empty_weights():
    """Within the block, new modules get their parameters on the meta device (buffers stay real).

    Only ``nn.Module.register_parameter`` is redirected, so code that builds modules runs as
    usual; nothing is allocated for weights. (accelerate's ``init_empty_weights`` does the same.)
    """
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and not param.is_meta:
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def checkpoint_files(path) -> list[Path]:
    """The safetensors files of a checkpoint: a file, or every ``*.safetensors`` of a directory
    (a sharded checkpoint's index lists them; unlisted files such as adapters are left out).

    Raises:
        ValueError: no safetensors file there (one line naming the path).
    """
    path = Path(path)
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = path / "model.safetensors"
    files = [single] if single.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no .safetensors checkpoint to stream (quantize-while-loading reads safetensors)")
    return files


def _libc_trim():
    """glibc's ``malloc_trim`` (None elsewhere)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _libc_trim()


def _release_freed_memory() -> None:
    """Hand the freed temporaries of one tensor back to the OS.

    glibc raises its mmap threshold each time a large block is freed, so later tensor-sized
    temporaries come from the heap, and the heap keeps them after they are freed: the process
    grew by ~0.25x of a 1.1B checkpoint that way (benchmarks/load_memory.py). ``malloc_trim``
    returns those pages without changing how the allocator works afterwards.
    """
    if _TRIM is not None:
        _TRIM(0)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_tensors(file):
    """Yield ``(key, tensor)`` from a safetensors file, each read into its own memory, in file order.

    Not ``safe_open``: it maps the whole file, and every page read stays mapped (resident, counted in
    the process's RSS) until the file is closed - the whole checkpoint by the end. Reading tensor by
    tensor keeps one tensor resident at a time.

    Raises:
        ValueError: not a safetensors file, or a dtype this reader does not know (named).
    """
    with open(file, "rb") as f:
        try:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{file}: not a safetensors file ({exc})") from None
        start = 8 + n
        entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                         key=lambda kv: kv[1]["data_offsets"])
        for key, info in entries:
            dtype = _DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"{file}: key {key!r} has dtype {info['dtype']}, which streamed loading does not read")
            begin, end = info["data_offsets"]
            data = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(start + begin)
            if f.readinto(data.numpy()) != end - begin:
                raise ValueError(f"{file}: truncated at key {key!r}")
            yield key, data.view(dtype).reshape(info["shape"])


def load_streamed(model: nn.Module, path, fmt: str | None = "nf4", targets=None, dtype: torch.dtype | None = None,
                  block_size: int = 64, double_quant: bool = False, device="cpu") -> nn.Module:
    """Fill a meta-device skeleton from safetensors, quantizing target Linear weights as they are read.

    Args:
        model: built under :func:`empty_weights` (or on ``torch.device("meta")`` without computed buffers).
        path: a ``.safetensors`` file or a checkpoint directory (sharded ones included).
        fmt: "nf4", "int8" or None (no quantization: a plain low-memory load in ``dtype``).
        targets: as `lorafit.quant.select_targets` (None: every Linear but the output layer).
        dtype: the dtype of the full-precision tensors and the layers' compute dtype (None: as stored).
    Returns:
        ``model``, on ``device``, with no meta tensor left (tied weights are re-tied).
    Raises:
        ValueError: a checkpoint key the model does not have, a tensor of the wrong shape, or
            model tensors the checkpoint does not provide (named).
    """
    if fmt is not None and fmt not in LAYER_TYPES:
        raise ValueError(f"unknown quantization format {fmt!r}; expected one of {sorted(LAYER_TYPES)}")
    shells = {}
    if fmt is not None:
        extra = {"block_size": block_size, "double_quant": double_quant} if fmt == "nf4" else {}
        for name in select_targets(model, targets):
            lin = model.get_submodule(name)
            if fmt == "nf4":
                check_nf4_shape(lin.in_features * lin.out_features, block_size, f"{name!r}")
            layer_dtype = dtype or lin.weight.dtype
            shell = LAYER_TYPES[fmt](lin.in_features, lin.out_features, bias=lin.bias is not None,
                                     compute_dtype=layer_dtype, device=device, **extra)
            _set_module(model, name, shell)
            shells[name] = shell
    for file in checkpoint_files(path):
        for key, tensor in read_tensors(file):
            _place(model, shells, key, tensor.to(device), dtype, file)
            del tensor
            _release_freed_memory()
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{path}: the checkpoint has no tensor for {len(left)} model tensor(s), e.g. {left[:3]}")
    return model


def _place(model: nn.Module, shells: dict, key: str, tensor: torch.Tensor, dtype, file) -> None:
    owner_name, _, attr = key.rpartition(".")
    try:
        owner = model.get_submodule(owner_name)
    except AttributeError:
        raise ValueError(f"{file}: key {key!r}: the model has no module {owner_name!r}") from None
    if owner_name in shells and attr == "weight":
        shell = shells[owner_name]
        if tuple(tensor.shape) != (shell.out_features, shell.in_features):
            raise ValueError(f"{file}: key {key!r} has shape {tuple(tensor.shape)}, the layer is "
                             f"{shell.out_features}x{shell.in_features}")
        with torch.no_grad():
            shell._set_storage(tensor.to(shell.compute_dtype))
        return
    current = owner._parameters.get(attr) if attr in owner._parameters else owner._buffers.get(attr)
    if current is None and attr not in owner._parameters and attr not in owner._buffers:
        raise ValueError(f"{file}: key {key!r}: module {owner_name!r} has no tensor {attr!r}")
    if current is not None and tuple(current.shape) != tuple(tensor.shape):
        raise ValueError(f"{file}: key {key!r} has shape {tuple(tensor.shape)}, the model needs {tuple(current.shape)}")
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=current.requires_grad if current is not None
                                               else tensor.is_floating_point())
    else:
        owner._buffers[attr] = tensor
