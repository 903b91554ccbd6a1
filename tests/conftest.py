import copy
import os
from pathlib import Path

import pytest
import torch

from tests.train.train_helpers import CHAT_TEMPLATE, make_tiny_bert, make_tiny_causal, sentiment_rows, write_csv

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def clone(model):
    return copy.deepcopy(model)


# tiny transformers models and data files for the application tests (train, jobs, tasks, cli);
# session-scoped and built only when a test asks for them
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
