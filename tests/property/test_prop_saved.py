"""What autograd keeps for a LoRA linear layer: x itself (no copy, no upcast) and x A^T, nothing else.

README "Fast by design": one custom op per layer saves only x and ``x @ A^T`` [T, R]; several
active adapters are one concatenated GEMM pair, so R is their total rank and there is ONE such
tensor, not one per adapter. Counted as a list (not a set of shapes), with dtypes and storage,
so a duplicate of x, an fp32 copy of a bf16 x or a per-adapter loop all fail.
"""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tests.property.prop_helpers import PROP_EACH, add_adapters, dtype_id
from tests.property.test_prop_linear import BASES, linear_cases, weight_of


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_id)
@pytest.mark.parametrize("path", list(BASES))
@PROP_EACH
@given(data=st.data(), n=st.integers(2, 4), length=st.integers(13, 16))
def test_saved_for_backward_is_x_and_xa_only(dtype, path, data, n, length):
    base, _, specs, active, dtype, gen = data.draw(linear_cases(dtypes=(dtype,), path=path, allow_dropout=False))
    model = copy.deepcopy(base)
    add_adapters(model, specs, active, gen)
    model.train()  # dropout is 0: training mode must not add a copy either
    in_f = weight_of(base.layer).shape[1]
    # T = n * length >= 26 rows: larger than any weight dimension here (<= 24), so an
    # activation-sized tensor is told from a weight-sized one by its leading size alone
    x = torch.randn(n, length, in_f, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
    rows = n * length
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)  # only the layer: what the loss saves is not its business
    acts = [t for t in saved if t.dim() >= 2 and (t.shape[0] == rows or tuple(t.shape[:2]) == (n, length))]
    rank = sum(specs[i]["r"] for i in active)
    desc = [(tuple(t.shape), t.dtype) for t in acts]
    assert len(acts) == 2, f"saved activations {desc}: want exactly x and x A^T"
    xs = [t for t in acts if t.data_ptr() == x.data_ptr()]
    assert len(xs) == 1 and xs[0].dtype == dtype and tuple(xs[0].shape) == tuple(x.shape), desc
    (xa,) = [t for t in acts if t is not xs[0]]
    assert tuple(xa.shape) == (rows, rank) and xa.dtype == dtype, desc
