"""The Triton NF4 decode kernel against the PyTorch path.

On a CUDA machine with triton the kernel runs for real. Without a GPU, if triton is
installed, the same kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, in a
subprocess because the flag is read when the kernel is defined): that checks its arithmetic,
not its compilation or speed. Without triton the test skips.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

CHECK = textwrap.dedent(
    """
    import sys, torch
    from lorafit.quant import formats
    from lorafit.quant.triton_nf4 import nf4_dequantize_triton
    dev = sys.argv[1]
    torch.manual_seed(0)
    for shape, block, dq in [((48, 256), 64, False), ((48, 256), 64, True), ((3, 2100), 30, True),
                             ((130, 512), 128, False), ((600, 512), 64, True)]:
        w = torch.randn(shape, device=dev) * 0.1
        s = formats.nf4_quantize(w, block, dq)
        ref = formats.nf4_dequantize(s["packed"], formats.nf4_scales(s), shape, torch.float32)
        for dtype in (torch.float32, torch.bfloat16):
            out = nf4_dequantize_triton(s, shape, dtype, block)
            assert out.dtype == dtype and out.shape == shape, (out.dtype, out.shape)
            if dtype == torch.float32 or dev == "cuda":  # the GPU rounds to nearest even, as torch
                torch.testing.assert_close(out.float(), ref.to(dtype).float(), rtol=0, atol=1e-6)
            else:  # the CPU interpreter truncates fp32 -> bf16: allow one bf16 step
                torch.testing.assert_close(out.float(), ref, rtol=2 ** -7, atol=1e-6)
    print("ok")
    """
)


def test_triton_kernel_matches_torch_path():
    if torch.cuda.is_available():
        dev, env = "cuda", dict(os.environ)
    else:
        dev, env = "cpu", {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run(
        [sys.executable, "-c", CHECK, dev], check=False, env=env, capture_output=True, text=True, timeout=300
    )
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
