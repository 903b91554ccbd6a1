"""Data reading (csv/tsv/jsonl, errors with file and line), option merging, LoRA+ groups, embedded data."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lorafit.optim import is_lora_b, param_groups
from lorafit.train.data import read_table, take_samples
from lorafit.common.errors import LorafitError
from lorafit.jobs.options import load_yaml, resolve
from lorafit.train.options import OPTIONS, coerce, parse_targets


def _defaults(task):
    if task not in ("text-classification", "causal-lm"):
        raise LorafitError(f"--task: invalid value {task!r}")
    return {"lr_lora": 1e-3, "lr_full": 5e-5, "batch_size": 32, "max_length": 64}


# ---------------------------------------------------------------- data
def test_csv_quoting_and_line_numbers(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('text,label\n"a, quoted ""comma"" field",1\n"two\nlines",0\n\nplain,1\n', encoding="utf-8")
    t = read_table(p)
    assert t.columns == ["text", "label"]
    assert [r["text"] for _, r in t.rows] == ['a, quoted "comma" field', "two\nlines", "plain"]
    assert [line for line, _ in t.rows] == [2, 3, 6]  # the multi-line field spans lines 3-4; line 5 is blank


def test_tsv_bom_and_jsonl(tmp_path):
    tsv = tmp_path / "d.tsv"
    tsv.write_bytes("\ufeffsentence\tlabel\nit's fine\t1\n".encode())
    assert read_table(tsv).rows == [(2, {"sentence": "it's fine", "label": "1"})]
    js = tmp_path / "d.jsonl"
    js.write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": "x", "extra": 2}\n', encoding="utf-8")
    t = read_table(js)
    assert t.columns == ["text", "label", "extra"] and [line for line, _ in t.rows] == [1, 3]


@pytest.mark.parametrize(
    "name, content, expect",
    [
        ("bad.csv", b"text,label\nok,1\ncaf\xe9,0\n", "bad.csv line 3: not valid UTF-8"),
        ("bad.jsonl", b'{"text": "a"}\n{"text": \n', "bad.jsonl line 2: invalid JSON"),
        ("bad.jsonl", b"[1, 2]\n", "bad.jsonl line 1: expected a JSON object"),
        ("bad.csv", b"text,label\na,1,extra\n", "bad.csv line 2: 3 fields but the header has 2"),
        ("bad.txt", b"x", "unsupported format '.txt'"),
    ],
)
def test_read_errors_name_file_and_line(tmp_path, name, content, expect):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(LorafitError, match=expect.replace(".", r"\.").replace("(", r"\(")):
        read_table(p)


def test_missing_file_column_value_and_empty(tmp_path):
    with pytest.raises(LorafitError, match="nope.csv: no such file"):
        read_table(tmp_path / "nope.csv")
    p = tmp_path / "d.csv"
    p.write_text("text,label\nhello,1\nshort\n", encoding="utf-8")
    t = read_table(p)
    with pytest.raises(LorafitError, match=r"no column 'sentence' \(columns: text, label\)"):
        t.require("sentence")
    with pytest.raises(LorafitError, match="d.csv line 3: missing value in column 'label'"):
        t.require("text", "label")
    e = tmp_path / "e.csv"
    e.write_text("text,label\n", encoding="utf-8")
    with pytest.raises(LorafitError, match="e.csv: no data rows"):
        read_table(e).nonempty()


def test_take_samples_is_a_seeded_shuffle():
    rows = list(range(100))
    a, b, c = take_samples(rows, 10, 0), take_samples(rows, 10, 0), take_samples(rows, 10, 1)
    assert a == b and a != c and len(set(a)) == 10 and a != rows[:10]
    assert take_samples(rows, None, 0) == rows


def test_embedded_dataset_is_small_balanced_and_regenerates():
    from lorafit.data import DEFAULT_EVAL, DEFAULT_TRAIN
    from lorafit.data.generate import generate, to_csv

    train, evaluation = generate()
    assert DEFAULT_TRAIN.read_text(encoding="utf-8") == to_csv(train)
    assert DEFAULT_EVAL.read_text(encoding="utf-8") == to_csv(evaluation)
    assert DEFAULT_TRAIN.stat().st_size + DEFAULT_EVAL.stat().st_size < 1_000_000
    labels = [lab for _, lab in train]
    assert len(set(labels)) == 5 and max(labels.count(x) for x in set(labels)) < 0.25 * len(labels)
    assert not {t for t, _ in train} & {t for t, _ in evaluation}


# ------------------------------------------------------------- options
def test_coerce_rules():
    by = {o.key: o for o in OPTIONS}
    assert coerce(by["lr"], "3e-4", "--lr") == 3e-4
    assert coerce(by["grad_checkpointing"], "yes", "x") is True
    with pytest.raises(
        LorafitError, match=r"--precision: invalid value 'fp8' \(choose from fp32, bf16, fp16\)"
    ):
        coerce(by["precision"], "fp8", "--precision")
    with pytest.raises(LorafitError, match="--rank: must be >= 1, got 0"):
        coerce(by["rank"], "0", "--rank")
    with pytest.raises(LorafitError, match="--lr: must be > 0"):
        coerce(by["lr"], 0, "--lr")
    with pytest.raises(LorafitError, match="cfg.yaml: epochs: expected an integer, got 1.5"):
        coerce(by["epochs"], 1.5, "cfg.yaml: epochs")
    with pytest.raises(LorafitError, match="expected a number"):
        coerce(by["lr"], "nan", "--lr")


def test_resolve_layers_flags_win(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rank: 4\nlr: 0.01\nmax-length: 32\neval_before: false\n", encoding="utf-8")
    opts = resolve({"config": str(cfg), "rank": "2"}, OPTIONS, _defaults, base={"epochs": 3, "rank": 16})
    assert (opts["rank"], opts["lr"], opts["max_length"], opts["epochs"]) == (2, 0.01, 32, 3)
    assert opts["alpha"] == 4.0 and opts["eval_before"] is False and opts["batch_size"] == 32
    # lr follows --full-finetune when not given
    assert resolve({"full_finetune": True}, OPTIONS, _defaults)["lr"] == 5e-5
    assert resolve({}, OPTIONS, _defaults)["lr"] == 1e-3


def test_options_a_task_does_not_use_are_refused_only_when_set(tmp_path):
    from lorafit.jobs.train import prepare

    with pytest.raises(LorafitError, match=r"^--text-column does not apply to --task image-classification \("):
        prepare({"task": "image-classification", "text_column": "x"})
    cfg = tmp_path / "c.yaml"
    cfg.write_text("task: image-classification\nmax_length: 32\n", encoding="utf-8")
    with pytest.raises(LorafitError, match="--max-length does not apply"):
        prepare({"config": str(cfg)})
    # defaults of those keys are still present in the resolved options, and are not a user choice
    opts, _ = prepare({"task": "image-classification", "rank": "4"})
    assert opts["text_column"] == "text" and opts["rank"] == 4


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rank: 4\nwarp: 1\n", encoding="utf-8")
    with pytest.raises(LorafitError, match="bad.yaml: unknown option 'warp'"):
        load_yaml(bad, OPTIONS)
    bad.write_text("rank: [4\n", encoding="utf-8")  # a one-line file: the error is on line 1
    with pytest.raises(LorafitError, match=r"bad\.yaml line 1: invalid YAML \(expected ',' or '\]'"):
        load_yaml(bad, OPTIONS)
    with pytest.raises(LorafitError, match="missing.yaml: no such config file"):
        load_yaml(tmp_path / "missing.yaml", OPTIONS)


def test_parse_targets():
    assert parse_targets("query, key,value") == ["query", "key", "value"]
    assert parse_targets("attention.self.query") == ["attention.self.query"]
    assert parse_targets("all-linear") == "all-linear"
    assert parse_targets(r".*\.(query|value)") == r".*\.(query|value)"
    with pytest.raises(LorafitError, match="invalid regex"):
        parse_targets("(query")


# ----------------------------------------------------------------- LoRA+
def test_param_groups_lora_plus():
    import lorafit

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    lorafit.inject(model, lorafit.LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"]))
    groups = {g["name"]: g for g in param_groups(model, 1e-3, b_ratio=16, weight_decay=0.1)}
    names = {id(p): n for n, p in model.named_parameters()}
    b = [names[id(p)] for p in groups["lora_B"]["params"]]
    rest = [names[id(p)] for p in groups["default"]["params"]]
    assert b and all(n.endswith("lora_B") for n in b)
    assert any(n.endswith("lora_A") for n in rest) and any(n.startswith("2.modules_to_save") for n in rest)
    assert groups["lora_B"]["lr"] == pytest.approx(1.6e-2) and groups["default"]["lr"] == 1e-3
    assert groups["default"]["weight_decay"] == 0.1
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == n_trainable
    assert is_lora_b("base_model.model.q.lora_B.default.weight")
    # embedding adapters start with A = 0: their B is not LoRA+'s zero-initialised factor
    assert not is_lora_b("x.lora_A.default.weight") and not is_lora_b("emb.lora_embedding_B.default")
    # a torch optimizer takes the groups as they are
    torch.optim.AdamW(param_groups(model, 1e-3, 2.0), lr=1e-3)


def test_param_groups_embedding_adapters_get_their_own_lr():
    import lorafit

    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    lorafit.inject(model, lorafit.LoraConfig(r=2, target_modules=["0", "1"]))
    groups = {g["name"]: g for g in param_groups(model, 1e-3, b_ratio=16, embedding_lr=5e-4)}
    emb = {id(p) for p in model[0].adapters.parameters()}
    assert {id(p) for p in groups["lora_embedding"]["params"]} == emb
    assert groups["lora_embedding"]["lr"] == 5e-4
    assert not emb & {id(p) for p in groups["lora_B"]["params"]}
    default = {g["name"]: g for g in param_groups(model, 1e-3, b_ratio=16)}
    assert default["lora_embedding"]["lr"] == 1e-3
