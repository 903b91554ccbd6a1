"""Triton NF4 decode: packed codes + block scales -> a dense weight in one pass.

Why a kernel at all: the plain PyTorch decode (int32 indices, fp32 gather, scale in place,
cast) moves about 22 bytes per weight each time a layer runs (forward, and again in
backward); this kernel reads 0.5 byte of codes (+ 1/64 of a scale) and writes 2 bytes of
bf16. On an 8B model that is the difference between ~25% and ~3% of a QLoRA step (README.md). The
matmul itself stays with cuBLAS through ``F.linear``: at training batch sizes it is compute
bound and a fused dequant-GEMM would only save the 2-byte write.

Used only when triton imports and the storage is on a CUDA device (see ``layers.py``). The
kernel's arithmetic is tested on CPU under ``TRITON_INTERPRET=1`` (tests/quant); compile and
speed on a GPU have to be checked on a machine that has one.
"""

from __future__ import annotations

import torch

from .formats import SCALE_GROUP, nf4_code

try:  # triton is optional: absent on CPU-only installs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

AVAILABLE = triton is not None
_BYTES = 1024  # packed bytes per program: 2048 weights


if AVAILABLE:

    @triton.jit
    def _nf4_decode_kernel(
        packed_ptr,
        absmax_ptr,
        absq_ptr,
        lo_ptr,
        step_ptr,
        code_ptr,
        out_ptr,
        n_bytes,
        HALF_BLOCK: tl.constexpr,
        GROUP: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
        BYTES: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs = pid * BYTES + tl.arange(0, BYTES)
        mask = offs < n_bytes
        byte = tl.load(packed_ptr + offs, mask=mask, other=0).to(tl.int32)
        # Both values of a byte lie in one block (block_size is even).
        blk = offs // HALF_BLOCK
        if DOUBLE_QUANT:
            q = tl.load(absq_ptr + blk, mask=mask, other=0).to(tl.float32)
            grp = blk // GROUP
            scale = tl.load(lo_ptr + grp, mask=mask, other=0.0) + q * tl.load(step_ptr + grp, mask=mask, other=0.0)
        else:
            scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
        hi = tl.load(code_ptr + (byte >> 4)) * scale
        lo = tl.load(code_ptr + (byte & 15)) * scale
        vals = tl.interleave(hi, lo)  # [2 * BYTES]: high nibble first, as encoded
        out_offs = pid * (2 * BYTES) + tl.arange(0, 2 * BYTES)
        tl.store(out_ptr + out_offs, vals.to(out_ptr.dtype.element_ty), mask=out_offs < 2 * n_bytes)


_code_cache: dict[str, torch.Tensor] = {}


def nf4_dequantize_triton(storage: dict, shape, dtype: torch.dtype, block_size: int) -> torch.Tensor:
    """Decode an NF4 storage dict (see ``formats.nf4_quantize``) with the Triton kernel.

    Args:
        storage: ``packed`` uint8 [numel // 2] and ``absmax`` fp32 [n_blocks], or the
            double-quantized ``absmax_q`` / ``absmax_lo`` / ``absmax_step``.
        shape: output shape (out_features, in_features).
        dtype: output dtype.
        block_size: values per block.

    Returns:
        Tensor of ``shape`` and ``dtype`` on the storage's device.
    """
    if not AVAILABLE:
        raise RuntimeError("triton is not installed")
    packed = storage["packed"]
    dev = packed.device
    key = str(dev)
    code = _code_cache.get(key)
    if code is None:
        code = _code_cache[key] = nf4_code(dev)
    out = torch.empty(shape, dtype=dtype, device=dev)
    n_bytes = packed.numel()
    dq = "absmax_q" in storage
    if dq:
        absmax = code  # unused pointer
        absq, lo, step = storage["absmax_q"], storage["absmax_lo"], storage["absmax_step"]
    else:
        absmax = storage["absmax"].float()
        absq, lo, step = packed, code, code  # unused pointers
    grid = (triton.cdiv(n_bytes, _BYTES),)
    _nf4_decode_kernel[grid](
        packed, absmax, absq, lo, step, code, out, n_bytes,
        HALF_BLOCK=block_size // 2, GROUP=SCALE_GROUP, DOUBLE_QUANT=dq, BYTES=_BYTES,
    )  # fmt: skip
    return out
