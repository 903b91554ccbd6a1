"""Shared pieces of the property tests: settings, strategies, dense references, error bounds.

Tolerances are derived, not tuned: every comparison is against a float64 reference computed
from the very same stored values, and the allowed error per element is a classic forward
error bound (Higham, "Accuracy and Stability of Numerical Algorithms", sec. 3.1)::

    |got - ref| <= (ROUNDINGS * u(dtype) + n * u(accum)) * absref

* ``absref`` is the same computation on absolute values (|x| @ |W|^T + s |x| @ |A|^T @ |B|^T + |b|),
  the quantity that every rounding error is proportional to;
* ``n`` is the longest chain of additions (the inner-product length: fan_in + total rank),
  each accumulated in ``accum`` (fp32 for bf16: the CPU GEMMs and convs accumulate in fp32);
* ``ROUNDINGS`` counts the roundings to the compute dtype along the chain (cast of A, of B*s,
  of x A^T, of the base output, of the sum, of the bias, of a merged weight, of a DoRA factor;
  8 counts each once, plus one to spare).

Every test also checks that the LoRA term is well above that bound (``assert_sensitive``), so
a bound wide enough to hide a wrong scaling or a dropped adapter cannot pass silently.
"""

from __future__ import annotations

import copy
import math
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st

import lorafit
from tests.helpers import Wrap  # noqa: F401 - the property tests import it from here

# derandomize: CI runs the same examples every time; database=None: nothing is written to disk
PROP = settings(max_examples=25, deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
# PEFT round trips build a PeftModel per example (~0.3 s each): fewer examples there
PROP_PEFT = settings(PROP, max_examples=15)
# for tests parametrized over dtype / code path: hypothesis's first examples favour the first
# value of a sampled_from, so a dtype drawn at random could get one example in 25; parametrizing
# gives every dtype and path its own examples
PROP_EACH = settings(PROP, max_examples=12)
ROUNDINGS = 8
DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
SCALES = (0.5, 2.0, 3.0)  # s != 1 (and s*s != s): a dropped or squared scaling changes the output


def unit(dtype: torch.dtype) -> float:
    """Unit roundoff u = eps / 2 (round to nearest)."""
    return torch.finfo(dtype).eps / 2


def accum(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are accumulated in: fp32 for half types (CPU GEMM/conv kernels), else itself."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def bound(absref: torch.Tensor, dtype: torch.dtype, n: int, roundings: int = ROUNDINGS) -> torch.Tensor:
    """Per-element forward error bound for a result of magnitude ``absref`` (see module docstring)."""
    u, ua = unit(dtype), unit(accum(dtype))
    return (roundings * u + n * ua / (1 - n * ua)) * absref + torch.finfo(torch.float64).tiny


def assert_within(got: torch.Tensor, ref: torch.Tensor, allowed: torch.Tensor, what: str) -> None:
    """Every element of ``got`` lies within ``allowed`` of the float64 ``ref``."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = (got.double() - ref).abs()
    excess = err - allowed
    i = int(excess.argmax())
    assert bool((excess <= 0).all()), (f"{what}: error {err.flatten()[i].item():.3g} exceeds the derived bound "
                                       f"{allowed.flatten()[i].item():.3g} at flat index {i} "
                                       f"(got {got.flatten()[i].item():.6g}, want {ref.flatten()[i].item():.6g})")


def assert_sensitive(ref: torch.Tensor, base_ref: torch.Tensor, allowed: torch.Tensor, what: str) -> None:
    """Skip (hypothesis ``assume``) an example whose adapter term is too small for the bound to see.

    The smallest error that must be visible is half the LoRA term (s in SCALES: a dropped or
    squared scaling changes the term by >= 50%), so the term must exceed 4x the bound. Only a
    few unlucky draws are skipped; if the reference itself lost the term, every example would
    be, and hypothesis fails the test as unsatisfiable.
    """
    signal = (ref - base_ref).abs().max().item()
    assume(signal > 4 * allowed.max().item())


@st.composite
def adapter_specs(draw, groups: int = 1, max_adapters: int = 3, max_rank: int = 4, allow_dropout: bool = True):
    """(specs, active indices): 1-3 adapters with own r / alpha / rsLoRA / dropout; non-empty active set.

    alpha is chosen so that the scaling s is exactly one of SCALES: s = alpha / r, or
    alpha / sqrt(r) with rsLoRA - the reference recomputes s from (alpha, r, rslora) itself.
    """
    n = draw(st.integers(1, max_adapters))
    specs = []
    for _ in range(n):
        r = groups * draw(st.integers(1, max_rank))
        rslora = draw(st.booleans())
        s = draw(st.sampled_from(SCALES))
        # a dropout > 0 takes the per-adapter path (a loop) instead of the concatenated one; in
        # eval mode no dropout is drawn, so the function is the same
        dropout = draw(st.sampled_from((0.0, 0.0, 0.1))) if allow_dropout else 0.0
        specs.append({"r": r, "alpha": s * (math.sqrt(r) if rslora else r), "use_rslora": rslora,
                      "dropout": dropout})
    active = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    return specs, sorted(active)


def scaling_of(spec: dict) -> float:
    """Independent of lorafit's code: PEFT's definition of the scaling."""
    return spec["alpha"] / (math.sqrt(spec["r"]) if spec["use_rslora"] else spec["r"])


def reload_into_copy(model: nn.Module, base: nn.Module, names: list[str], active) -> nn.Module:
    """Save each adapter of ``model`` and load them all into a deep copy of ``base``.

    The copy gets the same active adapters (``names[i]`` for ``i`` in ``active``) and is returned
    in eval mode, ready to be compared with ``model`` output for output.
    """
    fresh = copy.deepcopy(base)
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # grouped convs: "PEFT cannot load" is expected here
        for name in names:
            lorafit.save_adapter(model, Path(d) / name, adapter=name)
        for name in names:
            lorafit.load_adapter(fresh, Path(d) / name, adapter=name)
    lorafit.set_adapter(fresh, [names[i] for i in active])
    return fresh.eval()


def add_adapters(model: nn.Module, specs, active, gen: torch.Generator, **extra) -> list[str]:
    """Inject adapters a0, a1, ... with random A and B of unit-order effect; activate ``active``.

    A ~ N(0, 1/fan_in) and B ~ N(0, 1/r) make each LoRA term as large as the base output, so
    an error in it is never hidden by the tolerance.
    """
    names = [f"a{i}" for i in range(len(specs))]
    for name, spec in zip(names, specs):
        lorafit.inject(model, lorafit.LoraConfig(target_modules=["layer"], init=False, **spec, **extra),
                       adapter=name)
        ad = model.layer.adapters[name]
        with torch.no_grad():
            fan_in = ad.lora_A[0].numel()
            ad.lora_A.copy_(torch.randn(ad.lora_A.shape, generator=gen, dtype=torch.float64) / math.sqrt(fan_in))
            ad.lora_B.copy_(torch.randn(ad.lora_B.shape, generator=gen, dtype=torch.float64)
                            / math.sqrt(ad.lora_B[0].numel()))
    lorafit.set_adapter(model, [names[i] for i in active])
    # new wrappers are built in training mode even inside an eval() model (PEFT does the same):
    # without this, adapter dropout would be drawn in these inference comparisons
    model.eval()
    return names


def randomize_(module: nn.Module, gen: torch.Generator) -> None:
    """Base weights N(0, 1/fan_in), bias N(0, 1): deterministic from ``gen``."""
    with torch.no_grad():
        for p in module.parameters():
            fan = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(fan))
