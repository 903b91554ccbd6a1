"""Independent references for the core tests: dense weights, error bounds, op counters.

Nothing here calls lorafit's math: a reference built from the library's own ``delta_weight``
or ``_delta`` would agree with a wrong implementation. References are computed in float64
from the very values the layer stores; the allowed error is a forward error bound (Higham,
"Accuracy and Stability of Numerical Algorithms", sec. 3.1)::

    |got - ref| <= (ROUNDINGS + n) * u * absref

where ``u`` is the unit roundoff of the compute dtype, ``n`` the longest chain of additions
(an inner product's length plus the total rank) and ``absref`` the same computation on
absolute values. It is derived, not tuned: it holds for any summation order, so it does not
depend on the CPU, and it is orders of magnitude below what a wrong scaling, a dropped
padding mode or a missing adapter does to the output (tests check that too).
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

ROUNDINGS = 8  # casts of A, B*s, xA, base output, sum, bias, merged weight, DoRA factor


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def grouped_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, groups: int, weight_shape) -> torch.Tensor:
    """Conv update in the weight's layout, group by group: ``s * B_j @ A_j`` (float64).

    Args:
        a: A [r, in / groups, *k]; b: B [out, r / groups, 1...]; weight_shape: [out, in / groups, *k].
    """
    out, r = weight_shape[0], a.shape[0]
    rg, og = r // groups, out // groups
    parts = []
    for j in range(groups):
        aj = a[j * rg:(j + 1) * rg].double().reshape(rg, -1)
        bj = b[j * og:(j + 1) * og].double().reshape(og, rg)
        parts.append((bj @ aj).reshape(og, *weight_shape[1:]))
    return torch.cat(parts) * scaling


def dora_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's effective weight ``m (W + dW) / ||W + dW||`` (norm per output row), float64."""
    v = weight.double() + delta.double()
    norm = v.flatten(1).norm(dim=1)
    return v * (magnitude.double().reshape(-1) / norm).view(-1, *([1] * (v.dim() - 1)))


def conv_with(conv: nn.Module, weight: torch.Tensor, x: torch.Tensor, bias=True) -> torch.Tensor:
    """The base conv (torch's own forward: padding_mode, stride, dilation, groups) with another
    weight, in float64."""
    ref = copy.deepcopy(conv).double()
    b = ref.bias if (bias and ref.bias is not None) else None
    return ref._conv_forward(x.double(), weight.double(), b)


def abs_conv(conv: nn.Module, abs_weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``absref`` of a conv: the same conv on |x|, |W| and |b|."""
    ref = copy.deepcopy(conv).double()
    b = None if ref.bias is None else ref.bias.abs()
    return ref._conv_forward(x.double().abs(), abs_weight.double(), b)


def assert_within(got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """Elementwise |got - ref| <= bound (all float64), with the worst offender in the message."""
    err = (got.double() - ref).abs()
    excess = err - bound
    if (excess > 0).any():
        i = int(excess.flatten().argmax())
        raise AssertionError(f"{what}: |got - ref| = {err.flatten()[i]:.3g} > bound {bound.flatten()[i]:.3g} "
                             f"at flat index {i} (ref {ref.flatten()[i]:.4g}); max error {err.max():.3g}")


class OpCounter(TorchDispatchMode):
    """Counts aten ops (below autograd, so custom Functions' forward and backward are seen).

    ``calls`` maps the op's overload packet name (e.g. "mm", "addmm_", "convolution") to a count;
    ``shapes`` keeps each counted call's output shape, in order.
    """

    def __init__(self, names):
        super().__init__()
        self.names = set(names)
        self.calls: Counter = Counter()
        self.shapes: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in self.names:
            self.calls[name] += 1
            if isinstance(out, torch.Tensor):
                self.shapes.append((name, tuple(out.shape)))
        return out


GEMMS = ("mm", "addmm", "addmm_", "bmm", "baddbmm", "matmul")


def one_thread():
    """Generator for a fixture: tiny convs gain nothing from a second thread, and on a shared
    2-core machine spin-waiting OpenMP threads make them ~5x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
