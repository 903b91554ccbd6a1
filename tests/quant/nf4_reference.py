"""An NF4 / int8 reference written from the papers, sharing no code with lorafit.quant.

A test that decodes with the layer's own ``dequantize()`` agrees with a wrong encoder, a wrong
table or a wrong packing. These functions are deliberately naive (loops over blocks, a
nearest-level search by distance instead of bucketize on midpoints) so they are easy to read
against the QLoRA paper (Dettmers et al., 2023, sec. 3 and appendix E / bitsandbytes'
``create_normal_map``):

* the 16 NF4 levels: 8 positive quantiles of N(0, 1) at probabilities linspace(0.9677083, 0.5, 9)
  (the last, 0.5, dropped), 7 negative ones at linspace(0.9677083, 0.5, 8), and an exact zero,
  normalised so the largest is 1;
* a weight is flattened row-major and cut into blocks; each block stores absmax and, per value,
  the index of the nearest level to value / absmax; two indices per byte, the first value in the
  high nibble.

Used by tests/quant/test_quant_layers.py and, in a subprocess, by test_quant_triton.py.
"""

from __future__ import annotations

import torch

# QLoRA's NF4 table (bitsandbytes' values, fp32 as they ship them), ascending
NF4_TABLE = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip
OFFSET = 0.9677083  # the paper's offset: the outermost quantile, chosen so the 16 levels use [-1, 1]


def nf4_levels_from_normal_quantiles() -> torch.Tensor:
    """The 16 levels computed from N(0, 1) quantiles as in the paper, float64 [16]."""
    pos = torch.special.ndtri(torch.linspace(OFFSET, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(OFFSET, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    return v / v.max()


def nf4_quantize_ref(weight: torch.Tensor, block: int, scales: torch.Tensor | None = None):
    """(codes uint8 [numel] in 0..15, absmax fp32 [n_blocks], ambiguous bool [numel]).

    ``scales`` [n_blocks]: encode against these (double quantization's effective scales, which
    are >= absmax) instead of each block's absmax.

    ``ambiguous`` marks values within 1e-6 (relative) of the midpoint between two levels, where
    another correct encoder may round the other way; everywhere else the code is unique.
    """
    table = torch.tensor(NF4_TABLE, dtype=torch.float64)
    flat = weight.detach().double().reshape(-1, block)
    absmax = flat.abs().amax(1)
    s = absmax if scales is None else scales.double()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    norm = flat / safe[:, None]
    dist = (norm[..., None] - table).abs()  # [n_blocks, block, 16]
    two = dist.topk(2, dim=-1, largest=False)
    codes = two.indices[..., 0]
    ambiguous = (two.values[..., 1] - two.values[..., 0]) < 1e-6
    return codes.to(torch.uint8).reshape(-1), absmax.float(), ambiguous.reshape(-1)


def nf4_pack_ref(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [numel // 2]: code 2i in the high nibble, code 2i+1 in the low one."""
    out = torch.empty(codes.numel() // 2, dtype=torch.uint8)
    for i in range(out.numel()):
        out[i] = (int(codes[2 * i]) << 4) | int(codes[2 * i + 1])
    return out


def nf4_unpack_ref(packed: torch.Tensor) -> torch.Tensor:
    """uint8 codes [2 * len(packed)] from the packed bytes (high nibble first)."""
    p = packed.to(torch.int64)
    return torch.stack([p >> 4, p & 15], dim=1).reshape(-1)


def nf4_dequantize_ref(codes: torch.Tensor, scales: torch.Tensor, shape) -> torch.Tensor:
    """float32 weight of ``shape``: level[code] * scale of the code's block (float32 product)."""
    table = torch.tensor(NF4_TABLE, dtype=torch.float32)
    block = codes.numel() // scales.numel()
    vals = table[codes.to(torch.int64)].reshape(-1, block)
    return (vals * scales.float()[:, None]).reshape(shape)


def double_quant_scales_ref(q: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, group: int = 256):
    """Effective block scales under double quantization: lo[g] + q * step[g] for groups of 256."""
    out = torch.empty(q.numel(), dtype=torch.float32)
    for i in range(q.numel()):
        out[i] = lo[i // group] + float(q[i]) * step[i // group]
    return out


def int8_dequantize_ref(weight: torch.Tensor) -> torch.Tensor:
    """Per-row symmetric int8 (scale = absmax / 127, round to nearest), decoded, float32."""
    w = weight.detach().float()
    scale = w.abs().amax(1) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(w / safe[:, None]).clamp(-127, 127) * scale[:, None]
