"""Fixtures for the training tests (session-scoped tiny models; see helpers.py)."""

from __future__ import annotations

import pytest

from train_helpers import CHAT_TEMPLATE, make_tiny_bert, make_tiny_causal, sentiment_rows, write_csv


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return make_tiny_causal(tmp_path_factory.mktemp("tiny-llama"), "llama", chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    return make_tiny_causal(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture(scope="session")
def cls_data(tmp_path_factory):
    """(train.csv with 96 rows, eval.csv with 32 rows), labels pos/neg."""
    d = tmp_path_factory.mktemp("cls-data")
    return write_csv(d / "train.csv", sentiment_rows(96, seed=1)), write_csv(
        d / "eval.csv", sentiment_rows(32, seed=2)
    )


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from a second thread, and the CPUs are shared: spin-waiting
    OpenMP threads on an oversubscribed machine make every step many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
