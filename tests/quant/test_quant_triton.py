"""The Triton NF4 decode kernel against the PyTorch path and the independent reference.

On a CUDA machine with triton the kernel runs for real. Without a GPU, if triton is
installed, the same kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, in a
subprocess because the flag is read when the kernel is defined): that checks its arithmetic,
not its compilation or speed. triton is in the dev extra (Linux), so CI runs it; without
triton the test skips.
"""

import os
import subprocess
import sys
import textwrap

from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

CHECK = textwrap.dedent(
    """
    import sys, torch
    from lorafit.quant import formats
    from lorafit.quant.triton_nf4 import nf4_dequantize_triton
    from tests.quant.nf4_reference import nf4_dequantize_ref, nf4_unpack_ref
    dev = sys.argv[1]
    torch.manual_seed(0)
    for shape, block, dq in CASES:
        # every block gets its own magnitude (1e-3 .. 1e3): a value decoded with a neighbour's scale,
        # or a nibble taken from the wrong half of a block, is off by far more than one bf16 step
        n_blocks = shape[0] * shape[1] // block
        mag = torch.exp(torch.randn(n_blocks) * 2.3).repeat_interleave(block).view(shape)
        w = (torch.randn(shape) * mag).to(dev)
        s = formats.nf4_quantize(w, block, dq)
        scales = formats.nf4_scales(s).cpu()
        ref = formats.nf4_dequantize(s["packed"], formats.nf4_scales(s), shape, torch.float32).cpu()
        indep = nf4_dequantize_ref(nf4_unpack_ref(s["packed"].cpu()), scales, shape)
        assert torch.equal(ref, indep), ("torch path vs reference", shape, block, dq)
        for dtype in (torch.float32, torch.bfloat16):
            out = nf4_dequantize_triton(s, shape, dtype, block)
            assert out.dtype == dtype and out.shape == shape, (out.dtype, out.shape)
            out = out.float().cpu()
            if dtype == torch.float32 or dev == "cuda":  # the GPU rounds to nearest even, as torch
                want = indep.to(dtype).float()
                bad = out != want
            else:  # the CPU interpreter truncates fp32 -> bf16: allow one bf16 step (2^-7 relative)
                bad = (out - indep).abs() > 2 ** -7 * indep.abs()
            if bad.any():
                i = int(bad.flatten().nonzero()[0])
                raise AssertionError(f"{shape} block {block} dq {dq} {dtype}: value {i} (block {i // block}, "
                                     f"position {i % block}) is {out.flatten()[i]:.6g}, want {indep.flatten()[i]:.6g}")
    print("ok")
    """
)
# (shape, block_size, double_quant). The kernel handles 1024 packed bytes (2048 values) per
# program and finds a value's block as byte_offset // (block / 2): cover odd half-blocks (block
# 6, 18, 30), odd block counts, blocks straddling program boundaries, a partial last program,
# a single block, several double-quant groups of 256 scales with a partial last group.
CASES = [
    ((48, 256), 64, False),  # 192 blocks, 6 full programs
    ((48, 256), 64, True),
    ((5, 54), 18, False),  # 15 blocks (odd), half-block 9 (odd)
    ((7, 66), 6, True),  # 77 blocks, half-block 3, one program
    ((3, 2100), 30, True),  # 210 blocks straddling programs (2048 / 30 is not whole)
    ((1, 2), 2, False),  # one block of two values: one byte
    ((130, 512), 128, False),  # 520 blocks, partial last program
    ((61, 150), 6, True),  # 1525 blocks (odd): 6 double-quant groups, the last one partial
    ((600, 512), 64, True),  # 4800 blocks: 19 groups
]


def test_triton_kernel_matches_torch_path():
    if torch.cuda.is_available():
        dev, env = "cuda", dict(os.environ)
    else:
        dev, env = "cpu", {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), *sys.path])  # tests.quant
    code = f"CASES = {CASES!r}\n" + CHECK
    r = subprocess.run([sys.executable, "-c", code, dev], check=False, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_layer_uses_triton_on_cuda_and_matches():
    from lorafit.quant import NF4Linear, nf4_backend

    lin = torch.nn.Linear(256, 128).cuda().to(torch.bfloat16)
    q = NF4Linear.from_linear(lin, double_quant=True)
    assert nf4_backend(q.weight_packed.device) == "triton"
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = q(x)
    os.environ["LORAFIT_QUANT_BACKEND"] = "torch"
    try:
        ref = torch.nn.functional.linear(x, q.dequantize(), q.bias)
    finally:
        del os.environ["LORAFIT_QUANT_BACKEND"]
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    assert x.grad is not None
