"""Pure tensor functions for the NF4 and int8 storage formats (no modules, no autograd).

NF4 (Dettmers et al., 2023, "QLoRA"): the weight is flattened row-major and cut into blocks of
``block_size`` consecutive values; each block stores one absmax scale and, per value, the index
of the nearest of 16 "normal float" levels in [-1, 1] after dividing by that scale. Two 4-bit
indices share one byte (first value in the high nibble, as bitsandbytes does), so the storage
is 4 bits per weight plus 32 bits per block (0.28x of bf16 at block 64).

Double quantization stores the block scales themselves in 8 bits: groups of 256 scales share
an fp32 ``lo`` and ``step`` and each scale becomes ``lo + q * step`` with ``q`` rounded *up*.
Rounding up means the effective scale is never below the block's true absmax, so no value is
clipped and the per-value error bound ``scale * max_half_gap`` still holds with the effective
scale. It brings the scale overhead from 0.5 to ~0.13 bits per weight (0.26x of bf16).

int8: one fp32 scale per output row, ``scale = absmax(row) / 127``, symmetric round-to-nearest.
"""

from __future__ import annotations

import itertools

import torch

# The 16 NF4 levels from the QLoRA paper (bitsandbytes' table), ascending.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
# Largest distance from any point of [-1, 1] to its nearest level (half the widest gap).
NF4_MAX_HALF_GAP = max(b - a for a, b in itertools.pairwise(NF4_CODE)) / 2
SCALE_GROUP = 256  # scales per fp32 (lo, step) pair under double quantization
_CHUNK = 1 << 20  # values encoded per pass: bounds the temporaries (fp32 + bucketize's int64: ~16 MB)

_lut_cache: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def nf4_code(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 16 NF4 levels as a tensor [16]."""
    return torch.tensor(NF4_CODE, dtype=dtype, device=device)


def _pair_lut(device: torch.device) -> torch.Tensor:
    """int64 [256]: byte -> its two fp32 levels (high nibble first) viewed as one 64-bit word.

    Decoding is then one ``index_select`` of 8-byte words per byte, 3-4x faster on CPU than
    gathering [256, 2] rows or two nibble lookups, with int32 indices (2 bytes of temporary per
    weight). Viewing back as fp32 restores the pair order on any endianness.
    """
    key = (str(device), torch.int64)
    lut = _lut_cache.get(key)
    if lut is None:
        code = nf4_code(device)
        b = torch.arange(256, device=device)
        pairs = torch.stack([code[b >> 4], code[b & 15]], dim=1).contiguous()  # [256, 2] fp32
        lut = pairs.view(torch.int64).view(256)
        if torch.compiler.is_compiling():
            return lut  # traced: 256 entries built in the graph; a cache write would be a side effect
        _lut_cache[key] = lut
    return lut


def check_nf4_shape(numel: int, block_size: int, what: str = "weight") -> None:
    """Raise ValueError unless ``block_size`` is a positive even divisor of ``numel``."""
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if block_size % 2:
        raise ValueError(f"block_size must be even (two 4-bit codes per byte), got {block_size}")
    if numel % block_size:
        raise ValueError(f"block_size {block_size} does not divide the {numel} values of {what}")


def nf4_encode(blocks: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Encode values against given per-block scales.

    Args:
        blocks: [n_blocks, block_size] float values.
        scale: [n_blocks] scales (>= the block's absmax; zero for an all-zero block).

    Returns:
        uint8 [n_blocks * block_size // 2], two codes per byte, first value in the high nibble.
    """
    n_blocks, block = blocks.shape
    code = nf4_code(blocks.device)
    mid = (code[1:] + code[:-1]) / 2
    out = torch.empty(n_blocks, block // 2, dtype=torch.uint8, device=blocks.device)
    step = max(1, _CHUNK // block)
    for i in range(0, n_blocks, step):
        x = blocks[i : i + step].float()
        s = scale[i : i + step].float()
        s = torch.where(s > 0, s, torch.ones_like(s))
        x = (x / s[:, None]).clamp_(-1.0, 1.0)
        idx = torch.bucketize(x, mid).to(torch.uint8)
        out[i : i + step] = (idx[:, 0::2] << 4) | idx[:, 1::2]
    return out.reshape(-1)


def quantize_scales(absmax: torch.Tensor, group: int = SCALE_GROUP):
    """Double quantization: 8-bit scales, rounded up so that no block gets clipped.

    Args:
        absmax: [n_blocks] fp32 block scales (>= 0).
        group: scales sharing one (lo, step) pair.

    Returns:
        (q uint8 [n_blocks], lo fp32 [n_groups], step fp32 [n_groups]).
    """
    n = absmax.numel()
    n_groups = -(-n // group)
    a = absmax.float()
    pad = n_groups * group - n
    g = torch.cat([a, a[-1:].expand(pad)]) if pad else a
    g = g.view(n_groups, group)
    lo = g.amin(1)
    # A hair above (hi - lo) / 255, so that lo + 255 * step >= hi despite float rounding.
    step = (g.amax(1) - lo) / 255 * (1 + 2**-20)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.ceil((g - lo[:, None]) / safe[:, None]).clamp_(0, 255)
    # Float rounding can leave lo + q * step a ulp below the target: bump those by one level.
    low = (lo[:, None] + q * step[:, None]) < g
    q = torch.where(low, (q + 1).clamp_(max=255), q)
    return q.to(torch.uint8).reshape(-1)[:n].contiguous(), lo.contiguous(), step.contiguous()


def dequantize_scales(q: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, group: int = SCALE_GROUP):
    """Inverse of :func:`quantize_scales`: fp32 [n_blocks] effective scales."""
    gid = torch.arange(q.numel(), device=q.device) // group
    return lo[gid] + q.float() * step[gid]


def nf4_quantize(weight: torch.Tensor, block_size: int = 64, double_quant: bool = False) -> dict:
    """Quantize a weight to NF4.

    Args:
        weight: any shape, numel divisible by ``block_size``.
        block_size: values per absmax block (even).
        double_quant: also quantize the block scales to 8 bits.

    Returns:
        dict of storage tensors: ``packed`` uint8 [numel // 2] and either ``absmax`` fp32
        [n_blocks] or ``absmax_q`` uint8 [n_blocks], ``absmax_lo`` / ``absmax_step`` fp32
        [ceil(n_blocks / 256)].
    """
    check_nf4_shape(weight.numel(), block_size)
    blocks = weight.detach().reshape(-1, block_size)
    absmax = torch.maximum(blocks.amax(1), -blocks.amin(1)).float()  # |x| max without an |x| copy of the weight
    if not double_quant:
        return {"packed": nf4_encode(blocks, absmax), "absmax": absmax}
    q, lo, step = quantize_scales(absmax)
    scale = dequantize_scales(q, lo, step)  # encode against the scale that decoding will see
    return {"packed": nf4_encode(blocks, scale), "absmax_q": q, "absmax_lo": lo, "absmax_step": step}


def nf4_scales(storage: dict) -> torch.Tensor:
    """fp32 [n_blocks] effective block scales of an NF4 storage dict."""
    if "absmax" in storage:
        return storage["absmax"].float()
    return dequantize_scales(storage["absmax_q"], storage["absmax_lo"], storage["absmax_step"])


def nf4_dequantize(packed: torch.Tensor, scale: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    """Plain PyTorch NF4 decode.

    Args:
        packed: uint8 [numel // 2].
        scale: fp32 [n_blocks] effective block scales.
        shape: output shape, e.g. (out_features, in_features).
        dtype: output dtype.

    Returns:
        Tensor of ``shape`` and ``dtype``. The fp32 intermediate is one temporary of the layer's
        size; it is freed on return.
    """
    n_blocks = scale.numel()
    words = _pair_lut(packed.device).index_select(0, packed.to(torch.int32))  # [numel / 2] int64
    w = words.view(torch.float32).view(n_blocks, -1).mul_(scale[:, None])  # [n_blocks, block]
    return w.to(dtype).view(shape)


def int8_quantize(weight: torch.Tensor) -> dict:
    """Per-output-row symmetric int8.

    Args:
        weight: [out, in].

    Returns:
        dict ``q`` int8 [out, in], ``scale`` fp32 [out] (= absmax(row) / 127).
    """
    w = weight.detach()
    out_f = w.shape[0]
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = w.abs().amax(1).float() / 127
    rows = max(1, _CHUNK // max(1, w.shape[1]))
    for i in range(0, out_f, rows):
        s = scale[i : i + rows]
        s = torch.where(s > 0, s, torch.ones_like(s))
        q[i : i + rows] = torch.round(w[i : i + rows].float() / s[:, None]).clamp_(-127, 127).to(torch.int8)
    return {"q": q, "scale": scale}


def int8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[out, in] in ``dtype`` from int8 ``q`` [out, in] and fp32 ``scale`` [out]."""
    return (q.float().mul_(scale[:, None])).to(dtype)
