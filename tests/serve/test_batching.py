"""`lorafit.adapter_batch(..., slots=)`: the stacking order a server keeps fixed across batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import lorafit
from lorafit.tree import lora_layers
from tests.serve.helpers import randomize


def model_with_adapters():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    for i, name in enumerate("abc"):
        lorafit.inject(model, lorafit.LoraConfig(r=2 + i, target_modules=["0", "2"]), adapter=name)
    randomize(model, 0, std=0.5)
    return model


def stacks(model):
    return [next(iter(layer.stack_cache.values()))[2] for _, layer in lora_layers(model)]


def test_slots_give_the_same_rows_and_keep_the_stacks_across_mixes():
    model = model_with_adapters()
    x = torch.randn(3, 8)
    with torch.no_grad():
        with lorafit.adapter_batch(model, ["a", None, "c"]):
            plain = model(x)
        with lorafit.adapter_batch(model, ["a", None, "c"], slots=("c", "b", "a")):
            slotted = model(x)
        torch.testing.assert_close(slotted, plain)
        first = stacks(model)
        with lorafit.adapter_batch(model, ["b", "b", None], slots=("c", "b", "a")):  # another mix, same slots
            mixed = model(x)
        assert all(s is f for s, f in zip(stacks(model), first))  # not stacked again
        for i, name in enumerate(["b", "b", None]):
            with lorafit.adapter_batch(model, [name]):
                torch.testing.assert_close(mixed[i:i + 1], model(x[i:i + 1]))
        with lorafit.adapter_batch(model, ["b", "a", None]):  # without slots the mix decides the stacking
            model(x)
        assert all(s is not f for s, f in zip(stacks(model), first))


def test_slots_are_checked():
    model = model_with_adapters()
    with pytest.raises(ValueError, match="'c' is in names but not in slots"):
        with lorafit.adapter_batch(model, ["a", "c"], slots=("a", "b")):
            pass
    with pytest.raises(ValueError, match="unknown adapter 'z'"):
        with lorafit.adapter_batch(model, ["a"], slots=("a", "z")):
            pass
