"""Shared by the conftests of the application tests (train, jobs, tasks, cli)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from a second thread, and the CPUs are shared: spin-waiting
    OpenMP threads on an oversubscribed machine make every step many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
