"""Data formats (issue 13 point 5): .json, .parquet, .arrow and hf:NAME[:SPLIT] into the same Table,
errors that name the file and line (row), and a job trained from parquet."""

from __future__ import annotations

import json

import pytest

from tests.train.train_helpers import sentiment_rows

from lorafit.cli import main
from lorafit.common.errors import LorafitError
from lorafit.train.data import read_table

datasets = pytest.importorskip("datasets")

FEATURES = {"text": "string", "label": ["neg", "pos"], "score": "int64"}


def dataset(rows):
    """A datasets.Dataset with a ClassLabel column, as Hub datasets have."""
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"]),
                                  "score": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"text": [r[0] for r in rows], "label": [r[1] for r in rows],
                                       "score": [r[2] for r in rows]}, features=features)


ROWS = [("fine, really", 1, 7), ("NA", 0, -2), ("007", -1, 0)]  # -1: an unlabeled row


def test_parquet_and_arrow_give_the_rows_with_label_names(tmp_path):
    ds = dataset(ROWS)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for path in (tmp_path / "d.parquet", tmp_path / "saved" / "data-00000-of-00001.arrow"):
        table = read_table(path)
        assert table.columns == ["text", "label", "score"]
        assert table.rows == [(1, {"text": "fine, really", "label": "pos", "score": 7}),
                              (2, {"text": "NA", "label": "neg", "score": -2}),
                              (3, {"text": "007", "label": None, "score": 0})], path
        with pytest.raises(LorafitError, match=rf"{path.name} line 3: missing value in column 'label'"):
            table.require("text", "label")
    assert not list(tmp_path.glob("**/cache-*.arrow"))  # datasets' cache went to a temporary directory


def test_text_formats_keep_values_as_written(tmp_path):
    """csv stays ours: pandas (datasets' csv) would read NA as missing and 007 as 7."""
    (tmp_path / "d.csv").write_text("text,label\nNA,007\n", encoding="utf-8")
    assert read_table(tmp_path / "d.csv").rows == [(2, {"text": "NA", "label": "007"})]


def test_json_array_and_json_lines_with_lines(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('[\n  {"text": "a", "label": 1},\n\n  {"text": "b",\n   "label": "x", "extra": [1, 2]}\n]\n',
                 encoding="utf-8")
    table = read_table(p)
    assert table.columns == ["text", "label", "extra"]
    assert table.rows == [(2, {"text": "a", "label": 1}), (4, {"text": "b", "label": "x", "extra": [1, 2]})]
    p.write_text('{"text": "a"}\n\n{"text": "b"}\n', encoding="utf-8")  # JSON Lines named .json
    assert [line for line, _ in read_table(p).rows] == [1, 3]
    p.write_text("[]", encoding="utf-8")
    assert read_table(p).rows == []


@pytest.mark.parametrize("content, expect", [
    ('[\n {"text": "a"},\n {"text": }\n]', "bad.json line 3: invalid JSON (Expecting value)"),
    ('[\n {"text": "a"},\n 5\n]', "bad.json line 3: expected an array of JSON objects"),
    ('[{"text": "a"}] x', "bad.json line 1: invalid JSON (Extra data)"),
])
def test_json_errors_name_the_line(tmp_path, content, expect):
    p = tmp_path / "bad.json"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(LorafitError) as info:
        read_table(p)
    assert str(info.value) == f"{tmp_path}/{expect}"


def test_bad_binary_files_are_one_line(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not a parquet file at all")
    with pytest.raises(LorafitError, match=r"bad\.parquet: cannot read as parquet \(") as info:
        read_table(tmp_path / "bad.parquet")
    assert "\n" not in str(info.value)
    with pytest.raises(LorafitError, match=r"nope\.arrow: no such file"):
        read_table(tmp_path / "nope.arrow")
    with pytest.raises(LorafitError, match=r"unsupported format '\.xlsx' \(use .*\.parquet or \.arrow, or hf:"):
        read_table(tmp_path / "x.xlsx")


def test_hub_dataset_name_and_split(monkeypatch):
    calls = []

    def load_dataset(name, split=None, **kw):
        calls.append((name, split))
        return dataset(ROWS[:2])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    table = read_table("hf:someone/reviews:validation")
    assert calls == [("someone/reviews", "validation")]
    assert str(table.path) == "hf:someone/reviews:validation"
    assert table.rows[0] == (1, {"text": "fine, really", "label": "pos", "score": 7})
    read_table("hf:someone/reviews")
    assert calls[-1] == ("someone/reviews", "train")
    with pytest.raises(LorafitError, match="hf:: give a dataset name"):
        read_table("hf:")


def test_hub_dataset_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def load_dataset(name, split=None, **kw):  # what datasets raises offline without a cached copy
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(LorafitError) as info:
        read_table("hf:someone/not-cached")
    assert str(info.value) == ("hf:someone/not-cached: HF_HUB_OFFLINE is set and the dataset is not in the local "
                               "cache (unset HF_HUB_OFFLINE to download it, or give a local file)")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(LorafitError) as info:
        read_table("hf:someone/not-cached")
    assert str(info.value) == ("hf:someone/not-cached: cannot load the Hub dataset (ConnectionError: Couldn't reach "
                               "'someone/not-cached' on the Hub (LocalEntryNotFoundError))")


def test_real_datasets_offline_without_cache_is_one_line(tmp_path, monkeypatch):
    """The real datasets library (HF_HUB_OFFLINE=1 from conftest, an empty cache): no traceback."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(LorafitError, match=r"^hf:lorafit-tests/no-such-dataset: "):
        read_table("hf:lorafit-tests/no-such-dataset")


def test_training_job_reads_parquet_and_a_hub_split(tiny_bert, tmp_path, capsys, monkeypatch):
    """The whole job on the datasets formats: --train a parquet file, --eval hf:NAME:SPLIT (a stand-in
    for the Hub: load_dataset returns a real Dataset, as the Hub would), TensorBoard on."""
    train = [(text, 1 if label == "pos" else 0, 0) for text, label in sentiment_rows(48, seed=1)]
    dataset(train).to_parquet(str(tmp_path / "train.parquet"))
    hub = {("someone/reviews", "test"): dataset([(t, 1 if lab == "pos" else 0, 0) for t, lab in sentiment_rows(16, 2)])}
    real = datasets.load_dataset  # the parquet file goes through the real loader

    def load_dataset(name, split=None, **kw):
        return hub[(name, split)] if "/" in name else real(name, split=split, **kw)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    run = tmp_path / "run"
    code = main(["train", "--model", str(tiny_bert), "--train", str(tmp_path / "train.parquet"),
                 "--eval", "hf:someone/reviews:test", "--epochs", "1", "--batch-size", "16",
                 "--out", str(run), "--report-to", "tensorboard"])
    assert code == 0, capsys.readouterr().err
    assert "neg" in (run / "adapter" / "labels.json").read_text()  # ClassLabel names, not 0 / 1
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["eval_accuracy"] <= 1
    from tests.train.test_tracking import read_events

    events = read_events(run)
    assert [v for _, v in events["eval/accuracy"]][-1] == pytest.approx(metrics["eval_accuracy"], abs=1e-6)
    assert events["train/loss"] and events["train/learning_rate"]
