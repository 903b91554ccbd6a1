"""Fixtures for the quantization tests."""

import pytest
import torch
from tests.quant.quant_models import make_llama


@pytest.fixture
def llama():
    return make_llama()


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (2, 12), generator=g)
