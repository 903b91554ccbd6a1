"""Properties of multi-adapter management: mixed-adapter batches, set_adapter and delete_adapter.

``adapter_batch(model, names)``: row i of the output equals the float64 dense reference with
only adapter names[i] (None: the base), for Linear, conv (every argument) and Embedding layers,
whatever the mix of ranks, scalings and conv groups, with or without ``share_weights`` (which
must leave every adapter's values as they were). After ``delete_adapter`` and
``set_adapter`` the forward equals the reference for the adapters left active.
"""

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st
from tests.property.prop_helpers import (
    DTYPES, PROP_EACH, Wrap, add_adapters, adapter_specs, assert_sensitive, assert_within, bound, dtype_id,
    randomize_, scaling_of,
)
from tests.property.test_prop_conv import conv_cases, conv_reference
from tests.property.test_prop_linear import linear_cases, linear_reference, weight_of

import lorafit

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


def embedding_case(data, dtype):
    vocab, dim = data.draw(st.integers(2, 30)), data.draw(st.integers(1, 16))
    specs, active = data.draw(adapter_specs())
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    base = Wrap(nn.Embedding(vocab, dim))
    randomize_(base, gen)
    base = base.to(dtype).eval()
    ids = torch.randint(0, vocab, (data.draw(st.integers(1, 4)), 5), generator=gen)
    return base, ids, specs, active, dtype, gen


def embedding_reference(layer, terms, ids):
    w = layer.weight.double()
    table = w + sum((s * (b.double() @ a.double()).t() for a, b, s in terms), torch.zeros_like(w))
    abst = w.abs() + sum((s * (b.double().abs() @ a.double().abs()).t() for a, b, s in terms), torch.zeros_like(w))
    return table[ids], abst[ids], w[ids]


def reference(kind, layer, terms, x):
    """(ref, |.| ref, base ref) of one row (batch of 1) for the layer kind."""
    if kind == "linear":
        return linear_reference(layer, terms, x)
    if kind == "conv":
        return conv_reference(layer, terms, x)
    return embedding_reference(layer, terms, x)


def draw_case(kind, dtype, data):
    if kind == "linear":
        return data.draw(linear_cases(dtypes=(dtype,)))
    if kind == "conv":
        return data.draw(conv_cases(dtypes=(dtype,)))
    return embedding_case(data, dtype)


def inner(kind, layer, ranks) -> int:
    """Longest sum per output: fan-in (per group) plus the largest rank (stacks are zero-padded)."""
    if kind == "embedding":
        return max(ranks, default=0) + 1
    return weight_of(layer)[0].numel() + max(ranks, default=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kind", ["linear", "conv", "embedding"])
@PROP_EACH
@given(data=st.data())
def test_adapter_batch_rows_match_dense(dtype, kind, data):
    base, x, specs, active, dtype, gen = draw_case(kind, dtype, data)
    model = copy.deepcopy(base)
    names = add_adapters(model, specs, active, gen)
    rows = [data.draw(st.sampled_from(names + [None])) for _ in range(x.shape[0])]
    share = data.draw(st.booleans())  # the stacks become the adapters' storage: same rows, same values
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), lorafit.adapter_batch(model, rows, share_weights=share):
        got = model(x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    ads = model.layer.adapters
    refs, allowed = [], []
    for i, name in enumerate(rows):
        terms = [] if name is None else [(ads[name].lora_A, ads[name].lora_B, scaling_of(specs[names.index(name)]))]
        ref, absref, _ = reference(kind, base.layer, terms, x[i:i + 1])
        refs.append(ref)
        rank = [] if name is None else [specs[names.index(name)]["r"] // getattr(base.layer, "groups", 1)]
        allowed.append(bound(absref, dtype, inner(kind, base.layer, rank)))
    ref, allowed = torch.cat(refs), torch.cat(allowed)
    base_ref = reference(kind, base.layer, [], x)[0]
    if any(r is not None for r in rows):
        assert_sensitive(ref, base_ref, allowed, f"adapter_batch {kind}")
    assert_within(got, ref, allowed, f"adapter_batch {kind} {dtype} rows={rows}")


@pytest.mark.parametrize("kind", ["linear", "conv"])
@PROP_EACH
@given(data=st.data())
def test_delete_and_set_adapter_leave_the_right_function(kind, data):
    base, x, specs, active, dtype, gen = draw_case(kind, torch.float32, data)
    model = copy.deepcopy(base)
    names = add_adapters(model, specs, active, gen)
    gone = data.draw(st.sampled_from(names))
    lorafit.delete_adapter(model, gone)
    left = [n for n in names if n != gone]
    assert lorafit.adapter_names(model) == left
    live = lorafit.active_adapters(model)
    assert set(live) <= set(left) and (live or not left)  # never silently the bare base
    if left:
        chosen = data.draw(st.lists(st.sampled_from(left), min_size=1, unique=True))
        lorafit.set_adapter(model, chosen)
        live = chosen
    ads = model.layer.adapters if left else {}
    terms = [(ads[n].lora_A, ads[n].lora_B, scaling_of(specs[names.index(n)])) for n in live]
    ref, absref, _ = reference(kind, base.layer, terms, x)
    ranks = sum(specs[names.index(n)]["r"] for n in live) // getattr(base.layer, "groups", 1)
    allowed = bound(absref, dtype, weight_of(base.layer)[0].numel() + ranks)
    with torch.no_grad():
        assert_within(model(x), ref, allowed, f"{kind} after deleting {gone}, active {live}")
