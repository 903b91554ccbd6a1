"""Bad training input gives one line naming the culprit, before the model loads (issue 10, slice H2).

Each case used to train something wrong without a word, or to end in a traceback; the tests
check the message names the file / line / column / flag and the value, and that nothing ran.
"""

from __future__ import annotations

import json

import pytest

from lorafit.train.data import read_table, take_samples
from lorafit.common.errors import LorafitError
from lorafit.train.input_checks import position_limit
from lorafit.jobs.options import all_options, load_yaml, resolve, task_defaults
from lorafit.jobs.train import prepare
from lorafit.train.options import OPTIONS, coerce
from tests.train.train_helpers import write_csv, write_jsonl


def cls_task(tiny_bert, train, ev=None, **kw):
    from lorafit.tasks.text_classification import Task

    flags = {"model": str(tiny_bert), "train": str(train), **({"eval": str(ev)} if ev else {}), **kw}
    opts, _ = prepare({k: str(v) for k, v in flags.items()})
    return Task(opts)


# ---------------------------------------------------------------- labels
def test_one_label_is_refused(tiny_bert, tmp_path):
    one = write_csv(tmp_path / "one.csv", [(f"text {i}", "pos") for i in range(5)])
    with pytest.raises(LorafitError, match=r"^.*one\.csv: column 'label' has one label \('pos'\) in all 5 rows"):
        cls_task(tiny_bert, one).load_data()


def test_mixed_numeric_and_text_labels_name_both(tiny_bert, tmp_path):
    csv = write_csv(tmp_path / "m.csv", [("a", "1"), ("b", "0"), ("c", "pos")])
    with pytest.raises(
        LorafitError,
        match=r"m\.csv line 4: column 'label' mixes numeric labels \(1 on line 2\) and text labels \('pos' on line 4\)",
    ):
        cls_task(tiny_bert, csv).load_data()
    js = write_jsonl(tmp_path / "m.jsonl", [{"text": "a", "y": "neg"}, {"text": "b", "y": 3}])
    with pytest.raises(LorafitError, match=r"m\.jsonl line 2: column 'y' mixes numeric labels \(3 on line 2\)"):
        cls_task(tiny_bert, js, label_column="y").load_data()
    # one kind per column is fine, ints or strings ("1" and 1.0 are the int 1)
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"text": "a", "label": "1"}, {"text": "b", "label": 0.0}])
    task = cls_task(tiny_bert, ok)
    task.load_data()
    assert task.labels == [0, 1]


def _three_labels(tmp_path):
    """Rows of labels a and b (10 each) and one row of c; returns (file, n, seed) where the first n
    of the seeded shuffle hold a and b but not c."""
    rows = [(f"t{i}", "a" if i % 2 else "b") for i in range(20)] + [("rare", "c")]
    path = write_csv(tmp_path / "three.csv", rows)
    labels = [lab for _, lab in rows]
    for n in range(2, 20):
        kept = {labels[i] for i in take_samples(range(len(rows)), n, 0)}
        if kept == {"a", "b"}:
            return path, n
    raise AssertionError("no sample size drops c")  # pragma: no cover


def test_max_samples_dropping_a_label_is_named(tiny_bert, tmp_path):
    path, n = _three_labels(tmp_path)
    ev = write_csv(tmp_path / "ev.csv", [("x", "a"), ("y", "c")])
    with pytest.raises(
        LorafitError,
        match=rf"ev\.csv line 3: label 'c' .* never seen in training .*; --max-samples {n} kept none of "
        r"the 1 training rows with this label",
    ):
        cls_task(tiny_bert, path, ev, max_samples=n, seed=0).load_data()
    # a label absent from the whole file keeps the plain message (no --max-samples hint)
    ev2 = write_csv(tmp_path / "ev2.csv", [("y", "zzz")])
    with pytest.raises(LorafitError, match=r"never seen in training \(labels: a, b\)$"):
        cls_task(tiny_bert, path, ev2, max_samples=n, seed=0).load_data()


def test_max_samples_leaving_one_label_names_it(tiny_bert, tmp_path):
    rows = [(f"t{i}", "pos") for i in range(30)] + [("odd", "neg")]
    path = write_csv(tmp_path / "skew.csv", rows)
    n = next(n for n in range(1, 30) if 30 not in take_samples(range(31), n, 0))
    with pytest.raises(
        LorafitError,
        match=rf"skew\.csv: --max-samples {n} kept {n} rows, all with label 'pos' .* the file has 2 labels; .* --seed",
    ):
        cls_task(tiny_bert, path, max_samples=n, seed=0).load_data()


def test_max_samples_picks_the_same_rows_as_before(tiny_bert, tmp_path):
    """Sampling indices instead of rows must keep the subset (and so old runs) unchanged."""
    rows = [(f"text {i}", "pos" if i % 3 else "neg") for i in range(40)]
    path = write_csv(tmp_path / "d.csv", rows)
    task = cls_task(tiny_bert, path, max_samples=7, seed=3)
    train, _ = task.load_data()
    expect = [text for _, (text, _) in take_samples(list(enumerate(rows)), 7, 3)]
    got = [task.tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in train]
    assert got == expect


# ---------------------------------------------------------- data files
def test_tsv_saved_as_csv_and_the_reverse(tmp_path):
    tsv_as_csv = write_csv(tmp_path / "data.csv", [("good film", "pos")], delimiter="\t")
    expect = r"data\.csv: the header 'text\\tlabel' looks tab-separated; rename the file to data\.tsv"
    with pytest.raises(LorafitError, match=expect):
        read_table(tsv_as_csv)
    csv_as_tsv = write_csv(tmp_path / "data.tsv", [("good film", "pos")])
    with pytest.raises(LorafitError, match=r"looks comma-separated; rename the file to data\.csv"):
        read_table(csv_as_tsv)
    one_column = write_csv(tmp_path / "one.csv", [("a",)], header=("text",))
    assert read_table(one_column).columns == ["text"]


def test_yaml_error_lines_are_1_based_and_exist(tmp_path):
    bad = tmp_path / "bad.yaml"
    for text, line in [
        ("rank: 4\nlr: : 3\nepochs: 1\n", 2),  # mapping value in a plain scalar, on line 2
        ("rank: 4\n\tlr: 1\n", 2),  # a tab cannot start a token
        ("rank: [4\n", 1),  # unclosed: yaml's mark is the end of the stream (its line 1 = our line 2)
        ("epochs: 1\nrank: 'four\n", 2),  # unclosed quote: named where it opened, clamped to the last line
    ]:
        bad.write_text(text, encoding="utf-8")
        with pytest.raises(LorafitError, match=rf"^.*bad\.yaml line {line}: invalid YAML \(") as exc:
            load_yaml(bad, OPTIONS)
        assert "\n" not in str(exc.value)


# --------------------------------------------------------------- options
def test_dropout_must_be_below_1():
    by = {o.key: o for o in OPTIONS}
    for value in ("1", "1.5"):
        with pytest.raises(LorafitError, match=rf"^--dropout: must be < 1, got {float(value)!r}$"):
            coerce(by["dropout"], value, "--dropout")
    assert coerce(by["dropout"], "0.99", "--dropout") == 0.99
    import lorafit

    with pytest.raises(ValueError, match=r"0 <= dropout < 1, got 1\.5"):
        lorafit.LoraConfig(dropout=1.5)


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--lr", "-1e-3"], "--lr: must be > 0, got -0.001"),
        (["--lr", "-.5"], "--lr: must be > 0, got -0.5"),
        (["--alpha", "-2"], "--alpha: must be > 0, got -2.0"),
        (["--dropout", "-0.1"], "--dropout: must be >= 0, got -0.1"),
        (["--warmup", "-3"], "--warmup: must be >= 0, got -3.0"),
        (["--seed", "-1"], "--seed: must be >= 0, got -1"),
        (["--max-samples", "-5"], "--max-samples: must be >= 1, got -5"),
    ],
)
def test_negative_numbers_reach_the_range_check(args, expect, capsys):
    from lorafit.cli import main

    assert main(["train", *args]) == 2
    assert capsys.readouterr().err.strip() == f"lorafit: error: {expect}"


def test_adapter_options_with_full_finetune_are_refused(tmp_path):
    with pytest.raises(LorafitError, match=r"^--rank, --targets: adapter options cannot go with --full-finetune"):
        prepare({"full_finetune": True, "rank": "16", "targets": "query"})
    cfg = tmp_path / "job.yaml"
    cfg.write_text("full_finetune: true\nlr_b_ratio: 4\n", encoding="utf-8")
    with pytest.raises(LorafitError, match=rf"^--lr-b-ratio \(in {cfg}\): adapter option cannot go"):
        prepare({"config": str(cfg)})
    # alone, or resuming a full fine-tuning run whose config.yaml records every key, it is fine
    assert prepare({"full_finetune": True})[0]["full_finetune"] is True
    base = {"full_finetune": True, "rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": "all-linear"}
    assert resolve({"epochs": "2"}, all_options(), task_defaults, base=base)["epochs"] == 2


# ---------------------------------------------------- max length vs model
def _config(tmp_path, name, **cfg):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return d


def test_position_limit_from_config_json(tmp_path):
    assert position_limit(_config(tmp_path, "bert", model_type="bert", max_position_embeddings=512))[0] == 512
    assert position_limit(_config(tmp_path, "gpt2", model_type="gpt2", n_positions=1024))[0] == 1024
    # RoBERTa's positions start after pad_token_id: 514 rows, 512 usable
    rob = position_limit(_config(tmp_path, "rob", model_type="roberta", max_position_embeddings=514, pad_token_id=1))
    assert rob[0] == 512 and "pad_token_id 1" in rob[1]
    # rotary positions have no table: no hard limit
    assert position_limit(_config(tmp_path, "llama", model_type="llama", max_position_embeddings=256,
                                  rope_parameters={"rope_theta": 1e4})) is None
    assert position_limit(tmp_path / "nowhere") is None


def test_max_length_beyond_positions_is_refused_before_loading(tiny_bert, tiny_gpt2, tiny_llama, tmp_path):
    from lorafit.tasks.causal_lm import Task as LM
    from lorafit.tasks.text_classification import Task as Cls

    opts = resolve({"model": str(tiny_bert), "max_length": "129"}, all_options(), task_defaults)
    with pytest.raises(LorafitError, match=rf"^--max-length 129: model {tiny_bert} takes at most 128 tokens "
                                           r"\(config.json max_position_embeddings: 128\); give --max-length 128"):
        Cls(opts)
    opts["max_length"] = 128
    Cls(opts)
    lm = {"task": "causal-lm", "max_length": "257"}
    with pytest.raises(LorafitError, match=r"takes at most 256 tokens \(config.json n_positions: 256\)"):
        LM(resolve({**lm, "model": str(tiny_gpt2)}, all_options(), task_defaults))
    LM(resolve({**lm, "model": str(tiny_llama)}, all_options(), task_defaults))  # rotary: allowed


# --------------------------------------------------------------- causal-lm
def test_causal_lm_empty_text_and_no_targets(tiny_gpt2, tmp_path):
    from lorafit.tasks.causal_lm import Task

    def task(path, **kw):
        flags = {"task": "causal-lm", "model": str(tiny_gpt2), "train": str(path), **kw}
        return Task(resolve(flags, all_options(), task_defaults))

    empty = write_jsonl(tmp_path / "e.jsonl", [{"text": "the film was great"}, {"text": "  "}])
    with pytest.raises(LorafitError, match=r"e\.jsonl line 2: empty or non-text value in column 'text'"):
        task(empty).load_data()
    long_prompt = " ".join(["the film was great"] * 20)
    cut = write_jsonl(tmp_path / "p.jsonl", [{"prompt": long_prompt, "completion": " yes"}] * 2)
    with pytest.raises(LorafitError, match=r"p\.jsonl: no example has a target token within --max-length 8"):
        task(cut, max_length="8").load_data()
    train, _ = task(cut, max_length="200").load_data()  # long enough: the completion is kept
    assert len(train) == 2
